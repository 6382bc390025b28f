"""The torch backend of ``pixel_relation_loss``: chunks of anchors against every key at once
(extra memory O(chunk x keys)); the backward recomputes the logits. Math: DESIGN.md section 3.3."""
from typing import Optional, Tuple

import torch
from torch import Tensor

from pcd_kernels._conventions import compute_dtype, pixel_rows
from pcd_kernels.backends.torch._common import chunks, normalize_backward, prepared, valid_rows


def limits(**problem):
    """No limit beyond the public function's argument checks."""
    return None


def saved_shape(student: Tensor, keys: Optional[Tensor]) -> Tuple[int, ...]:
    """The forward saves nothing for the backward, which recomputes both distributions."""
    return (0,)


class _RelationInputs:
    """Rows of both maps (and the keys) in the compute dtype, normalised, and the key rows every
    anchor's distributions run over: the given keys, or (cross-image) the pixels of every image
    that has a valid one, as segments of H·W rows (masked pixels zeroed, and left out of the
    softmaxes)."""

    def __init__(self, student, teacher, keys, mask, normalize):
        B, C, H, W = student.shape
        self.shape = (B, C, H, W)
        self.dtype = compute_dtype(student.dtype)
        self.s_hat = prepared(pixel_rows(student), self.dtype, normalize)
        self.t_hat = prepared(pixel_rows(teacher), self.dtype, normalize)
        self.anchors = valid_rows(mask, B * H * W, student.device)
        if keys is not None:
            self.k_hat = prepared(keys, self.dtype, normalize)
            self.s_keys = self.t_keys = self.k_hat
            self.segments, self.key_valid, self.share = 1, None, 1.0
            return
        self.k_hat = None
        valid = mask.reshape(B, H * W) if mask is not None else torch.ones(B, H * W, dtype=torch.bool,
                                                                            device=student.device)
        images = valid.any(1).nonzero().squeeze(1)  # an image with no valid pixel is left out
        self.key_images, self.key_valid = images, valid[images]
        zeroed = lambda x: (x.masked_fill(~valid.reshape(-1, 1), 0).view(B, H * W, x.shape[1])[images]
                            .reshape(-1, x.shape[1]))
        self.s_keys, self.t_keys = zeroed(self.s_hat), zeroed(self.t_hat)
        self.segments = images.numel()
        self.share = 1.0 / max(self.segments, 1)

    def logits(self, rows, inv_tau):
        """(student, teacher) logits of these anchors, (rows, segments, keys per segment), -inf at
        masked keys."""
        s_logits = (self.s_hat[rows] @ self.s_keys.T).mul_(inv_tau).view(rows.numel(), self.segments, -1)
        t_logits = (self.t_hat[rows] @ self.t_keys.T).mul_(inv_tau).view(rows.numel(), self.segments, -1)
        if self.key_valid is not None:
            s_logits.masked_fill_(~self.key_valid, float("-inf"))
            t_logits.masked_fill_(~self.key_valid, float("-inf"))
        return s_logits, t_logits


def forward(student: Tensor, teacher: Tensor, keys: Optional[Tensor], mask: Optional[Tensor],
            temperature: float, normalize: bool) -> Tuple[Tensor, Tensor]:
    """Per-anchor KL(P_t || P_s), (B, H, W), 0 at masked pixels, and an empty saved state (the
    backward recomputes); memory O(chunk x keys)."""
    inp = _RelationInputs(student, teacher, keys, mask, normalize)
    B, _, H, W = inp.shape
    values = inp.s_hat.new_zeros(B * H * W)
    for _, rows in chunks(inp.anchors, inp.s_keys.shape[0]):
        s_logits, t_logits = inp.logits(rows, 1.0 / temperature)
        log_pt, log_ps = t_logits.log_softmax(2), s_logits.log_softmax(2)
        terms = log_pt.exp() * (log_pt - log_ps)
        if inp.key_valid is not None:  # (-inf) - (-inf) at masked keys
            terms = terms.masked_fill(~inp.key_valid, 0)
        values[rows] = terms.sum((1, 2)) * inp.share
    return values.reshape(B, H, W), values.new_empty(saved_shape(student, keys), dtype=torch.float32)


def backward(grad_values: Tensor, student: Tensor, teacher: Tensor, keys: Optional[Tensor],
             mask: Optional[Tensor], saved: Tensor, temperature: float, normalize: bool, needs_student: bool,
             needs_keys: bool
             ) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """Gradients of sum(grad_values * values) for student (anchor and, without keys, key roles)
    and keys, recomputing the logits chunk by chunk: d KL / d s-logit_q = P_s(q) - P_t(q). The
    teacher's distribution is a constant target. The student's gradient comes back as a
    channels_last (B, C, H, W) tensor, the keys' as (K, C)."""
    inp = _RelationInputs(student, teacher, keys, mask, normalize)
    B, C, H, W = inp.shape
    inv_tau = 1.0 / temperature
    coef = grad_values.reshape(-1).to(inp.dtype) * (inv_tau * inp.share)
    grad_s = inp.s_hat.new_zeros(B * H * W, C) if needs_student else None
    grad_keys = inp.s_keys.new_zeros(inp.s_keys.shape) if (needs_student and keys is None) or needs_keys else None
    for _, rows in chunks(inp.anchors, inp.s_keys.shape[0]):
        s_logits, t_logits = inp.logits(rows, inv_tau)
        weights = s_logits.softmax(2).sub_(t_logits.softmax(2)).mul_(coef[rows, None, None]).flatten(1)
        if grad_s is not None:
            grad_s[rows] = weights @ inp.s_keys
        if grad_keys is not None:
            grad_keys.addmm_(weights.T, inp.s_hat[rows])
    grad_k = None
    if keys is None:
        if grad_s is not None and grad_keys.numel():  # the student's pixels are keys too
            grad_s.view(B, H * W, C).index_add_(0, inp.key_images, grad_keys.view(-1, H * W, C))
    elif grad_keys is not None:
        grad_k = normalize_backward(keys.to(inp.dtype), grad_keys) if normalize else grad_keys
        grad_k = grad_k.to(keys.dtype)
    if grad_s is not None:
        if normalize:
            grad_s = normalize_backward(pixel_rows(student).to(inp.dtype), grad_s)
        if mask is not None:  # masked pixels are not used: their (maybe NaN) values get no gradient
            grad_s.masked_fill_(~mask.reshape(-1, 1), 0)
        grad_s = grad_s.to(student.dtype).view(B, H, W, C).permute(0, 3, 1, 2)
    return grad_s, grad_k
