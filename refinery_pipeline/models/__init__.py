"""Networks: the architecture registry, checkpoints read safely, ImageNet classes."""
