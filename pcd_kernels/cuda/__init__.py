"""Host-side wrappers of the CUDA extension's kernels (``csrc/``, bound as ``pcd_kernels._C``):
one module per op, with the same forward/backward functions as ``pcd_kernels.triton``."""
