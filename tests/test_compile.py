"""torch.library registration, for every op of the registry (pcd_kernels.backends.OPS): opcheck of
its custom ops on each backend, and torch.compile(fullgraph=True) over code calling the op."""
import pytest
import torch

from _helpers import CUDA, op_calls, op_cases, op_test_entry, through_custom_ops
from pcd_kernels.backends import OPS


@pytest.mark.parametrize("op,backend,device,dtype", [c for c in op_cases() if through_custom_ops(*c.values[:2])])
def test_opcheck(op, backend, device, dtype):
    """Schema, fake (meta) kernels (strides included), autograd registration and dispatch of both
    custom ops, checked by torch itself, on each problem of the op (for pixel_attention, q, k and v
    are channel slices of one fused projection, as MHSA2d passes them) and each set of gradients
    the backward can be asked for."""
    forward, backward = (getattr(torch.ops.pcd_kernels, name).default for name in OPS[op].custom_ops)
    for call in op_calls(op, device, dtype):
        torch.library.opcheck(forward, (*call.forward, backend))
        out = forward(*call.forward, backend)
        for needs in call.needs:
            torch.library.opcheck(backward, (*call.backward(out), backend, *needs))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not CUDA, reason="no CUDA device"))])
@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
@pytest.mark.parametrize("op", list(OPS))
def test_torch_compile_fullgraph(op, compiler, device):
    """The compiled step (the op's test file's COMPILE_STEP: code calling the op) equals the eager
    one, value and gradient (backend "auto": the torch backend on CPU, the GPU's on CUDA)."""
    torch._dynamo.reset()
    step, (x, *args) = op_test_entry(op, "COMPILE_STEP", "a function (device) -> (step, its arguments; the first "
                                     "is the tensor differentiated)")(device)
    x = x.to(device).requires_grad_()
    args = [a.to(device) for a in args]
    expected = step(x, *args)
    (expected_grad,) = torch.autograd.grad(expected, x)
    got = torch.compile(step, fullgraph=True, backend=compiler)(x, *args)
    (grad,) = torch.autograd.grad(got, x)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(grad, expected_grad)
