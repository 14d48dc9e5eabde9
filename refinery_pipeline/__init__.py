"""refinery: offline Label Refinery labels, stored once and replayed by an FFCV loader."""
__version__ = "0.1.0"
