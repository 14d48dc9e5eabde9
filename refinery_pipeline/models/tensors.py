"""Image tensors for a model: uint8 NHWC crops to normalized float NCHW input, and back."""
import torch

# ImageNet statistics in uint8 units: batches stay uint8 until they reach the device.
IMAGENET_NORMALIZATION = {"mean": [123.675, 116.28, 103.53], "std": [58.395, 57.12, 57.375]}


def to_pixels(images: torch.Tensor, device) -> torch.Tensor:
    """uint8 NHWC crops -> float NCHW pixel values (0-255) on ``device``."""
    return images.to(device, non_blocking=True).permute(0, 3, 1, 2).float()


def _stats(normalization, like: torch.Tensor):
    mean = torch.tensor(normalization["mean"], device=like.device).view(1, 3, 1, 1)
    std = torch.tensor(normalization["std"], device=like.device).view(1, 3, 1, 1)
    return mean, std


def normalize(pixels: torch.Tensor, normalization=IMAGENET_NORMALIZATION,
              channels_last: bool = True) -> torch.Tensor:
    """Float NCHW pixels -> the network's input (channels_last memory if asked)."""
    mean, std = _stats(normalization, pixels)
    x = (pixels - mean) / std
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x.contiguous()


def denormalize(x: torch.Tensor, normalization=IMAGENET_NORMALIZATION) -> torch.Tensor:
    """A network input back to float pixel values (the inverse of :func:`normalize`)."""
    mean, std = _stats(normalization, x)
    return x * std + mean


def to_model_input(images: torch.Tensor, device, normalization=IMAGENET_NORMALIZATION,
                   channels_last: bool = True) -> torch.Tensor:
    """uint8 NHWC crops -> normalised float NCHW on ``device`` (channels_last memory)."""
    return normalize(to_pixels(images, device), normalization, channels_last)
