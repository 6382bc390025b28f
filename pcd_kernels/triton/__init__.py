"""Triton kernels, one module per operation. Imported lazily: importing pcd_kernels does not
import Triton, so TRITON_INTERPRET=1 can still be set before the kernels are first used."""
