"""The test kit: devices, the (backend, device, dtype) cases of every op (read from the registry,
``pcd_kernels.backends.OPS``), running an op with its gradients, and the DESIGN.md 5 comparison
rule against a float64 reference."""
import importlib
import os
from dataclasses import dataclass
from typing import Callable, Sequence

import pytest
import torch

import pcd_kernels
from pcd_kernels.backends import OPS, implementation
from pcd_kernels.backends import dtypes as backend_dtypes

CUDA = torch.cuda.is_available()
INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"
DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)

# Absolute floor of the comparison rule, relative to the reference's largest magnitude.
FLOOR = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def devices():
    """cpu always; cuda when present (a skip says why otherwise)."""
    return ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not CUDA, reason="no CUDA device"))]


def _dtype_name(dtype):
    return str(dtype)[6:]


def _backend_package(backend):
    return importlib.import_module(f"pcd_kernels.backends.{backend}")


def _skip_reason(backend, device, dtype):
    """Why (backend, device, dtype) cannot run here, or None."""
    if device == "cuda" and not CUDA:
        return "no CUDA device"
    reason = _backend_package(backend).unavailable_reason(torch.device(device))
    if reason is None and backend == "triton" and device == "cpu" and dtype == torch.bfloat16:
        reason = "bfloat16 gives wrong numbers in Triton's CPU interpreter; checked on CUDA"
    return reason


def backend_cases(op, dtypes=DTYPES, backends=None, devices=("cpu", "cuda"), every_backend=False):
    """The (backend, device, dtype) cases of ``op`` (a name in ``pcd_kernels.backends.OPS``): every
    backend the registry lists for it, on each of ``devices``, in each of ``dtypes`` the backend
    takes for it (the registry's: the CUDA ops take float16 and bfloat16 only); ``backends`` keeps
    only those named. With ``every_backend``, a backend
    that takes none of ``dtypes`` is in with the first dtype it takes (CUDA's pixel_contrastive_loss
    in float16 where ``dtypes`` is float32 alone): for tests whose error bounds follow the dtype. A
    case that cannot run here is skipped with the reason. backend='cuda' has no CPU case: on CPU
    tensors it is an error (tested in test_build.py). Ids read ``<backend>-<device>-<dtype>`` (make
    gpu-smoke selects by them)."""
    cases = []
    for device in devices:
        for backend in OPS[op].backends:
            if (backends is not None and backend not in backends) or (backend == "cuda" and device == "cpu"):
                continue
            takes = backend_dtypes(op, backend)
            wanted = dtypes
            if every_backend and takes is not None and not set(takes) & set(dtypes):
                wanted = takes[:1]
            for dtype in wanted:
                if takes is not None and dtype not in takes:
                    continue
                reason = _skip_reason(backend, device, dtype)
                cases.append(pytest.param(backend, device, dtype, id=f"{backend}-{device}-{_dtype_name(dtype)}",
                                          marks=pytest.mark.skipif(reason is not None, reason=reason or "")))
    return cases


def op_cases(dtypes=(torch.float32,)):
    """(op, backend, device, dtype) over every op of the registry: :func:`backend_cases` of each,
    every backend in (``every_backend``)."""
    cases = [(op, case) for op in OPS for case in backend_cases(op, dtypes, every_backend=True)]
    return [pytest.param(op, *case.values, marks=case.marks, id=f"{op}-{case.id}") for op, case in cases]


def cuda_extension_missing():
    """Why backend='cuda' cannot run here (extension not built), or None."""
    from pcd_kernels.backends.cuda import _extension

    return None if _extension.is_built() else f"pcd_kernels._C not built: {_extension.unavailable_reason()}"


def run(fn, inputs, dtype, device, grads=None, weight=None, **kwargs):
    """``fn(*inputs, **kwargs)`` on ``inputs`` cast to (device, dtype) (None passes through; tensors
    among ``kwargs``, e.g. a mask, are moved only), and the gradients of sum(weight * result)
    w.r.t. the inputs ``grads`` flags (default: every input), None for the others."""
    grads = (True,) * len(inputs) if grads is None else grads
    leaves = [x.to(device=device, dtype=dtype).requires_grad_(g) if x is not None else None
              for x, g in zip(inputs, grads)]
    kwargs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    out = fn(*leaves, **kwargs)
    weight = torch.ones(()) if weight is None else weight
    wanted = [x for x in leaves if x is not None and x.requires_grad]
    got = iter(torch.autograd.grad((out * weight.to(device=device, dtype=out.dtype)).sum(), wanted,
                                   allow_unused=True) if wanted else [])
    return out, [next(got) if x is not None and x.requires_grad else None for x in leaves]


def check_against_reference(op, formula, inputs, backend, device, dtype, *, grads=None, weight=None,
                            names=None, out_dtype=None, plain_dtype=None, plain_device="cpu",
                            result_scale=0.0, grad_scale=0.0, **kwargs):
    """The public ``op`` (a name in ``OPS``) on ``backend``, ``device`` and ``dtype``, forward and the
    gradients :func:`run` takes, against ``formula`` (the reference, with the same arguments,
    ``backend`` aside) in float64 on the CPU, with the error bound of :func:`assert_close` set by
    ``formula`` in plain PyTorch: on the inputs rounded to ``dtype``, computed in ``plain_dtype``
    (default ``dtype``; float64 where PyTorch has no kernel in ``dtype``) on ``plain_device``
    ("cpu", or "device" for the case's). The result must come out in ``out_dtype`` (default
    float32, float64 for float64 inputs) and each gradient in ``dtype`` and the input's shape;
    ``result_scale`` and ``grad_scale`` are assert_close's ``scale`` of the result and of the
    gradients; ``names`` name the inputs in messages."""
    names = names or [f"input {i}" for i in range(len(inputs))]
    out_dtype = out_dtype or torch.promote_types(dtype, torch.float32)
    plain_dtype = plain_dtype or dtype
    plain_device = device if plain_device == "device" else plain_device
    rounded = [x.to(dtype) if x is not None else None for x in inputs]
    ref, ref_grads = run(formula, inputs, torch.float64, "cpu", grads, weight, **kwargs)
    plain, plain_grads = run(formula, rounded, plain_dtype, plain_device, grads, weight, **kwargs)
    ours, our_grads = run(getattr(pcd_kernels, op), inputs, dtype, device, grads, weight, backend=backend, **kwargs)
    assert ours.dtype == out_dtype, f"{op}: result dtype {ours.dtype}, expected {out_dtype}"
    assert_close(op, ours.cpu(), plain.cpu(), ref, dtype, scale=result_scale)
    for name, g, g_plain, g_ref, x in zip(names, our_grads, plain_grads, ref_grads, inputs):
        if g_ref is None:
            assert g is None, f"{name} got a gradient it did not ask for"
            continue
        assert g.dtype == dtype and g.shape == x.shape, f"d{name}: {g.dtype} {tuple(g.shape)}"
        assert_close(f"d{name}", g.cpu(), g_plain.cpu(), g_ref, dtype, scale=grad_scale)


def assert_close(name, ours, plain, reference, dtype, scale=0.0):
    """DESIGN.md 5: |ours - ref| <= 2 |plain - ref| + floor, ref in float64, plain = naive PyTorch
    in ``dtype``. The floor is FLOOR[dtype] times the larger of the reference's magnitude and
    ``scale``, the size of the terms the result is a sum of (a saturated softmax makes a gradient
    ~0 while its terms, recomputed in ``dtype``, keep their rounding). Prints the worst elements
    when it fails."""
    assert ours.shape == reference.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(reference.shape)}"
    if reference.numel() == 0:
        return
    ref = reference.detach().double()
    err = (ours.detach().double() - ref).abs()
    err_plain = (plain.detach().double() - ref).abs().max() if plain is not None else 0.0
    scale = max(ref.abs().max().item() if ref.numel() else 0.0, scale, 1e-30)
    bound = 2 * float(err_plain) + FLOOR[dtype] * scale
    worst = err.max().item() if err.numel() else 0.0
    if not worst <= bound:  # also fails on NaN
        flat = err.flatten()
        bad = (flat > bound) | flat.isnan()
        idx = flat.argsort(descending=True)[:5] if not flat.isnan().any() else bad.nonzero().flatten()[:5]
        rows = [f"  at {tuple(int(i) for i in torch.unravel_index(k, err.shape))}: ours "
                f"{ours.detach().flatten()[k].item():.6g} ref {ref.flatten()[k].item():.6g}" for k in idx]
        raise AssertionError(
            f"{name}: max error {worst:.3g} > bound {bound:.3g} (2 x plain-{_dtype_name(dtype)} error "
            f"{float(err_plain):.3g} + floor {FLOOR[dtype]:g} x {scale:.3g}); {int(bad.sum())} of "
            f"{flat.numel()} elements beyond it:\n" + "\n".join(rows))


# ------------------------------------------------------------------------------------------------
# Calls of each op's torch.library custom ops, read by the opcheck tests (test_compile.py) and the
# allocation tests (test_memory.py): each op's test file builds its own (its SMALL_CALLS). A backend
# module's forward/backward take the custom ops' arguments without ``backend``
# (pcd_kernels/backends/__init__.py).
# ------------------------------------------------------------------------------------------------


@dataclass
class OpCall:
    """``forward``: the forward custom op's arguments, ``backend`` left out; ``backward(outputs)``:
    the backward custom op's, given the forward's outputs, ``backend`` and the needs flags left
    out; ``needs``: the needs flags to call it with (each tuple a call); ``public(backend)``: the
    public op on the same problem, forward and backward; ``naive()``: the reference formula,
    forward and backward; ``matrix``: elements of the (anchors x keys) matrix it stores;
    ``torch_chunks``: the torch backend's chunk settings (module, attribute, value) that keep its
    chunks well below that matrix; ``backward_options``: keyword sets to call the torch backend's
    backward with (each a call)."""
    forward: tuple
    backward: Callable
    needs: Sequence[tuple]
    public: Callable
    naive: Callable
    matrix: int
    torch_chunks: Sequence[tuple] = ()
    backward_options: Sequence[dict] = ({},)


def leaves(device, dtype, *shapes):
    return [torch.randn(shape).to(device, dtype).requires_grad_() for shape in shapes]


def detached(args):
    return tuple(x.detach() if isinstance(x, torch.Tensor) else x for x in args)


def forward_and_backward(out, *inputs):
    torch.autograd.grad(out.sum(), [x for x in inputs if x is not None and x.requires_grad])


def op_test_entry(op, name, what):
    """``name``, which every op's test file, ``tests/test_<op module>.py``, defines for the shared
    tests (``what`` says what it is): the test files are found from the registry, so a new op
    edits no shared table. The module is the one pytest imported (it imports test files by their
    base name, tests/ on sys.path)."""
    path = f"tests/test_{OPS[op].module}.py"
    try:
        module = importlib.import_module(f"test_{OPS[op].module}")
    except ModuleNotFoundError as e:
        if e.name != f"test_{OPS[op].module}":
            raise
        raise LookupError(f"{op}: no test file {path}; every op of the registry has one, defining {name}") from None
    if not hasattr(module, name):
        raise LookupError(f"{op}: {path} defines no {name}; add {name} = {what} (see tests/test_pixel_attention.py)")
    return getattr(module, name)


def op_calls(op, device, dtype, large=False):
    """Every :class:`OpCall` of ``op``: small problems, or ``large`` ones whose (anchors x keys)
    matrix is far larger than their inputs."""
    build, variants = op_test_entry(op, "SMALL_CALLS", "(an OpCall builder (device, dtype, large=False, "
                                    "**variant), [the variant keyword sets, {} for one])")
    return [build(device, dtype, large, **variant) for variant in variants]


def through_custom_ops(op, backend):
    """Whether ``backend`` runs ``op`` through its custom ops: a backend that is differentiable by
    itself (SDPA for pixel_attention's torch backend) has no forward/backward."""
    try:
        return hasattr(implementation(op, backend), "forward")
    except ImportError:  # not installed or not built: the case is skipped, saying why
        return True
