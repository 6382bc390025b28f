"""omni_contrastive_loss (Af-DCD) against a float64 re-implementation of the official formula.
(Memory: test_memory.py; torch.library registration and torch.compile: test_compile.py.)"""
import pytest
import torch

from _helpers import backend_cases, check_against_reference, run
from pcd_kernels import omni_contrastive_loss
from pcd_kernels._conventions import omni_pack
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
