"""Triton kernels, installed as ``virchow_fast.kernels``: one op per file."""
