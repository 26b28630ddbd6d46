"""Fused and memory-lean kernels, each with a plain PyTorch reference and a test against it."""
