"""Shared test helpers: devices, backends and the DESIGN.md 5 comparison rule."""
import os

import pytest
import torch

CUDA = torch.cuda.is_available()
INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"

# Absolute floor of the comparison rule, relative to the reference's largest magnitude.
FLOOR = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def devices():
    """cpu always; cuda when present (a skip says why otherwise)."""
    return ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not CUDA, reason="no CUDA device"))]


def backend_cases(with_cuda=True):
    """(backend, device, dtype) cases every op test runs; ``with_cuda`` adds the CUDA extension's
    (for the ops it implements)."""
    cases = []
    for device in ("cpu", "cuda"):
        no_device = device == "cuda" and not CUDA
        for dtype in (torch.float64, torch.float32, torch.float16, torch.bfloat16):
            marks = [pytest.mark.skipif(no_device, reason="no CUDA device")]
            cases.append(pytest.param("torch", device, dtype, marks=marks,
                                      id=f"torch-{device}-{str(dtype)[6:]}"))
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            reason = None
            if no_device:
                reason = "no CUDA device"
            elif device == "cpu" and not INTERPRETER:
                reason = "Triton runs on CUDA tensors here (TRITON_INTERPRET is off)"
            elif device == "cpu" and dtype == torch.bfloat16:
                reason = "bfloat16 gives wrong numbers in Triton's CPU interpreter; checked on CUDA"
            marks = [pytest.mark.skipif(reason is not None, reason=reason or "")]
            cases.append(pytest.param("triton", device, dtype, marks=marks,
                                      id=f"triton-{device}-{str(dtype)[6:]}"))
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            if device == "cpu" or not with_cuda:
                continue  # backend='cuda' on CPU tensors is an error, tested in test_build.py
            reason = "no CUDA device" if no_device else cuda_extension_missing()
            marks = [pytest.mark.skipif(reason is not None, reason=reason or "")]
            cases.append(pytest.param("cuda", device, dtype, marks=marks, id=f"cuda-{device}-{str(dtype)[6:]}"))
    return cases


def cuda_extension_missing():
    """Why backend='cuda' cannot run here (extension not built), or None."""
    from pcd_kernels.backends.cuda import _extension

    return None if _extension.is_built() else f"pcd_kernels._C not built: {_extension.unavailable_reason()}"


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
            f"{name}: max error {worst:.3g} > bound {bound:.3g} (2 x plain-{str(dtype)[6:]} error "
            f"{float(err_plain):.3g} + floor {FLOOR[dtype]:g} x {scale:.3g}); {int(bad.sum())} of "
            f"{flat.numel()} elements beyond it:\n" + "\n".join(rows))
