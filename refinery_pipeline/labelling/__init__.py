"""Labelling: the refinery, precompute (local, torchrun, Ray), audits, copy checks."""
