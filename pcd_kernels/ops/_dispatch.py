"""Backend selection shared by every op (DESIGN.md section 4).

``"auto"`` picks, for CUDA tensors, the fastest built and tested GPU backend, and for CPU tensors
the chunked PyTorch backend. An explicitly requested backend that cannot run raises a
RuntimeError saying why, never a crash.
"""
import importlib.util
from typing import Optional

import torch

BACKENDS = ("auto", "torch", "triton", "cuda")
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Looked up once: torch.compile (before torch 2.12) cannot trace importlib calls.
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def triton_unavailable_reason(device: torch.device) -> Optional[str]:
    """Why the Triton kernels cannot run on ``device``, or None when they can."""
    if not _TRITON_INSTALLED:
        return ("Triton is not installed (pip install 'pcd_kernels[triton]', or pip install triton; it ships "
                "for Linux)")
    if device.type == "cuda":
        return None
    from pcd_kernels.triton.pixel_contrastive import is_interpreter

    if device.type == "cpu" and is_interpreter():
        return None
    return (f"the Triton kernels need CUDA tensors, got {device.type} tensors (Triton's CPU "
            "interpreter runs them when TRITON_INTERPRET=1 is set before pcd_kernels' Triton "
            "kernels are first imported; it is slow and meant for tests)")


def resolve_backend(op: str, backend: str, device: torch.device, dtype: torch.dtype,
                    cuda_kernel: bool = False) -> str:
    """The backend that will run ``op``; raises RuntimeError/TypeError if the requested one cannot."""
    if backend == "auto":
        if device.type == "cuda" and dtype in TRITON_DTYPES and triton_unavailable_reason(device) is None:
            return "triton"
        return "torch"
    if backend == "triton":
        reason = triton_unavailable_reason(device)
        if reason is not None:
            raise RuntimeError(f"{op}: backend='triton' cannot run: {reason}")
        if dtype not in TRITON_DTYPES:
            raise TypeError(f"{op}: backend='triton' supports float16, bfloat16 and float32 inputs, "
                            f"got {dtype}; use backend='torch' for {dtype}")
        return "triton"
    if backend == "cuda":
        from pcd_kernels import _cuda

        if not _cuda.is_built():
            raise RuntimeError(f"{op}: backend='cuda' cannot run: {_cuda.unavailable_reason()}")
        if not cuda_kernel:
            raise RuntimeError(f"{op}: backend='cuda' cannot run: the CUDA extension does not "
                               "implement this op yet; use backend='triton' (GPU) or 'torch'")
        if device.type != "cuda":
            raise RuntimeError(f"{op}: backend='cuda' needs CUDA tensors, got {device.type} tensors")
        return "cuda"
    return backend


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


def run_without_autocast(device: torch.device, fn, *args):
    """Call a backend implementation. Its inputs already are in the dtype to compute in; autocast
    must not recast the implementation's own float32 accumulations."""
    if not torch.amp.is_autocast_available(device.type):
        return fn(*args)
    with torch.autocast(device.type, enabled=False):
        return fn(*args)
