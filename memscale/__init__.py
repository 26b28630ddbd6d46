"""memscale: pretraining stack for memory-augmented transformers."""

__version__ = "0.1.0"
