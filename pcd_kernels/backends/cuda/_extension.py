"""Loads the compiled CUDA extension ``pcd_kernels._C`` and says plainly why it is unavailable.

Importing pcd_kernels never fails because the extension is missing: the torch and Triton
backends do not need it. Code that does need it calls :func:`extension` and gets a RuntimeError
that explains what is wrong and how to build it.
"""
import importlib
from typing import Optional

_BUILD_HINT = (
    "Build it with nvcc (CUDA 12+) on PATH or CUDA_HOME set: "
    "`pip install -e . --no-build-isolation` in the pcd_kernels checkout "
    "(PCD_KERNELS_CUDA_ARCHS overrides the default '80;90a')."
)

_module = None
_error: Optional[str] = None


def _load():
    global _module, _error
    if _module is not None or _error is not None:
        return
    try:
        _module = importlib.import_module("pcd_kernels._C")
    except ImportError as exc:
        _error = (f"the CUDA extension pcd_kernels._C is not built ({exc}); the package was "
                  "installed without it (nvcc not found or PCD_KERNELS_NO_CUDA=1 at install "
                  f"time). {_BUILD_HINT}")


def is_built() -> bool:
    """True when the compiled extension can be imported (it may still find no GPU)."""
    _load()
    return _module is not None


def unavailable_reason() -> Optional[str]:
    """Why the extension cannot be imported, or None when it can."""
    _load()
    return _error


def extension():
    """The compiled module; raises RuntimeError saying why when it is missing."""
    _load()
    if _module is None:
        raise RuntimeError(_error)
    return _module


def probe(device=None) -> int:
    """Run the extension's self-test kernel on ``device`` (default: the current CUDA device).

    Returns 42 when the build carries code for this GPU and launches work; raises RuntimeError
    naming the failing CUDA step otherwise.
    """
    import torch

    ext = extension()
    if not torch.cuda.is_available():
        raise RuntimeError("pcd_kernels._C is built, but torch sees no CUDA device")
    device = torch.device("cuda", torch.cuda.current_device()) if device is None else torch.device(device)
    stream = torch.cuda.current_stream(device).cuda_stream
    return ext.probe(device.index if device.index is not None else 0, stream, 41)


# Element types the kernels are instantiated for, as the launchers number them (csrc/'s DType,
# exported as _C.DType; tests/test_csrc.py checks that both agree).
DTYPE_CODES = {"float32": 0, "float16": 1, "bfloat16": 2}

# Elements of the kernels' 16-byte asynchronous copies (csrc/include/pcd_kernels/cute_tiles.cuh
# kVec): the rows they read start 16-byte aligned and hold a multiple of this many elements.
ROW_ALIGN = 8


def aligned_row_length(elements: int) -> int:
    """``elements`` rounded up to a multiple of ROW_ALIGN: the length of a row the kernels read."""
    return -(-elements // ROW_ALIGN) * ROW_ALIGN


def dtype_code(tensor) -> int:
    """The launchers' code for ``tensor``'s dtype; TypeError for one the kernels do not take."""
    name = str(tensor.dtype).replace("torch.", "")
    if name not in DTYPE_CODES:
        raise TypeError(f"backend='cuda' supports float32, float16 and bfloat16 tensors, got {tensor.dtype}")
    return DTYPE_CODES[name]


def stream_of(tensor) -> int:
    """The cudaStream_t (as an integer) torch is using on ``tensor``'s device right now."""
    import torch

    return torch.cuda.current_stream(tensor.device).cuda_stream


def device_index(tensor) -> int:
    """The CUDA device ordinal of ``tensor`` (the current device for a bare "cuda" device)."""
    import torch

    index = tensor.device.index
    return index if index is not None else torch.cuda.current_device()


def pointer(tensor) -> int:
    """``tensor``'s device address for a launcher's field; 0 (absent) for None."""
    return tensor.data_ptr() if tensor is not None else 0


def struct(cls, **fields):
    """An instance of the extension's struct ``cls`` (every field 0) with ``fields`` set by name;
    a name the C++ struct does not declare raises AttributeError."""
    instance = cls()
    for name, value in fields.items():
        setattr(instance, name, value)
    return instance


def params(cls, tensor, **fields):
    """An op's launch parameters ``cls`` (``_C.<Op>Params``, declared in ``csrc/include/pcd_kernels/<op>.h``)
    for a launch on ``tensor``'s device and current stream in its dtype, with ``fields`` set by name."""
    return struct(cls, device=device_index(tensor), stream=stream_of(tensor), dtype=dtype_code(tensor), **fields)
