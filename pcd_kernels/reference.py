"""Plain-PyTorch implementations, written once and shared by the tests, the benchmark and the
CPU backend.

Two kinds live here:

* **naive formulas** (``naive_*``, ``official_*``): the published methods' math exactly as their
  official code computes it, building the full (anchors x keys) logit matrix. They are the ground
  truth of the test suite (run in float64) and the baseline of ``bench/``.
* **the chunked torch backend** (``*_chunked``): the same numbers with a hand-written backward
  that recomputes the logits chunk by chunk, so extra memory is O(chunk x keys), never
  O(anchors x keys). It is the CPU path of ``backend="auto"``.

Notation follows DESIGN.md section 3.1: anchors are student pixels, keys are teacher pixels
and queue rows, ``lse`` is the per-anchor logsumexp over its keys.
"""
from typing import Iterator, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

NORM_EPS = 1e-12  # F.normalize's eps: vectors are divided by max(||x||, NORM_EPS)

# Elements of one (chunk x keys) logit block in the chunked backend: 4 Mi float32 = 16 MiB,
# small enough for the memory bound, large enough that the per-chunk matmuls stay efficient.
CHUNK_ELEMENTS = 1 << 22


def pixel_rows(x: Tensor) -> Tensor:
    """(B, C, H, W) map -> (B*H*W, C) rows in (b, h, w) order: the anchor/key index used everywhere."""
    return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])


# --------------------------------------------------------------------------------------------
# Naive (materialising) formulas: ground truth and benchmark baseline
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
# Chunked torch backend
# --------------------------------------------------------------------------------------------


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The torch backend accumulates in float32, or float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _prepared(x: Tensor, dtype: torch.dtype, normalize: bool) -> Tensor:
    x = x.to(dtype)
    return F.normalize(x, dim=1, eps=NORM_EPS) if normalize else x


def _normalize_backward(x: Tensor, grad_hat: Tensor) -> Tensor:
    """Gradient through x -> x / max(||x||, eps), exactly as autograd differentiates F.normalize."""
    norm = torch.linalg.vector_norm(x, dim=1, keepdim=True)
    x_hat = x / norm.clamp_min(NORM_EPS)
    projected = grad_hat - x_hat * (x_hat * grad_hat).sum(1, keepdim=True)
    return torch.where(norm >= NORM_EPS, projected / norm.clamp_min(NORM_EPS), grad_hat / NORM_EPS)


def mask_bytes(mask: Tensor) -> Tensor:
    """A bool mask as the flat contiguous uint8 array the kernels read (1 = valid)."""
    return mask.reshape(-1).contiguous().view(torch.uint8)


class KernelGradients:
    """The gradient buffers a kernel backend of ``pixel_contrastive_loss`` writes: contiguous
    (rows, C) matrices, None where not needed, handed back as channels_last (B, C, H, W) maps
    (and the queue's as a (K, C) matrix). ``empty`` is True when no kernel has to run: no anchor
    at all (every buffer is zeroed), or only a queue gradient asked of an empty queue."""

    def __init__(self, student: Tensor, teacher: Tensor, queue: Optional[Tensor], needs_student: bool,
                 needs_teacher: bool, needs_queue: bool):
        B, C, H, W = student.shape
        self.shape = (B, H, W, C)

        def rows(n, dtype):
            return torch.empty((n, C), dtype=dtype, device=student.device)

        self.anchors = rows(B * H * W, student.dtype) if needs_student else None
        self.pixels = rows(B * H * W, teacher.dtype) if needs_teacher else None
        self.queue = rows(queue.shape[0], queue.dtype) if (needs_queue and queue is not None) else None
        has_queue = queue is not None and queue.shape[0] > 0
        no_rows = B * H * W == 0
        if no_rows or (self.queue is not None and not has_queue):
            for grad in (self.anchors, self.pixels, self.queue):
                if grad is not None:
                    grad.zero_()
        self.empty = no_rows

    def maps(self) -> Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
        def as_map(rows):
            return rows.view(self.shape).permute(0, 3, 1, 2) if rows is not None else None

        return as_map(self.anchors), as_map(self.pixels), self.queue


def anchor_weights(grad_loss: Tensor, mask: Optional[Tensor]) -> Tensor:
    """d(result)/d(loss_i) per anchor as a flat contiguous float32 vector, 0 at masked anchors."""
    g = grad_loss.reshape(-1).to(torch.float32)
    if mask is not None:
        g = g.where(mask.reshape(-1), 0.0)
    return g.contiguous()


def key_side_weights(g: Tensor) -> Tuple[Tensor, Tensor]:
    """(g / max|g|, max|g| as a 1-element tensor): key-side kernels weigh each anchor by the
    first, which keeps the weights in half precision's range when a mean reduction makes every
    g about 1 / anchors, and multiply by the second at the end."""
    g_max = g.abs().amax().clamp_min(1e-30).reshape(1)
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
    reaches eps and inv * G below it (the clamp is constant there; see ``_normalize_backward``).
    Written as inv * G - proj * (x_hat . G) * x, proj is inv^2 where ||x|| >= eps and 0 below,
    float32; ``inv`` is :func:`inverse_norms` of the same rows."""
    norms = torch.linalg.vector_norm(rows, dim=1, dtype=torch.float32)
    return torch.where(norms >= NORM_EPS, inv * inv, torch.zeros_like(inv))


def _valid_rows(mask: Optional[Tensor], n: int, device) -> Tensor:
    if mask is None:
        return torch.arange(n, device=device)
    return mask.reshape(-1).nonzero().squeeze(1)


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


def _chunks(rows: Tensor, n_keys: int) -> Iterator[Tuple[int, Tensor]]:
    step = max(1, CHUNK_ELEMENTS // max(n_keys, 1))
    for start in range(0, rows.numel(), step):
        yield start, rows[start:start + step]


class _Prepared:
    """Inputs as normalised (rows, C) matrices in the compute dtype, shared by forward and backward."""

    def __init__(self, student, teacher, queue, extra_keys, mask, extra_mask, normalize):
        self.batch, self.channels, height, width = student.shape
        self.hw = height * width
        self.dtype = compute_dtype(student.dtype)
        self.a_hat = _prepared(pixel_rows(student), self.dtype, normalize)
        self.t_hat = _prepared(pixel_rows(teacher), self.dtype, normalize)
        self.q_hat = _prepared(queue, self.dtype, normalize) if queue is not None else None
        self.extra_hat = None
        if extra_keys is not None:
            extra = extra_keys if extra_mask is None else extra_keys[extra_mask]
            self.extra_hat = _prepared(extra, self.dtype, normalize)
        self.valid_idx = _valid_rows(mask, self.a_hat.shape[0], student.device)


def pixel_contrastive_forward_chunked(student: Tensor, teacher: Tensor, queue: Optional[Tensor],
                                      extra_keys: Optional[Tensor], mask: Optional[Tensor],
                                      extra_mask: Optional[Tensor], negatives: str,
                                      temperature: float, normalize: bool) -> Tuple[Tensor, Tensor]:
    """Per-anchor loss and lse, (B, H, W) each, 0 at masked pixels; memory O(chunk x keys).

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
        for _, rows in _chunks(anchor_rows, keys.shape[0]):
            lse_rows = torch.logsumexp((prep.a_hat[rows] @ keys.T).mul_(inv_tau), 1)
            if key_rows is None:  # "none": the positive is a key of its own
                lse_rows = torch.logaddexp(lse_rows, pos[rows])
            lse[rows] = lse_rows
            loss[rows] = lse_rows - pos[rows]
    return loss.reshape(B, H, W), lse.reshape(B, H, W)


def pixel_contrastive_backward_chunked(grad_loss: Tensor, student: Tensor, teacher: Tensor,
                                       queue: Optional[Tensor], extra_keys: Optional[Tensor],
                                       mask: Optional[Tensor], extra_mask: Optional[Tensor],
                                       loss: Tensor, lse: Tensor, negatives: str,
                                       temperature: float, normalize: bool, needs_student: bool,
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
        for start, rows in _chunks(anchor_rows, keys.shape[0]):
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
            grad_hat = _normalize_backward(rows.to(prep.dtype), grad_hat)
        grad_hat = grad_hat.to(x.dtype)
        if x.dim() == 2:
            return grad_hat
        if mask is not None:  # masked pixels are not used: their (maybe NaN) values get no gradient
            grad_hat.masked_fill_(~mask.reshape(-1, 1), 0)
        return grad_hat.view(B, x.shape[2], x.shape[3], C).permute(0, 3, 1, 2)

    return finish(grad_a, student), finish(grad_t, teacher), finish(grad_q, queue)


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


class _RelationInputs:
    """Rows of both maps (and the keys) in the compute dtype, normalised, and the key rows every
    anchor's distributions run over: the given keys, or (cross-image) the pixels of every image
    that has a valid one, as segments of H·W rows (masked pixels zeroed, and left out of the
    softmaxes)."""

    def __init__(self, student, teacher, keys, mask, normalize):
        B, C, H, W = student.shape
        self.shape = (B, C, H, W)
        self.dtype = compute_dtype(student.dtype)
        self.s_hat = _prepared(pixel_rows(student), self.dtype, normalize)
        self.t_hat = _prepared(pixel_rows(teacher), self.dtype, normalize)
        self.anchors = _valid_rows(mask, B * H * W, student.device)
        if keys is not None:
            self.k_hat = _prepared(keys, self.dtype, normalize)
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


def pixel_relation_forward_chunked(student: Tensor, teacher: Tensor, keys: Optional[Tensor],
                                   mask: Optional[Tensor], temperature: float, normalize: bool) -> Tensor:
    """Per-anchor KL(P_t || P_s), (B, H, W), 0 at masked pixels; memory O(chunk x keys)."""
    inp = _RelationInputs(student, teacher, keys, mask, normalize)
    B, _, H, W = inp.shape
    values = inp.s_hat.new_zeros(B * H * W)
    for _, rows in _chunks(inp.anchors, inp.s_keys.shape[0]):
        s_logits, t_logits = inp.logits(rows, 1.0 / temperature)
        log_pt, log_ps = t_logits.log_softmax(2), s_logits.log_softmax(2)
        terms = log_pt.exp() * (log_pt - log_ps)
        if inp.key_valid is not None:  # (-inf) - (-inf) at masked keys
            terms = terms.masked_fill(~inp.key_valid, 0)
        values[rows] = terms.sum((1, 2)) * inp.share
    return values.reshape(B, H, W)


def pixel_relation_backward_chunked(grad_values: Tensor, student: Tensor, teacher: Tensor,
                                    keys: Optional[Tensor], mask: Optional[Tensor], temperature: float,
                                    normalize: bool, needs_student: bool, needs_keys: bool
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
    for _, rows in _chunks(inp.anchors, inp.s_keys.shape[0]):
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
        grad_k = _normalize_backward(keys.to(inp.dtype), grad_keys) if normalize else grad_keys
        grad_k = grad_k.to(keys.dtype)
    if grad_s is not None:
        if normalize:
            grad_s = _normalize_backward(pixel_rows(student).to(inp.dtype), grad_s)
        if mask is not None:  # masked pixels are not used: their (maybe NaN) values get no gradient
            grad_s.masked_fill_(~mask.reshape(-1, 1), 0)
        grad_s = grad_s.to(student.dtype).view(B, H, W, C).permute(0, 3, 1, 2)
    return grad_s, grad_k


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


def omni_pack(x: Tensor, groups: int, patch_size: Tuple[int, int]) -> Tensor:
    """(B, C, H, W) -> (patches, C/groups, samples): the samples of every patch, dims-major.

    Sample i of a patch is (position n, group m) with i = n * groups + m and n = row * pw + col
    inside the patch (the official ordering); its vector is channels [m*C/groups, (m+1)*C/groups)
    at that pixel. Dims-major means one dimension of all samples of a patch is contiguous.
    """
    B, C, H, W = x.shape
    ph, pw = patch_size
    d = C // groups
    x = x.reshape(B, groups, d, H // ph, ph, W // pw, pw).permute(0, 3, 5, 2, 4, 6, 1)
    return x.reshape(B * (H // ph) * (W // pw), d, ph * pw * groups)


def omni_allowed(samples: int, groups: int, device) -> Tensor:
    """(samples, samples) bool: key j is in anchor i's logsumexp (the positive, or another group)."""
    group = torch.arange(samples, device=device) % groups
    return (group[:, None] != group[None, :]) | torch.eye(samples, dtype=torch.bool, device=device)


# (patches x samples x samples x dims) elements per step of the chunked backward's sign pass:
# 4 Mi float32 = 16 MiB.
OMNI_SIGN_ELEMENTS = 1 << 22


def _omni_patch_chunks(patches: int, samples: int) -> int:
    return max(1, CHUNK_ELEMENTS // max(samples * samples, 1))


def omni_contrastive_forward_chunked(student: Tensor, teacher: Tensor, groups: int,
                                     temperature: float) -> Tuple[Tensor, Tensor]:
    """Per-sample loss and lse (patches, samples) of packed (patches, dims, samples) maps;
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


def omni_contrastive_backward_chunked(grad_loss: Tensor, student: Tensor, teacher: Tensor,
                                      lse: Tensor, groups: int, temperature: float,
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


# --------------------------------------------------------------------------------------------
# pixel_attention (DESIGN.md 3.4)
# --------------------------------------------------------------------------------------------


def attention_heads(x: Tensor, num_heads: int) -> Tensor:
    """(B, heads*d, H, W) map -> (B, heads, H*W, d): the (batch, head, token, dim) layout attention
    libraries expect, as a strided view (a transpose)."""
    B, C, H, W = x.shape
    return x.reshape(B, num_heads, C // num_heads, H * W).transpose(2, 3)


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


def sdpa_pixel_attention(q: Tensor, k: Tensor, v: Tensor, num_heads: int, scale: float) -> Tensor:
    """The same through ``F.scaled_dot_product_attention`` on the reshaped maps, with the permutes and
    copies a user writes around it: the torch backend of ``pixel_attention``. The fused SDPA kernels
    (flash on CPU; flash, efficient and cuDNN on CUDA) need token-major inputs with unit dim stride,
    so the maps are copied to (B, heads, H*W, d); a strided view would fall back to SDPA's math
    path, which builds the (H*W x Hk*Wk) matrix."""
    qh, kh, vh = (attention_heads(x, num_heads).contiguous() for x in (q, k, v))
    out = F.scaled_dot_product_attention(qh, kh, vh, scale=scale)
    if out.device.type == "cpu":
        # The CPU flash kernel's AVX-512 exp (torch 2.13, ATEN_CPU_CAPABILITY=avx512) returns 0 for
        # a query row holding NaN where its other paths return NaN. A NaN or infinite query
        # component makes the naive formula's whole row NaN, so that is what the row becomes.
        out = out.masked_fill(~qh.isfinite().all(dim=-1, keepdim=True), float("nan"))
    return out.transpose(2, 3).reshape(q.shape)
