"""Triton kernels of acf-fast, imported as ``acf_fast.kernels``.

One module per fused computation, each with its kernels, launch function and
autograd.Function (Liger-Kernel's layout). Importing this package does not
import triton; the modules that define kernels do.
"""
