"""autoprune: automated multi-objective pruning search for PyTorch models."""

__version__ = "0.1.0"
