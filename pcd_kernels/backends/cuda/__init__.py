"""The CUDA backend: host-side wrappers (one module per op) of the compiled extension's kernels
(``csrc/``, bound as ``pcd_kernels._C``, loaded by ``_extension``). ``backend="auto"`` does not
choose it until a GPU run shows it correct and faster than the Triton backend."""
from typing import Optional

import torch

from pcd_kernels.backends.cuda import _extension

# The kernels copy their tiles 16 bytes (8 half-precision elements) at a time, asynchronously:
# float32 inputs go to the Triton or torch backends.
DTYPES = (torch.float16, torch.bfloat16)


def unavailable_reason(device: torch.device) -> Optional[str]:
    """Why the extension's kernels cannot run on ``device``, or None when they can."""
    if not _extension.is_built():
        return _extension.unavailable_reason()
    if device.type != "cuda":
        return f"it needs CUDA tensors, got {device.type} tensors"
    return None
