"""The same training loop on the FFCV backend: ``refinery.replay_loader``.

FFCV decodes each image's stored crop for the epoch in its own threads and hands uint8 NHWC
batches with the stored top-k labels; the loop normalizes them to float NCHW on the device,
expands the labels to dense targets there, and trains with KL divergence. FFCV reuses its batch
buffers: ``.clone()`` any tensor of a batch kept beyond its step (a kept view changes).

    python examples/ffcv_loop.py labels.zarr imagenet_train.beton --epochs 2
"""
import argparse

import torch
import torchvision

import refinery_pipeline as refinery

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("store"), parser.add_argument("data", help=".beton or ImageFolder tree")
parser.add_argument("--epochs", type=int, default=1)
parser.add_argument("--batch-size", type=int, default=64)
parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
parser.add_argument("--limit-steps", type=int, default=0, help="steps per epoch at most")
args = parser.parse_args()

store = refinery.open_store(args.store)
num_classes = store.num_classes
loader = refinery.replay_loader(store, args.data, args.batch_size, num_workers=2, seed=0)
mean = torch.tensor([0.485, 0.456, 0.406], device=args.device).view(1, 3, 1, 1) * 255
std = torch.tensor([0.229, 0.224, 0.225], device=args.device).view(1, 3, 1, 1) * 255
model = torchvision.models.resnet18(num_classes=num_classes).to(args.device)
model = model.to(memory_format=torch.channels_last)
optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-5)

for epoch in range(args.epochs):
    loader.set_epoch(epoch)  # which stored crop each image replays (and the shuffle)
    total, steps = 0.0, 0
    for batch in loader:  # its tensors are overwritten a few batches on: clone what you keep
        # (B, S, S, 3) uint8 -> (B, 3, S, S) float; permute keeps NHWC memory (channels_last)
        images = batch.images.to(args.device, non_blocking=True).permute(0, 3, 1, 2)
        images = (images.float() - mean) / std
        targets = refinery.dense_targets(batch.targets, num_classes, device=args.device)
        loss = refinery.kl_divergence(model(images), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total, steps = total + loss.item(), steps + 1
        if steps == args.limit_steps:
            break
    print(f"epoch {epoch}: mean loss {total / max(steps, 1):.4f}", flush=True)
