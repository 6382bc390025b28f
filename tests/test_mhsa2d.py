"""MHSA2d: shapes, gradients to every parameter, equality with an explicit reshape/SDPA
formulation of the same weights, position encodings, state_dict, torch.compile, bad arguments."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

from _helpers import CUDA, INTERPRETER, assert_close
from pcd_kernels import MHSA2d
from pcd_kernels.nn.attention import sinusoidal_position_encoding

TRITON = pytest.mark.skipif(not (CUDA or INTERPRETER), reason="Triton cannot run: no CUDA and no interpreter")
DEVICE = "cuda" if CUDA else "cpu"
BACKENDS = ["torch", pytest.param("triton", marks=TRITON)]


def explicit(module, x):
    """What a user writes by hand: conv, reshape/permute to (B, heads, HW, d), SDPA, back, conv."""
    B, C, H, W = x.shape
    heads, d = module.num_heads, C // module.num_heads
    pos = module.position_encoding(H, W, x.device, x.dtype)
    y = x if pos is None else x + pos
    qkv = F.conv2d(y, module.qkv.weight, module.qkv.bias)
    q, k, v = (t.reshape(B, heads, d, H * W).permute(0, 1, 3, 2) for t in qkv.split(C, dim=1))
    a = F.scaled_dot_product_attention(q, k, v)  # default scale d^-1/2
    a = a.permute(0, 1, 3, 2).reshape(B, C, H, W)
    out = F.conv2d(a, module.proj.weight, module.proj.bias)
    if module.residual:
        out = out + x
    return out if module.norm is None else module.norm(out)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("options", [
    dict(),
    dict(pos_embed="learned", norm="layer", qkv_bias=False),
    dict(pos_embed=None, residual=False, norm="batch"),
], ids=["defaults", "learned-layernorm-nobias", "nopos-noresidual-batchnorm"])
@pytest.mark.parametrize("size", [(5, 7), (3, 13)], ids=["5x7", "3x13"])
def test_equals_explicit_formulation(backend, options, size):
    """float32 module against the explicit formulation in float64 (the reference) and in float32
    (the plain error the DESIGN.md 5 rule allows twice of), output and every gradient. In eval
    mode: training-mode BatchNorm makes the bias gradients ~0 by cancellation, which would test
    float32 rounding, not attention."""
    module = MHSA2d(24, num_heads=3, backend=backend, **options).to(DEVICE).eval()
    x = torch.randn(2, 24, *size, device=DEVICE)
    # A random weighting, not out.square().sum(): a LayerNorm output's sum of squares is constant,
    # which would leave only cancelling rounding noise in every gradient.
    weight = torch.randn(x.shape, device=DEVICE)

    def grads_of(fn, m, x):
        x = x.detach().clone().requires_grad_()
        out = fn(m, x)
        return out, torch.autograd.grad((out * weight.to(out.dtype)).sum(), [x, *m.parameters()])

    out, grads = grads_of(lambda m, x: m(x), module, x)
    plain, plain_grads = grads_of(explicit, module, x)
    reference = copy.deepcopy(module).double()
    ref, ref_grads = grads_of(explicit, reference, x.double())
    assert out.shape == x.shape
    assert_close("output", out.cpu(), plain.cpu(), ref.cpu(), torch.float32)
    names = ["x", *(n for n, _ in module.named_parameters())]
    for name, g, g_plain, g_ref in zip(names, grads, plain_grads, ref_grads):
        assert_close(f"d{name}", g.cpu(), g_plain.cpu(), g_ref.cpu(), torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_parameter_gets_a_gradient(backend):
    module = MHSA2d(32, num_heads=4, pos_embed="learned", norm="layer", backend=backend).to(DEVICE)
    x = torch.randn(2, 32, 9, 9, device=DEVICE)
    module(x).square().mean().backward()
    for name, p in module.named_parameters():
        assert p.grad is not None, name
        assert p.grad.isfinite().all() and p.grad.abs().sum() > 0, name


def test_state_dict_is_stable():
    keys = {
        (): ["qkv.weight", "qkv.bias", "proj.weight", "proj.bias"],
        (("pos_embed", "learned"), ("norm", "layer")): ["pos_embed", "qkv.weight", "qkv.bias", "proj.weight",
                                                        "proj.bias", "norm.weight", "norm.bias"],
        (("qkv_bias", False), ("norm", "batch")): ["qkv.weight", "proj.weight", "proj.bias", "norm.weight",
                                                   "norm.bias", "norm.running_mean", "norm.running_var",
                                                   "norm.num_batches_tracked"],
    }
    for options, expected in keys.items():
        module = MHSA2d(16, num_heads=2, **dict(options))
        assert list(module.state_dict()) == expected
        clone = MHSA2d(16, num_heads=2, **dict(options))
        clone.load_state_dict(module.state_dict())
        x = torch.randn(1, 16, 4, 5)
        torch.testing.assert_close(clone.eval()(x), module.eval()(x))


def test_learned_positions_are_interpolated_to_any_size():
    module = MHSA2d(16, num_heads=2, pos_embed="learned", pos_embed_size=(4, 6))
    assert module.position_encoding(4, 6, "cpu", torch.float32) is module.pos_embed
    pos = module.position_encoding(7, 3, "cpu", torch.float32)
    torch.testing.assert_close(pos, F.interpolate(module.pos_embed, size=(7, 3), mode="bilinear",
                                                  align_corners=False))
    assert module(torch.randn(2, 16, 7, 3)).shape == (2, 16, 7, 3)


def test_sinusoidal_encoding():
    C, H, W = 18, 5, 7  # C % 4 == 2: two channels left at zero
    pos = sinusoidal_position_encoding(C, H, W)
    assert pos.shape == (1, C, H, W)
    n = C // 4
    i, y, x = 2, 3, 5
    freq = 10000.0 ** (-i / n)
    row, col = (y + 0.5) * 2 * math.pi / H, (x + 0.5) * 2 * math.pi / W
    expected = [math.sin(row * freq), math.cos(row * freq), math.sin(col * freq), math.cos(col * freq)]
    got = [pos[0, i + j * n, y, x].item() for j in range(4)]
    assert got == pytest.approx(expected, abs=1e-6)
    assert torch.equal(pos[0, 4 * n:], torch.zeros(C - 4 * n, H, W))
    # rows vary along H only, columns along W only
    assert torch.equal(pos[0, :2 * n], pos[0, :2 * n, :, :1].expand(-1, H, W))
    assert torch.equal(pos[0, 2 * n:4 * n], pos[0, 2 * n:4 * n, :1, :].expand(-1, H, W))


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(compiler):
    torch._dynamo.reset()
    module = MHSA2d(16, num_heads=2, norm="layer").to(DEVICE)
    x = torch.randn(2, 16, 5, 6, device=DEVICE, requires_grad=True)
    expected = module(x)
    (expected_grad,) = torch.autograd.grad(expected.sum(), x)
    compiled = torch.compile(module, fullgraph=True, backend=compiler)
    got = compiled(x)
    (grad,) = torch.autograd.grad(got.sum(), x)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-4)


@TRITON
def test_torch_compile_through_the_triton_custom_op():
    torch._dynamo.reset()
    module = MHSA2d(16, num_heads=2, backend="triton").to(DEVICE)
    x = torch.randn(1, 16, 3, 5, device=DEVICE, requires_grad=True)
    expected = module(x)
    (expected_grad,) = torch.autograd.grad(expected.sum(), x)
    got = torch.compile(module, fullgraph=True, backend="aot_eager")(x)
    (grad,) = torch.autograd.grad(got.sum(), x)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(grad, expected_grad)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(channels=10, num_heads=4), ValueError, "divisible by num_heads"),
    (dict(channels=0), ValueError, "channels must be an int"),
    (dict(channels=8, num_heads=2.0), ValueError, "num_heads must be an int"),
    (dict(channels=8, num_heads=2, pos_embed="rope"), ValueError, "pos_embed must be"),
    (dict(channels=8, num_heads=2, norm="group"), ValueError, "norm must be"),
    (dict(channels=8, num_heads=2, residual=1), TypeError, "residual must be True or False"),
    (dict(channels=8, num_heads=2, backend="flash"), ValueError, "backend must be one of"),
    (dict(channels=8, num_heads=2, pos_embed="learned", pos_embed_size=(0, 4)), ValueError, "pos_embed_size"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        MHSA2d(**kwargs)


def test_wrong_input_says_what_it_expected():
    module = MHSA2d(8, num_heads=2)
    with pytest.raises(ValueError, match=r"\(B, 8, H, W\)"):
        module(torch.randn(1, 6, 3, 3))
    with pytest.raises(TypeError, match="torch.Tensor"):
        module([1.0])


@TRITON
def test_torch_compile_dynamic_shapes_through_the_triton_custom_op():
    """One compiled graph for several map sizes (SDPA's own CPU path does not compile dynamically
    in torch 2.13, a PyTorch limitation, so this covers the Triton path)."""
    torch._dynamo.reset()
    module = MHSA2d(16, num_heads=2, backend="triton").to(DEVICE)
    compiled = torch.compile(module, dynamic=True, backend="inductor")
    for size in ((3, 5), (4, 7), (6, 2)):
        x = torch.randn(1, 16, *size, device=DEVICE, requires_grad=True)
        got = compiled(x)
        (grad,) = torch.autograd.grad(got.sum(), x)
        expected = module(x)
        (expected_grad,) = torch.autograd.grad(expected.sum(), x)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-4)
