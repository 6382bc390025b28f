"""What every benchmark module shares with the harness."""


class Unavailable(Exception):
    """A provider that cannot run here; the message says why."""


def triton_reason(device: str):
    """Why the Triton kernels cannot run on ``device`` here, or None when they can."""
    if device != "cuda":
        return "the Triton kernels need CUDA tensors (the CPU interpreter is for tests)"
    import torch

    from pcd_kernels.backends import triton

    return triton.unavailable_reason(torch.device(device))


def require_triton(device: str) -> None:
    """Raise Unavailable unless the Triton kernels can run on ``device``."""
    reason = triton_reason(device)
    if reason is not None:
        raise Unavailable(reason)


def cuda_extension_reason(device: str):
    """Why backend='cuda' cannot run on ``device`` here, or None when it can."""
    if device != "cuda":
        return "the CUDA extension's kernels need CUDA tensors"
    import torch

    from pcd_kernels.backends import cuda

    return cuda.unavailable_reason(torch.device(device))


def registry():
    """pcd_kernels' registry of ops, ``pcd_kernels.backends.OPS`` (public name -> Op), which fills
    as ``import pcd_kernels`` imports each op."""
    import pcd_kernels

    return pcd_kernels.backends.OPS


def op_modules():
    """The benchmark module of every op of the registry, ``bench/<op module>.py``, by that module
    name, in the registry's order."""
    import importlib

    return {op.module: importlib.import_module(op.module) for op in registry().values()}
