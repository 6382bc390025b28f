"""Host-side preparation the GPU backends (Triton and CUDA) share: the buffers and per-row factors
their kernels read, computed once in O(rows) by torch. Nothing here is a reference formula."""
from typing import Optional, Tuple

import torch
from torch import Tensor

from pcd_kernels._conventions import NORM_EPS

# Both GPU backends of pixel_contrastive_loss give each image its own grid row in negatives="image"
# mode, and CUDA caps that axis (y) at 65,535.
MAX_GRID_IMAGES = 65535


def image_grid_limit(negatives: str, batch: int) -> Optional[str]:
    """What a GPU backend of pixel_contrastive_loss cannot take about the batch size, or None."""
    if negatives == "image" and batch > MAX_GRID_IMAGES:
        return (f"with negatives='image' takes up to {MAX_GRID_IMAGES} images per call, got {batch}; split the "
                "batch or use backend='torch'")
    return None


def mask_bytes(mask: Tensor) -> Tensor:
    """A bool mask as the flat contiguous uint8 array the kernels read (1 = valid)."""
    return mask.reshape(-1).contiguous().view(torch.uint8)


class KernelGradients:
    """The gradient buffers a kernel backend of ``pixel_contrastive_loss`` writes: contiguous
    (rows, C) matrices, None where not needed, handed back as channels_last (B, C, H, W) maps
    (and the queue's as a (K, C) matrix). ``empty`` is True when no kernel has to run: no anchor
    at all (every buffer is zeroed; a queue gradient asked of an empty queue is zeroed too)."""

    def __init__(self, student: Tensor, teacher: Tensor, queue: Optional[Tensor], needs_student: bool,
                 needs_teacher: bool, needs_queue: bool):
        B, C, H, W = student.shape
        self.shape = (B, H, W, C)

        def rows(n, dtype):
            return torch.empty((n, C), dtype=dtype, device=student.device)

        self.anchors = rows(B * H * W, student.dtype) if needs_student else None
        self.teacher = rows(B * H * W, teacher.dtype) if needs_teacher else None
        self.queue = rows(queue.shape[0], queue.dtype) if (needs_queue and queue is not None) else None
        has_queue = queue is not None and queue.shape[0] > 0
        no_rows = B * H * W == 0
        if no_rows or (self.queue is not None and not has_queue):
            for grad in (self.anchors, self.teacher, self.queue):
                if grad is not None:
                    grad.zero_()
        self.empty = no_rows

    def maps(self) -> Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
        def as_map(rows):
            return rows.view(self.shape).permute(0, 3, 1, 2) if rows is not None else None

        return as_map(self.anchors), as_map(self.teacher), self.queue


def anchor_weights(grad_loss: Tensor, mask: Optional[Tensor]) -> Tensor:
    """d(result)/d(loss_i) per anchor as a flat contiguous float32 vector, 0 at masked anchors."""
    g = grad_loss.reshape(-1).to(torch.float32)
    if mask is not None:
        g = g.where(mask.reshape(-1), 0.0)
    return g.contiguous()


def key_side_weights(g: Tensor) -> Tuple[Tensor, Tensor]:
    """(g / max|g|, max|g| as a 1-element tensor): key-side kernels weigh each anchor by the
    first, which keeps the weights in half precision's range when a mean reduction makes every
    g about 1 / anchors, and multiply by the second at the end.

    The maximum is over the finite g: a NaN or inf g then reaches only the keys its anchor sees
    (as in the formula), where a NaN or inf maximum would reach every key."""
    g_max = g.abs().where(g.isfinite(), 0.0).amax().clamp_min(1e-30).reshape(1)
    return g / g_max, g_max


def inverse_norms(rows: Tensor) -> Tensor:
    """1 / max(||row||, NORM_EPS) for each row of a (rows, C) matrix, float32.

    The fused GPU kernels (Triton and CUDA) read raw vectors and these inverse norms, computed
    once in O(rows), instead of normalised copies."""
    norms = torch.linalg.vector_norm(rows, dim=1, dtype=torch.float32)
    return norms.clamp_min_(NORM_EPS).reciprocal_()


def projection_scales(rows: Tensor, inv: Tensor) -> Tensor:
    """Per-row factor of the normalisation's gradient that the fused kernels apply.

    The gradient through x / max(||x||, eps) is inv * (G - x_hat (x_hat . G)) where the norm
    reaches eps and inv * G below it (the clamp is constant there; see ``backends.torch._common.normalize_backward``).
    Written as inv * G - proj * (x_hat . G) * x, proj is inv^2 where ||x|| >= eps and 0 below,
    float32; ``inv`` is :func:`inverse_norms` of the same rows."""
    norms = torch.linalg.vector_norm(rows, dim=1, dtype=torch.float32)
    return torch.where(norms >= NORM_EPS, inv * inv, torch.zeros_like(inv))


class PixelContrastiveKernels:
    """``forward`` and ``backward`` of pixel_contrastive_loss for a GPU backend (the contract in
    docs/contributing.md), given how it prepares its inputs (``prepare``, called with the forward's
    arguments), launches its forward (``launch_forward(inputs, loss, lse2)``) and its backward
    kernels (``launch_backward(inputs, gradients, g, loss, lse2)``, g the anchor weights), inside
    ``device_guard(student)``: the buffers, the empty cases and the order are the same for both."""

    def __init__(self, prepare, launch_forward, launch_backward, device_guard):
        self.prepare, self.launch_forward, self.launch_backward = prepare, launch_forward, launch_backward
        self.device_guard = device_guard

    def forward(self, student, teacher, queue, extra_keys, mask, extra_mask, negatives, temperature, normalize):
        """Per-anchor loss and lse2, (B, H, W) float32 each, 0 at masked pixels."""
        B, _, H, W = student.shape
        loss = torch.empty((B, H, W), dtype=torch.float32, device=student.device)
        lse2 = torch.empty_like(loss)
        if loss.numel():
            inputs = self.prepare(student, teacher, queue, extra_keys, mask, extra_mask, negatives, temperature,
                                  normalize)
            with self.device_guard(student):
                self.launch_forward(inputs, loss, lse2)
        return loss, lse2

    def backward(self, grad_loss, student, teacher, queue, extra_keys, mask, extra_mask, loss, lse2, negatives,
                 temperature, normalize, needs_student, needs_teacher, needs_queue):
        """Gradients (student, teacher, queue) of sum(grad_loss * loss), None where not needed: maps
        as channels_last (B, C, H, W) tensors, the queue as a contiguous (K, C) one."""
        grads = KernelGradients(student, teacher, queue, needs_student, needs_teacher, needs_queue)
        if not grads.empty:
            inputs = self.prepare(student, teacher, queue, extra_keys, mask, extra_mask, negatives, temperature,
                                  normalize)
            with self.device_guard(student):
                self.launch_backward(inputs, grads, anchor_weights(grad_loss, mask), loss, lse2)
        return grads.maps()


def attention_outputs(q: Tensor, num_heads: int) -> Tuple[Tensor, Tensor]:
    """The (output, lse) buffers of pixel_attention's GPU forward for (B, C, LQ) queries: the output
    contiguous in q's dtype, the base-2 lse (B * heads, LQ) float32."""
    B, C, LQ = q.shape
    return q.new_empty((B, C, LQ)), torch.empty((B * num_heads, LQ), dtype=torch.float32, device=q.device)


def attention_gradients(q: Tensor, k: Tensor, v: Tensor, needs_q: bool, needs_kv: bool
                        ) -> Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor], bool]:
    """pixel_attention's GPU gradient buffers (each in its input's layout when that is dense, None
    where not needed) and whether no kernel has to run (no query or no key: they are zeroed)."""
    grad_q = torch.empty_like(q) if needs_q else None
    grad_k, grad_v = (torch.empty_like(k), torch.empty_like(v)) if needs_kv else (None, None)
    empty = q.numel() == 0 or k.numel() == 0
    if empty:
        for g in (grad_q, grad_k, grad_v):
            if g is not None:
                g.zero_()
    return grad_q, grad_k, grad_v, empty
