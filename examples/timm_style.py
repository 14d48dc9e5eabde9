"""A timm/torchvision-reference style loop: the store's crop as a PIL image to classic
post-crop transforms, dense soft targets built in the collate, soft-target cross entropy.

The store already fixes each crop (box, flip, size), so only post-crop augmentations belong in
the transform: no RandomResizedCrop. With timm installed, its RandomErasing is added.

    python examples/timm_style.py labels.zarr imagenet/train --epochs 2
"""
import argparse

import torch
import torchvision
from torch.utils.data import DataLoader
from torchvision import transforms

import refinery_pipeline as refinery


def train_one_epoch(model, loader, optimizer, device, limit_steps=0):
    model.train()
    total, steps = 0.0, 0
    for batch in loader:  # a CropBatch; targets are dense (B, C) distributions
        images, targets = batch.images.to(device), batch.targets.to(device)
        loss = refinery.soft_cross_entropy(model(images), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total, steps = total + loss.item(), steps + 1
        if steps == limit_steps:
            break
    return total / max(steps, 1)


parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("store"), parser.add_argument("data", help=".beton or ImageFolder tree")
parser.add_argument("--epochs", type=int, default=1)
parser.add_argument("--batch-size", type=int, default=64)
parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
parser.add_argument("--limit-steps", type=int, default=0, help="steps per epoch at most")
args = parser.parse_args()

store = refinery.open_store(args.store)
post_crop = [transforms.ColorJitter(0.4, 0.4, 0.4), transforms.ToTensor(),
             transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])]
try:
    from timm.data.random_erasing import RandomErasing
    post_crop.append(RandomErasing(0.25, mode="pixel", device="cpu"))
except ImportError:
    pass
dataset = refinery.StoreCropDataset(store, args.data, transforms.Compose(post_crop),
                                    crop_format="pil")
loader = DataLoader(dataset, args.batch_size, shuffle=True, num_workers=2, drop_last=True,
                    collate_fn=refinery.CropCollate(num_classes=store.num_classes))
model = torchvision.models.resnet18(num_classes=store.num_classes).to(args.device)
optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-5)
for epoch in range(args.epochs):
    dataset.set_epoch(epoch)
    loss = train_one_epoch(model, loader, optimizer, args.device, args.limit_steps)
    print(f"epoch {epoch}: mean loss {loss:.4f}", flush=True)
