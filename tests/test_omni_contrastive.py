"""omni_contrastive_loss (Af-DCD) against a float64 re-implementation of the official formula.
(Memory: test_memory.py; torch.library registration and torch.compile: test_compile.py.)"""
import pytest
import torch

from _helpers import OpCall, backend_cases, check_against_reference, detached, forward_and_backward, leaves, run
from pcd_kernels import omni_contrastive_loss
from pcd_kernels._conventions import omni_pack
from pcd_kernels.backends.torch import _common as torch_common
from pcd_kernels.backends.torch import omni_contrastive as torch_backend
from pcd_kernels.reference import official_omni_contrastive_loss

OP = "omni_contrastive_loss"
CASES = backend_cases(OP)
FP32 = backend_cases(OP, dtypes=(torch.float32,))
TEMPERATURE = 0.07
# (B, C, H, W, groups, patch_size, pool_size): groups 4/8/16, pooled and not, a floor-pooled
# 34x66 map, a non-square patch, D = C / groups odd.
SHAPES = [
    (2, 32, 8, 8, 4, (2, 2), 0),
    (1, 64, 34, 66, 16, (4, 4), 4),
    (2, 24, 6, 6, 8, (2, 3), 0),
    (1, 40, 9, 17, 8, (2, 2), 2),
    (1, 16, 10, 10, 8, (5, 5), 0),  # 200 samples per patch: not a power of two, a part-filled tile
]


def run_loss(student, teacher, dtype, device, fn=omni_contrastive_loss, **kwargs):
    """fn's loss and its gradients w.r.t. (student, teacher)."""
    return run(fn, (student, teacher), dtype, device, **kwargs)


def check_matches_official(backend, device, dtype, student, teacher, grad_atol=1e-6, **options):
    """Loss and both gradients within fixed float32 tolerances of the float64 official formula."""
    options["temperature"] = TEMPERATURE
    ref, ref_grads = run_loss(student, teacher, torch.float64, "cpu", official_omni_contrastive_loss, **options)
    ours, grads = run_loss(student, teacher, dtype, device, backend=backend, **options)
    torch.testing.assert_close(ours.double().cpu(), ref, rtol=1e-5, atol=1e-5)
    for g, g_ref in zip(grads, ref_grads):
        torch.testing.assert_close(g.double().cpu(), g_ref, rtol=1e-4, atol=grad_atol)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"B{s[0]}C{s[1]}-{s[2]}x{s[3]}-M{s[4]}-p{s[5][0]}{s[5][1]}-pool{s[6]}")
@pytest.mark.parametrize("backend,device,dtype", CASES)
def test_matches_official_formula(backend, device, dtype, shape):
    B, C, H, W, groups, patch_size, pool_size = shape
    student = torch.randn(B, C, H, W, dtype=torch.float64)
    teacher = student + 0.5 * torch.randn(B, C, H, W, dtype=torch.float64)
    pooled = (H // pool_size) * (W // pool_size) if pool_size else H * W
    # plain PyTorch: the official formula on the inputs rounded to dtype, in float64 (cdist has no
    # CPU half); the scale of a gradient is one sign term's, g / tau
    check_against_reference(OP, official_omni_contrastive_loss, (student, teacher), backend, device, dtype,
                            names=("student", "teacher"), plain_dtype=torch.float64,
                            grad_scale=1.0 / (pooled * B * TEMPERATURE), groups=groups, patch_size=patch_size,
                            pool_size=pool_size, temperature=TEMPERATURE)


@pytest.mark.parametrize("backend,device,dtype", FP32)
def test_any_strides_and_one_sided_gradients(backend, device, dtype):
    student = torch.randn(2, 32, 8, 8, dtype=torch.float64)
    teacher = torch.randn(2, 32, 8, 8, dtype=torch.float64)
    options = dict(groups=8, patch_size=(2, 2), pool_size=0)
    ref, (ref_s, ref_t) = run_loss(student, teacher, torch.float64, "cpu", official_omni_contrastive_loss,
                                   temperature=TEMPERATURE, **options)
    s = student.to(device, dtype).contiguous(memory_format=torch.channels_last).requires_grad_()
    t = teacher.to(device, dtype).transpose(2, 3).contiguous().transpose(2, 3)  # no grad
    loss = omni_contrastive_loss(s, t, backend=backend, temperature=TEMPERATURE, **options)
    (grad_s,) = torch.autograd.grad(loss, s)
    torch.testing.assert_close(loss.double().cpu(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_s.double().cpu(), ref_s, rtol=1e-4, atol=1e-6)


TRITON_FP32 = backend_cases(OP, dtypes=(torch.float32,), backends=("triton",))


@pytest.mark.parametrize("block_elements", [128, 8192], ids=["one-anchor-tiles", "gpu-sized-tiles"])
@pytest.mark.parametrize("backend,device,dtype", TRITON_FP32)
def test_triton_tile_sizes(backend, device, dtype, block_elements, monkeypatch):
    """The tests otherwise run the interpreter's tile size; the GPU's differs (and a 1-row tile is
    what very large patches get)."""
    from pcd_kernels.backends.triton import omni_contrastive as kernels

    monkeypatch.setattr(kernels, "INTERPRETER_BLOCK_ELEMENTS", block_elements)
    monkeypatch.setattr(kernels, "BLOCK_ELEMENTS", block_elements)
    student = torch.randn(1, 24, 6, 10, dtype=torch.float64)  # (3, 5) patches x 8 groups: 120 samples
    teacher = torch.randn(1, 24, 6, 10, dtype=torch.float64)
    check_matches_official(backend, device, dtype, student, teacher, groups=8, patch_size=(3, 5), pool_size=0)


@pytest.mark.parametrize("backend,device,dtype", FP32)
def test_ties_follow_cdist(backend, device, dtype):
    """|s - t| at s == t: the gradient uses sign(0) = 0, as torch.cdist's backward does."""
    student = torch.randn(1, 16, 4, 4, dtype=torch.float64)
    teacher = student.clone()
    teacher[:, :, :2] = torch.randn(1, 16, 2, 4, dtype=torch.float64)  # half the pixels tie exactly
    check_matches_official(backend, device, dtype, student, teacher, grad_atol=2e-5,  # terms ~ 1 / (HW tau)
                           groups=4, patch_size=(2, 2), pool_size=0)


@pytest.mark.parametrize("backend,device,dtype", TRITON_FP32)
def test_triton_refuses_patches_beyond_its_limit(backend, device, dtype):
    s = torch.randn(1, 512, 8, 8, device=device)
    with pytest.raises(ValueError, match="up to 4096 samples per patch"):
        omni_contrastive_loss(s, s, groups=128, patch_size=(8, 8), pool_size=0, backend="triton")


@pytest.mark.parametrize("backend,device,dtype", FP32)
def test_single_group_has_only_the_positive(backend, device, dtype):
    s, t = torch.randn(1, 8, 4, 4), torch.randn(1, 8, 4, 4)
    loss, grads = run_loss(s, t, dtype, device, backend=backend, groups=1, patch_size=(2, 2), pool_size=0)
    assert loss.item() == 0.0 and all(not g.any() for g in grads)


@pytest.mark.parametrize("backend,device,dtype", FP32)
def test_nan_in_nan_out(backend, device, dtype):
    s, t = torch.randn(1, 16, 4, 4), torch.randn(1, 16, 4, 4)
    s[0, 3, 1, 1] = float("nan")
    loss, _ = run_loss(s, t, dtype, device, backend=backend, groups=4, patch_size=(2, 2), pool_size=0)
    assert loss.isnan().item()


def test_both_torch_backward_paths_agree():
    """The explicit sign pass (used off CPU) and cdist's CPU backward give the same gradients."""
    s = omni_pack(torch.randn(2, 48, 8, 8, dtype=torch.float64), 8, (2, 4))
    t = omni_pack(torch.randn(2, 48, 8, 8, dtype=torch.float64), 8, (2, 4))
    loss, lse = torch_backend.forward(s, t, 8, TEMPERATURE)
    g = torch.rand_like(loss)
    by_sign = torch_backend.backward(g, s, t, lse, 8, TEMPERATURE, True, True, sign_pass=True)
    by_cdist = torch_backend.backward(g, s, t, lse, 8, TEMPERATURE, True, True, sign_pass=False)
    for a, b in zip(by_sign, by_cdist):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("kwargs,error,message", [
    (dict(groups=5), ValueError, "C = 32 must be divisible by groups = 5"),
    (dict(groups=0), ValueError, "groups must be an int >= 1"),
    (dict(patch_size=(3, 3), pool_size=0), ValueError, r"8x8, must be divisible by patch_size"),
    (dict(patch_size=(4, 4), pool_size=4), ValueError, r"pooled by 4 to 2x2"),
    (dict(patch_size=4), ValueError, "patch_size must be two ints"),
    (dict(pool_size=-1), ValueError, "pool_size must be an int >= 0"),
    (dict(pool_size=16), ValueError, "smaller than pool_size"),
    (dict(temperature=0.0), ValueError, "temperature"),
    (dict(backend="cudnn"), ValueError, "backend must be one of"),
    (dict(teacher=torch.randn(2, 32, 8, 4)), ValueError, "same shape"),
    (dict(student=torch.randn(2, 32, 8, 8).long()), TypeError, "student must be float"),
    (dict(student=torch.randn(2, 0, 8, 8), teacher=torch.randn(2, 0, 8, 8), groups=1), ValueError, "0 channels"),
    (dict(student=torch.randn(2, 0, 8, 8), teacher=torch.randn(2, 0, 8, 8), groups=1, patch_size=(2, 2), pool_size=4),
     ValueError, "0 channels"),
])
def test_bad_inputs(kwargs, error, message):
    kwargs = dict(kwargs)
    s = kwargs.pop("student", torch.randn(2, 32, 8, 8))
    t = kwargs.pop("teacher", torch.randn(2, 32, 8, 8))
    options = dict(groups=4, patch_size=(2, 2), pool_size=0)
    options.update(kwargs)
    with pytest.raises(error, match=message):
        omni_contrastive_loss(s, t, **options)


def test_cuda_backend_says_why():
    with pytest.raises(RuntimeError, match="backend='cuda' cannot run"):
        omni_contrastive_loss(torch.randn(1, 8, 4, 4), torch.randn(1, 8, 4, 4), groups=2, patch_size=(2, 2),
                              pool_size=0, backend="cuda")


# ------------------------------------------------------------------------------------------------
# What the shared tests read from every op's test file (tests/_helpers.py: op_test_entry):
# SMALL_CALLS, COMPILE_STEP, GPU_SMOKE and GPU_SMOKE_DRY.
# ------------------------------------------------------------------------------------------------


def _small_call(device, dtype, large=False):
    (B, C, H, W), groups, patch = ((1, 32, 8, 8), 8, (4, 4)) if large else ((1, 16, 4, 4), 4, (2, 2))
    maps = leaves(device, dtype, (B, C, H, W), (B, C, H, W))
    s, t = (omni_pack(x.detach(), groups, patch).requires_grad_() for x in maps)  # (patches, dims, samples)
    forward = (s, t, groups, 0.1)

    def distances():  # every sample pair's L1 distance by broadcasting: what cdist's CUDA backward stores
        (s.transpose(1, 2)[:, :, None] - t.transpose(1, 2)[:, None]).abs().sum(-1)

    return OpCall(
        forward, lambda out: (torch.randn_like(out[0]), *detached(forward[:2] + out[1:]), *forward[2:]),
        needs=[(True, True), (True, False), (False, True)],
        public=lambda backend: forward_and_backward(omni_contrastive_loss(
            *maps, groups=groups, patch_size=patch, pool_size=0, temperature=0.1, backend=backend), *maps),
        naive=distances, matrix=s.shape[0] * s.shape[2] ** 2 * s.shape[1],
        torch_chunks=[(torch_common, "CHUNK_ELEMENTS", 1 << 14), (torch_backend, "OMNI_SIGN_ELEMENTS", 1 << 14)],
        backward_options=[dict(sign_pass=True), dict(sign_pass=False)])


# (the OpCall builder, the keyword sets of the problems it is called on): the opcheck tests
# (test_compile.py) and the allocation tests (test_memory.py)
SMALL_CALLS = (_small_call, [{}])


def _compile_step(device):
    def step(s, t):
        return omni_contrastive_loss(torch.relu(s), t, groups=4, patch_size=(2, 2), pool_size=2)

    return step, (torch.randn(2, 16, 8, 8), torch.randn(2, 16, 8, 8))


# device -> (step, its arguments; the first is the tensor differentiated): test_compile.py's
# torch.compile tests
COMPILE_STEP = _compile_step

# make gpu-smoke (bench/gpu_smoke.py): the -k expression of this file's tests it runs per GPU
# backend, and on its CPU dry run (the interpreter is slow: there, fewer where it costs)
GPU_SMOKE = ("test_matches_official_formula or test_nan_in_nan_out or "
             "test_any_strides_and_one_sided_gradients")
GPU_SMOKE_DRY = GPU_SMOKE
