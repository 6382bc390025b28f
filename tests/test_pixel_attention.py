"""pixel_attention against a float64 softmax attention on reshaped maps, on every backend."""
import math

import pytest
import torch

from _helpers import (CUDA, INTERPRETER, OpCall, assert_close, backend_cases, check_against_reference,
                      cuda_extension_missing, detached, forward_and_backward, leaves, run)
from pcd_kernels import pixel_attention
from pcd_kernels.reference import naive_pixel_attention

OP = "pixel_attention"
CASES = backend_cases(OP)
FP32 = backend_cases(OP, dtypes=(torch.float32,))
# float32, and the CUDA kernels in the 16-bit dtypes they take (no float32: 16-byte cp.async of
# half-precision rows); a 16-bit case is held to the plain-PyTorch bound (_helpers.assert_close)
WIDE = FP32 + backend_cases(OP, dtypes=(torch.float16, torch.bfloat16), backends=("cuda",))


def _close(name, ours, reference, inputs, dtype, device, rtol, atol, **kwargs):
    """ours against the float64 reference: within rtol, atol in float32; in 16-bit dtypes within
    the bound of the same formula in plain PyTorch in ``dtype`` on ``device`` (``inputs``, ``kwargs``:
    its call, a function of the inputs cast)."""
    if dtype == torch.float32:
        torch.testing.assert_close(ours.double().cpu() if ours is not None else None, reference, rtol=rtol, atol=atol,
                                   msg=name)
    else:
        assert_close(name, ours.cpu(), inputs(dtype, device).cpu(), reference, dtype)

# (B, C, heads, query map, key map or None for self-attention, scale or None): odd map sizes
# (5x7, 3x13, 9x9), head dims 8 (padded to 16), 20 (not a power of two), 16, 32 and 128,
# cross-attention with a different key map size, a custom scale.
SHAPES = [
    (2, 24, 3, (5, 7), None, None),
    (1, 40, 2, (3, 13), None, None),
    (1, 32, 2, (9, 9), None, 0.3),
    (2, 64, 2, (4, 6), (3, 5), None),
    (1, 128, 1, (3, 5), (6, 3), None),
]


def _id(shape):
    B, C, heads, (H, W), key, scale = shape
    cross = f"-keys{key[0]}x{key[1]}" if key else ""
    return f"B{B}C{C}h{heads}-{H}x{W}{cross}" + (f"-scale{scale}" if scale else "")


def make(shape, dtype=torch.float64):
    B, C, heads, (H, W), key, scale = shape
    Hk, Wk = key or (H, W)
    q = torch.randn(B, C, H, W, dtype=dtype)
    k = torch.randn(B, C, Hk, Wk, dtype=dtype)
    v = torch.randn(B, C, Hk, Wk, dtype=dtype)
    return q, k, v


def check_op(backend, device, dtype, shape):
    """Output and every gradient against the float64 formula; plain PyTorch is the eager formula
    in ``dtype`` on the device."""
    heads, scale = shape[2], shape[5]
    inputs = make(shape)
    check_against_reference(OP, naive_pixel_attention, inputs, backend, device, dtype,
                            weight=torch.randn_like(inputs[0]), names="qkv", out_dtype=dtype, plain_device="device",
                            num_heads=heads, scale=scale)


@pytest.mark.parametrize("shape", SHAPES, ids=_id)
@pytest.mark.parametrize("backend,device,dtype", CASES)
def test_matches_reference(backend, device, dtype, shape):
    check_op(backend, device, dtype, shape)


@pytest.mark.parametrize("backend,device,dtype", WIDE)
@pytest.mark.parametrize("layout", ["qkv-slices", "qkv-slices-channels-last", "channels-last", "transposed-map"])
def test_any_strides(backend, device, dtype, layout):
    """q, k, v as channel slices of one fused projection (what MHSA2d passes: read in place), the
    same projection channels-last (each head's 16 channels contiguous: the CUDA kernels read its
    rows in place), channels-last maps, and maps whose rows are not evenly strided (copied first)."""
    B, C, H, W, heads = 2, 32, 5, 6, 2
    if layout.startswith("qkv-slices"):
        qkv = torch.randn(B, 3 * C, H, W, dtype=torch.float64)
        leaf = qkv.to(device, dtype)
        if layout.endswith("channels-last"):
            leaf = leaf.contiguous(memory_format=torch.channels_last)
        leaf = leaf.requires_grad_()
        q, k, v = leaf.chunk(3, dim=1)
    elif layout == "channels-last":
        qkv = torch.randn(3, B, C, H, W, dtype=torch.float64)
        leaf = qkv.to(device, dtype).contiguous(memory_format=torch.channels_last_3d).requires_grad_()
        q, k, v = leaf.unbind(0)
    else:
        qkv = torch.randn(3, B, C, W, H, dtype=torch.float64).transpose(3, 4)
        leaf = qkv.to(device, dtype).requires_grad_()
        q, k, v = leaf.unbind(0)
    grad_out = torch.randn(B, C, H, W, dtype=torch.float64)
    out = pixel_attention(q, k, v, num_heads=heads, backend=backend)
    (grad,) = torch.autograd.grad(out, leaf, grad_out.to(device, dtype))
    ref_leaf = qkv.clone().requires_grad_()
    rq, rk, rv = ref_leaf.chunk(3, dim=1) if layout.startswith("qkv-slices") else ref_leaf.unbind(0)
    ref = naive_pixel_attention(rq, rk, rv, heads)
    (ref_grad,) = torch.autograd.grad(ref, ref_leaf, grad_out)

    def plain(dtype, device, gradient=False):
        leaf = qkv.to(device, dtype).requires_grad_()
        pq, pk, pv = leaf.chunk(3, dim=1) if layout.startswith("qkv-slices") else leaf.unbind(0)
        out = naive_pixel_attention(pq, pk, pv, heads)
        return torch.autograd.grad(out, leaf, grad_out.to(device, dtype))[0] if gradient else out

    _close("output", out, ref, plain, dtype, device, rtol=1e-5, atol=1e-5)
    _close("gradient", grad, ref_grad, lambda *a: plain(*a, gradient=True), dtype, device, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend,device,dtype", WIDE)
def test_nan_in_nan_out(backend, device, dtype):
    """A NaN query pixel poisons its own output in its head; a NaN key pixel every output of its
    head. Nothing is masked."""
    q, k, v = (x.to(device, dtype) for x in make((1, 16, 2, (3, 4), None, None)))
    q[0, 0, 1, 2] = float("nan")  # head 0, query pixel (1, 2)
    k[0, 9, 0, 0] = float("nan")  # head 1, key pixel (0, 0)
    out = pixel_attention(q, k, v, num_heads=2, backend=backend).cpu()
    head0, head1 = out[0, :8], out[0, 8:]
    assert head0[:, 1, 2].isnan().all()
    assert head0.isnan().sum() == 8  # only that pixel
    assert head1.isnan().all()


@pytest.mark.parametrize("backend,device,dtype", [c for c in WIDE if c.values[2] != torch.float16])  # 1e17: no float16
def test_logits_far_below_minus_1e30_still_give_a_softmax(backend, device, dtype):
    """Every logit of every row near -1e34 (float32 and bfloat16 hold such inputs): the softmax is
    one-hot on each row's largest logit, so each output pixel is one value pixel. A running maximum
    that starts at a finite -1e30 would stay above every logit, weigh them all 0 and give 0 / 0."""
    q, k, v = make((1, 16, 2, (3, 4), None, None))
    q = (q.abs() + 0.5) * 1e17  # positive queries, negative keys: every product is below -2.5e33
    k = -(k.abs() + 0.5) * 1e17
    q, k, v = (x.to(dtype).double() for x in (q, k, v))  # the reference sees the rounded inputs
    expected = naive_pixel_attention(q, k, v, 2)
    out = pixel_attention(q.to(device, dtype), k.to(device, dtype), v.to(device, dtype), num_heads=2,
                          backend=backend).double().cpu()
    assert out.isfinite().all()
    torch.testing.assert_close(out, expected, rtol=0, atol=0)  # one value pixel each, copied


@pytest.mark.filterwarnings("ignore:overflow encountered in matmul")  # the interpreter's numpy, on purpose
@pytest.mark.parametrize("backend,device,dtype", [c for c in WIDE if c.values[2] != torch.float16])  # 1e38: no float16
def test_keys_whose_logits_overflow_to_minus_inf_get_zero_weight(backend, device, dtype):
    """190 of 200 keys so large (-1e38 per channel against positive queries) that their logits
    overflow float32 to -inf, and they come first: every kernel's first key tiles hold nothing else
    (a running maximum still -inf after them). Their weights are 0, as the float64 formula's are,
    and the output is the softmax over the other 10 keys, not NaN."""
    q, k, v = make((1, 16, 2, (2, 3), (20, 10), None))
    q = q.abs() + 0.5
    k[:, :, :19] = -1e38  # key pixels 0..189 in (h, w) order
    q, k, v = (x.to(dtype).double() for x in (q, k, v))  # the reference sees the rounded inputs
    expected = naive_pixel_attention(q, k, v, 2)
    assert expected.isfinite().all()
    out = pixel_attention(q.to(device, dtype), k.to(device, dtype), v.to(device, dtype), num_heads=2,
                          backend=backend).double().cpu()
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out, expected, rtol=tolerance, atol=tolerance)


def test_large_finite_queries_stay_finite_and_an_infinite_one_gives_nan():
    """The NaN guard of the torch backend must not see NaN where the inputs hold none: a float16
    query row whose sum overflows is finite, and so is its output."""
    q = torch.full((1, 16, 2, 3), 5000.0, dtype=torch.float16)  # a row sums to 80,000 > float16 65,504
    k, v = torch.randn(1, 16, 2, 3, dtype=torch.float16) * 1e-4, torch.randn(1, 16, 2, 3, dtype=torch.float16)
    out = pixel_attention(q, k, v, num_heads=1, backend="torch")
    assert out.isfinite().all()
    q[0, 3, 1, 1] = float("inf")
    expected = naive_pixel_attention(q.double(), k.double(), v.double(), 1)
    out = pixel_attention(q, k, v, num_heads=1, backend="torch")
    assert torch.equal(out.isnan(), expected.isnan()) and out[0, :, 1, 1].isnan().all()


@pytest.mark.parametrize("backend,device,dtype", WIDE)
def test_empty_batch_and_empty_query_map(backend, device, dtype):
    q = torch.randn(0, 8, 3, 3, device=device, dtype=dtype, requires_grad=True)
    out = pixel_attention(q, q, q, num_heads=2, backend=backend)
    assert out.shape == (0, 8, 3, 3)
    out.sum().backward()
    assert q.grad.shape == q.shape
    q = torch.randn(1, 8, 0, 3, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(1, 8, 2, 2, device=device, dtype=dtype, requires_grad=True)
    out = pixel_attention(q, k, k, num_heads=2, backend=backend)
    assert out.shape == (1, 8, 0, 3)
    out.sum().backward()
    assert torch.equal(k.grad, torch.zeros_like(k))
    q = torch.randn(1, 8, 0, 3, device=device, dtype=dtype, requires_grad=True)  # an empty map attends to itself
    out = pixel_attention(q, q, q, num_heads=2, backend=backend)
    out.sum().backward()
    assert out.shape == q.grad.shape == (1, 8, 0, 3)


@pytest.mark.parametrize("backend,device,dtype", WIDE)
@pytest.mark.parametrize("wanted", ["q", "kv", "k"])
def test_one_sided_gradients(backend, device, dtype, wanted):
    """Frozen queries or frozen keys/values: only the gradients asked for are computed."""
    inputs = make((1, 16, 2, (3, 5), (4, 3), None))
    options = dict(grads=[name in wanted for name in "qkv"], weight=torch.randn_like(inputs[0]), num_heads=2)
    _, grads = run(pixel_attention, inputs, dtype, device, backend=backend, **options)
    _, ref_grads = run(naive_pixel_attention, inputs, torch.float64, "cpu", **options)
    plain_grads = run(naive_pixel_attention, inputs, dtype, device, **options)[1] if dtype != torch.float32 else None
    for i, (name, g, g_ref) in enumerate(zip("qkv", grads, ref_grads)):
        assert (g is None) == (name not in wanted), f"d{name}: {'not ' if g is None else ''}computed"
        if g is not None:
            _close(f"d{name}", g, g_ref, lambda *_: plain_grads[i], dtype, device, rtol=1e-4, atol=1e-5)


_NEW_TF32_API = r"""
import torch
from pcd_kernels.backends.triton._common import matmul_precision
assert matmul_precision(torch.float32) == "ieee"
torch.backends.cuda.matmul.fp32_precision = "tf32"   # torch >= 2.9; the legacy flag then raises
assert matmul_precision(torch.float32) == "tf32", matmul_precision(torch.float32)
assert matmul_precision(torch.bfloat16) == "tf32"
print("ok")
"""


@pytest.mark.skipif(not hasattr(torch.backends.cuda.matmul, "fp32_precision"),
                    reason="this torch has only the legacy allow_tf32 flag")
def test_tf32_allowed_through_the_new_precision_api():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _NEW_TF32_API], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]


def test_mixed_dtypes_promote():
    q = torch.randn(1, 8, 3, 3)
    k = torch.randn(1, 8, 3, 3, dtype=torch.float64)
    out = pixel_attention(q, k, k.half(), num_heads=2)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, naive_pixel_attention(q.double(), k, k.half().double(), 2))


def test_autocast_runs_float32_inputs_in_the_autocast_dtype():
    """As scaled_dot_product_attention does under autocast."""
    q = torch.randn(1, 8, 3, 5, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = pixel_attention(q, q, q, num_heads=2)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert q.grad.dtype == torch.float32
    ref = naive_pixel_attention(*(q.detach().bfloat16().double(),) * 3, 2)
    torch.testing.assert_close(out.double(), ref, rtol=2e-2, atol=2e-2)


def test_default_scale_is_inverse_sqrt_head_dim():
    q, k, v = make((1, 24, 2, (3, 4), None, None))
    torch.testing.assert_close(pixel_attention(q, k, v, num_heads=2),
                               naive_pixel_attention(q, k, v, 2, scale=1 / math.sqrt(12)))


def _bad_inputs():
    x = torch.randn(2, 8, 3, 3)
    return [
        (dict(q=x[:, :0], k=x[:, :0], v=x[:, :0], num_heads=1), ValueError, "at least one channel"),
        (dict(q=x, k=x, v=x, num_heads=3), ValueError, "divisible by num_heads"),
        (dict(q=x, k=x, v=x, num_heads=0), ValueError, "num_heads"),
        (dict(q=x, k=x, v=x, num_heads=True), ValueError, "num_heads"),
        (dict(q=x, k=torch.randn(1, 8, 3, 3), v=torch.randn(1, 8, 3, 3), num_heads=2), ValueError, "batch"),
        (dict(q=x, k=torch.randn(2, 4, 3, 3), v=torch.randn(2, 4, 3, 3), num_heads=2), ValueError, "channels"),
        (dict(q=x, k=x, v=torch.randn(2, 8, 3, 4), num_heads=2), ValueError, "k and v"),
        (dict(q=x, k=torch.randn(2, 8, 0, 3), v=torch.randn(2, 8, 0, 3), num_heads=2), ValueError, "key map"),
        (dict(q=x[0], k=x, v=x, num_heads=2), ValueError, "q must be a 4-D"),
        (dict(q=x, k=x.long(), v=x, num_heads=2), TypeError, "k must be float16"),
        (dict(q=x.numpy(), k=x, v=x, num_heads=2), TypeError, "q must be a torch.Tensor"),
        (dict(q=x, k=x, v=x, num_heads=2, scale=float("inf")), ValueError, "scale must be finite"),
        (dict(q=x, k=x, v=x, num_heads=2, scale=torch.tensor(0.5)), TypeError, "scale must be a real"),
        (dict(q=x, k=x, v=x, num_heads=2, backend="flash"), ValueError, "backend must be one of"),
        (dict(q=x.double(), k=x.double(), v=x.double(), num_heads=2, backend="triton"), TypeError, "float64"),
    ]


def test_meta_tensors_give_meta_results_and_gradients():
    """Frameworks build and trace models on meta tensors: no autocast query may fail there."""
    from pcd_kernels import MHSA2d

    q = torch.randn(2, 8, 3, 5, device="meta", dtype=torch.float16, requires_grad=True)
    kv = torch.randn(2, 8, 4, 2, device="meta", dtype=torch.float16, requires_grad=True)
    out = pixel_attention(q, kv, kv, num_heads=2)
    assert out.device.type == "meta" and out.dtype == torch.float16 and out.shape == q.shape
    out.sum().backward()
    assert q.grad.shape == q.shape and kv.grad.shape == kv.shape and kv.grad.device.type == "meta"
    block = MHSA2d(8, num_heads=2, norm="layer").to("meta")
    x = torch.randn(2, 8, 3, 5, device="meta", requires_grad=True)
    block(x).sum().backward()
    assert x.grad.device.type == "meta" and x.grad.shape == x.shape


@pytest.mark.parametrize("kwargs,error,match", _bad_inputs(), ids=lambda v: v if isinstance(v, str) else "")
def test_bad_inputs_raise_clear_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        pixel_attention(**kwargs)


def test_cuda_backend_says_why_it_cannot_run():
    """On CPU tensors: the extension is missing ("cannot run: ... not built") or the tensors are
    not on a GPU."""
    x = torch.randn(1, 8, 3, 3)
    with pytest.raises(RuntimeError, match="backend='cuda' (cannot run|needs CUDA tensors)"):
        pixel_attention(x, x, x, num_heads=2, backend="cuda")


CUDA_KERNELS = pytest.mark.skipif(not CUDA or cuda_extension_missing() is not None,
                                  reason="the CUDA kernels need a GPU and the built extension")
GPU_CASES = backend_cases(OP, backends=("triton", "cuda"), devices=("cuda",))


@pytest.mark.parametrize("backend,device,dtype", GPU_CASES)
@pytest.mark.parametrize("head_dim", [8, 16, 24, 32, 64, 96, 128])
def test_gpu_kernels_over_several_tiles(backend, device, dtype, head_dim):
    """Query and key counts beyond one 64-position tile and not multiples of it (135 queries, 143
    keys, and one query against 70 keys), every padded head width of the CUDA kernels."""
    for shape in [(2, 2 * head_dim, 2, (9, 15), (11, 13), None), (1, head_dim, 1, (1, 1), (7, 10), 0.7)]:
        check_op(backend, device, dtype, shape)


@CUDA_KERNELS
def test_cuda_refuses_what_it_cannot_take():
    from pcd_kernels.backends.cuda import pixel_attention as kernels

    x = torch.randn(1, 2 * kernels.MAX_HEAD_DIM, 2, 2, device="cuda", dtype=torch.float16)
    with pytest.raises(ValueError, match="backend='cuda' takes head dims up to"):
        pixel_attention(x, x, x, num_heads=1, backend="cuda")
    for dtype in (torch.float64, torch.float32):  # 16-bit kernels only
        with pytest.raises(TypeError, match=str(dtype).split(".")[1]):
            pixel_attention(x.to(dtype), x.to(dtype), x.to(dtype), num_heads=2, backend="cuda")


@CUDA_KERNELS
def test_cuda_takes_more_than_65535_batch_heads():
    """The grid is (tiles x batch*heads) on its x axis: no 65,535 cap as on the y axis."""
    q, k, v = (torch.randn(40000, 4, 1, 2, device="cuda", dtype=torch.float16, requires_grad=True) for _ in range(3))
    grad_out = torch.randn(40000, 4, 1, 2, device="cuda", dtype=torch.float16)
    out = pixel_attention(q, k, v, num_heads=2, backend="cuda")
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    ref = pixel_attention(*(x.float() for x in (q, k, v)), num_heads=2, backend="torch")
    ref_grads = torch.autograd.grad(ref, (q, k, v), grad_out.float())
    torch.testing.assert_close(out.float(), ref, rtol=1e-2, atol=1e-2)
    for g, g_ref in zip(grads, ref_grads):
        torch.testing.assert_close(g.float(), g_ref.float(), rtol=2e-2, atol=2e-2)


@CUDA_KERNELS
def test_cuda_is_deterministic():
    q, k, v = (x.to("cuda", torch.bfloat16).requires_grad_() for x in make((2, 64, 2, (11, 13), (9, 10), None)))
    grad_out = torch.randn(2, 64, 11, 13, device="cuda", dtype=torch.bfloat16)
    first, second = ([pixel_attention(q, k, v, num_heads=2, backend="cuda")] for _ in range(2))
    for out in (first, second):
        out += torch.autograd.grad(out[0], (q, k, v), grad_out)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.skipif(not (CUDA or INTERPRETER), reason="Triton cannot run: no CUDA and no interpreter")
def test_triton_refuses_sizes_beyond_its_limits():
    from pcd_kernels.backends.triton import pixel_attention as kernels

    x = torch.randn(1, 2 * kernels.MAX_HEAD_DIM, 2, 2, device="cuda" if CUDA else "cpu")
    with pytest.raises(ValueError, match="head dims up to"):
        pixel_attention(x, x, x, num_heads=1, backend="triton")
    # auto falls back to the torch backend instead
    torch.testing.assert_close(pixel_attention(x, x, x, num_heads=1), naive_pixel_attention(x, x, x, 1),
                               rtol=1e-4, atol=1e-4)
    many = torch.randn(kernels.MAX_BATCH_HEADS // 2 + 1, 4, 1, 1, device=x.device)
    with pytest.raises(ValueError, match="batch x heads up to"):
        pixel_attention(many, many, many, num_heads=2, backend="triton")


@pytest.mark.skipif(not (CUDA or INTERPRETER), reason="Triton cannot run: no CUDA and no interpreter")
def test_triton_is_deterministic():
    device = "cuda" if CUDA else "cpu"
    q, k, v = (x.float().to(device).requires_grad_() for x in make((1, 32, 2, (5, 6), None, None)))
    grad_out = torch.randn(1, 32, 5, 6, device=device)
    first = [torch.autograd.grad(pixel_attention(q, k, v, num_heads=2, backend="triton"), (q, k, v), grad_out)
             for _ in range(2)]
    for a, b in zip(*first):
        assert torch.equal(a, b)


@pytest.mark.skipif(not INTERPRETER, reason="tile sizes are set per launch only in the interpreter")
@pytest.mark.parametrize("blocks", [(32, 64), (64, 16)], ids=["wide-key-tiles", "tall-query-tiles"])
def test_triton_tile_sizes(blocks, monkeypatch):
    """The suite otherwise runs 16 x 16 tiles; the GPU's are larger and not square."""
    from pcd_kernels.backends.triton import pixel_attention as kernels

    monkeypatch.setattr(kernels.LAUNCHERS, "interpreter_blocks", {"BLOCK_M": blocks[0], "BLOCK_N": blocks[1]})
    shape = (1, 32, 2, (5, 9), (7, 11), None)
    inputs = make(shape)
    grad_out = torch.randn_like(inputs[0])
    ref, ref_grads = run(naive_pixel_attention, inputs, torch.float64, "cpu", weight=grad_out, num_heads=2)
    ours, grads = run(pixel_attention, inputs, torch.float32, "cpu", weight=grad_out, num_heads=2, backend="triton")
    torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=1e-5)
    for g, g_ref in zip(grads, ref_grads):
        torch.testing.assert_close(g.double(), g_ref, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not CUDA, reason="the autotune candidates are GPU tile shapes (the interpreter's "
                                     "tiles are covered by test_triton_tile_sizes)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("head_dim", [32, 64, 128])
def test_every_autotune_candidate_on_gpu(head_dim, dtype, monkeypatch):
    """The suite runs each kernel's first configuration; the benchmark's autotuner may pick any."""
    from pcd_kernels.backends.triton import pixel_attention as kernels

    shape = (2, 2 * head_dim, 2, (37, 41), (29, 33), None)
    inputs = make(shape)
    grad_out = torch.randn_like(inputs[0])
    ref, ref_grads = run(naive_pixel_attention, inputs, torch.float64, "cpu", weight=grad_out, num_heads=2)
    plain, plain_grads = run(naive_pixel_attention, inputs, dtype, "cuda", weight=grad_out, num_heads=2)
    width = kernels._config_class(head_dim, 2, "tf32")
    candidates = kernels._GPU_CONFIGS[width]
    for i in range(max(len(c) for c in candidates.values())):
        monkeypatch.setattr(kernels, "gpu_configs",
                            lambda kind, *sizes, i=i: [candidates[kind][min(i, len(candidates[kind]) - 1)]])
        ours, grads = run(pixel_attention, inputs, dtype, "cuda", weight=grad_out, num_heads=2, backend="triton")
        assert_close(f"output, candidate {i}", ours.cpu(), plain.cpu(), ref, dtype)
        for name, g, g_plain, g_ref in zip("qkv", grads, plain_grads, ref_grads):
            assert_close(f"d{name}, candidate {i}", g.cpu(), g_plain.cpu(), g_ref, dtype)


# ------------------------------------------------------------------------------------------------
# What the shared tests read from every op's test file (tests/_helpers.py: op_test_entry):
# SMALL_CALLS, COMPILE_STEP, GPU_SMOKE and GPU_SMOKE_DRY.
# ------------------------------------------------------------------------------------------------


def _small_call(device, dtype, large=False):
    # large: 16x16 queries against 12x20 keys; small: q, k, v as channel slices of one fused
    # projection (what MHSA2d passes), read in place
    if large:
        q, k, v = leaves(device, dtype, (1, 8, 16, 16), (1, 8, 12, 20), (1, 8, 12, 20))
    else:
        qkv = torch.randn(2, 3 * 16, 13).to(device, dtype)
        q, k, v = (x.requires_grad_() for x in qkv.chunk(3, dim=1))
    forward = (q.flatten(2), k.flatten(2), v.flatten(2), 2, 0.3)
    return OpCall(
        forward, lambda out: (torch.randn_like(out[0]), *detached(forward[:3] + out), *forward[3:]),
        needs=[(True, True), (False, True), (True, False)],
        public=lambda backend: forward_and_backward(pixel_attention(
            q, k, v, num_heads=2, scale=0.3, backend=backend), q, k, v),
        naive=lambda: forward_and_backward(naive_pixel_attention(q, k, v, 2, 0.3), q, k, v),
        matrix=q[0, 0].numel() * k[0, 0].numel())


# (the OpCall builder, the keyword sets of the problems it is called on): the opcheck tests
# (test_compile.py) and the allocation tests (test_memory.py)
SMALL_CALLS = (_small_call, [{}])


def _compile_step(device):
    def step(q, kv):
        return pixel_attention(torch.relu(q) * 2.0, kv, kv, num_heads=2).square().mean()

    return step, (torch.randn(2, 16, 5, 6), torch.randn(2, 16, 4, 3))


# device -> (step, its arguments; the first is the tensor differentiated): test_compile.py's
# torch.compile tests
COMPILE_STEP = _compile_step

# make gpu-smoke (bench/gpu_smoke.py): the -k expression of this file's tests it runs per GPU
# backend, and on its CPU dry run (the interpreter is slow: there, fewer where it costs)
GPU_SMOKE = ("test_matches_reference or test_any_strides or test_nan_in_nan_out or "
             "test_logits_far_below_minus_1e30_still_give_a_softmax or "
             "test_keys_whose_logits_overflow_to_minus_inf_get_zero_weight or "
             "test_gpu_kernels_over_several_tiles or test_one_sided_gradients")
GPU_SMOKE_DRY = GPU_SMOKE
