"""torch.library registration: opcheck, and torch.compile(fullgraph=True) over code calling the op."""
import pytest
import torch

from _helpers import CUDA, INTERPRETER
from pcd_kernels import PixelContrastiveLoss, pixel_contrastive_loss


def _op_args(device, backend, negatives="batch", masked=True, requires_grad=True):
    s = torch.randn(2, 12, 3, 5, device=device, requires_grad=requires_grad)
    t = torch.randn(2, 12, 3, 5, device=device, requires_grad=requires_grad)
    q = torch.randn(7, 12, device=device, requires_grad=requires_grad)
    mask = (torch.rand(2, 3, 5, device=device) > 0.3) if masked else None
    return (s, t, q, None, mask, None, negatives, 0.2, True, backend)


@pytest.mark.parametrize("negatives", ["batch", "none"])
def test_opcheck_forward_op(negatives):
    """Schema, fake (meta) kernel, autograd registration and dispatch, checked by torch itself."""
    backend = "triton" if CUDA else "torch"
    device = "cuda" if CUDA else "cpu"
    torch.library.opcheck(torch.ops.pcd_kernels.pixel_contrastive_forward.default,
                          _op_args(device, backend, negatives))


def test_opcheck_backward_op():
    s, t, q, x, mask, xm, negatives, tau, normalize, backend = _op_args("cpu", "torch", requires_grad=False)
    loss, lse = torch.ops.pcd_kernels.pixel_contrastive_forward(s, t, q, x, mask, xm, negatives, tau,
                                                                normalize, backend)
    torch.library.opcheck(torch.ops.pcd_kernels.pixel_contrastive_backward.default,
                          (torch.randn_like(loss), s, t, q, x, mask, xm, loss, lse, negatives, tau,
                           normalize, backend, True, True, True))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not CUDA, reason="no CUDA device"))])
@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(compiler, device):
    torch._dynamo.reset()
    criterion = PixelContrastiveLoss(negatives="none", queue_size=9, dim=12).to(device)

    def step(s, t, mask):
        features = torch.relu(s) * 2.0  # something around the op for the compiler to fuse
        return criterion(features, t, mask) + 0.1 * pixel_contrastive_loss(features, t, negatives="image")

    s = torch.randn(2, 12, 3, 5, device=device, requires_grad=True)
    t, mask = torch.randn(2, 12, 3, 5, device=device), torch.rand(2, 3, 5, device=device) > 0.3
    expected = step(s, t, mask)
    (expected_grad,) = torch.autograd.grad(expected, s)
    compiled = torch.compile(step, fullgraph=True, backend=compiler)
    got = compiled(s, t, mask)
    (grad,) = torch.autograd.grad(got, s)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(grad, expected_grad)


@pytest.mark.skipif(not (CUDA or INTERPRETER), reason="Triton cannot run: no CUDA and no interpreter")
def test_opcheck_attention_ops():
    """pixel_attention's Triton custom ops: schema, fake kernels (strides included) and autograd,
    on a channel slice of a fused projection as MHSA2d passes it."""
    device = "cuda" if CUDA else "cpu"
    qkv = torch.randn(2, 3 * 16, 13, device=device)
    q, k, v = (x.requires_grad_() for x in qkv.chunk(3, dim=1))
    torch.library.opcheck(torch.ops.pcd_kernels.pixel_attention_forward.default, (q, k, v, 2, 0.3, "triton"))
    out, lse = torch.ops.pcd_kernels.pixel_attention_forward(q, k, v, 2, 0.3, "triton")
    saved = (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out.detach(), lse.detach(), 2, 0.3,
             "triton")
    for needs_q, needs_kv in ((True, True), (False, True), (True, False)):
        torch.library.opcheck(torch.ops.pcd_kernels.pixel_attention_backward.default,
                              (*saved, needs_q, needs_kv))
