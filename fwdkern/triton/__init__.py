"""Triton kernels. Importing this package needs triton; fwdkern imports it lazily."""
