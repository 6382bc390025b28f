"""Host-side wrapper of the CUDA kernels of ``pixel_contrastive_loss`` (``csrc/pixel_contrastive.cu``,
DESIGN.md 3.1), with the same ``forward`` / ``backward`` as :mod:`pcd_kernels.backends.triton.pixel_contrastive`.

torch prepares what the kernels read (contiguous (B*H*W, C) pixel matrices, inverse norms,
projection scales, mask bytes, the scaled upstream gradient) and allocates the outputs; the
extension ``pcd_kernels._C`` gets raw pointers, sizes and strides and launches on torch's current
stream of the inputs' device. Three kernels, none storing anything of size anchors x keys, each
output element written once (deterministic):

* forward: per-anchor loss and base-2 lse (what the backward reads);
* anchor backward: the student gradient, and the teacher's for ``negatives="none"``;
* key backward: the teacher-pixel keys' gradient ("image"/"batch") and the queue's.
"""
import math

import torch

from pcd_kernels.backends.cuda import _extension
from pcd_kernels._conventions import NEGATIVES_MODES, pixel_rows
from pcd_kernels.backends._host import (KernelGradients, anchor_weights, image_grid_limit, inverse_norms,
                                        key_side_weights, mask_bytes, projection_scales)

def limits(*, dtype, auto, negatives, batch):
    return image_grid_limit(negatives, batch)


def _ptr(t):
    return t.data_ptr() if t is not None else 0


class _Inputs:
    """Everything the launchers take first, prepared once per call (tensors kept alive here)."""

    def __init__(self, student, teacher, queue, extra_keys, mask, extra_mask, negatives, temperature,
                 normalize):
        B, C, H, W = student.shape
        self.device = student.device
        self.anchors = pixel_rows(student).contiguous()
        self.pixels = pixel_rows(teacher.to(student.dtype)).contiguous()
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
        self.inv_anchors, self.inv_pixels = norms(self.anchors), norms(self.pixels)
        self.inv_queue = norms(self.queue) if self.queue is not None else None
        self.inv_extra = norms(self.extra) if self.extra is not None else None
        self.temperature = temperature

    def args(self):
        """Keyword arguments every launcher starts with."""
        extra, queue = self.extra, self.queue
        return dict(
            device=self.device.index if self.device.index is not None else torch.cuda.current_device(),
            stream=_extension.stream_of(self.anchors), dtype=_extension.dtype_code(self.anchors), mode=self.mode,
            n_rows=self.n_rows, hw=self.hw, channels=self.channels,
            anchors=_ptr(self.anchors), pixels=_ptr(self.pixels),
            extra=_ptr(extra), n_extra=extra.shape[0] if extra is not None else 0,
            extra_stride_row=extra.stride(0) if extra is not None else 0,
            extra_stride_col=extra.stride(1) if extra is not None else 0,
            queue=_ptr(queue), n_queue=queue.shape[0] if queue is not None else 0,
            queue_stride_row=queue.stride(0) if queue is not None else 0,
            queue_stride_col=queue.stride(1) if queue is not None else 0,
            inv_anchors=_ptr(self.inv_anchors), inv_pixels=_ptr(self.inv_pixels),
            inv_extra=_ptr(self.inv_extra), inv_queue=_ptr(self.inv_queue),
            valid=_ptr(self.valid), valid_extra=_ptr(self.valid_extra),
            logit_scale=1.0 / (self.temperature * math.log(2.0)), inv_temperature=1.0 / self.temperature)

    def projections(self, rows, inv):
        return projection_scales(rows, inv) if self.normalize else None


def forward(student, teacher, queue, extra_keys, mask, extra_mask, negatives, temperature, normalize):
    """Per-anchor loss and base-2 lse (log2 of the softmax denominator, what :func:`backward`
    reads), (B, H, W) float32 each, 0 at masked pixels."""
    B, _, H, W = student.shape
    loss = torch.empty((B, H, W), dtype=torch.float32, device=student.device)
    lse = torch.empty_like(loss)
    if loss.numel() == 0:
        return loss, lse
    inp = _Inputs(student, teacher, queue, extra_keys, mask, extra_mask, negatives, temperature, normalize)
    ext = _extension.extension()
    with torch.cuda.device(student.device):
        ext.pixel_contrastive_forward(**inp.args(), loss=loss.data_ptr(), lse2=lse.data_ptr())
    return loss, lse


def backward(grad_loss, student, teacher, queue, extra_keys, mask, extra_mask, loss, lse, negatives,
             temperature, normalize, needs_student, needs_teacher, needs_queue):
    """Gradients (student, teacher, queue) of sum(grad_loss * loss), None where not needed: maps
    as channels_last (B, C, H, W) tensors, the queue as a contiguous (K, C) one."""
    grads = KernelGradients(student, teacher, queue, needs_student, needs_teacher, needs_queue)
    if grads.empty:
        return grads.maps()
    grad_a, grad_t, grad_q = grads.anchors, grads.teacher, grads.queue
    has_queue = queue is not None and queue.shape[0] > 0
    inp = _Inputs(student, teacher, queue, extra_keys, mask, extra_mask, negatives, temperature, normalize)
    # The kernels write in the inputs' common dtype (the op promotes them to one before this).
    for grad in (grad_t, grad_q):
        if grad is not None and grad.dtype != student.dtype:
            raise TypeError(f"backend='cuda': gradients in {grad.dtype} and {student.dtype} at once")
    g = anchor_weights(grad_loss, mask)
    lse2 = lse.reshape(-1).contiguous()
    none_mode = inp.mode == NEGATIVES_MODES["none"]
    pixel_keys = grad_t is not None and not none_mode
    queue_keys = grad_q is not None and has_queue
    ext = _extension.extension()
    with torch.cuda.device(student.device):
        args = inp.args()
        grad_t_none = grad_t if none_mode else None
        # Every tensor a launch reads stays referenced until the launch is enqueued: memory freed
        # earlier could be handed to a kernel enqueued before ours.
        proj_a = inp.projections(inp.anchors, inp.inv_anchors)
        proj_t = inp.projections(inp.pixels, inp.inv_pixels)
        if grad_a is not None or grad_t_none is not None:
            ext.pixel_contrastive_backward_anchors(
                **args, lse2=lse2.data_ptr(), grad=g.data_ptr(), proj_anchors=_ptr(proj_a),
                proj_pixels=_ptr(proj_t), grad_anchors=_ptr(grad_a), grad_pixels=_ptr(grad_t_none))
        if pixel_keys or queue_keys:
            g_scaled, g_max = key_side_weights(g)
            proj_q = inp.projections(inp.queue, inp.inv_queue) if queue_keys else None
            for are_pixels, wanted, proj, grad in ((True, pixel_keys, proj_t, grad_t),
                                                   (False, queue_keys, proj_q, grad_q)):
                if wanted:
                    ext.pixel_contrastive_backward_keys(
                        **args, keys_are_pixels=are_pixels, lse2=lse2.data_ptr(),
                        grad_scaled=g_scaled.data_ptr(), grad_max=g_max.data_ptr(), proj_keys=_ptr(proj),
                        grad_keys=grad.data_ptr())
    return grads.maps()
