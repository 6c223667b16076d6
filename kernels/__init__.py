"""Triton kernels (fastjanus.kernels). Empty until the kernels issue lands; every op has a plain-torch path."""
