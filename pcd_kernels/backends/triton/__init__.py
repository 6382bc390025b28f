"""The Triton backend: one module of kernels per op, shared helpers in ``_common``. Imported
lazily: importing pcd_kernels does not import Triton, so TRITON_INTERPRET=1 can still be set
before the kernels are first used. This module itself never imports Triton."""
import importlib.util
from typing import Optional

import torch

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Looked up once: torch.compile (before torch 2.12) cannot trace importlib calls.
_INSTALLED = importlib.util.find_spec("triton") is not None


def unavailable_reason(device: torch.device) -> Optional[str]:
    """Why the Triton kernels cannot run on ``device``, or None when they can."""
    if not _INSTALLED:
        return ("Triton is not installed (pip install 'pcd_kernels[triton]', or pip install triton; it ships "
                "for Linux)")
    if device.type == "cuda":
        return None
    from pcd_kernels.backends.triton._common import is_interpreter

    if device.type == "cpu" and is_interpreter():
        return None
    return (f"the Triton kernels need CUDA tensors, got {device.type} tensors (Triton's CPU "
            "interpreter runs them when TRITON_INTERPRET=1 is set before pcd_kernels' Triton "
            "kernels are first imported; it is slow and meant for tests)")
