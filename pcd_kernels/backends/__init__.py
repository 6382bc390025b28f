"""Every op's backends, found through one registry.

A backend is a package here (``torch``, ``triton``, ``cuda``) with

* ``unavailable_reason(device) -> str | None``: why none of its kernels can run there (not
  installed, not built, wrong device), or None;
* ``DTYPES``: the input dtypes its kernels take (None: every float dtype);

and one module per op it implements, ``backends/<backend>/<op module>.py``, with

* ``limits(*, dtype, auto, **problem) -> str | None``: what it cannot take about this call's
  sizes ("takes ...; use ..."), or None; ``auto`` is True when ``backend="auto"`` asks, which may
  prefer another backend where this one would run but slower;
* ``forward(...)`` and ``backward(...)``: the implementations of the op's two ``torch.library``
  custom ops (their signatures are the custom ops', in ``ops/<op module>.py``, without
  ``backend``), or for a backend that is differentiable by itself the function the op calls;

``ops/<op module>.py`` registers its op, and reads: check the arguments, :func:`resolve` the
backend, call the custom op, which calls :func:`implementation`. docs/contributing.md says how to
add an op or a backend.
"""
import sys
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

BACKENDS = ("auto", "torch", "triton", "cuda")
# What backend="auto" tries on CUDA tensors, in order, before the torch backend. The CUDA
# extension is not among them until a GPU run shows it correct and faster than Triton.
_AUTO_ON_GPU = ("triton",)


@dataclass(frozen=True)
class Op:
    """One public op: its function's name, its module name under ``ops/`` and every backend
    package, and the backends that implement it."""
    name: str
    module: str
    backends: Tuple[str, ...]

    @property
    def custom_ops(self) -> Tuple[str, str]:
        """Its ``torch.library`` ops, forward and backward, under ``torch.ops.pcd_kernels``."""
        return f"{self.module}_forward", f"{self.module}_backward"


# Every op, by its public name, in the order pcd_kernels imports them: each ops/<op>.py registers
# its own (importing pcd_kernels, which imports this package first, fills it).
OPS = {}


def _loader(name: str):
    """A function returning the module ``name``, imported on first use. torch.compile traces the
    ops' backend resolution: it cannot follow importlib, but it follows an import statement, so
    each module's loader is one, written when the module becomes known (here and in register)."""
    namespace = {"sys": sys}
    exec(f"def load():\n    import {name}\n    return sys.modules[{name!r}]\n", namespace)
    return namespace["load"]


# Module name -> its loader: the backend packages, and each registered op's backend modules.
_LOADERS = {name: _loader(name) for name in (f"pcd_kernels.backends.{backend}" for backend in BACKENDS[1:])}


def register(op: Op) -> Op:
    """Add ``op`` to OPS (from its ops/<op>.py, at import)."""
    unknown = set(op.backends) - set(BACKENDS[1:])
    if unknown:
        raise ValueError(f"{op.name}: unknown backends {sorted(unknown)}")
    OPS[op.name] = op
    for backend in op.backends:
        name = f"pcd_kernels.backends.{backend}.{op.module}"
        _LOADERS[name] = _loader(name)
    return op


def implementation(op: str, backend: str):
    """The module of ``backend`` that implements ``op`` (imported on first use: importing
    pcd_kernels imports neither Triton nor the CUDA extension)."""
    return _module(f"pcd_kernels.backends.{backend}.{OPS[op].module}")


def _package(backend: str):
    return _module(f"pcd_kernels.backends.{backend}")


def _module(name: str):
    return _LOADERS[name]()


def dtypes(op: str, backend: str) -> Optional[Tuple[torch.dtype, ...]]:
    """The input dtypes ``backend`` takes for ``op`` (None: every float dtype): its package's
    ``DTYPES``, which every op of the backend takes. Imports no op module."""
    return _package(backend).DTYPES


def _backends_taking(op: str, backend: str, dtype: torch.dtype) -> str:
    """The other backends of ``op`` whose packages take ``dtype``, torch last, as "backend='a' or 'b'"
    (for an error message)."""
    others = [b for b in BACKENDS[1:] if b not in (backend, "torch") and b in OPS[op].backends
              and (dtypes(op, b) is None or dtype in dtypes(op, b))] + ["torch"]
    return "backend=" + " or ".join(repr(b) for b in others)


def unavailable(op: str, backend: str, device: torch.device, dtype: torch.dtype, auto: bool = False,
                **problem) -> Optional[Exception]:
    """The error an explicit request of ``backend`` for this call raises, or None when it runs:
    RuntimeError when the backend cannot run at all, TypeError for a dtype it does not take,
    ValueError for sizes beyond its limits."""
    if backend not in OPS[op].backends:
        return RuntimeError(f"{op}: backend={backend!r} cannot run: the {backend} backend does not implement this "
                            "op yet; use backend='triton' (GPU) or 'torch'")
    reason = _package(backend).unavailable_reason(device)
    if reason is not None:
        return RuntimeError(f"{op}: backend={backend!r} cannot run: {reason}")
    takes = dtypes(op, backend)
    if takes is not None and dtype not in takes:
        names = [str(d).replace("torch.", "") for d in takes]
        return TypeError(f"{op}: backend={backend!r} supports {', '.join(names[:-1])} and {names[-1]} inputs, got "
                         f"{dtype}; use {_backends_taking(op, backend, dtype)} for {dtype}")
    limit = implementation(op, backend).limits(dtype=dtype, auto=auto, **problem)
    return None if limit is None else ValueError(f"{op}: backend={backend!r} {limit}")


def resolve(op: str, backend: str, device: torch.device, dtype: torch.dtype, **problem) -> str:
    """The backend that runs this call of ``op``. ``"auto"``: the first of the GPU backends that
    takes it on CUDA tensors, else ``"torch"``; a named backend that cannot take it raises."""
    if backend == "auto":
        if device.type == "cuda":
            for candidate in _AUTO_ON_GPU:
                if unavailable(op, candidate, device, dtype, auto=True, **problem) is None:
                    return candidate
        return "torch"
    error = unavailable(op, backend, device, dtype, **problem)
    if error is not None:
        raise error
    return backend
