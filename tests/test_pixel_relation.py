"""pixel_relation_loss (CIRKD): against a float64 naive formula, against the official CIRKD code
(copied below with its origin), every gradient, masks, reductions, odd sizes, bad input. (Memory:
test_memory.py; torch.library registration and torch.compile: test_compile.py.)"""
import pytest
import torch
import torch.nn.functional as F

from _helpers import (OpCall, assert_close, backend_cases, check_against_reference, detached, forward_and_backward,
                      leaves, run)
from pcd_kernels import pixel_relation_loss
from pcd_kernels.backends.torch import _common as torch_common
from pcd_kernels import reference
from pcd_kernels.reference import naive_pixel_relation_loss

B, C, H, W, K = 3, 20, 5, 7, 50  # C not a power of two, H*W = 35 odd
OP = "pixel_relation_loss"
CASES = backend_cases(OP)
FP32 = backend_cases(OP, dtypes=(torch.float32,))


def make_inputs(b=B, c=C, h=H, w=W, k=K, masked=False):
    student = torch.randn(b, c, h, w, dtype=torch.float64)
    teacher = student + 0.8 * torch.randn(b, c, h, w, dtype=torch.float64)  # related distributions
    keys = torch.randn(k, c, dtype=torch.float64) if k else None
    mask = torch.rand(b, h, w) > 0.35 if masked else None
    return student, teacher, keys, mask


def run_loss(student, teacher, keys, mask, dtype, device, fn=pixel_relation_loss, **kwargs):
    """fn's value and the gradients of its sum w.r.t. (student, teacher, keys): the teacher's is
    None (a constant target)."""
    return run(fn, (student, teacher, keys), dtype, device, grads=(True, False, True), mask=mask, **kwargs)


def check_op(backend, device, dtype, inputs, **kwargs):
    *tensors, mask = inputs
    b, _, h, w = tensors[0].shape
    weight = torch.rand(b, h, w, dtype=torch.float64) + 0.5 if kwargs.get("reduction") == "none" else None
    check_against_reference(OP, naive_pixel_relation_loss, tensors, backend, device, dtype, grads=(True, False, True),
                            weight=weight, names=("student", "teacher", "keys"), mask=mask, **kwargs)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("mode", ["cross_image", "keys"])
@pytest.mark.parametrize("backend,device,dtype", CASES)
def test_matches_reference(backend, device, dtype, mode, masked, reduction):
    inputs = make_inputs(k=K if mode == "keys" else 0, masked=masked)
    check_op(backend, device, dtype, inputs, temperature=0.5, reduction=reduction)


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("mode", ["cross_image", "keys", "cross_image_other_channels"])
@pytest.mark.parametrize("backend,device,dtype", FP32)
def test_backends_on_wider_channels_and_tails(backend, device, dtype, mode, normalize):
    """C above one Triton channel tile (chunked), key and anchor tails, a teacher with other
    channels, one image without a valid pixel."""
    c_t = 70 if mode == "cross_image_other_channels" else 40
    student, teacher, keys, mask = make_inputs(b=3, c=40, h=5, w=9, k=37 if mode == "keys" else 0, masked=True)
    teacher = torch.randn(3, c_t, 5, 9, dtype=torch.float64) if c_t != 40 else teacher
    mask[1] = False
    check_op(backend, device, dtype, (student * 0.5, teacher * 0.5, keys, mask), temperature=0.7,
             normalize=normalize, reduction="none")


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("mode", ["cross_image", "keys"])
def test_unnormalised_and_odd_shapes(mode, normalize, monkeypatch):
    """Chunks smaller than a row of keys, a single image, one-pixel maps, C = 1."""
    monkeypatch.setattr(torch_common, "CHUNK_ELEMENTS", 64)
    for b, c, h, w in ((1, 3, 4, 9), (4, 1, 1, 1), (2, 33, 3, 3)):
        student, teacher, keys, mask = make_inputs(b, c, h, w, k=17 if mode == "keys" else 0, masked=True)
        mask[0, 0, 0] = True  # a random mask of 4 pixels may have none (test_no_valid_anchor_... covers that)
        # unnormalised logits at temperature 1 stay moderate with small vectors
        student, teacher = student * 0.3, teacher * 0.3
        keys = keys * 0.3 if keys is not None else None
        for reduction in ("mean", "none"):
            options = dict(temperature=0.7, normalize=normalize, reduction=reduction)
            ours, our_grads = run_loss(student, teacher, keys, mask, torch.float64, "cpu", **options)
            ref, ref_grads = run_loss(student, teacher, keys, mask, torch.float64, "cpu", naive_pixel_relation_loss,
                                      **options)
            torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)
            for g, g_ref in zip(our_grads, ref_grads):  # (the teacher's is None in both)
                torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-12)


# ---- The official CIRKD code (github.com/winycg/CIRKD, losses/cirkd_mini_batch.py and
# losses/cirkd_memory.py at commit 05a27537), copied with only `.cuda()` removed and the module
# reduced to the computation it performs. ----

class CriterionMiniBatchCrossImagePair(torch.nn.Module):
    def __init__(self, temperature, pooling=False):
        super(CriterionMiniBatchCrossImagePair, self).__init__()
        self.temperature = temperature
        self.pooling = pooling

    def pair_wise_sim_map(self, fea_0, fea_1):
        C, H, W = fea_0.size()

        fea_0 = fea_0.reshape(C, -1).transpose(0, 1)
        fea_1 = fea_1.reshape(C, -1).transpose(0, 1)

        sim_map_0_1 = torch.mm(fea_0, fea_1.transpose(0, 1))
        return sim_map_0_1

    def forward(self, feat_S, feat_T):
        B, C, H, W = feat_S.size()

        if self.pooling:
            avg_pool = torch.nn.AvgPool2d(kernel_size=(2, 2), stride=(2, 2), padding=0, ceil_mode=True)
            feat_S = avg_pool(feat_S)
            feat_T = avg_pool(feat_T)

        feat_S = F.normalize(feat_S, p=2, dim=1)
        feat_T = F.normalize(feat_T, p=2, dim=1)

        sim_dis = torch.tensor(0.)
        for i in range(B):
            for j in range(B):
                s_sim_map = self.pair_wise_sim_map(feat_S[i], feat_S[j])
                t_sim_map = self.pair_wise_sim_map(feat_T[i], feat_T[j])

                p_s = F.log_softmax(s_sim_map / self.temperature, dim=1)
                p_t = F.softmax(t_sim_map / self.temperature, dim=1)

                sim_dis_ = F.kl_div(p_s, p_t, reduction='batchmean')
                sim_dis += sim_dis_
        sim_dis = sim_dis / (B * B)
        return sim_dis


def official_memory_logits_kd(s_feats, t_feats, t_X_pixel_contrast, contrast_temperature, contrast_kd_temperature):
    """StudentSegContrast.forward's pixel term after sampling: anchors (rows, C) already
    normalised, the sampled memory rows t_X_pixel_contrast (rows, C)."""
    t_pixel_logits = torch.div(torch.mm(t_feats, t_X_pixel_contrast.T), contrast_temperature)
    s_pixel_logits = torch.div(torch.mm(s_feats, t_X_pixel_contrast.T), contrast_temperature)

    def contrast_sim_kd(s_logits, t_logits):
        p_s = F.log_softmax(s_logits / contrast_kd_temperature, dim=1)
        p_t = F.softmax(t_logits / contrast_kd_temperature, dim=1)
        sim_dis = F.kl_div(p_s, p_t, reduction='batchmean') * contrast_kd_temperature ** 2
        return sim_dis

    return contrast_sim_kd(s_pixel_logits, t_pixel_logits.detach())


# ---- end of the official code ----


def test_equals_the_official_mini_batch_loss():
    student, teacher, _, _ = make_inputs()
    s1, s2 = student.clone().requires_grad_(), student.clone().requires_grad_()
    official = CriterionMiniBatchCrossImagePair(0.6)(s1, teacher)
    ours = pixel_relation_loss(s2, teacher, temperature=0.6)
    # The official sum starts from torch.tensor(0.), a float32 scalar: float64 terms, float32 sum.
    assert official.dtype == torch.float32
    torch.testing.assert_close(ours, official.double(), rtol=1e-6, atol=1e-9)
    (g_official,), (g_ours,) = torch.autograd.grad(official, s1), torch.autograd.grad(ours, s2)
    torch.testing.assert_close(g_ours, g_official, rtol=1e-5, atol=1e-9)


def test_equals_the_official_memory_loss():
    """The memory term: anchors are the valid pixels, keys the sampled memory rows (unit rows, as
    the memory holds); temperature = contrast_temperature * contrast_kd_temperature, times
    contrast_kd_temperature ** 2."""
    student, teacher, _, mask = make_inputs(masked=True)
    memory = F.normalize(torch.randn(19 * 8, C, dtype=torch.float64), dim=1)
    tau_c, tau_kd = 0.1, 1.0 + 0.5
    s1, s2 = student.clone().requires_grad_(), student.clone().requires_grad_()
    rows = lambda x: F.normalize(x, dim=1).permute(0, 2, 3, 1).reshape(-1, C)[mask.reshape(-1)]
    official = official_memory_logits_kd(rows(s1), rows(teacher), memory, tau_c, tau_kd)
    ours = pixel_relation_loss(s2, teacher, memory, temperature=tau_c * tau_kd, mask=mask) * tau_kd ** 2
    torch.testing.assert_close(ours, official, rtol=1e-12, atol=1e-14)
    # (The official memory is a buffer: no gradient to compare. Ours normalises key rows, so a key's
    # gradient loses its radial part; test_matches_reference checks it against the naive formula.)
    (g_official,), (g_ours,) = torch.autograd.grad(official, s1), torch.autograd.grad(ours, s2)
    torch.testing.assert_close(g_ours, g_official, rtol=1e-9, atol=1e-14)


@pytest.mark.parametrize("mode", ["cross_image", "keys"])
def test_no_valid_anchor_gives_zero_and_zero_gradients(mode):
    student, teacher, keys, _ = make_inputs(k=K if mode == "keys" else 0)
    mask = torch.zeros(B, H, W, dtype=torch.bool)
    s = student.clone().requires_grad_()
    loss = pixel_relation_loss(s, teacher, keys, mask=mask)
    (grad,) = torch.autograd.grad(loss, s)
    assert loss.item() == 0.0 and not grad.any()


def test_an_image_without_valid_pixels_leaves_the_mean_over_images():
    """Cross-image: image 1 has no valid pixel, so the anchors of images 0 and 2 average over two
    images, and the result equals the loss of the batch without image 1."""
    student, teacher, _, mask = make_inputs(masked=True)
    mask[1] = False
    mask[0, 0, 0] = mask[2, 0, 0] = True
    full = pixel_relation_loss(student, teacher, mask=mask, reduction="none")
    keep = torch.tensor([0, 2])
    without = pixel_relation_loss(student[keep], teacher[keep], mask=mask[keep], reduction="none")
    torch.testing.assert_close(full[keep], without, rtol=1e-12, atol=1e-14)
    assert not full[1].any()


@pytest.mark.parametrize("backend,device,dtype", FP32)
def test_masked_nan_pixels_reach_nothing_in_either_map(backend, device, dtype):
    """NaN at masked pixels of both maps (used as keys without keys): every value and gradient as
    the float64 formula gives with those pixels zeroed."""
    student, teacher, _, mask = make_inputs(masked=True)
    mask[0, 1, 2] = False
    poisoned_s, poisoned_t = student.clone(), teacher.clone()
    poisoned_s[0, :, 1, 2] = poisoned_t[0, :, 1, 2] = float("nan")
    ours, (grad, _, _) = run_loss(poisoned_s, poisoned_t, None, mask, dtype, device, backend=backend,
                                  reduction="none")
    ref, (ref_grad, _, _) = run_loss(poisoned_s, poisoned_t, None, mask, torch.float64, "cpu",
                                     naive_pixel_relation_loss, reduction="none")
    assert torch.isfinite(ours).all() and torch.isfinite(grad).all() and torch.isfinite(ref_grad).all()
    torch.testing.assert_close(ours.double().cpu(), ref, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(grad.double().cpu(), ref_grad, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("mode", ["cross_image", "keys"])
def test_nan_in_nan_out_unless_masked(mode):
    student, teacher, keys, _ = make_inputs(k=K if mode == "keys" else 0)
    student[0, :, 1, 2] = float("nan")
    assert torch.isnan(pixel_relation_loss(student, teacher, keys))
    mask = torch.ones(B, H, W, dtype=torch.bool)
    mask[0, 1, 2] = False
    s = student.clone().requires_grad_()
    loss = pixel_relation_loss(s, teacher, keys, mask=mask)
    (grad,) = torch.autograd.grad(loss, s)
    assert torch.isfinite(loss) and torch.isfinite(grad).all() and not grad[0, :, 1, 2].any()


def test_teacher_gets_no_gradient_and_layouts_are_read_as_is():
    student, teacher, keys, _ = make_inputs()
    s = student.to(memory_format=torch.channels_last).requires_grad_()
    t = teacher.clone().requires_grad_()
    loss = pixel_relation_loss(s, t, keys.t().contiguous().t())  # a transposed view of the keys
    grad_s, grad_t = torch.autograd.grad(loss, (s, t), allow_unused=True)
    assert grad_t is None
    expected = pixel_relation_loss(student.clone().requires_grad_(), teacher, keys)
    torch.testing.assert_close(loss, expected)


def test_mixed_dtypes_promote_and_autocast_runs_in_its_dtype():
    student, teacher, keys, _ = make_inputs()
    loss = pixel_relation_loss(student.float(), teacher.half(), keys.float())
    assert loss.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = pixel_relation_loss(student.float(), teacher.float(), keys.float())
    assert loss.dtype == torch.float32
    plain = naive_pixel_relation_loss(student.bfloat16(), teacher.bfloat16(), keys.bfloat16())
    ref = naive_pixel_relation_loss(student, teacher, keys)
    assert_close("autocast loss", loss, plain, ref, torch.bfloat16)


@pytest.mark.parametrize("call, error, words", [
    (lambda s, t, k: pixel_relation_loss(s, t, k, backend="cuda"), RuntimeError, "does not implement this op"),
    (lambda s, t, k: pixel_relation_loss(s, t, k, backend="fast"), ValueError, "backend"),
    (lambda s, t, k: pixel_relation_loss(s, t, k[:, :5]), ValueError, "keys must be (K, C)"),
    (lambda s, t, k: pixel_relation_loss(s, t, k.long()), TypeError, "keys"),
    (lambda s, t, k: pixel_relation_loss(s, t[:, :4], k), ValueError, "teacher"),
    (lambda s, t, k: pixel_relation_loss(s, t[:1]), ValueError, "teacher"),
    (lambda s, t, k: pixel_relation_loss(s, t, temperature=0), ValueError, "temperature"),
    (lambda s, t, k: pixel_relation_loss(s, t, reduction="max"), ValueError, "reduction"),
    (lambda s, t, k: pixel_relation_loss(s, t, normalize=1), TypeError, "normalize"),
    (lambda s, t, k: pixel_relation_loss(s, t, mask=torch.ones(B, H, W)), TypeError, "mask"),
    (lambda s, t, k: pixel_relation_loss(s, t, mask=torch.ones(B, W, H, dtype=torch.bool)), ValueError, "mask"),
])
def test_bad_input_says_what_was_expected(call, error, words):
    student, teacher, keys, _ = make_inputs()
    with pytest.raises(error, match=words.replace("(", r"\(").replace(")", r"\)")):
        call(student, teacher, keys)


def test_the_reference_transcriptions_equal_the_official_code():
    """bench/pixel_relation.py times reference.official_cirkd_*; they compute what the official
    code above does."""
    student, teacher, _, mask = make_inputs(masked=True)
    official = CriterionMiniBatchCrossImagePair(0.4)(student, teacher)
    torch.testing.assert_close(reference.official_cirkd_minibatch_loss(student, teacher, 0.4), official.double(),
                               rtol=1e-6, atol=1e-9)
    memory = F.normalize(torch.randn(40, C, dtype=torch.float64), dim=1)
    rows = lambda x: F.normalize(x, dim=1).permute(0, 2, 3, 1).reshape(-1, C)[mask.reshape(-1)]
    torch.testing.assert_close(reference.official_cirkd_memory_loss(student, teacher, memory, 0.1, 2.0, mask),
                               official_memory_logits_kd(rows(student), rows(teacher), memory, 0.1, 2.0),
                               rtol=1e-12, atol=1e-14)


def test_cross_image_maps_may_differ_in_channels():
    """Each map's similarities use its own pixels: a 128-channel student against a 512-channel
    teacher is CIRKD's MobileNetV2 / ResNet-101 pairing. Keys need the same C on both sides."""
    student = torch.randn(2, 12, 4, 6, dtype=torch.float64)
    teacher = torch.randn(2, 40, 4, 6, dtype=torch.float64)
    s1, s2 = student.clone().requires_grad_(), student.clone().requires_grad_()
    official = CriterionMiniBatchCrossImagePair(0.3)(s1, teacher)
    ours = pixel_relation_loss(s2, teacher, temperature=0.3)
    torch.testing.assert_close(ours, official.double(), rtol=1e-6, atol=1e-9)
    (g1,), (g2,) = torch.autograd.grad(official, s1), torch.autograd.grad(ours, s2)
    torch.testing.assert_close(g2, g1, rtol=1e-5, atol=1e-9)
    with pytest.raises(ValueError, match="same shape"):
        pixel_relation_loss(student, teacher, torch.randn(5, 12, dtype=torch.float64))
    with pytest.raises(ValueError, match="batch and map size"):
        pixel_relation_loss(student, teacher[:, :, :3])


@pytest.mark.parametrize("mode", ["cross_image", "keys"])
@pytest.mark.parametrize("shape", [(2, 4, 0, 3), (0, 4, 3, 3)])
def test_empty_maps_give_zero_and_empty_gradients(mode, shape):
    s = torch.randn(shape, requires_grad=True)
    keys = torch.randn(5, 4, requires_grad=True) if mode == "keys" else None
    loss = pixel_relation_loss(s, torch.randn(shape), keys)
    loss.backward()
    assert loss.item() == 0.0 and s.grad.shape == s.shape
    assert keys is None or not keys.grad.any()


# ------------------------------------------------------------------------------------------------
# What the shared tests read from every op's test file (tests/_helpers.py: op_test_entry):
# SMALL_CALLS, COMPILE_STEP, GPU_SMOKE and GPU_SMOKE_DRY.
# ------------------------------------------------------------------------------------------------


def _small_call(device, dtype, large=False, keys=False):
    B, C, H, W, K = (2, 2, 14, 14, 300) if large else (2, 12, 3, 5, 7)
    s, t, k = leaves(device, dtype, (B, C, H, W), (B, C, H, W), (K, C))
    t.requires_grad_(False)
    k = k if keys else None
    mask = None if large else torch.rand(B, H, W, device=device) > 0.3
    forward = (s, t, k, mask, 0.5, True)
    return OpCall(
        forward, lambda out: (torch.randn_like(out[0]), *detached(forward[:4] + out[1:]), *forward[4:]),
        needs=[(True, keys)],
        public=lambda backend: forward_and_backward(pixel_relation_loss(
            s, t, k, mask=mask, temperature=0.5, backend=backend), s, k),
        naive=lambda: forward_and_backward(naive_pixel_relation_loss(
            s, t, k, mask=mask, temperature=0.5), s, k),
        # (the official cross-image loss stores one (H*W x H*W) matrix per pair of images at a time)
        matrix=B * H * W * K if keys else (H * W) ** 2, torch_chunks=[(torch_common, "CHUNK_ELEMENTS", 1024)])


# (the OpCall builder, the keyword sets of the problems it is called on): the opcheck tests
# (test_compile.py) and the allocation tests (test_memory.py)
SMALL_CALLS = (_small_call, [dict(keys=False), dict(keys=True)])


def _compile_step(device):
    def step(s, t, k, mask):
        features = torch.relu(s) * 2.0
        return pixel_relation_loss(features, t, mask=mask) + 0.5 * pixel_relation_loss(features, t, k, temperature=0.2)

    return step, (torch.randn(3, 20, 5, 7), torch.randn(3, 20, 5, 7), torch.randn(50, 20), torch.rand(3, 5, 7) > 0.35)


# device -> (step, its arguments; the first is the tensor differentiated): test_compile.py's
# torch.compile tests
COMPILE_STEP = _compile_step

# make gpu-smoke (bench/gpu_smoke.py): the -k expression of this file's tests it runs per GPU
# backend, and on its CPU dry run (the interpreter is slow: there, fewer where it costs)
GPU_SMOKE = "test_matches_reference or test_backends_on_wider_channels_and_tails"
GPU_SMOKE_DRY = "test_matches_reference and mean and mask"
