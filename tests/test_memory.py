"""No op stores its (anchors x keys) matrix, on any backend (every op of the registry,
pcd_kernels.backends.OPS); the torch backend's peak memory stays within the issue's bound
(measured in a subprocess, so nothing else shares the peak)."""
import json
import subprocess
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from _helpers import op_calls, op_cases, through_custom_ops
from pcd_kernels.backends import OPS, implementation


class LargestAllocation(TorchDispatchMode):
    """Records the largest number of elements of any tensor an op creates. It sees the ops a
    custom op runs only when it is active around them: inside a call of the custom op itself it
    sees that op's outputs alone."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_every_op_has_a_call():
    """Every op's test file defines SMALL_CALLS (op_calls says what to add where one does not)."""
    for op in OPS:
        assert op_calls(op, "cpu", torch.float32), op


@pytest.mark.parametrize("op,backend,device,dtype", op_cases(dtypes=(torch.float32, torch.float64, torch.bfloat16)))
def test_never_allocates_anchors_by_keys(op, backend, device, dtype, monkeypatch):
    """Forward and backward, through the backend's own forward/backward (the custom ops'
    implementations: the probe sees every tensor they make), or the public op for a backend that
    is differentiable by itself. The torch backend's chunks are made small for the problem; the
    GPU backends' host code may allocate a quarter of the matrix (the interpreter copies each
    argument as bytes: 4x a float32 input's elements). The same probe sees the reference formula
    store the matrix."""
    for call in op_calls(op, device, dtype, large=True):
        options = [{}]
        if backend == "torch":
            for module, name, value in call.torch_chunks:
                monkeypatch.setattr(module, name, value)
            options = call.backward_options
        limit = call.matrix // (8 if backend == "torch" else 4)
        for option in options:
            with LargestAllocation() as ours:
                if through_custom_ops(op, backend):
                    kernels = implementation(op, backend)
                    out = kernels.forward(*call.forward)
                    kernels.backward(*call.backward(out), *call.needs[0], **option)
                else:
                    call.public(backend)
            assert ours.largest <= limit, (option, ours.largest, call.matrix)
        with LargestAllocation() as naive:
            call.naive()
        assert naive.largest >= call.matrix, (naive.largest, call.matrix)


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
