"""The torch backend of ``pixel_contrastive_loss``: the loss with a hand-written backward that
recomputes the logits chunk by chunk, so extra memory is O(chunk x keys), never O(anchors x keys).
The CPU (and float64) path of ``backend="auto"``. Math: DESIGN.md section 3.1."""
from typing import Iterator, Optional, Tuple

import torch
from torch import Tensor

from pcd_kernels._conventions import compute_dtype, pixel_rows
from pcd_kernels.backends.torch._common import chunks, normalize_backward, prepared, valid_rows


def limits(**problem):
    """No limit beyond the public function's argument checks."""
    return None


def _anchor_groups(negatives: str, batch: int, hw: int, valid_idx: Tensor
                   ) -> Iterator[Tuple[Tensor, Optional[Tensor]]]:
    """Yields (anchor rows, teacher-pixel key rows or None) sharing one key set."""
    if negatives == "image":
        image = valid_idx // hw
        for b in range(batch):
            rows = valid_idx[image == b]
            yield rows, rows
    elif negatives == "batch":
        yield valid_idx, valid_idx
    else:
        yield valid_idx, None


def _group_keys(t_hat: Tensor, key_rows: Optional[Tensor], extra_hat: Optional[Tensor],
                q_hat: Optional[Tensor]) -> Tensor:
    parts = [t_hat[key_rows]] if key_rows is not None else []
    if key_rows is not None and extra_hat is not None:
        parts.append(extra_hat)
    if q_hat is not None:
        parts.append(q_hat)
    if len(parts) == 1:
        return parts[0]
    return torch.cat(parts) if parts else t_hat.new_zeros(0, t_hat.shape[1])


class _Prepared:
    """Inputs as normalised (rows, C) matrices in the compute dtype, shared by forward and backward."""

    def __init__(self, student, teacher, queue, extra_keys, mask, extra_mask, normalize):
        self.batch, self.channels, height, width = student.shape
        self.hw = height * width
        self.dtype = compute_dtype(student.dtype)
        self.a_hat = prepared(pixel_rows(student), self.dtype, normalize)
        self.t_hat = prepared(pixel_rows(teacher), self.dtype, normalize)
        self.q_hat = prepared(queue, self.dtype, normalize) if queue is not None else None
        self.extra_hat = None
        if extra_keys is not None:
            extra = extra_keys if extra_mask is None else extra_keys[extra_mask]
            self.extra_hat = prepared(extra, self.dtype, normalize)
        self.valid_idx = valid_rows(mask, self.a_hat.shape[0], student.device)


def forward(student: Tensor, teacher: Tensor, queue: Optional[Tensor], extra_keys: Optional[Tensor],
            mask: Optional[Tensor], extra_mask: Optional[Tensor], negatives: str, temperature: float,
            normalize: bool) -> Tuple[Tensor, Tensor]:
    """Per-anchor loss and (natural) lse, (B, H, W) each, 0 at masked pixels; memory O(chunk x keys).

    ``extra_keys`` (rows, C) with ``extra_mask`` are further teacher pixels (other ranks'), used
    as keys by ``negatives="batch"`` only.
    """
    prep = _Prepared(student, teacher, queue, extra_keys, mask, extra_mask, normalize)
    B, _, H, W = student.shape
    inv_tau = 1.0 / temperature
    n = prep.a_hat.shape[0]
    loss = prep.a_hat.new_zeros(n)
    lse = prep.a_hat.new_zeros(n)
    pos = (prep.a_hat * prep.t_hat).sum(1).mul_(inv_tau)
    for anchor_rows, key_rows in _anchor_groups(negatives, B, prep.hw, prep.valid_idx):
        keys = _group_keys(prep.t_hat, key_rows, prep.extra_hat, prep.q_hat)
        for _, rows in chunks(anchor_rows, keys.shape[0]):
            lse_rows = torch.logsumexp((prep.a_hat[rows] @ keys.T).mul_(inv_tau), 1)
            if key_rows is None:  # "none": the positive is a key of its own
                lse_rows = torch.logaddexp(lse_rows, pos[rows])
            lse[rows] = lse_rows
            loss[rows] = lse_rows - pos[rows]
    return loss.reshape(B, H, W), lse.reshape(B, H, W)


def backward(grad_loss: Tensor, student: Tensor, teacher: Tensor, queue: Optional[Tensor],
             extra_keys: Optional[Tensor], mask: Optional[Tensor], extra_mask: Optional[Tensor], loss: Tensor,
             lse: Tensor, negatives: str, temperature: float, normalize: bool, needs_student: bool,
             needs_teacher: bool, needs_queue: bool
             ) -> Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """Gradients of sum(grad_loss * loss) for student, teacher and queue (None where not needed),
    recomputing the logits chunk by chunk (DESIGN.md 3.1 backward formulas).

    Maps' gradients come back as channels_last (B, C, H, W) tensors, the queue's as (K, C)."""
    prep = _Prepared(student, teacher, queue, extra_keys, mask, extra_mask, normalize)
    B, C = prep.batch, prep.channels
    inv_tau = 1.0 / temperature
    valid_idx = prep.valid_idx
    n = prep.a_hat.shape[0]
    lse = lse.reshape(-1).to(prep.dtype)
    coef = grad_loss.reshape(-1).to(prep.dtype) * inv_tau  # d loss_i / d logit_ik = coef_i (p_ik - onehot)
    grad_a = prep.a_hat.new_zeros(n, C) if needs_student else None
    grad_t = prep.a_hat.new_zeros(n, C) if needs_teacher else None
    grad_q = prep.q_hat.new_zeros(prep.q_hat.shape) if needs_queue and prep.q_hat is not None else None
    for anchor_rows, key_rows in _anchor_groups(negatives, B, prep.hw, valid_idx):
        keys = _group_keys(prep.t_hat, key_rows, prep.extra_hat, prep.q_hat)
        want_keys = grad_q is not None or (grad_t is not None and key_rows is not None)
        grad_keys = keys.new_zeros(keys.shape) if want_keys else None
        for start, rows in chunks(anchor_rows, keys.shape[0]):
            weights = (prep.a_hat[rows] @ keys.T).mul_(inv_tau).sub_(lse[rows, None]).exp_()
            weights.mul_(coef[rows, None])
            if key_rows is not None:
                # The positive is key start + r of anchor r: softmax minus one-hot, subtracted
                # here rather than afterwards so that saturated anchors do not cancel.
                diagonal = torch.arange(rows.numel(), device=rows.device)
                weights[diagonal, start + diagonal] -= coef[rows]
            if grad_a is not None:
                grad_a[rows] = weights @ keys
            if grad_keys is not None:
                grad_keys.addmm_(weights.T, prep.a_hat[rows])
        if grad_keys is not None:
            if grad_t is not None and key_rows is not None:
                grad_t.index_add_(0, key_rows, grad_keys[:key_rows.numel()])
            if grad_q is not None:
                grad_q += grad_keys[keys.shape[0] - grad_q.shape[0]:]
    if negatives == "none":  # the positive is a key of its own, outside the chunks
        pos = (prep.a_hat[valid_idx] * prep.t_hat[valid_idx]).sum(1) * inv_tau
        pos_coef = coef[valid_idx] * torch.expm1(pos - lse[valid_idx])  # coef (p_positive - 1)
        if grad_a is not None:
            grad_a.index_add_(0, valid_idx, pos_coef[:, None] * prep.t_hat[valid_idx])
        if grad_t is not None:
            grad_t.index_add_(0, valid_idx, pos_coef[:, None] * prep.a_hat[valid_idx])

    def finish(grad_hat, x):
        if grad_hat is None:
            return None
        rows = pixel_rows(x) if x.dim() == 4 else x
        if normalize:
            grad_hat = normalize_backward(rows.to(prep.dtype), grad_hat)
        grad_hat = grad_hat.to(x.dtype)
        if x.dim() == 2:
            return grad_hat
        if mask is not None:  # masked pixels are not used: their (maybe NaN) values get no gradient
            grad_hat.masked_fill_(~mask.reshape(-1, 1), 0)
        return grad_hat.view(B, x.shape[2], x.shape[3], C).permute(0, 3, 1, 2)

    return finish(grad_a, student), finish(grad_t, teacher), finish(grad_q, queue)
