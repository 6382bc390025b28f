"""Host-side wrapper of the CUDA kernels of ``pixel_contrastive_loss`` (``csrc/pixel_contrastive.cu``,
DESIGN.md 3.1), with the same ``forward`` / ``backward`` as :mod:`pcd_kernels.backends.triton.pixel_contrastive`.

torch prepares what the kernels read (contiguous (B*H*W, C) pixel matrices, inverse norms,
projection scales, mask bytes, the scaled upstream gradient) and allocates the outputs; the
extension ``pcd_kernels._C`` gets them as one ``PixelContrastiveParams`` (raw pointers, sizes and
strides, filled by field name) and launches on torch's current stream of the inputs' device. Three
kernels, none storing anything of size anchors x keys, each output element written once
(deterministic):

* forward: per-anchor loss and lse2 (base 2, what the backward reads);
* anchor backward: the student gradient, and the teacher's for ``negatives="none"``;
* key backward: the teacher keys' gradient ("image"/"batch") and the queue's.
"""
import torch

from pcd_kernels._conventions import NEGATIVES_MODES, logit_scale, pixel_rows
from pcd_kernels.backends._host import (PixelContrastiveKernels, image_grid_limit, inverse_norms, key_side_weights,
                                        mask_bytes, projection_scales)
from pcd_kernels.backends.cuda import _extension
from pcd_kernels.backends.cuda._extension import pointer


def limits(*, dtype, auto, negatives, batch):
    return image_grid_limit(negatives, batch)


def _strided_rows(name, rows):
    """The params fields ``name``, ``n_<name>``, ``<name>_stride_row``, ``<name>_stride_col`` of an
    optional (rows, C) matrix; none for None (all stay 0)."""
    if rows is None:
        return {}
    return {name: rows.data_ptr(), f"n_{name}": rows.shape[0], f"{name}_stride_row": rows.stride(0),
            f"{name}_stride_col": rows.stride(1)}


class _Inputs:
    """What every launcher reads, prepared once per call (tensors kept alive here)."""

    def __init__(self, student, teacher, queue, extra_keys, mask, extra_mask, negatives, temperature,
                 normalize):
        B, C, H, W = student.shape
        self.anchors = pixel_rows(student).contiguous()
        self.teacher = pixel_rows(teacher.to(student.dtype)).contiguous()
        self.n_rows, self.channels, self.hw = B * H * W, C, H * W
        self.mode = NEGATIVES_MODES[negatives]
        self.normalize = normalize
        self.queue = queue.to(student.dtype) if queue is not None and queue.shape[0] > 0 else None
        self.extra = None
        self.valid_extra = None
        if extra_keys is not None and extra_keys.shape[0] > 0 and self.mode == NEGATIVES_MODES["batch"]:
            self.extra = extra_keys.to(student.dtype)
            if extra_mask is not None:
                self.valid_extra = mask_bytes(extra_mask)
        self.valid = mask_bytes(mask) if mask is not None else None
        norms = inverse_norms if normalize else (lambda rows: None)
        self.inv_anchors, self.inv_teacher = norms(self.anchors), norms(self.teacher)
        self.inv_queue = norms(self.queue) if self.queue is not None else None
        self.inv_extra = norms(self.extra) if self.extra is not None else None
        self.temperature = temperature

    def params(self, **fields):
        """The launchers' ``PixelContrastiveParams``: these inputs, and ``fields`` (outputs and what
        one launcher reads) by name."""
        return _extension.params(
            _extension.extension().PixelContrastiveParams, self.anchors, negatives=self.mode,
            n_rows=self.n_rows, hw=self.hw, channels=self.channels,
            anchors=pointer(self.anchors), teacher=pointer(self.teacher),
            **_strided_rows("extra", self.extra), **_strided_rows("queue", self.queue),
            inv_anchors=pointer(self.inv_anchors), inv_teacher=pointer(self.inv_teacher),
            inv_extra=pointer(self.inv_extra), inv_queue=pointer(self.inv_queue),
            valid=pointer(self.valid), valid_extra=pointer(self.valid_extra),
            logit_scale=logit_scale(self.temperature), inv_temperature=1.0 / self.temperature,
            **fields)

    def projections(self, rows, inv):
        return projection_scales(rows, inv) if self.normalize else None


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
    proj_a = inp.projections(inp.anchors, inp.inv_anchors)
    proj_t = inp.projections(inp.teacher, inp.inv_teacher)
    if grad_a is not None or grad_t_none is not None:
        ext.pixel_contrastive_backward_anchors(inp.params(
            lse2=pointer(lse2), grad=pointer(g), proj_anchors=pointer(proj_a), proj_teacher=pointer(proj_t),
            grad_anchors=pointer(grad_a), grad_teacher=pointer(grad_t_none)))
    if teacher_keys or queue_keys:
        g_scaled, g_max = key_side_weights(g)
        proj_q = inp.projections(inp.queue, inp.inv_queue) if queue_keys else None
        for are_teacher, wanted, proj, grad in ((True, teacher_keys, proj_t, grad_t),
                                                (False, queue_keys, proj_q, grad_q)):
            if wanted:
                ext.pixel_contrastive_backward_keys(inp.params(
                    keys_are_teacher=are_teacher, lse2=pointer(lse2), grad_scaled=pointer(g_scaled),
                    grad_max=pointer(g_max), proj_keys=pointer(proj), grad_keys=pointer(grad)))


# forward(...) -> (loss, lse2) and backward(...) -> gradients: the contract of docs/contributing.md.
_ENTRY_POINTS = PixelContrastiveKernels(_Inputs, _launch_forward, _launch_backward,
                                        lambda student: torch.cuda.device(student.device))
forward, backward = _ENTRY_POINTS.forward, _ENTRY_POINTS.backward
