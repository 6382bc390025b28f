"""pixel_contrastive_loss against the float64 naive formula, for every backend that can run."""
import pytest
import torch
import torch.nn.functional as F

from _helpers import (CUDA, INTERPRETER, OpCall, backend_cases, check_against_reference, cuda_extension_missing,
                      detached, forward_and_backward, leaves, run)
from pcd_kernels import PixelContrastiveLoss, pixel_contrastive_loss
from pcd_kernels._conventions import pixel_rows
from pcd_kernels.reference import naive_pixel_contrastive_loss, official_pcd_loss

OP = "pixel_contrastive_loss"
CASES = backend_cases(OP)
FP32 = backend_cases(OP, dtypes=(torch.float32,))
# float32, or the first dtype of a backend that takes none (CUDA): for tests whose bounds follow the dtype
ANY = backend_cases(OP, dtypes=(torch.float32,), every_backend=True)

# C not a power of two (and wider than the interpreter's 32-channel tile: two C chunks), H*W = 35
# not a multiple of any block, a queue of 37 rows.
B, C, H, W, K = 2, 40, 5, 7, 37


def make_inputs(b=B, c=C, h=H, w=W, k=K, masked=False):
    student = torch.randn(b, c, h, w, dtype=torch.float64)
    teacher = student + 0.7 * torch.randn(b, c, h, w, dtype=torch.float64)  # positives mean something
    queue = torch.randn(k, c, dtype=torch.float64) if k is not None else None
    mask = torch.rand(b, h, w) > 0.3 if masked else None
    return student, teacher, queue, mask


def check_op(backend, device, dtype, inputs, weight=None, grads=(True, True, True), **kwargs):
    """Value and every gradient of ``backend`` in ``dtype`` against the float64 naive formula."""
    *tensors, mask = inputs
    check_against_reference(OP, naive_pixel_contrastive_loss, tensors, backend, device, dtype, grads=grads,
                            weight=weight, names=("student", "teacher", "queue"),
                            result_scale=loss_term_scale(inputs, **kwargs),
                            grad_scale=gradient_term_scale(inputs, weight, **kwargs), mask=mask, **kwargs)


def run_loss(student, teacher, queue, mask, dtype, device, fn=pixel_contrastive_loss, **kwargs):
    """fn's loss and the gradients of its sum w.r.t. (student, teacher, queue)."""
    return run(fn, (student, teacher, queue), dtype, device, mask=mask, **kwargs)


def loss_term_scale(inputs, temperature=0.2, normalize=True, reduction="mean", **_):
    """Size of the logits a loss is a difference of (lse - positive): 1 / temperature for unit
    vectors, times the number of anchors for a sum. A saturated loss is ~0 while its two terms,
    computed in the test's dtype, keep their rounding."""
    student, _, _, mask = inputs
    logit = 1.0 / temperature if normalize else None
    if logit is None:
        return 0.0
    count = int(mask.sum()) if mask is not None else mask_free_count(student)
    return logit * (count if reduction == "sum" else 1)


def gradient_term_scale(inputs, weight, temperature=0.2, normalize=True, reduction="mean", **_):
    """Size of one anchor-key term of a gradient, |g| / temperature x |key| / |x| (unit vectors
    when normalising): the scale its rounding is relative to."""
    student, teacher, queue, mask = inputs
    g = (weight.abs().max() if weight is not None else torch.ones(())).item()
    if reduction == "mean":
        g /= max(int(mask.sum()) if mask is not None else mask_free_count(student), 1)
    vectors = [student.transpose(0, 1).flatten(1).T, teacher.transpose(0, 1).flatten(1).T]
    vectors += [queue] if queue is not None else []
    norms = torch.cat([v.norm(dim=1) for v in vectors])
    if normalize:  # (degenerate, near-zero vectors have a test of their own)
        return g / temperature / norms[norms > 1e-3].min().item()
    return g / temperature * norms.max().item()


def mask_free_count(x):
    return x.shape[0] * x.shape[2] * x.shape[3]


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("negatives", ["batch", "image", "none"])
@pytest.mark.parametrize("backend,device,dtype", CASES)
def test_matches_reference(backend, device, dtype, negatives, masked, reduction):
    inputs = make_inputs(masked=masked)
    weight = torch.randn(B, H, W) if reduction == "none" else torch.randn(())
    check_op(backend, device, dtype, inputs, weight, negatives=negatives, reduction=reduction)


@pytest.mark.parametrize("shape", [(1, 3, 3, 13, 20), (3, 16, 4, 4, None), (2, 70, 2, 9, 5), (1, 33, 1, 1, 3),
                                   (2, 24, 3, 3, 0)],
                         ids=["C3-3x13", "no-queue", "C70-2x9", "1x1-map", "empty-queue"])
@pytest.mark.parametrize("negatives", ["batch", "image", "none"])
@pytest.mark.parametrize("backend,device,dtype", ANY)
def test_odd_shapes(backend, device, dtype, negatives, shape):
    if negatives == "none" and shape[-1] is None:
        pytest.skip("negatives='none' needs a queue (tested in test_bad_inputs)")
    inputs = make_inputs(*shape, masked=True)
    check_op(backend, device, dtype, inputs, negatives=negatives)


@pytest.mark.parametrize("backend,device,dtype", ANY)
def test_empty_batch(backend, device, dtype):
    for negatives in ("batch", "none"):
        loss, grads = run_loss(*make_inputs(b=0), dtype, device, backend=backend, negatives=negatives)
        assert loss.item() == 0.0
        assert [tuple(g.shape) for g in grads] == [(0, C, H, W), (0, C, H, W), (K, C)]
        assert not grads[2].any()


@pytest.mark.parametrize("backend,device,dtype", ANY)
@pytest.mark.parametrize("negatives", ["batch", "image", "none"])
def test_without_normalization(backend, device, dtype, negatives):
    student, teacher, queue, mask = make_inputs(masked=True)
    inputs = (0.2 * student, 0.2 * teacher, 0.2 * queue, mask)
    check_op(backend, device, dtype, inputs, negatives=negatives, normalize=False, temperature=0.5)


@pytest.mark.parametrize("backend,device,dtype", ANY)
def test_tiny_temperature_is_stable(backend, device, dtype):
    check_op(backend, device, dtype, make_inputs(masked=True), negatives="batch", temperature=0.01)
    check_op(backend, device, dtype, make_inputs(), negatives="none", temperature=0.01)


@pytest.mark.parametrize("backend,device,dtype", FP32)
@pytest.mark.parametrize("negatives", ["batch", "none"])
@pytest.mark.parametrize("norm", [0.0, 1e-13], ids=["zero", "below-eps"])
def test_tiny_vectors_follow_f_normalize(backend, device, dtype, norm, negatives):
    """F.normalize divides by max(||x||, 1e-12): below that the clamp is constant, so the
    gradient has no projection term (and is ~1e12 times larger than its neighbours')."""
    student, teacher, queue, mask = make_inputs()
    tiny = [(student, (0, slice(None), 1, 2)), (teacher, (1, slice(None), 3, 4)),
            (teacher, (0, slice(None), 1, 2)), (queue, (5,))]
    for x, index in tiny:
        x[index] *= norm / x[index].norm()
    inputs = (student, teacher, queue, mask)
    ref, ref_grads = run_loss(*inputs, torch.float64, "cpu", fn=naive_pixel_contrastive_loss, negatives=negatives)
    ours, our_grads = run_loss(*inputs, dtype, device, backend=backend, negatives=negatives)
    torch.testing.assert_close(ours.double().cpu(), ref, rtol=1e-5, atol=1e-5)
    for name, g, g_ref in zip(("student", "teacher", "queue"), our_grads, ref_grads):
        # Row by row (a pixel's or queue row's gradient vector), relative to the row's largest
        # entry: the tiny rows' gradients are ~1e12 times their neighbours'.
        rows, ref_rows = (g.double().cpu(), g_ref) if g.dim() == 2 else (
            pixel_rows(g.double().cpu()), pixel_rows(g_ref))
        scale = ref_rows.abs().amax(1, keepdim=True).clamp_min(1e-300)
        error = ((rows - ref_rows).abs() / scale).amax(1)
        assert error.max() < 1e-4, f"d{name}: worst row error {error.max():.3g} at row {int(error.argmax())}"


@pytest.mark.parametrize("grads", [(True, False, False), (False, True, False), (False, False, True),
                                   (False, True, True)], ids=["student", "teacher", "queue", "keys"])
@pytest.mark.parametrize("negatives", ["batch", "image", "none"])
@pytest.mark.parametrize("backend,device,dtype", ANY)
def test_gradients_only_where_required(backend, device, dtype, negatives, grads):
    check_op(backend, device, dtype, make_inputs(masked=True), grads=grads, negatives=negatives)


@pytest.mark.parametrize("backend,device,dtype", FP32)
def test_official_pcd_loss_with_transposed_queue(backend, device, dtype):
    """Official PCD: (C, K) queue buffer of unit columns, passed as queue=buffer.t() (no copy)."""
    student, teacher, _, _ = make_inputs()
    buffer = F.normalize(torch.randn(C, 300, dtype=torch.float64), dim=0)
    s64 = student.clone().requires_grad_()
    official = official_pcd_loss(s64, teacher, buffer, 0.2)
    (official_grad,) = torch.autograd.grad(official, s64)
    s = student.to(device, dtype).requires_grad_()
    queue = buffer.to(device, dtype).t()
    assert not queue.is_contiguous()
    ours = pixel_contrastive_loss(s, teacher.to(device, dtype), queue, negatives="none", backend=backend)
    (grad,) = torch.autograd.grad(ours, s)
    torch.testing.assert_close(ours.double().cpu(), official, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double().cpu(), official_grad, rtol=1e-4, atol=1e-7)


@pytest.mark.skipif(not (INTERPRETER or CUDA), reason="the Triton kernels run in the interpreter or on a GPU only")
@pytest.mark.parametrize("copied", [False, True], ids=["in_place", "copied"])
def test_transposed_queue_beyond_32_bit_tile_offsets(copied, monkeypatch):
    """The kernels address a tile's rows with 32-bit offsets: a transposed queue whose in-tile
    span would pass 2**31 (more than 2**31 / C rows) is read from a contiguous copy. The limit is
    lowered here to this queue's span, so both paths run and agree with the float64 formula."""
    from pcd_kernels.backends.triton import _common
    from pcd_kernels.backends.triton import pixel_contrastive as kernels

    device = "cuda" if CUDA else "cpu"
    student, teacher, queue, mask = make_inputs(k=300, masked=True)
    buffer = queue.t().contiguous()  # (C, K), passed transposed
    transposed = buffer.to(device, torch.float32).t()
    if copied:
        monkeypatch.setattr(_common, "INT32_OFFSETS", buffer.shape[1] * (C - 1))
    prepared = _common.int32_tile_offsets(transposed, kernels.TILE_ROWS)
    assert (prepared.data_ptr() != transposed.data_ptr()) == copied
    assert prepared.is_contiguous() == copied
    check_op("triton", device, torch.float32, (student, teacher, buffer.t(), mask), negatives="none")


def _layouts(x):
    """The same values in other memory layouts: channels_last, a permuted view, a strided slice."""
    b, c, h, w = x.shape
    wide = torch.zeros(b, c, h, 2 * w, dtype=x.dtype)
    wide[..., ::2] = x
    return {
        "channels_last": x.contiguous(memory_format=torch.channels_last),
        "permuted_view": x.transpose(2, 3).contiguous().transpose(2, 3),
        "strided_slice": wide[..., ::2],
    }


@pytest.mark.parametrize("layout", ["channels_last", "permuted_view", "strided_slice"])
@pytest.mark.parametrize("backend,device,dtype", ANY)
def test_any_strides(backend, device, dtype, layout):
    student, teacher, queue, mask = make_inputs(masked=True)
    inputs = (_layouts(student)[layout], _layouts(teacher)[layout], queue, mask)
    assert not inputs[0].is_contiguous()
    check_op(backend, device, dtype, inputs, negatives="image")


@pytest.mark.parametrize("backend,device,dtype", ANY)
def test_no_valid_anchor_gives_zero_not_nan(backend, device, dtype):
    student, teacher, queue, _ = make_inputs()
    mask = torch.zeros(B, H, W, dtype=torch.bool)
    for reduction in ("mean", "sum"):
        loss, grads = run_loss(student, teacher, queue, mask, dtype, device,
                               backend=backend, reduction=reduction)
        assert loss.item() == 0.0
        for g in grads:
            assert torch.equal(g, torch.zeros_like(g))


@pytest.mark.filterwarnings("ignore:All-NaN slice encountered")  # the interpreter's numpy, on purpose
@pytest.mark.parametrize("backend,device,dtype", ANY)
def test_nan_in_nan_out_unless_masked(backend, device, dtype):
    student, teacher, queue, mask = make_inputs(masked=True)
    valid = mask.nonzero()[0].tolist()
    invalid = (~mask).nonzero()[0].tolist()
    for negatives in ("batch", "none"):
        s = student.clone()
        s[valid[0], :, valid[1], valid[2]] = float("nan")
        loss, _ = run_loss(s, teacher, queue, mask, dtype, device,
                           backend=backend, negatives=negatives)
        assert loss.isnan().item(), f"{negatives}: NaN in a valid student pixel was not propagated"
        t = teacher.clone()
        t[valid[0], :, valid[1], valid[2]] = float("nan")
        loss, _ = run_loss(student, t, queue, mask, dtype, device,
                           backend=backend, negatives=negatives)
        assert loss.isnan().item(), f"{negatives}: NaN in a valid teacher pixel was not propagated"
        q = queue.clone()
        q[3, 0] = float("nan")
        loss, _ = run_loss(student, teacher, q, mask, dtype, device,
                           backend=backend, negatives=negatives)
        assert loss.isnan().item(), f"{negatives}: NaN in the queue was not propagated"
    # A masked pixel is neither anchor nor key: its values, NaN included, do not reach the result.
    s, t = student.clone(), teacher.clone()
    s[invalid[0], :, invalid[1], invalid[2]] = float("nan")
    t[invalid[0], :, invalid[1], invalid[2]] = float("nan")
    loss, grads = run_loss(s, t, queue, mask, dtype, device, backend=backend)
    assert loss.isfinite().item()
    assert all(g.isfinite().all() for g in grads)


@pytest.mark.parametrize("backend,device,dtype", ANY)
def test_nan_teacher_pixel_reaches_only_its_own_anchor_without_pixel_negatives(backend, device, dtype):
    # With negatives="none" a teacher pixel is only its own anchor's positive: a NaN there makes
    # that anchor's loss and gradients NaN and no other's (a kernel that multiplies whole tiles of
    # teacher pixels by zero weights would spread it as 0 * NaN).
    student, teacher, queue, _ = make_inputs()
    b, h, w = 1, 2, 3
    teacher[b, :, h, w] = float("nan")
    loss, (grad_s, grad_t, grad_q) = run_loss(student, teacher, queue, None, dtype, device,
                                              backend=backend, negatives="none", reduction="none")
    own = torch.zeros(loss.shape, dtype=torch.bool)
    own[b, h, w] = True
    own = own.to(loss.device)
    assert loss[own].isnan().all() and loss[~own].isfinite().all()
    assert grad_s.permute(0, 2, 3, 1)[own].isnan().all() and grad_s.permute(0, 2, 3, 1)[~own].isfinite().all()
    assert grad_t.permute(0, 2, 3, 1)[~own].isfinite().all()
    assert grad_q.isnan().any()  # every queue row is a key of the NaN anchor


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("negatives", ["image", "none"])
@pytest.mark.parametrize("backend,device,dtype", ANY)
def test_non_finite_upstream_gradient_reaches_only_what_its_anchor_sees(backend, device, dtype, negatives, bad):
    # reduction="none" with a NaN (or inf) weight at one anchor: that anchor's gradients and those
    # of the keys it sees are non-finite, no other's. The key-side kernels divide the weights by
    # their largest magnitude, which must be taken over the finite ones, or one bad weight spreads
    # to every key of every image.
    student, teacher, queue, _ = make_inputs()
    b, h, w = 0, 2, 3
    weight = torch.rand(B, H, W, dtype=torch.float64) + 0.5
    weight[b, h, w] = bad
    _, (grad_s, grad_t, grad_q) = run(pixel_contrastive_loss, (student, teacher, queue), dtype, device,
                                      weight=weight, backend=backend, negatives=negatives, reduction="none")
    own = torch.zeros(B, H, W, dtype=torch.bool)
    own[b, h, w] = True
    grad_s, grad_t = pixel_rows(grad_s.cpu()).view(B, H, W, -1), pixel_rows(grad_t.cpu()).view(B, H, W, -1)
    assert not grad_s[own].isfinite().all() and grad_s[~own].isfinite().all()
    seen = own.clone() if negatives == "none" else own.any((1, 2), keepdim=True).expand(B, H, W)
    assert not grad_t[seen].isfinite().all(1).any(), "a key the bad anchor sees kept a finite gradient"
    assert grad_t[~seen].isfinite().all(), "a key the bad anchor does not see got a non-finite gradient"
    assert not grad_q.isfinite().all(1).any()  # every queue row is a key of every anchor


@pytest.mark.parametrize("backend,device,dtype", FP32)
def test_mixed_dtypes_are_promoted(backend, device, dtype):
    student, teacher, queue, _ = make_inputs()
    s = student.to(device, torch.bfloat16).requires_grad_()
    q = queue.to(device, torch.float32).requires_grad_()
    loss = pixel_contrastive_loss(s, teacher.to(device, torch.bfloat16), q, backend=backend)
    loss.backward()
    assert s.grad.dtype == torch.bfloat16 and q.grad.dtype == torch.float32
    expected = pixel_contrastive_loss(s.detach().float(), teacher.to(device, torch.bfloat16).float(),
                                      q.detach(), backend=backend)
    torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize("backend,device,dtype", ANY)
def test_autocast_runs_the_op_in_the_autocast_dtype(backend, device, dtype):
    student, teacher, queue, _ = make_inputs()
    s = student.to(device, torch.float32).requires_grad_()
    t, q = teacher.to(device, torch.float32), queue.to(device, torch.float32)
    low = torch.bfloat16 if device == "cpu" else torch.float16
    with torch.autocast(device, dtype=low):
        loss = pixel_contrastive_loss(s, t, q, backend=backend)
    loss.backward()
    assert loss.dtype == torch.float32 and s.grad.dtype == torch.float32
    expected = pixel_contrastive_loss(s.detach().to(low), t.to(low), q.to(low), backend=backend)
    torch.testing.assert_close(loss, expected)


@pytest.mark.skipif(not CUDA, reason="needs a GPU: the CPU interpreter runs programs one at a time, "
                                       "so it cannot show (non-)determinism")
def test_triton_backward_is_deterministic():
    device = "cuda"
    student, teacher, queue, mask = make_inputs(masked=True)
    results = []
    for _ in range(2):
        loss, grads = run_loss(student, teacher, queue, mask, torch.float32, device,
                               backend="triton", negatives="batch")
        results.append([loss, *grads])
    for first, second in zip(*results):
        assert torch.equal(first, second)


@pytest.mark.parametrize("negatives", ["batch", "image", "none"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_meta_tensors_give_meta_results_and_gradients(negatives, reduction):
    """Frameworks build and trace models on meta tensors: no autocast query may fail there."""
    s, t, q = (torch.randn(*shape, device="meta", dtype=torch.bfloat16, requires_grad=True)
               for shape in ((2, 8, 3, 5), (2, 8, 3, 5), (7, 8)))
    mask = torch.ones(2, 3, 5, dtype=torch.bool, device="meta")
    loss = pixel_contrastive_loss(s, t, q, negatives=negatives, mask=mask, reduction=reduction)
    assert loss.device.type == "meta" and loss.dtype == torch.float32
    assert loss.shape == ((2, 3, 5) if reduction == "none" else ())
    loss.sum().backward()
    for x in (s, t, q):
        assert x.grad.device.type == "meta" and x.grad.shape == x.shape and x.grad.dtype == x.dtype


def _bad_cases():
    s = torch.randn(2, 8, 3, 3)
    q = torch.randn(5, 8)
    ok = dict(student=s, teacher=s.clone(), queue=q)
    return [
        ("student not a tensor", dict(ok, student=s.numpy()), TypeError, "student must be a torch.Tensor"),
        ("student 3-D", dict(ok, student=s[0]), ValueError, "student must be a 4-D"),
        ("shape mismatch", dict(ok, teacher=torch.randn(2, 8, 3, 4)), ValueError, "same shape"),
        ("integer student", dict(ok, student=s.long(), teacher=s.long()), TypeError, "student must be float"),
        ("zero channels", dict(ok, student=s[:, :0], teacher=s[:, :0]), ValueError, "0 channels"),
        ("queue channels", dict(ok, queue=torch.randn(5, 7)), ValueError, r"queue must be \(K, C\) with C = 8"),
        ("queue 3-D", dict(ok, queue=torch.randn(1, 5, 8)), ValueError, "queue must be a 2-D"),
        ("queue integer", dict(ok, queue=q.int()), TypeError, "queue must be float"),
        ("temperature 0", dict(ok, temperature=0.0), ValueError, "temperature must be a finite number > 0"),
        ("temperature < 0", dict(ok, temperature=-0.1), ValueError, "temperature"),
        ("temperature nan", dict(ok, temperature=float("nan")), ValueError, "temperature"),
        ("temperature inf", dict(ok, temperature=float("inf")), ValueError, "temperature"),
        ("temperature tensor", dict(ok, temperature=torch.tensor(0.2)), TypeError, r"float\(t\)"),
        ("negatives", dict(ok, negatives="pixels"), ValueError, "negatives must be one of"),
        ("reduction", dict(ok, reduction="avg"), ValueError, "reduction must be one of"),
        ("backend", dict(ok, backend="cudnn"), ValueError, "backend must be one of"),
        ("normalize", dict(ok, normalize=1), TypeError, "normalize must be True or False"),
        ("mask shape", dict(ok, mask=torch.ones(2, 3, 4, dtype=torch.bool)), ValueError, r"mask must have shape"),
        ("mask dtype", dict(ok, mask=torch.ones(2, 3, 3)), TypeError, "mask must be a bool tensor"),
        ("none without queue", dict(ok, queue=None, negatives="none"), ValueError, "needs a queue"),
        ("devices", dict(ok, queue=q.to("meta")), ValueError, "queue is on meta"),
    ]


@pytest.mark.parametrize("kwargs,error,message", [c[1:] for c in _bad_cases()], ids=[c[0] for c in _bad_cases()])
def test_bad_inputs(kwargs, error, message):
    kwargs = dict(kwargs)
    with pytest.raises(error, match=message):
        pixel_contrastive_loss(kwargs.pop("student"), kwargs.pop("teacher"), kwargs.pop("queue"), **kwargs)


def test_backends_that_cannot_run_say_why(monkeypatch):
    s, t, q, _ = make_inputs()
    # CPU tensors: the extension is missing ("cannot run: ... not built") or the tensors are not CUDA's
    with pytest.raises(RuntimeError, match="backend='cuda' (cannot run|needs CUDA tensors)"):
        pixel_contrastive_loss(s.float(), t.float(), q.float(), backend="cuda")
    if CUDA and cuda_extension_missing() is None:
        for dtype in (torch.float64, torch.float32):
            with pytest.raises(TypeError, match=f"backend='cuda' supports float16 and bfloat16 inputs, got {dtype}"):
                pixel_contrastive_loss(s.to("cuda", dtype), t.to("cuda", dtype), q.to("cuda", dtype), backend="cuda")
    if INTERPRETER or CUDA:
        device = "cuda" if CUDA else "cpu"
        with pytest.raises(TypeError, match="backend='triton' supports float16, bfloat16 and float32"):
            pixel_contrastive_loss(s.to(device), t.to(device), q.to(device), backend="triton")
    from pcd_kernels.backends.triton import _common

    monkeypatch.setattr(_common, "is_interpreter", lambda: False)
    with pytest.raises(RuntimeError, match="need CUDA tensors, got cpu tensors"):
        pixel_contrastive_loss(s.float(), t.float(), q.float(), backend="triton")


@pytest.mark.skipif(not CUDA or cuda_extension_missing() is not None,
                    reason="needs a GPU and the built extension: PCD_KERNELS_CUDA_TMA chooses between CUDA kernels")
@pytest.mark.parametrize("negatives", ["batch", "image", "none"])
def test_cuda_tma_and_cp_async_kernels_agree_and_tma_required_says_why_not(negatives, monkeypatch):
    """Each CUDA kernel of the op (forward, anchor and key backward) has two versions: the TMA one
    on sm_90 GPUs where one 256-channel chunk holds C, the cp.async one elsewhere and with
    PCD_KERNELS_CUDA_TMA=0. Both, with every gradient, against the float64 formula, and against
    each other bit for bit (the same operands, MMAs and order: only the copies differ); with
    PCD_KERNELS_CUDA_TMA=1 the TMA ones are required: they run, or a RuntimeError says why (not
    sm_90, no sm_90a code, or C = 300 needing two chunks); another value is a ValueError."""
    from pcd_kernels.backends.cuda import _extension

    sm90 = torch.cuda.get_device_capability()[0] == 9
    has_90a = "90a" in _extension.extension().cuda_architectures.split(",")
    for c in (200, 300):
        inputs = make_inputs(b=2, c=c, h=7, w=11, k=130, masked=True)
        # the first of its conditions the TMA kernels fail (csrc/pixel_contrastive.cu tma_refusal)
        refusal = ("the GPU is not sm_90" if not sm90 else "the extension was built without sm_90a code"
                   if not has_90a else "C = 300" if c > 256 else None)
        for dtype in (torch.float16, torch.bfloat16):
            results = {}
            for choice in ("0", "1"):
                monkeypatch.setenv("PCD_KERNELS_CUDA_TMA", choice)
                if choice == "1" and refusal is not None:
                    with pytest.raises(RuntimeError, match="PCD_KERNELS_CUDA_TMA=1 asks for the TMA forward, which "
                                                           "cannot run: " + refusal):
                        run_loss(*inputs, dtype, "cuda", backend="cuda", negatives=negatives)
                    continue
                check_op("cuda", "cuda", dtype, inputs, grads=(True, True, True), negatives=negatives)
                results[choice] = run_loss(*inputs, dtype, "cuda", backend="cuda", negatives=negatives)
            if len(results) == 2:
                (loss0, grads0), (loss1, grads1) = results["0"], results["1"]
                assert torch.equal(loss0, loss1)
                for name, g0, g1 in zip(("student", "teacher", "queue"), grads0, grads1):
                    assert torch.equal(g0, g1), f"{name} gradient: TMA and cp.async kernels differ"
    monkeypatch.setenv("PCD_KERNELS_CUDA_TMA", "off")
    with pytest.raises(ValueError, match="PCD_KERNELS_CUDA_TMA must be 0 .* or unset .*, got 'off'"):
        run_loss(*make_inputs(b=1, c=8, h=3, w=3, k=5), torch.float16, "cuda", backend="cuda", negatives=negatives)


def test_cuda_backend_refuses_float32_before_running(monkeypatch):
    """The CUDA kernels take float16 and bfloat16 only (those of pixel_attention too): the
    registry refuses float32 naming where it runs, before anything runs (a CUDA device simulated:
    the availability check comes first)."""
    from pcd_kernels import backends
    from pcd_kernels.backends import cuda

    assert backends.dtypes("pixel_contrastive_loss", "cuda") == (torch.float16, torch.bfloat16)
    assert backends.dtypes("pixel_attention", "cuda") == (torch.float16, torch.bfloat16)
    monkeypatch.setattr(cuda, "unavailable_reason", lambda device: None)
    s, t, q, _ = make_inputs()
    message = (r"pixel_contrastive_loss: backend='cuda' supports float16 and bfloat16 inputs, got torch.float32; "
               r"use backend='triton' or 'torch' for torch.float32")
    with pytest.raises(TypeError, match=message):
        pixel_contrastive_loss(s.float(), t.float(), q.float(), backend="cuda")
    with pytest.raises(TypeError, match="got torch.float32"):  # promoted to float32 with a float16 student
        pixel_contrastive_loss(s.half(), t.float(), q.half(), backend="cuda")
    error = backends.unavailable("pixel_contrastive_loss", "cuda", torch.device("cuda"), torch.float64,
                                 negatives="batch", batch=2)
    assert isinstance(error, TypeError) and str(error).endswith("use backend='torch' for torch.float64")
    assert backends.unavailable("pixel_contrastive_loss", "cuda", torch.device("cuda"), torch.bfloat16,
                                negatives="batch", batch=2) is None


def test_auto_uses_the_torch_backend_for_cpu_tensors(monkeypatch):
    from pcd_kernels.backends.torch import pixel_contrastive as torch_backend

    calls = []
    real = torch_backend.forward
    monkeypatch.setattr(torch_backend, "forward", lambda *a: calls.append(1) or real(*a))
    s, t, q, _ = make_inputs()
    pixel_contrastive_loss(s.float(), t.float(), q.float())
    assert calls == [1]


@pytest.mark.skipif(not (CUDA or INTERPRETER), reason="Triton cannot run: no CUDA and no interpreter")
def test_image_negatives_beyond_the_grid_limit_are_refused_or_fall_back(monkeypatch):
    from pcd_kernels.backends import _host
    from pcd_kernels.backends._host import MAX_GRID_IMAGES

    device = "cuda" if CUDA else "cpu"
    student = torch.randn(MAX_GRID_IMAGES + 1, 2, 1, 1, device=device)
    teacher = torch.randn_like(student)
    with pytest.raises(ValueError, match=f"takes up to {MAX_GRID_IMAGES} images per call, got {MAX_GRID_IMAGES + 1}"):
        pixel_contrastive_loss(student, teacher, negatives="image", backend="triton")

    # "auto" uses the torch backend instead (shown at a small limit: the torch backend is slow on
    # 65,536 one-pixel images).
    monkeypatch.setattr(_host, "MAX_GRID_IMAGES", 2)
    student, teacher, _, _ = make_inputs(b=3)
    student, teacher = student.float().to(device), teacher.float().to(device)
    with pytest.raises(ValueError, match="takes up to 2 images per call, got 3"):
        pixel_contrastive_loss(student, teacher, negatives="image", backend="triton")
    torch.testing.assert_close(pixel_contrastive_loss(student, teacher, negatives="image"),
                               pixel_contrastive_loss(student, teacher, negatives="image", backend="torch"))


@pytest.mark.skipif(not CUDA, reason="the autotune candidates are GPU tile shapes (the interpreter runs its own "
                                     "small tiles)")
@pytest.mark.parametrize("dtype,negatives", [(torch.bfloat16, "none"), (torch.bfloat16, "batch"),
                                             (torch.float32, "none"), (torch.float32, "batch"),
                                             (torch.float16, "batch")], ids=str)
def test_every_autotune_candidate_on_gpu(dtype, negatives, monkeypatch):
    """The suite runs each kernel's first configuration; the autotuner may pick any other. Sizes
    span several tiles of every candidate, with tails (float32 here is IEEE, float16 normalises
    tiles in registers: each has its own candidates; float16's differ in the backward kernels,
    which negatives="batch" runs all of: anchor, queue keys, teacher keys)."""
    from pcd_kernels.backends.triton import pixel_contrastive as kernels

    inputs = make_inputs(b=3, c=72, h=11, w=13, k=300 if negatives == "none" else 45, masked=True)
    lists = kernels.config_lists("ieee" if dtype == torch.float32 else "tf32", dtype != torch.float16)
    for i in range(max(len(c) for c in lists.values())):
        monkeypatch.setattr(kernels, "gpu_configs", lambda kind, precision, scale_weights=True, i=i:
                            [lists[kind][min(i, len(lists[kind]) - 1)]])
        check_op("triton", "cuda", dtype, inputs, negatives=negatives)


# ------------------------------------------------------------------------------------------------
# What the shared tests read from every op's test file (tests/_helpers.py: op_test_entry):
# SMALL_CALLS, COMPILE_STEP, GPU_SMOKE and GPU_SMOKE_DRY.
# ------------------------------------------------------------------------------------------------


def _small_call(device, dtype, large=False, negatives="batch"):
    from pcd_kernels.backends.torch import _common

    B, C, H, W, K = (2, 8, 8, 8, 300) if large else (2, 12, 3, 5, 7)
    s, t, q = leaves(device, dtype, (B, C, H, W), (B, C, H, W), (K, C))
    mask = None if large else torch.rand(B, H, W, device=device) > 0.3
    forward = (s, t, q, None, mask, None, negatives, 0.2, True)
    pixels = {"batch": B * H * W, "image": H * W, "none": 0}[negatives]
    return OpCall(
        forward, lambda out: (torch.randn_like(out[0]), *detached(forward[:6] + out), *forward[6:]),
        needs=[(True, True, True)],
        public=lambda backend: forward_and_backward(pixel_contrastive_loss(
            s, t, q, mask=mask, negatives=negatives, backend=backend), s, t, q),
        naive=lambda: forward_and_backward(naive_pixel_contrastive_loss(
            s, t, q, mask=mask, negatives=negatives), s, t, q),
        matrix=B * H * W * (K + pixels), torch_chunks=[(_common, "CHUNK_ELEMENTS", 4096)])


# (the OpCall builder, the keyword sets of the problems it is called on): the opcheck tests
# (test_compile.py) and the allocation tests (test_memory.py)
SMALL_CALLS = (_small_call, [dict(negatives="batch"), dict(negatives="none")])


def _compile_step(device):
    criterion = PixelContrastiveLoss(negatives="none", queue_size=9, dim=12).to(device)

    def step(s, t, mask):
        features = torch.relu(s) * 2.0  # something around the op for the compiler to fuse
        return criterion(features, t, mask) + 0.1 * pixel_contrastive_loss(features, t, negatives="image")

    return step, (torch.randn(2, 12, 3, 5), torch.randn(2, 12, 3, 5), torch.rand(2, 3, 5) > 0.3)


# device -> (step, its arguments; the first is the tensor differentiated): test_compile.py's
# torch.compile tests
COMPILE_STEP = _compile_step

# make gpu-smoke (bench/gpu_smoke.py): the -k expression of this file's tests it runs per GPU
# backend, and on its CPU dry run (the interpreter is slow: there, fewer where it costs)
GPU_SMOKE = ("test_matches_reference or test_odd_shapes or test_nan_in_nan_out_unless_masked or "
             "test_non_finite_upstream_gradient_reaches_only_what_its_anchor_sees or "
             "test_any_strides or test_empty_batch or test_official_pcd_loss_with_transposed_queue")
GPU_SMOKE_DRY = "(test_matches_reference and mean) or test_odd_shapes or test_nan_in_nan_out_unless_masked"
