"""``pixel_relation_loss``: CIRKD's pixel-relation distillation without an (anchors x keys) matrix.

This module owns the op's public function (argument checks, dtype promotion, backend dispatch, the
reduction) and its two ``torch.library`` custom ops, forward and backward, which call the chosen
backend's ``pcd_kernels/backends/<backend>/pixel_relation.py`` (Triton kernels or chunked torch).
Math: DESIGN.md section 3.3.
"""
from typing import Optional, Tuple

import torch
from torch import Tensor

from pcd_kernels._conventions import compute_dtype
from pcd_kernels.ops._checks import (check_bool, check_choice, check_key_rows, check_maps, check_mask,
                                     check_positive_finite, check_same_device)
from pcd_kernels.ops._dispatch import BACKENDS, Op, autocast_dtype, implementation, register, resolve, run_backend
from pcd_kernels.ops._reduction import REDUCTIONS, reduce_per_anchor

_OP = register(Op("pixel_relation_loss", "pixel_relation", ("torch", "triton"))).name


@torch.library.custom_op("pcd_kernels::pixel_relation_forward", mutates_args=())
def _forward_op(student: Tensor, teacher: Tensor, keys: Optional[Tensor], mask: Optional[Tensor],
                temperature: float, normalize: bool, backend: str) -> Tuple[Tensor, Tensor]:
    """Per-anchor KL(P_t || P_s), (B, H, W), 0 at masked pixels, and the state the same backend's
    backward reads: nothing for the torch backend (it recomputes), both distributions' base-2
    lse per anchor and key segment for the Triton kernels."""
    return run_backend(_OP, backend, "forward", student.device, student, teacher, keys, mask, temperature,
                       normalize)


@_forward_op.register_fake
def _forward_fake(student, teacher, keys, mask, temperature, normalize, backend):
    B, _, H, W = student.shape
    values = student.new_empty((B, H, W), dtype=compute_dtype(student.dtype))
    saved_shape = implementation(_OP, backend).saved_shape(student, keys)
    return values, student.new_empty(saved_shape, dtype=torch.float32)


@torch.library.custom_op("pcd_kernels::pixel_relation_backward", mutates_args=())
def _backward_op(grad_values: Tensor, student: Tensor, teacher: Tensor, keys: Optional[Tensor],
                 mask: Optional[Tensor], saved: Tensor, temperature: float, normalize: bool, backend: str,
                 needs_student: bool, needs_keys: bool) -> Tuple[Tensor, Tensor]:
    """Gradients for (student, keys); an empty tensor stands for one not asked for."""
    grads = run_backend(_OP, backend, "backward", student.device, grad_values, student, teacher, keys, mask,
                        saved, temperature, normalize, needs_student, needs_keys)
    return tuple(g if g is not None else student.new_empty(0) for g in grads)


@_backward_op.register_fake
def _backward_fake(grad_values, student, teacher, keys, mask, saved, temperature, normalize, backend,
                   needs_student, needs_keys):
    B, C, H, W = student.shape
    empty = student.new_empty(0)
    # The student's gradient is a channels_last view of (B*H*W, C) rows, as both backends return it.
    return (student.new_empty((B, H, W, C)).permute(0, 3, 1, 2) if needs_student else empty,
            keys.new_empty(keys.shape) if (needs_keys and keys is not None) else empty)


def _setup_context(ctx, inputs, output):
    student, teacher, keys, mask, temperature, normalize, backend = inputs
    ctx.save_for_backward(student, teacher, keys, mask, output[1])
    ctx.options = (temperature, normalize, backend)


def _backward(ctx, grad_values, grad_saved):
    student, teacher, keys, mask, saved = ctx.saved_tensors
    temperature, normalize, backend = ctx.options
    need_s, _, need_k = ctx.needs_input_grad[:3]
    need_k = need_k and keys is not None
    grad_s, grad_k = torch.ops.pcd_kernels.pixel_relation_backward(
        grad_values, student, teacher, keys, mask, saved, temperature, normalize, backend, need_s, need_k)
    # The teacher's distribution is a constant target (CIRKD detaches it): no gradient to teacher.
    return grad_s if need_s else None, None, grad_k if need_k else None, None, None, None, None


_forward_op.register_autograd(_backward, setup_context=_setup_context)


def _check_inputs(student, teacher, keys, temperature, normalize, mask, reduction, backend):
    # Without keys each map is compared only with itself: the channel counts may differ.
    check_maps(student, teacher, same_channels=keys is not None)
    check_choice("reduction", reduction, REDUCTIONS)
    check_choice("backend", backend, BACKENDS)
    temperature = check_positive_finite("temperature", temperature)
    check_bool("normalize", normalize)
    check_key_rows("keys", keys, student)
    check_mask(mask, student)
    check_same_device("student", student, keys=keys, mask=mask)
    return temperature


def pixel_relation_loss(student: Tensor, teacher: Tensor, keys: Optional[Tensor] = None, *,
                        temperature: float = 1.0, normalize: bool = True, mask: Optional[Tensor] = None,
                        reduction: str = "mean", backend: str = "auto") -> Tensor:
    r"""CIRKD's pixel-relation distillation, fused: the student mimics the teacher's
    pixel-similarity distributions.

    Every valid pixel ``p`` is an anchor. Over a set of keys, ``P_t = softmax(t_hat_p . k_t / temperature)``
    and ``P_s = softmax(s_hat_p . k_s / temperature)``; the anchor's value is ``KL(P_t || P_s)``.

    - ``keys=None`` (CIRKD's mini-batch loss): for every image ``j`` of the batch (the anchor's own
      included), the keys are the pixels of image ``j``, teacher pixels for ``P_t`` and student
      pixels for ``P_s``; the anchor's value is the mean over ``j``. With no mask, ``"mean"`` is
      ``CriterionMiniBatchCrossImagePair(temperature)`` (its ``pooling=False``).
    - ``keys`` (K, C) (CIRKD's memory loss): the same K rows for both, e.g. a class-wise memory of
      teacher pixels. ``StudentSegContrast``'s ``contrast_sim_kd`` is ``"mean"`` with
      ``temperature = contrast_temperature * contrast_kd_temperature``, times
      ``contrast_kd_temperature ** 2``.

    No (anchors x keys) tensor is ever stored: the Triton kernels keep online logsumexps over key
    tiles, the torch backend works in chunks of anchors (extra memory O(chunk x keys)); both
    recompute the logits in the backward.

    Args:
        student, teacher: (B, C, H, W) float maps of the same shape, any strides; without
            ``keys`` their channel counts may differ (each map's similarities use its own).
        keys: optional (K, C) key rows (see above).
        temperature: softmax temperature, a finite number > 0.
        normalize: divide every pixel vector and key row by ``max(||x||, 1e-12)`` first (as
            ``F.normalize``).
        mask: optional (B, H, W) bool, True where a pixel is valid; masked pixels are neither
            anchors nor keys, and their values (NaN included) do not reach the result. Without
            ``keys``, an image with no valid pixel is left out of the mean over images.
        reduction: ``"mean"`` over valid anchors, ``"sum"``, or ``"none"`` for the (B, H, W) map of
            per-anchor values with 0 at masked pixels. No valid anchor gives 0, not NaN.
        backend: ``"auto"`` (Triton for CUDA tensors, the chunked torch backend for CPU or
            float64), ``"triton"``, ``"torch"``; ``"cuda"`` raises (no CUDA kernel for this op).

    Returns:
        The loss: a scalar, or (B, H, W) for ``reduction="none"``; float32 (float64 for float64
        inputs). Gradients reach ``student`` (without ``keys``, through both its anchor and its
        key role) and ``keys``; the teacher's distribution is a constant target, as CIRKD's
        ``.detach()``, so ``teacher`` gets none. Inputs of different float dtypes are promoted to
        a common one; under ``torch.autocast`` the op runs in the autocast dtype.

    Example::

        >>> import torch
        >>> from pcd_kernels import pixel_relation_loss
        >>> s = torch.randn(2, 64, 16, 16, requires_grad=True)
        >>> t = torch.randn(2, 64, 16, 16)
        >>> loss = pixel_relation_loss(s, t, temperature=1.0)
        >>> loss.backward()
    """
    temperature = _check_inputs(student, teacher, keys, temperature, normalize, mask, reduction, backend)
    dtype = autocast_dtype(student.device)
    if dtype is None:
        dtype = torch.promote_types(student.dtype, teacher.dtype)
        dtype = dtype if keys is None else torch.promote_types(dtype, keys.dtype)
    backend = resolve(_OP, backend, student.device, dtype)  # "cuda" raises: no CUDA kernels
    student, teacher = student.to(dtype), teacher.to(dtype)
    keys = keys.to(dtype) if keys is not None else None
    values, _ = torch.ops.pcd_kernels.pixel_relation_forward(student, teacher, keys, mask, temperature, normalize,
                                                             backend)
    return reduce_per_anchor(values, mask, reduction)
