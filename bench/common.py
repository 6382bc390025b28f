"""What every benchmark module shares with the harness: the fields every case has, counts per
mode, the inputs every distillation loss takes, and the registry of ops."""
from dataclasses import dataclass


@dataclass(frozen=True)
class MapCase:
    """A case on a batch of (channels x height x width) maps; each op's ``Case`` adds its own
    fields (and ``sweep``, the size a sweep case varies, "" for a fixed case, and ``x``, that
    size's value)."""
    name: str
    batch: int
    channels: int
    height: int
    width: int

    @property
    def map_elements(self) -> int:
        """B*C*H*W: the elements of one batch of maps."""
        return self.batch * self.channels * self.height * self.width

    @property
    def maps(self) -> str:
        """The maps' sizes, for describe()."""
        return f"B={self.batch} C={self.channels} {self.height}x{self.width}"


def by_mode(mode: str, forward, backward):
    """A count (FLOPs, exps, bytes) for ``mode``: the forward's, the backward's, or their sum, "total"."""
    return {"forward": forward, "backward": backward, "total": forward + backward}[mode]


def student_and_teacher(case: MapCase, device: str, dtype, generator):
    """A (B, C, H, W) student map that requires grad and a teacher map related to it (the student
    plus as much noise), drawn from ``generator``."""
    import torch

    shape = (case.batch, case.channels, case.height, case.width)
    student = torch.randn(shape, generator=generator).to(device, dtype).requires_grad_()
    teacher = (student.detach().float() + torch.randn(shape, generator=generator).to(device)).to(dtype)
    return student, teacher


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
