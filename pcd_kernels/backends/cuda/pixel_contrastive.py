"""Host-side wrapper of the CUDA kernels of ``pixel_contrastive_loss`` (``csrc/pixel_contrastive.cu``,
DESIGN.md 3.1), with the same ``forward`` / ``backward`` as :mod:`pcd_kernels.backends.triton.pixel_contrastive`.

torch prepares what the kernels read (the operands, see :func:`_operand`; inverse norms,
projection scales, mask bytes, the scaled upstream gradient) and allocates the outputs; the
extension ``pcd_kernels._C`` gets them as one ``PixelContrastiveParams`` (raw pointers, sizes and
strides, filled by field name) and launches on torch's current stream of the inputs' device. Three
kernels, none storing anything of size anchors x keys, each output element written once
(deterministic):

* forward: per-anchor loss and lse2 (base 2, what the backward reads);
* anchor backward: the student gradient, and the teacher's for ``negatives="none"``;
* key backward: the teacher keys' gradient ("image"/"batch") and the queue's.
"""
from typing import Optional, Tuple

import torch
from torch import Tensor

from pcd_kernels._conventions import NEGATIVES_MODES, NORM_EPS, logit_scale, pixel_rows
from pcd_kernels.backends._host import PixelContrastiveKernels, image_grid_limit, key_side_weights, mask_bytes
from pcd_kernels.backends.cuda import _extension
from pcd_kernels.backends.cuda._extension import aligned_row_length, pointer

def limits(*, dtype, auto, negatives, batch):
    return image_grid_limit(negatives, batch)


def _operand(rows: Tensor, dtype: torch.dtype, normalize: bool, valid: Optional[Tensor] = None
             ) -> Tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
    """(operand, inv, proj) of a (n, C) matrix ``rows``, rows where the bool (n,) ``valid`` is False
    masked out.

    The operand is what the kernels copy into shared memory unchanged (an asynchronous copy
    cannot scale what it moves, so the normalisation is done here, once, rather than per tile):
    a contiguous (n, aligned_row_length(C)) matrix in ``dtype`` holding x * inv (computed in float32,
    rounded once, as the Triton kernels do in registers) when normalising, else x; masked rows 0
    (a NaN there must not reach a tile's sums); channels past C 0. ``rows`` itself when nothing
    needs changing. inv = 1 / max(||x||, eps) and proj (inv where ||x|| >= eps, else 0: the factor
    of x_hat (x_hat . G) in the normalisation's gradient: ``backends/_host.projection_scales``'s
    inv^2 times x, written with the rounded x_hat)
    are float32 per row, from the same norms, None unless normalising. No float32 copy: the norms
    accumulate in float32 as they read, and the product is computed in float32 and rounded as it
    is stored (about 6 bytes of traffic per element rather than 24 through a float32 copy)."""
    n, C = rows.shape
    stride = aligned_row_length(C)
    rows = rows.to(dtype)  # x rounded to dtype, as the kernels' inputs are (no copy when it is)
    if not normalize and valid is None and stride == C and rows.is_contiguous() and rows.data_ptr() % 16 == 0:
        return rows, None, None  # (16-byte copies: the rows must start 16-byte aligned, as a view may not)
    operand = torch.empty((n, stride), dtype=dtype, device=rows.device)
    operand[:, C:].zero_()
    inv = proj = None
    if normalize:
        norms = torch.linalg.vector_norm(rows, dim=1, dtype=torch.float32)
        inv = norms.clamp_min(NORM_EPS).reciprocal_()
        proj = inv.where(norms >= NORM_EPS, 0.0)
        del norms
        torch.mul(rows, inv[:, None], out=operand[:, :C])
    else:
        operand[:, :C].copy_(rows)
    if valid is not None:
        operand.masked_fill_(~valid[:, None], 0)
    return operand, inv, proj


class _Inputs:
    """What every launcher reads, prepared once per call (tensors kept alive here)."""

    def __init__(self, student, teacher, queue, extra_keys, mask, extra_mask, negatives, temperature,
                 normalize):
        B, C, H, W = student.shape
        dtype = student.dtype
        self.n_rows, self.channels, self.hw = B * H * W, C, H * W
        self.row_stride = aligned_row_length(C)
        self.mode = NEGATIVES_MODES[negatives]
        self.normalize = normalize
        self.valid = mask_bytes(mask) if mask is not None else None
        valid = mask.reshape(-1) if mask is not None else None
        self.anchors, self.inv_anchors, self.proj_anchors = _operand(pixel_rows(student), dtype, normalize, valid)
        self.teacher, self.inv_teacher, self.proj_teacher = _operand(pixel_rows(teacher), dtype, normalize, valid)
        self.queue = self.inv_queue = self.proj_queue = None
        if queue is not None and queue.shape[0] > 0:
            self.queue, self.inv_queue, self.proj_queue = _operand(queue, dtype, normalize)
        self.extra = None
        self.valid_extra = None
        if extra_keys is not None and extra_keys.shape[0] > 0 and self.mode == NEGATIVES_MODES["batch"]:
            valid_extra = extra_mask.reshape(-1) if extra_mask is not None else None
            # keys only (no gradient): neither inv nor proj is read
            self.extra = _operand(extra_keys, dtype, normalize, valid_extra)[0]
            if extra_mask is not None:
                self.valid_extra = mask_bytes(extra_mask)
        self.temperature = temperature

    def params(self, **fields):
        """The launchers' ``PixelContrastiveParams``: these inputs, and ``fields`` (outputs and what
        one launcher reads) by name."""
        return _extension.params(
            _extension.extension().PixelContrastiveParams, self.anchors, negatives=self.mode,
            n_rows=self.n_rows, hw=self.hw, channels=self.channels, row_stride=self.row_stride,
            anchors=pointer(self.anchors), teacher=pointer(self.teacher),
            extra=pointer(self.extra), n_extra=self.extra.shape[0] if self.extra is not None else 0,
            queue=pointer(self.queue), n_queue=self.queue.shape[0] if self.queue is not None else 0,
            inv_anchors=pointer(self.inv_anchors), inv_teacher=pointer(self.inv_teacher),
            inv_queue=pointer(self.inv_queue), valid=pointer(self.valid), valid_extra=pointer(self.valid_extra),
            logit_scale=logit_scale(self.temperature), inv_temperature=1.0 / self.temperature,
            **fields)


def _launch_forward(inp, loss, lse2):
    _extension.extension().pixel_contrastive_forward(inp.params(loss=pointer(loss), lse2=pointer(lse2)))


def _launch_backward(inp, grads, g, loss, lse2):
    """The backward kernels writing ``grads``' buffers, for anchor weights ``g`` (flat float32) and
    the forward's ``lse2``."""
    lse2 = lse2.reshape(-1).contiguous()
    grad_a, grad_t, grad_q = grads.anchors, grads.teacher, grads.queue
    # The kernels write in the inputs' common dtype (the op promotes them to one before this).
    for grad in (grad_t, grad_q):
        if grad is not None and grad.dtype != inp.anchors.dtype:
            raise TypeError(f"backend='cuda': gradients in {grad.dtype} and {inp.anchors.dtype} at once")
    ext = _extension.extension()
    none_mode = inp.mode == NEGATIVES_MODES["none"]
    grad_t_none = grad_t if none_mode else None
    teacher_keys = grad_t is not None and not none_mode
    queue_keys = grad_q is not None and inp.queue is not None
    # Every tensor a launch reads stays referenced until the launch is enqueued: memory freed
    # earlier could be handed to a kernel enqueued before ours.
    proj_a, proj_t = inp.proj_anchors, inp.proj_teacher
    if grad_a is not None or grad_t_none is not None:
        ext.pixel_contrastive_backward_anchors(inp.params(
            lse2=pointer(lse2), grad=pointer(g), proj_anchors=pointer(proj_a), proj_teacher=pointer(proj_t),
            grad_anchors=pointer(grad_a), grad_teacher=pointer(grad_t_none)))
    if teacher_keys or queue_keys:
        g_scaled, g_max = key_side_weights(g)
        for are_teacher, wanted, proj, grad in ((True, teacher_keys, proj_t, grad_t),
                                                (False, queue_keys, inp.proj_queue, grad_q)):
            if wanted:
                ext.pixel_contrastive_backward_keys(inp.params(
                    keys_are_teacher=are_teacher, lse2=pointer(lse2), grad_scaled=pointer(g_scaled),
                    grad_max=pointer(g_max), proj_keys=pointer(proj), grad_keys=pointer(grad)))


# forward(...) -> (loss, lse2) and backward(...) -> gradients: the contract of docs/contributing.md.
_ENTRY_POINTS = PixelContrastiveKernels(_Inputs, _launch_forward, _launch_backward,
                                        lambda student: torch.cuda.device(student.device))
forward, backward = _ENTRY_POINTS.forward, _ENTRY_POINTS.backward
