"""Ground truth: the published methods' math exactly as their official code computes it, building
the full (anchors x keys) matrices. The test suite runs these in float64 and compares every
backend with them; ``bench/`` uses them as the baseline users would otherwise run.

* ``naive_*``: the formula of each op written the obvious way.
* ``official_*``: the official repositories' code (PCD, CIRKD, Af-DCD), reduced to the loss.

Nothing here is a backend and nothing here imports one: the backends live in
``pcd_kernels/backends/``. Notation follows DESIGN.md section 3 and docs/contributing.md's
glossary: anchors are student pixels, keys are teacher pixels and queue rows.
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from pcd_kernels._conventions import NORM_EPS, attention_heads, compute_dtype, pixel_rows

# --------------------------------------------------------------------------------------------
# pixel_contrastive_loss (DESIGN.md 3.1)
# --------------------------------------------------------------------------------------------


def naive_pixel_contrastive_loss(student: Tensor, teacher: Tensor, queue: Optional[Tensor] = None, *,
                                 negatives: str = "batch", temperature: float = 0.2,
                                 normalize: bool = True, mask: Optional[Tensor] = None,
                                 reduction: str = "mean") -> Tensor:
    """Pixel-wise InfoNCE (DESIGN.md 3.1) by building the whole (anchors x keys) logit matrix.

    Same arguments and semantics as :func:`pcd_kernels.pixel_contrastive_loss` (no process
    group): keys are the anchor's positive, the valid teacher pixels of its image ("image") or
    of the batch ("batch"), and the queue rows; masked pixels are neither anchors nor keys.
    """
    B, C, H, W = student.shape
    s, t = pixel_rows(student), pixel_rows(teacher)
    q = queue
    if normalize:
        s, t = F.normalize(s, dim=1), F.normalize(t, dim=1)
        q = F.normalize(q, dim=1) if q is not None else None
    n = s.shape[0]
    valid = mask.reshape(-1) if mask is not None else torch.ones(n, dtype=torch.bool, device=s.device)
    idx = valid.nonzero().squeeze(1)
    s_v, t_v = s[idx], t[idx]
    pos = (s_v * t_v).sum(1) / temperature
    blocks = []
    if negatives == "none":
        blocks.append(pos[:, None])
    else:
        pixel_logits = s_v @ t_v.T / temperature
        if negatives == "image":
            image = idx // (H * W)
            pixel_logits = pixel_logits.masked_fill(image[:, None] != image[None, :], float("-inf"))
        blocks.append(pixel_logits)
    if q is not None:
        blocks.append(s_v @ q.T / temperature)
    per_anchor = torch.logsumexp(torch.cat(blocks, 1), 1) - pos
    if reduction == "none":
        return s.new_zeros(n).index_put((idx,), per_anchor).reshape(B, H, W)
    total = per_anchor.sum()
    return total if reduction == "sum" else total / max(idx.numel(), 1)


def official_pcd_loss(student_output: Tensor, teacher_output: Tensor, queue: Tensor,
                      temperature: float) -> Tensor:
    """The official PCD ``_pixelwise_contrastive_loss`` (allo-rene/pcd, pcd/pcd.py), with its
    queue in the official (C, K) layout: positive = teacher pixel at the same place, negatives =
    the queue columns, cross-entropy averaged over all B*H*W pixels.
    """
    N, C, H, W = student_output.shape
    student_output = F.normalize(student_output.reshape(N, C, -1), dim=1, p=2)
    teacher_output = F.normalize(teacher_output.detach().reshape(N, C, -1), dim=1, p=2)
    pos = (student_output * teacher_output).sum(dim=1).reshape(-1, 1)
    neg = torch.matmul(student_output.transpose(1, 2), queue.clone().detach()).reshape(-1, queue.shape[1])
    logit = torch.cat((pos, neg), dim=1).div(temperature)
    target = torch.zeros(logit.size(0), dtype=torch.long, device=logit.device)
    return F.cross_entropy(logit, target)


# --------------------------------------------------------------------------------------------
# CIRKD pixel relation loss (DESIGN.md 3.3)
# --------------------------------------------------------------------------------------------


def naive_pixel_relation_loss(student: Tensor, teacher: Tensor, keys: Optional[Tensor] = None, *,
                              temperature: float = 1.0, normalize: bool = True, mask: Optional[Tensor] = None,
                              reduction: str = "mean") -> Tensor:
    """``pixel_relation_loss`` written out with every (anchors x keys) matrix: the test suite's
    ground truth (in float64) and the benchmark's baseline. Same arguments and semantics: the
    teacher's distribution is a constant target (computed from detached tensors)."""
    B, C, H, W = student.shape
    s = pixel_rows(student).to(compute_dtype(student.dtype))
    t = pixel_rows(teacher).detach().to(s.dtype)
    valid = mask.reshape(-1) if mask is not None else torch.ones(s.shape[0], dtype=torch.bool, device=s.device)
    # masked pixels are never used: zeroed first, so that their values (NaN too) reach nothing
    s, t = s.masked_fill(~valid[:, None], 0), t.masked_fill(~valid[:, None], 0)
    if normalize:
        s, t = F.normalize(s, dim=1, eps=NORM_EPS), F.normalize(t, dim=1, eps=NORM_EPS)

    def kl(t_logits, s_logits):  # row-wise KL(softmax(t) || softmax(s))
        log_pt, log_ps = t_logits.log_softmax(1), s_logits.log_softmax(1)
        return (log_pt.exp() * (log_pt - log_ps)).sum(1)

    values = s.new_zeros(s.shape[0])
    if keys is not None:
        k = keys.to(s.dtype)
        k = F.normalize(k, dim=1, eps=NORM_EPS) if normalize else k
        values = values.masked_scatter(valid, kl(t[valid] @ k.detach().T / temperature, s[valid] @ k.T / temperature))
    else:
        image = torch.arange(B, device=s.device).repeat_interleave(H * W)
        images = [j for j in range(B) if bool(valid[image == j].any())]
        for i in images:
            anchors = valid & (image == i)
            per_image = [kl(t[anchors] @ t[valid & (image == j)].T / temperature,
                            s[anchors] @ s[valid & (image == j)].T / temperature) for j in images]
            values = values.masked_scatter(anchors, torch.stack(per_image).mean(0))
    values = values.reshape(B, H, W)
    if reduction == "none":
        return values
    if reduction == "sum":
        return values.sum()
    return values.sum() / max(int(valid.sum()), 1)


def official_cirkd_minibatch_loss(feat_S: Tensor, feat_T: Tensor, temperature: float) -> Tensor:
    """CIRKD's ``CriterionMiniBatchCrossImagePair`` (winycg/CIRKD, ``losses/cirkd_mini_batch.py``,
    ``pooling=False``) as it computes: B² image pairs, each an (H·W × H·W) similarity matrix per
    map, row-wise KL averaged over rows and pairs. (The official sum starts from a float32
    ``torch.tensor(0.).cuda()``; this one keeps the inputs' dtype and device.)"""
    B, C = feat_S.shape[:2]
    s = F.normalize(feat_S, p=2, dim=1).reshape(B, C, -1).transpose(1, 2)
    t = F.normalize(feat_T, p=2, dim=1).reshape(B, C, -1).transpose(1, 2)
    total = feat_S.new_zeros(())
    for i in range(B):
        for j in range(B):
            total = total + F.kl_div(F.log_softmax(s[i] @ s[j].T / temperature, dim=1),
                                     F.softmax(t[i] @ t[j].T / temperature, dim=1), reduction="batchmean")
    return total / (B * B)


def official_cirkd_memory_loss(s_feats: Tensor, t_feats: Tensor, memory: Tensor, contrast_temperature: float,
                               contrast_kd_temperature: float, mask: Optional[Tensor] = None) -> Tensor:
    """One memory term of CIRKD's ``StudentSegContrast`` (``losses/cirkd_memory.py``) after sampling:
    the maps normalised, the valid pixels' (pixels × memory rows) logits of both, divided by
    ``contrast_temperature``, then ``contrast_sim_kd``: KL(batchmean) at ``contrast_kd_temperature``
    times its square. ``memory`` (rows, C) holds the sampled, unit memory rows."""
    C = s_feats.shape[1]
    rows = lambda x: F.normalize(x, p=2, dim=1).permute(0, 2, 3, 1).reshape(-1, C)
    s, t = rows(s_feats), rows(t_feats)
    if mask is not None:
        s, t = s[mask.reshape(-1)], t[mask.reshape(-1)]
    t_logits = torch.div(torch.mm(t, memory.T), contrast_temperature)
    s_logits = torch.div(torch.mm(s, memory.T), contrast_temperature)
    p_s = F.log_softmax(s_logits / contrast_kd_temperature, dim=1)
    p_t = F.softmax(t_logits.detach() / contrast_kd_temperature, dim=1)
    return F.kl_div(p_s, p_t, reduction="batchmean") * contrast_kd_temperature ** 2


# --------------------------------------------------------------------------------------------
# Af-DCD omni-contrastive loss (DESIGN.md 3.2)
# --------------------------------------------------------------------------------------------


def official_omni_contrastive_loss(preds: Tensor, targets: Tensor, groups: int = 16,
                                   patch_size: Tuple[int, int] = (4, 4), pool_size: int = 4,
                                   temperature: float = 0.07, crop: Optional[int] = None) -> Tensor:
    """The official Af-DCD contrastive term (OSVAI/Af-DCD, ``OmniContrastiveFeatureLoss``:
    ``get_omni_contrastive_loss(preds, targets) / BS``), with ``torch.cdist(p=1)``.

    ``crop`` reproduces its CamVid branch (crop to crop x crop, no pooling).
    """
    if crop is not None:
        preds, targets = preds[:, :, :crop, :crop], targets[:, :, :crop, :crop]
    elif pool_size != 0:
        preds, targets = F.max_pool2d(preds, pool_size), F.max_pool2d(targets, pool_size)
    B, C, H, W = preds.shape
    n2 = patch_size[0] * patch_size[1]
    M = groups

    def to_ctr_format(x):
        hp, wp = patch_size
        x = x.contiguous().view(B, C, H // hp, hp, W // wp, wp).permute(0, 2, 4, 1, 3, 5)
        x = torch.stack(x.split(C // M, dim=3), dim=3)
        x = x.contiguous().view(B, (H * W) // n2, M, C // M, n2)
        return x.permute(0, 1, 4, 2, 3).contiguous().view(-1, n2 * M, C // M)

    similarity = -torch.cdist(to_ctr_format(preds), to_ctr_format(targets), p=1)
    eye = torch.eye(n2 * M, dtype=torch.bool, device=preds.device).repeat(similarity.shape[0], 1, 1)
    group = torch.arange(M, device=preds.device).repeat(n2)
    negative = (group[None, :] != group[:, None]).repeat(similarity.shape[0], 1, 1)
    positives = similarity[eye].view(B * H * W * M, -1)
    negatives = similarity[negative].view(B * H * W * M, -1)
    logits = torch.cat([positives, negatives], dim=1) / temperature
    labels = torch.zeros(logits.shape[0], dtype=torch.long, device=preds.device)
    return F.cross_entropy(logits, labels, reduction="sum") / (H * W) / B


# --------------------------------------------------------------------------------------------
# pixel_attention (DESIGN.md 3.4)
# --------------------------------------------------------------------------------------------


def naive_pixel_attention(q: Tensor, k: Tensor, v: Tensor, num_heads: int,
                          scale: Optional[float] = None) -> Tensor:
    """Per-head ``softmax(q k^T * scale) v`` over the pixels of (B, heads*d, H, W) maps, building
    the whole (queries x keys) attention matrix: the eager formulation users write, the test
    suite's ground truth (in float64) and the benchmark's baseline."""
    d = q.shape[1] // num_heads
    scale = d ** -0.5 if scale is None else scale
    qh, kh, vh = (attention_heads(x, num_heads) for x in (q, k, v))
    weights = torch.softmax((qh @ kh.transpose(2, 3)) * scale, dim=-1)
    return (weights @ vh).transpose(2, 3).reshape(q.shape)
