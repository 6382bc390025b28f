"""torch.library registration, for every op of the registry (pcd_kernels.backends.OPS): opcheck of
its custom ops on each backend, and torch.compile(fullgraph=True) over code calling the op."""
import pytest
import torch

from _helpers import CUDA, op_calls, op_cases, through_custom_ops
from pcd_kernels import (PixelContrastiveLoss, omni_contrastive_loss, pixel_attention, pixel_contrastive_loss,
                         pixel_relation_loss)
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


def _pixel_contrastive_step(device):
    criterion = PixelContrastiveLoss(negatives="none", queue_size=9, dim=12).to(device)

    def step(s, t, mask):
        features = torch.relu(s) * 2.0  # something around the op for the compiler to fuse
        return criterion(features, t, mask) + 0.1 * pixel_contrastive_loss(features, t, negatives="image")

    return step, (torch.randn(2, 12, 3, 5), torch.randn(2, 12, 3, 5), torch.rand(2, 3, 5) > 0.3)


def _pixel_relation_step(device):
    def step(s, t, k, mask):
        features = torch.relu(s) * 2.0
        return pixel_relation_loss(features, t, mask=mask) + 0.5 * pixel_relation_loss(features, t, k, temperature=0.2)

    return step, (torch.randn(3, 20, 5, 7), torch.randn(3, 20, 5, 7), torch.randn(50, 20), torch.rand(3, 5, 7) > 0.35)


def _omni_contrastive_step(device):
    def step(s, t):
        return omni_contrastive_loss(torch.relu(s), t, groups=4, patch_size=(2, 2), pool_size=2)

    return step, (torch.randn(2, 16, 8, 8), torch.randn(2, 16, 8, 8))


def _pixel_attention_step(device):
    def step(q, kv):
        return pixel_attention(torch.relu(q) * 2.0, kv, kv, num_heads=2).square().mean()

    return step, (torch.randn(2, 16, 5, 6), torch.randn(2, 16, 4, 3))


# op -> (device -> (step, its arguments; the first is the tensor differentiated))
STEPS = {"pixel_contrastive_loss": _pixel_contrastive_step, "pixel_relation_loss": _pixel_relation_step,
         "omni_contrastive_loss": _omni_contrastive_step, "pixel_attention": _pixel_attention_step}


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not CUDA, reason="no CUDA device"))])
@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
@pytest.mark.parametrize("op", list(OPS))
def test_torch_compile_fullgraph(op, compiler, device):
    """The compiled step equals the eager one, value and gradient (backend "auto": the torch
    backend on CPU, the GPU's on CUDA)."""
    torch._dynamo.reset()
    step, (x, *args) = STEPS[op](device)
    x = x.to(device).requires_grad_()
    args = [a.to(device) for a in args]
    expected = step(x, *args)
    (expected_grad,) = torch.autograd.grad(expected, x)
    got = torch.compile(step, fullgraph=True, backend=compiler)(x, *args)
    (grad,) = torch.autograd.grad(got, x)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(grad, expected_grad)
