"""Loaders that replay a store's crops: FFCV and plain PyTorch, joined by key."""
