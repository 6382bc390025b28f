"""The torch backend of ``omni_contrastive_loss``: chunks of patches, the backward recomputing the
L1 logits, never a (pairs x dims) buffer. Math: DESIGN.md section 3.2."""
from typing import Optional, Tuple

import torch
from torch import Tensor

from pcd_kernels._conventions import compute_dtype
from pcd_kernels.backends.torch import _common


def limits(**problem):
    """No limit beyond the public function's argument checks."""
    return None


def omni_allowed(samples: int, groups: int, device) -> Tensor:
    """(samples, samples) bool: key j is in anchor i's logsumexp (the positive, or another group)."""
    group = torch.arange(samples, device=device) % groups
    return (group[:, None] != group[None, :]) | torch.eye(samples, dtype=torch.bool, device=device)


# (patches x samples x samples x dims) elements per step of the chunked backward's sign pass:
# 4 Mi float32 = 16 MiB.
OMNI_SIGN_ELEMENTS = 1 << 22


def _omni_patch_chunks(patches: int, samples: int) -> int:
    return max(1, _common.CHUNK_ELEMENTS // max(samples * samples, 1))


def forward(student: Tensor, teacher: Tensor, groups: int, temperature: float) -> Tuple[Tensor, Tensor]:
    """Per-sample loss and (natural) lse (patches, samples) of packed (patches, dims, samples) maps;
    memory O(patch chunk x samples^2), never (pairs x dims)."""
    P, _, K = student.shape
    dtype = compute_dtype(student.dtype)
    allowed = omni_allowed(K, groups, student.device)
    loss = student.new_zeros((P, K), dtype=dtype)
    lse = torch.zeros_like(loss)
    step = _omni_patch_chunks(P, K)
    for start in range(0, P, step):
        s = student[start:start + step].to(dtype).transpose(1, 2)
        t = teacher[start:start + step].to(dtype).transpose(1, 2)
        logits = torch.cdist(s, t, p=1).div_(-temperature)
        positive = logits.diagonal(dim1=1, dim2=2)
        lse_chunk = torch.logsumexp(logits.masked_fill(~allowed, float("-inf")), 2)
        lse[start:start + step] = lse_chunk
        loss[start:start + step] = lse_chunk - positive
    return loss, lse


def backward(grad_loss: Tensor, student: Tensor, teacher: Tensor, lse: Tensor, groups: int, temperature: float,
             needs_student: bool, needs_teacher: bool, sign_pass=None
             ) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """Gradients of sum(grad_loss * loss) for the packed maps: with w_ij = g_i (p_ij - [i = j])
    over allowed keys, d/ds_i = -sum_j w_ij sign(s_i - t_j) / tau and d/dt_j = +sum_i (same).

    Chunks of patches are recomputed one at a time. Within a chunk the sign-weighted sums go
    through ``torch.cdist``'s own backward on CPU, which needs no (pairs x dims) buffer there, and
    through an explicit pass over dimension chunks elsewhere (CUDA's cdist backward allocates one);
    ``sign_pass`` forces one or the other.
    """
    P, D, K = student.shape
    dtype = compute_dtype(student.dtype)
    if sign_pass is None:
        sign_pass = student.device.type != "cpu"
    allowed = omni_allowed(K, groups, student.device)
    eye = torch.eye(K, dtype=torch.bool, device=student.device)
    grad_s = torch.zeros((P, D, K), dtype=dtype, device=student.device) if needs_student else None
    grad_t = torch.zeros((P, D, K), dtype=dtype, device=student.device) if needs_teacher else None
    step = _omni_patch_chunks(P, K)
    dim_step = max(1, OMNI_SIGN_ELEMENTS // max(min(step, P) * K * K, 1))
    for start in range(0, P, step):
        rows = slice(start, start + step)
        s = student[rows].to(dtype)
        t = teacher[rows].to(dtype)
        s_rows, t_rows = s.transpose(1, 2).contiguous(), t.transpose(1, 2).contiguous()
        distances = torch.cdist(s_rows, t_rows, p=1)
        weights = (distances / -temperature - lse[rows].to(dtype)[:, :, None]).exp_()
        weights.masked_fill_(~allowed, 0).sub_(eye.to(dtype))
        weights.mul_(grad_loss[rows].to(dtype)[:, :, None] / temperature)
        if not sign_pass:
            # d distance_ij / d s_i = sign(s_i - t_j): cdist's own backward op forms the sums
            # (called directly: custom-op implementations run below autograd).
            if grad_s is not None:
                grad_s[rows] = torch.ops.aten._cdist_backward(
                    (-weights).contiguous(), s_rows, t_rows, 1.0, distances).transpose(1, 2)
            if grad_t is not None:
                grad_t[rows] = torch.ops.aten._cdist_backward(
                    (-weights).transpose(1, 2).contiguous(), t_rows, s_rows, 1.0,
                    distances.transpose(1, 2).contiguous()).transpose(1, 2)
            continue
        for d0 in range(0, D, dim_step):
            dims = slice(d0, d0 + dim_step)
            # sign(s_i - t_j) for every (i, j) of these dims: (chunk, dims, K, K)
            sign = torch.sign(s[:, dims, :, None] - t[:, dims, None, :])
            sign.mul_(weights[:, None])
            if grad_s is not None:
                grad_s[rows, dims] = -sign.sum(3)
            if grad_t is not None:
                grad_t[rows, dims] = sign.sum(2)
    cast = lambda g, x: g.to(x.dtype) if g is not None else None
    return cast(grad_s, student), cast(grad_t, teacher)
