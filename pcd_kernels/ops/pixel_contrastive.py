"""``pixel_contrastive_loss``: pixel-wise InfoNCE without an (anchors x keys) matrix.

This module owns the op's public function (argument checks, dtype promotion, the process-group
gather, backend resolution, the reduction) and its two ``torch.library`` custom ops, forward and
backward, which call the chosen backend's ``pcd_kernels/backends/<backend>/pixel_contrastive.py``
(Triton kernels; the CUDA extension's over ``csrc/pixel_contrastive.cu``; chunked torch).
Math: DESIGN.md section 3.1.
"""
from typing import Optional, Tuple

import torch
from torch import Tensor

from pcd_kernels._conventions import compute_dtype, pixel_rows
from pcd_kernels.ops._checks import (check_bool, check_choice, check_key_rows, check_maps, check_mask,
                                     check_positive_finite, check_process_group, check_same_device,
                                     check_same_on_every_rank)
from pcd_kernels.ops._dispatch import BACKENDS, Op, autocast_dtype, register, resolve, run_backend
from pcd_kernels.ops._reduction import REDUCTIONS, reduce_per_anchor

NEGATIVES = ("batch", "image", "none")
_OP = register(Op("pixel_contrastive_loss", "pixel_contrastive", ("torch", "triton", "cuda"))).name


@torch.library.custom_op("pcd_kernels::pixel_contrastive_forward", mutates_args=())
def _forward_op(student: Tensor, teacher: Tensor, queue: Optional[Tensor], extra_keys: Optional[Tensor],
                mask: Optional[Tensor], extra_mask: Optional[Tensor], negatives: str,
                temperature: float, normalize: bool, backend: str) -> Tuple[Tensor, Tensor]:
    """Per-anchor (loss, saved), each (B, H, W), 0 at masked pixels.

    ``saved`` is what the same backend's backward reads: each anchor's logsumexp over its keys,
    ``lse2`` (base 2) for the kernels, ``lse`` (natural) for the torch backend."""
    return run_backend(_OP, backend, "forward", student.device, student, teacher, queue, extra_keys, mask,
                       extra_mask, negatives, temperature, normalize)


@_forward_op.register_fake
def _forward_fake(student, teacher, queue, extra_keys, mask, extra_mask, negatives, temperature,
                  normalize, backend):
    B, _, H, W = student.shape
    loss = student.new_empty((B, H, W), dtype=compute_dtype(student.dtype))
    return loss, torch.empty_like(loss)


@torch.library.custom_op("pcd_kernels::pixel_contrastive_backward", mutates_args=())
def _backward_op(grad_loss: Tensor, student: Tensor, teacher: Tensor, queue: Optional[Tensor],
                 extra_keys: Optional[Tensor], mask: Optional[Tensor], extra_mask: Optional[Tensor],
                 loss: Tensor, saved: Tensor, negatives: str, temperature: float, normalize: bool,
                 backend: str, needs_student: bool, needs_teacher: bool,
                 needs_queue: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """Gradients for (student, teacher, queue); an empty tensor stands for one not asked for."""
    grads = run_backend(_OP, backend, "backward", student.device, grad_loss, student, teacher, queue,
                        extra_keys, mask, extra_mask, loss, saved, negatives, temperature, normalize,
                        needs_student, needs_teacher, needs_queue)
    return tuple(g if g is not None else student.new_empty(0) for g in grads)


@_backward_op.register_fake
def _backward_fake(grad_loss, student, teacher, queue, extra_keys, mask, extra_mask, loss, saved,
                   negatives, temperature, normalize, backend, needs_student, needs_teacher,
                   needs_queue):
    B, C, H, W = student.shape
    empty = student.new_empty(0)
    # Both backends return the maps' gradients as channels_last views of (B*H*W, C) rows.
    as_map = lambda x: x.new_empty((B, H, W, C)).permute(0, 3, 1, 2)
    return (as_map(student) if needs_student else empty,
            as_map(teacher) if needs_teacher else empty,
            queue.new_empty(queue.shape) if (needs_queue and queue is not None) else empty)


def _setup_context(ctx, inputs, output):
    student, teacher, queue, extra_keys, mask, extra_mask, negatives, temperature, normalize, backend = inputs
    loss, saved = output
    ctx.save_for_backward(student, teacher, queue, extra_keys, mask, extra_mask, loss, saved)
    ctx.options = (negatives, temperature, normalize, backend)


def _backward(ctx, grad_loss, grad_saved):
    student, teacher, queue, extra_keys, mask, extra_mask, loss, saved = ctx.saved_tensors
    negatives, temperature, normalize, backend = ctx.options
    need_s, need_t, need_q = ctx.needs_input_grad[:3]
    need_q = need_q and queue is not None
    grad_s, grad_t, grad_q = torch.ops.pcd_kernels.pixel_contrastive_backward(
        grad_loss, student, teacher, queue, extra_keys, mask, extra_mask, loss, saved, negatives,
        temperature, normalize, backend, need_s, need_t, need_q)
    return (grad_s if need_s else None, grad_t if need_t else None, grad_q if need_q else None,
            None, None, None, None, None, None, None)


_forward_op.register_autograd(_backward, setup_context=_setup_context)


def _gather_pixel_keys(teacher: Tensor, mask: Optional[Tensor], group) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """Every other rank's teacher pixels (rows, C) and validity, gathered without gradient."""
    import torch.distributed as dist

    world = dist.get_world_size(group)
    if world == 1:
        return None, None
    rank = dist.get_rank(group)
    rows = pixel_rows(teacher.detach()).contiguous()
    valid = (mask.reshape(-1) if mask is not None
             else torch.ones(rows.shape[0], dtype=torch.bool, device=rows.device)).to(torch.uint8)
    all_rows = [torch.empty_like(rows) for _ in range(world)]
    all_valid = [torch.empty_like(valid) for _ in range(world)]
    dist.all_gather(all_rows, rows, group=group)
    dist.all_gather(all_valid, valid, group=group)
    others = [r for r in range(world) if r != rank]
    return (torch.cat([all_rows[r] for r in others]),
            torch.cat([all_valid[r] for r in others]).bool())


def _check_inputs(student, teacher, queue, negatives, temperature, normalize, mask, reduction, backend):
    check_maps(student, teacher)
    check_choice("negatives", negatives, NEGATIVES)
    check_choice("reduction", reduction, REDUCTIONS)
    check_choice("backend", backend, BACKENDS)
    temperature = check_positive_finite("temperature", temperature)
    check_bool("normalize", normalize)
    check_key_rows("queue", queue, student, " (for the official (C, K) queue buffer pass queue.t())")
    if queue is None and negatives == "none":
        raise ValueError("negatives='none' needs a queue: the keys are the positive and the queue rows")
    check_mask(mask, student)
    check_same_device("student", student, queue=queue, mask=mask)
    return temperature


def pixel_contrastive_loss(student: Tensor, teacher: Tensor, queue: Optional[Tensor] = None, *,
                           negatives: str = "batch", temperature: float = 0.2, normalize: bool = True,
                           mask: Optional[Tensor] = None, reduction: str = "mean", process_group=None,
                           backend: str = "auto") -> Tensor:
    r"""Pixel-wise InfoNCE between a student and a teacher feature map, fused.

    Every valid student pixel ``i`` is an anchor; its positive is the teacher pixel at the same
    place and its keys are chosen by ``negatives``. With ``s_hat, t_hat, q_hat`` the (optionally
    L2-normalised) vectors,

    ``L_i = logsumexp_k(s_hat_i . key_k / temperature) - s_hat_i . t_hat_i / temperature``

    with the positive counted once among the keys. No (anchors x keys) tensor is ever stored.

    Args:
        student, teacher: (B, C, H, W) float maps of the same shape, any strides (NCHW,
            channels_last, permuted views are read in place).
        queue: optional (K, C) extra negative keys, e.g. a MoCo queue. The official PCD (C, K)
            buffer works as ``queue=buffer.t()`` without a copy.
        negatives: ``"batch"``: every valid teacher pixel of the batch (of every rank, with a
            ``process_group``) is a key; ``"image"``: those of the anchor's own image;
            ``"none"``: only the positive and the queue (the official PCD loss; needs a queue).
        temperature: softmax temperature, a finite number > 0.
        normalize: divide every vector by ``max(||x||, 1e-12)`` first (as ``F.normalize``).
        mask: optional (B, H, W) bool, True where a pixel is valid; masked pixels are neither
            anchors nor keys, and their values (NaN included) do not reach the result.
        reduction: ``"mean"`` over valid anchors, ``"sum"``, or ``"none"`` for the (B, H, W) map
            of per-anchor losses with 0 at masked pixels. No valid anchor gives 0, not NaN.
        process_group: a ``torch.distributed`` process group or None. With ``negatives="batch"``,
            the teacher pixels and masks of every rank of this group are keys (gathered without
            gradient). The loss covers this rank's anchors; ``"mean"`` divides by the average
            number of valid anchors per rank (one all-reduce), so averaging the ranks' losses, as
            DDP averages gradients, gives exactly the single-process mean of the concatenated
            batch, masks or not. Keys of ``"image"``/``"none"`` are local in any case. Every rank
            must call with the same ``negatives``, ``reduction``, ``normalize`` and
            ``temperature`` (and, for ``"batch"``, the same shape and dtype): one small
            all-gather checks this first, and every rank raises the same ValueError otherwise.
        backend: ``"auto"`` (Triton for CUDA tensors, the chunked torch backend for CPU or
            float64), ``"triton"``, ``"torch"``, or ``"cuda"``: the compiled extension's
            tensor-core kernels (``pcd_kernels._C``; CUDA tensors in float16, bfloat16 or float32).

    Returns:
        The loss: a scalar, or (B, H, W) for ``reduction="none"``; float32 (float64 for float64
        inputs) whatever the input precision, as autocast does for losses.

    Inputs of different float dtypes are promoted to a common one (like ``torch.cat``); under
    ``torch.autocast`` the op runs in the autocast dtype, as a matmul would. The Triton kernels take
    float16, bfloat16 and float32 and accumulate in float32; float32 inputs
    use TF32 tensor cores only when ``torch.backends.cuda.matmul.allow_tf32`` is True. The CUDA
    kernels (``backend="cuda"``) take float16 and bfloat16 and accumulate in float32.
    Gradients reach ``student``, ``teacher`` and ``queue`` wherever they require grad.

    Example::

        >>> import torch
        >>> from pcd_kernels import pixel_contrastive_loss
        >>> s = torch.randn(2, 64, 7, 7, requires_grad=True)
        >>> t = torch.randn(2, 64, 7, 7)
        >>> queue = torch.randn(4096, 64)
        >>> loss = pixel_contrastive_loss(s, t, queue, negatives="none")
        >>> loss.backward()
    """
    check_process_group(process_group)
    try:
        temperature = _check_inputs(student, teacher, queue, negatives, temperature, normalize, mask,
                                    reduction, backend)
        dtype = autocast_dtype(student.device)
        if dtype is None:
            dtype = student.dtype if queue is None else torch.promote_types(student.dtype, queue.dtype)
            dtype = torch.promote_types(dtype, teacher.dtype)
        backend = resolve(_OP, backend, student.device, dtype, negatives=negatives, batch=student.shape[0])
    except Exception:
        if process_group is not None:  # the other ranks must not wait for this one's collectives
            check_same_on_every_rank(_OP, process_group, None)
        raise
    if process_group is not None:
        # Which collectives run, and their shapes and dtypes, follow from these: agreed first.
        agreed = dict(negatives=negatives, reduction=reduction, normalize=normalize, temperature=temperature)
        if negatives == "batch":
            B, C, H, W = student.shape
            agreed.update({"batch size": B, "channels": C, "map size (H, W)": (H, W), "dtype": dtype})
        check_same_on_every_rank(_OP, process_group, agreed)
    student, teacher = student.to(dtype), teacher.to(dtype)
    queue = queue.to(dtype) if queue is not None else None

    extra_keys = extra_mask = None
    if process_group is not None and negatives == "batch":
        extra_keys, extra_mask = _gather_pixel_keys(teacher, mask, process_group)
    loss_map, _ = torch.ops.pcd_kernels.pixel_contrastive_forward(
        student, teacher, queue, extra_keys, mask, extra_mask, negatives, temperature, normalize, backend)
    anchor_count = None
    if process_group is not None:
        anchor_count = lambda count: _mean_valid_count_over_ranks(count, loss_map.device, process_group)
    return reduce_per_anchor(loss_map, mask, reduction, anchor_count)


def _mean_valid_count_over_ranks(count, device, group):
    """The average number of valid anchors per rank: dividing this rank's sum by it makes the
    ranks' mean loss (and DDP's averaged gradients) exactly the single-process mean."""
    import torch.distributed as dist

    world = dist.get_world_size(group)
    if world == 1:
        return count
    total = torch.as_tensor(count, dtype=torch.float32, device=device).clone()
    dist.all_reduce(total, group=group)
    return total / world
