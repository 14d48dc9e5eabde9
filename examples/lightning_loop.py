"""PyTorch Lightning on a label store: ``set_epoch`` goes in ``on_train_epoch_start``.

Lightning calls it before iterating the epoch's loader (a run resumed at epoch e iterates once
before it: build the data set with ``epoch=e`` there); under DDP it sets its sampler's epoch.

    python examples/lightning_loop.py labels.zarr imagenet/train --epochs 2
"""
import argparse

import lightning as L
import torch
import torchvision
from torch.utils.data import DataLoader
from torchvision.transforms import v2

import refinery_pipeline as refinery

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("store"), parser.add_argument("data", help=".beton or ImageFolder tree")
parser.add_argument("--epochs", type=int, default=1)
parser.add_argument("--batch-size", type=int, default=64)
parser.add_argument("--limit-steps", type=int, default=0, help="steps per epoch at most")
args = parser.parse_args()


class Student(L.LightningModule):
    def __init__(self, store, data):
        super().__init__()
        self.num_classes, self.losses = store.num_classes, []
        self.dataset = refinery.StoreCropDataset(store, data, v2.Compose([
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])]))
        self.model = torchvision.models.resnet18(num_classes=self.num_classes)

    def train_dataloader(self):
        return DataLoader(self.dataset, args.batch_size, shuffle=True, num_workers=2,
                          drop_last=True, collate_fn=refinery.CropCollate())

    def on_train_epoch_start(self):
        self.dataset.set_epoch(self.current_epoch)  # which stored crop each image replays

    def training_step(self, batch, batch_index):
        targets = refinery.dense_targets(batch.targets, self.num_classes, device=self.device)
        loss = refinery.kl_divergence(self.model(batch.images), targets)
        self.losses.append(loss.detach())
        return loss

    def on_train_epoch_end(self):
        mean = torch.stack(self.losses).mean().item()
        print(f"epoch {self.current_epoch}: mean loss {mean:.4f}", flush=True)
        self.losses.clear()

    def configure_optimizers(self):
        return torch.optim.SGD(self.model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-5)


quiet = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False)
trainer = L.Trainer(max_epochs=args.epochs, limit_train_batches=args.limit_steps or 1.0, **quiet)
trainer.fit(Student(refinery.open_store(args.store), args.data))
