"""``omni_contrastive_loss``: Af-DCD's omni-contrastive term without the cdist backward buffer.

The public function checks arguments, max-pools, packs both maps into (patches, dims, samples)
with differentiable torch ops (so autograd carries the gradients back through the packing and the
pooling) and calls the ``torch.library`` custom ops, which call the chosen backend's
``pcd_kernels/backends/<backend>/omni_contrastive.py`` (Triton kernels or chunked torch).
Math: DESIGN.md section 3.2.
"""
import numbers
from typing import Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from pcd_kernels._conventions import compute_dtype, omni_pack
from pcd_kernels.ops._checks import check_choice, check_maps, check_positive_finite
from pcd_kernels.ops._dispatch import BACKENDS, Op, register, resolve, run_backend

_OP = register(Op("omni_contrastive_loss", "omni_contrastive", ("torch", "triton"))).name


@torch.library.custom_op("pcd_kernels::omni_contrastive_forward", mutates_args=())
def _forward_op(student: Tensor, teacher: Tensor, groups: int, temperature: float,
                backend: str) -> Tuple[Tensor, Tensor]:
    """Per-sample (loss, saved), each (patches, samples), of packed (patches, dims, samples)
    maps; ``saved`` is what the same backend's backward reads, each sample's logsumexp (``lse2``,
    base 2, for the kernels; ``lse``, natural, for the torch backend)."""
    return run_backend(_OP, backend, "forward", student.device, student, teacher, groups, temperature)


@_forward_op.register_fake
def _forward_fake(student, teacher, groups, temperature, backend):
    P, _, K = student.shape
    loss = student.new_empty((P, K), dtype=compute_dtype(student.dtype))
    return loss, torch.empty_like(loss)


@torch.library.custom_op("pcd_kernels::omni_contrastive_backward", mutates_args=())
def _backward_op(grad_loss: Tensor, student: Tensor, teacher: Tensor, saved: Tensor, groups: int,
                 temperature: float, backend: str, needs_student: bool,
                 needs_teacher: bool) -> Tuple[Tensor, Tensor]:
    """Gradients for the packed (student, teacher); an empty tensor stands for one not asked for."""
    grads = run_backend(_OP, backend, "backward", student.device, grad_loss, student, teacher, saved, groups,
                        temperature, needs_student, needs_teacher)
    return tuple(g if g is not None else student.new_empty(0) for g in grads)


@_backward_op.register_fake
def _backward_fake(grad_loss, student, teacher, saved, groups, temperature, backend, needs_student,
                   needs_teacher):
    empty = student.new_empty(0)
    return (student.new_empty(student.shape) if needs_student else empty,
            teacher.new_empty(teacher.shape) if needs_teacher else empty)


def _setup_context(ctx, inputs, output):
    student, teacher, groups, temperature, backend = inputs
    ctx.save_for_backward(student, teacher, output[1])
    ctx.options = (groups, temperature, backend)


def _backward(ctx, grad_loss, grad_saved):
    student, teacher, saved = ctx.saved_tensors
    groups, temperature, backend = ctx.options
    need_s, need_t = ctx.needs_input_grad[:2]
    grad_s, grad_t = torch.ops.pcd_kernels.omni_contrastive_backward(
        grad_loss, student, teacher, saved, groups, temperature, backend, need_s, need_t)
    return grad_s if need_s else None, grad_t if need_t else None, None, None, None


_forward_op.register_autograd(_backward, setup_context=_setup_context)


def _check_int(name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def _check_patch_size(patch_size) -> Tuple[int, int]:
    if (not isinstance(patch_size, Sequence) or len(patch_size) != 2
            or any(isinstance(p, bool) or not isinstance(p, numbers.Integral) or p < 1 for p in patch_size)):
        raise ValueError(f"patch_size must be two ints >= 1 (rows, cols), got {patch_size!r}")
    return int(patch_size[0]), int(patch_size[1])


def omni_contrastive_loss(student: Tensor, teacher: Tensor, *, groups: int = 16,
                          patch_size: Tuple[int, int] = (4, 4), pool_size: int = 4,
                          temperature: float = 0.07, backend: str = "auto") -> Tensor:
    r"""Af-DCD's omni-contrastive loss between two (B, C, H, W) maps, fused.

    Both maps are max-pooled by ``pool_size`` (0: not pooled; floor pooling, like
    ``F.max_pool2d``) and cut into ``patch_size`` patches; the channels are split into ``groups``
    groups. Inside a patch, sample (n, m) is the C/groups-vector of group m at position n. For
    every student sample (the anchor) the positive is the teacher sample (n, m) and the negatives
    are every teacher sample of the patch from another group (n', m' != m); logits are
    ``-||s - t||_1 / temperature``. The loss is the cross-entropy summed over anchors, divided by
    the pooled H'*W' and by B: exactly the official ``OmniContrastiveFeatureLoss`` contrastive term.

    Unlike ``torch.cdist``'s backward, which allocates a (patches, samples, samples, dims) buffer
    (gigabytes at Cityscapes resolution), nothing of size pairs x dims is ever stored.

    Args:
        student, teacher: (B, C, H, W) float maps of the same shape (any strides).
        groups: channel groups M; C must be divisible by it.
        patch_size: (rows, cols); the pooled map must be divisible by it.
        pool_size: max-pooling kernel and stride, 0 for none.
        temperature: a finite number > 0.
        backend: ``"auto"`` (Triton for CUDA tensors, the chunked torch backend otherwise and
            beyond 4,096 samples per patch), ``"triton"``, ``"torch"``; ``"cuda"`` raises (no CUDA
            kernel for this op).

    Returns:
        A scalar, float32 (float64 for float64 inputs). Gradients reach both maps.

    Example::

        >>> import torch
        >>> from pcd_kernels import omni_contrastive_loss
        >>> s = torch.randn(2, 64, 32, 32, requires_grad=True)
        >>> t = torch.randn(2, 64, 32, 32)
        >>> loss = omni_contrastive_loss(s, t, groups=16, patch_size=(4, 4), pool_size=4)
        >>> loss.backward()
    """
    check_maps(student, teacher)
    groups = _check_int("groups", groups, 1)
    patch_size = _check_patch_size(patch_size)
    pool_size = _check_int("pool_size", pool_size, 0)
    temperature = check_positive_finite("temperature", temperature)
    check_choice("backend", backend, BACKENDS)
    B, C, H, W = student.shape
    if C % groups:
        raise ValueError(f"channels C = {C} must be divisible by groups = {groups}")
    if pool_size:
        if H < pool_size or W < pool_size:
            raise ValueError(f"a {H}x{W} map is smaller than pool_size = {pool_size}")
        student, teacher = F.max_pool2d(student, pool_size), F.max_pool2d(teacher, pool_size)
    H, W = student.shape[2:]
    if H % patch_size[0] or W % patch_size[1] or H == 0 or W == 0:
        pooled = f"pooled by {pool_size} to " if pool_size else ""
        raise ValueError(f"the map, {pooled}{H}x{W}, must be divisible by patch_size = {patch_size}")

    dtype = torch.promote_types(student.dtype, teacher.dtype)
    student, teacher = student.to(dtype), teacher.to(dtype)
    backend = resolve(_OP, backend, student.device, dtype, samples=patch_size[0] * patch_size[1] * groups,
                      patch_size=patch_size, groups=groups)
    packed_s = omni_pack(student, groups, patch_size)
    packed_t = omni_pack(teacher, groups, patch_size)
    loss, _ = torch.ops.pcd_kernels.omni_contrastive_forward(packed_s, packed_t, groups, temperature, backend)
    return loss.sum() / (H * W) / max(B, 1)
