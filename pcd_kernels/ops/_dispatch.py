"""What every op's dispatch shares: the backend registry (``pcd_kernels/backends``), the autocast
dtype, and calling a backend's implementation outside autocast (DESIGN.md section 4).

``"auto"`` picks, for CUDA tensors, the fastest built and tested GPU backend, and for CPU tensors
the chunked PyTorch backend. An explicitly requested backend that cannot run raises a
RuntimeError saying why (TypeError for a dtype it does not take, ValueError for sizes beyond its
limits), never a crash.
"""
from typing import Optional

import torch

from pcd_kernels.backends import BACKENDS, Op, implementation, register, resolve

__all__ = ["BACKENDS", "Op", "implementation", "register", "resolve", "autocast_dtype", "run_backend"]


def autocast_dtype(device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype when autocast is on for ``device``: the op then runs in it, as a matmul
    would."""
    try:
        # (meta tensors, on which frameworks build models, have no autocast: torch raises there)
        if torch.amp.is_autocast_available(device.type) and torch.is_autocast_enabled(device.type):
            return torch.get_autocast_dtype(device.type)
    except (TypeError, AttributeError):  # torch < 2.4: per-device autocast queries differ
        pass
    return None


def run_backend(op: str, backend: str, function: str, device: torch.device, *args):
    """Call ``function`` ("forward"/"backward") of ``backend``'s implementation of ``op``. Its
    inputs already are in the dtype to compute in; autocast must not recast the implementation's
    own float32 accumulations."""
    fn = getattr(implementation(op, backend), function)
    if not torch.amp.is_autocast_available(device.type):
        return fn(*args)
    with torch.autocast(device.type, enabled=False):
        return fn(*args)
