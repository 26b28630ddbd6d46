"""Triton kernels, one module per kernel, each called through its torch-side entry point in memscale/kernels/.

Importing this package imports triton; `@triton.jit` decides at import whether a kernel is compiled for the GPU or
run by the CPU interpreter (`TRITON_INTERPRET=1`), so the variable must be set before the first import (the tests
set it when no GPU is present).
"""
