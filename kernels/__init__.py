"""Triton kernels, one file per op (installed as `vitfast.kernels`)."""
