"""The fused paths never allocate an (anchors x keys) tensor; the torch backend's peak memory
stays within the issue's bound (measured in a subprocess, so nothing else shares the peak)."""
import json
import subprocess
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from _helpers import CUDA, INTERPRETER
from pcd_kernels.backends.torch import _common as torch_common
from pcd_kernels.backends.torch import pixel_contrastive as torch_backend
from pcd_kernels import reference
from pcd_kernels.reference import naive_pixel_contrastive_loss


class LargestAllocation(TorchDispatchMode):
    """Records the largest number of elements of any tensor an op creates."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def _inputs(negatives):
    B, C, H, W, K = 2, 8, 8, 8, 300
    s, t = torch.randn(B, C, H, W), torch.randn(B, C, H, W)
    q = torch.randn(K, C)
    n_keys = K + (B * H * W if negatives == "batch" else 0)
    return (s, t, q, None, None, None, negatives, 0.2, True), B * H * W * n_keys


@pytest.mark.parametrize("negatives", ["batch", "none"])
def test_torch_backend_never_allocates_anchors_by_keys(monkeypatch, negatives):
    monkeypatch.setattr(torch_common, "CHUNK_ELEMENTS", 4096)
    args, anchors_by_keys = _inputs(negatives)
    with LargestAllocation() as mode:
        loss, lse = torch_backend.forward(*args)
        torch_backend.backward(torch.ones_like(loss), *args[:6], loss, lse, *args[6:],
                                                     True, True, True)
    assert mode.largest <= anchors_by_keys // 8, (mode.largest, anchors_by_keys)
    # The same probe catches the naive formula materialising the logit matrix.
    with LargestAllocation() as naive:
        s, t, q = (x.requires_grad_() for x in args[:3])
        naive_pixel_contrastive_loss(s, t, q, negatives=negatives).backward()
    assert naive.largest >= anchors_by_keys


@pytest.mark.skipif(not (CUDA or INTERPRETER), reason="Triton cannot run: no CUDA and no interpreter")
@pytest.mark.parametrize("negatives", ["batch", "none"])
def test_triton_host_code_never_allocates_anchors_by_keys(negatives):
    from pcd_kernels.backends.triton import pixel_contrastive as kernels

    args, anchors_by_keys = _inputs(negatives)
    if CUDA:
        args = tuple(a.cuda() if isinstance(a, torch.Tensor) else a for a in args)
    with LargestAllocation() as mode:
        loss, lse = kernels.forward(*args)
        kernels.backward(torch.ones_like(loss), *args[:6], loss, lse, *args[6:], True, True, True)
    # (the interpreter itself copies arguments as bytes: 4x a float32 input's elements)
    assert mode.largest <= anchors_by_keys // 4, (mode.largest, anchors_by_keys)


_PEAK_RSS_SCRIPT = r"""
import json, resource, torch
from pcd_kernels import pixel_contrastive_loss
torch.manual_seed(0)
B, C, H, W, K = 4, 64, 32, 32, 65536
s = torch.randn(B, C, H, W, requires_grad=True)
t = torch.randn(B, C, H, W)
q = torch.nn.functional.normalize(torch.randn(K, C), dim=1)
# warm up torch's kernels and allocator on a tiny problem
pixel_contrastive_loss(s[:1, :, :2, :2].detach().requires_grad_(), t[:1, :, :2, :2], q[:16],
                       negatives="none", backend="torch").backward()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
pixel_contrastive_loss(s, t, q, negatives="none", backend="torch").backward()
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"extra_mb": (after - before) / 1024, "grad_finite": bool(s.grad.isfinite().all())}))
"""


def test_torch_backend_peak_memory_bound():
    """B=4, C=64, 32x32, K=65,536, negatives="none", forward + backward: the naive formula needs
    about 3-4 GB more; the torch backend must stay below 300 MB."""
    out = subprocess.run([sys.executable, "-c", _PEAK_RSS_SCRIPT], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["grad_finite"]
    assert result["extra_mb"] < 300, f"peak RSS grew by {result['extra_mb']:.0f} MB"


def _attention_inputs(device="cpu"):
    B, C, H, W, Hk, Wk = 1, 16, 16, 16, 12, 20
    q = torch.randn(B, C, H, W, device=device, requires_grad=True)
    k, v = (torch.randn(B, C, Hk, Wk, device=device, requires_grad=True) for _ in range(2))
    return (q, k, v), H * W * Hk * Wk


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_attention_torch_backend_never_allocates_queries_by_keys(dtype):
    """SDPA's fused CPU kernel runs only on token-major copies: on strided views it would take
    the math path, which builds the matrix."""
    from pcd_kernels import pixel_attention

    (q, k, v), queries_by_keys = _attention_inputs()
    q, k, v = (x.detach().to(dtype).requires_grad_() for x in (q, k, v))
    with LargestAllocation() as mode:
        pixel_attention(q, k, v, num_heads=2, backend="torch").sum().backward()
    assert mode.largest <= queries_by_keys // 8, (mode.largest, queries_by_keys)
    with LargestAllocation() as naive:
        reference.naive_pixel_attention(q, k, v, 2).sum().backward()
    assert naive.largest >= queries_by_keys


@pytest.mark.skipif(not (CUDA or INTERPRETER), reason="Triton cannot run: no CUDA and no interpreter")
def test_attention_triton_host_code_never_allocates_queries_by_keys():
    from pcd_kernels import pixel_attention

    (q, k, v), queries_by_keys = _attention_inputs("cuda" if CUDA else "cpu")
    with LargestAllocation() as mode:
        pixel_attention(q, k, v, num_heads=2, backend="triton").sum().backward()
    assert mode.largest <= queries_by_keys // 8, (mode.largest, queries_by_keys)
