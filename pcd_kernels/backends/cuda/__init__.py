"""The CUDA backend: host-side wrappers (one module per op) of the compiled extension's kernels
(``csrc/``, bound as ``pcd_kernels._C``, loaded by ``_extension``). ``backend="auto"`` does not
choose it until a GPU run shows it correct and faster than the Triton backend."""
from typing import Optional

import torch

from pcd_kernels.backends.cuda import _extension

DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def unavailable_reason(device: torch.device) -> Optional[str]:
    """Why the extension's kernels cannot run on ``device``, or None when they can."""
    if not _extension.is_built():
        return _extension.unavailable_reason()
    if device.type != "cuda":
        return f"it needs CUDA tensors, got {device.type} tensors"
    return None
