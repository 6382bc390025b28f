"""Triton kernels for ``pixel_contrastive_loss`` (DESIGN.md 3.1).

Three kernels, none of which stores anything of size anchors x keys:

* ``_forward_kernel``: one program per tile of anchors streams the key tiles (teacher pixels of
  the image or batch, other ranks' pixels, queue rows), keeps a running max and sum per anchor
  (online logsumexp, base 2), and writes the per-anchor loss and lse2.
* ``_backward_anchor_kernel``: recomputes each anchor's softmax tile by tile and accumulates
  sum_k (p_ik - [k is i's positive]) k_hat_k (like flash-attention's dQ). With
  ``negatives="none"`` a second launch of it (TEACHER_POSITIVES, no key loop) writes the teacher
  gradient, which then involves only the anchor's own positive.
* ``_backward_key_kernel``: one program per tile of keys loops over the anchors that see them and
  accumulates sum_i g_i (p_ik - [k is i's positive]) a_hat_i (like dK). Every output element has
  exactly one writer: no atomics, deterministic results.

Subtracting the positive inside the tile loop (softmax minus one-hot, as autograd does) rather
than afterwards keeps saturated anchors (p_positive ~ 1, tiny temperatures) free of cancellation.

L2 normalisation is fused: the kernels read raw vectors and apply the inverse norms (computed once,
O(rows)) to the logits; the gradient through the normalisation, (G - x_hat (x_hat . G)) / ||x||,
needs x_hat . G, which equals a per-row sum of (p - onehot) * logit accumulated in the same loop,
so the epilogue applies it without a second pass over C.

Pixel maps reach the kernels as contiguous (B*H*W, C) matrices (a view for channels_last
inputs, one copy otherwise), so every tile load is contiguous along C, and their gradients leave
the same way, as channels_last maps. Queue rows are read through both of their strides, so the
official (C, K) buffer passed transposed needs no copy.

Modelled bound (bench/model.py; not measured): per anchor-key pair the forward does 2*C FLOPs on
the tensor cores and one exp on the MUFU, the backward 4*C FLOPs and one exp. On an H200 (bf16
989 TFLOP/s, 16 exps per clock per SM) with the exps not overlapping the MMAs, C = 256 bounds the
forward at 68 % of the bf16 peak and forward + backward at 76 %; 32,768 anchors x 65,536 keys
take at least 4.4 ms for both.
"""
import torch
import triton
import triton.language as tl

from pcd_kernels._conventions import NEGATIVES_MODES, logit_scale
from pcd_kernels.backends._host import (PixelContrastiveKernels, image_grid_limit, inverse_norms, key_side_weights,
                                        mask_bytes, projection_scales)
from pcd_kernels.backends.triton._common import (KernelCall, LN2, LOG2E, Launchers, MAX_INIT, accumulate_rows,
                                                 block_c, device_guard, dot_rows, int32_tile_offsets, largest_tile,
                                                 load_chunk, matmul_precision, pixel_matrix, row_block,
                                                 store_gradient, store_rows, through_normalization, tune_key)


def limits(*, dtype, auto, negatives, batch):
    return image_grid_limit(negatives, batch)


@triton.jit
def _rowwise_dot(x0, X, Y, start, rows, ok, s_r, C, BLOCK_C: tl.constexpr, C_TILES: tl.constexpr):
    """x_i . y_i for each row i of two row-major matrices (the positive pairs), float32."""
    y = load_chunk(Y, start, rows, ok, s_r, 1, 0, C, BLOCK_C)
    acc = tl.sum(x0.to(tl.float32) * y.to(tl.float32), 1)
    for ci in range(1, C_TILES):
        x = load_chunk(X, start, rows, ok, s_r, 1, ci * BLOCK_C, C, BLOCK_C)
        y = load_chunk(Y, start, rows, ok, s_r, 1, ci * BLOCK_C, C, BLOCK_C)
        acc += tl.sum(x.to(tl.float32) * y.to(tl.float32), 1)
    return acc


@triton.jit
def _key_tile_logits(a0, A, row0, rows, a_in, a_sr, row_scale, K, k_sr, k_sc, start, keys, k_in, inv_k_ptr,
                     valid_k_ptr, C, HAS_MASK: tl.constexpr, NORMALIZE: tl.constexpr,
                     BLOCK_C: tl.constexpr, C_TILES: tl.constexpr, PRECISION: tl.constexpr):
    """Base-2 logits (BLOCK_M, BLOCK_N) of anchor rows against key rows, -inf for absent keys.

    Returns the logits, the mask of keys that exist (in range and not masked), the keys' first
    channel chunk, loaded as 0 for absent keys (the whole key when C_TILES == 1), and their
    inverse norms (1 without normalisation)."""
    k_ok = k_in
    if HAS_MASK:
        k_ok = k_ok & (tl.load(valid_k_ptr + keys, mask=k_in, other=0) != 0)
    k0 = load_chunk(K, start, keys, k_ok, k_sr, k_sc, 0, C, BLOCK_C)
    s = dot_rows(a0, A, row0, rows, a_in, a_sr, 1, k0, K, start, keys, k_ok, k_sr, k_sc, C, BLOCK_C, C_TILES,
                  PRECISION)
    s = s * row_scale[:, None]
    inv_k = tl.full(keys.shape, 1.0, tl.float32)
    if NORMALIZE:
        inv_k = tl.load(inv_k_ptr + keys, mask=k_ok, other=0.0)
        s = s * inv_k[None, :]
    return tl.where(k_ok[None, :], s, float("-inf")), k_ok, k0, inv_k


@triton.jit
def _lse_over_keys(m, l, pos, a0, A, rows, row0, a_in, a_sr, row_scale, K, k_sr, k_sc, lo, hi,
                   inv_k_ptr, valid_k_ptr, C, HOLDS_POSITIVES: tl.constexpr, HAS_MASK: tl.constexpr,
                   NORMALIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_C: tl.constexpr, C_TILES: tl.constexpr, PRECISION: tl.constexpr):
    """Online logsumexp (running max m, running sum l, base 2) over key rows [lo, hi) of one
    source. For teacher pixels it also picks each anchor's positive logit out of the tile holding
    it, so that loss = lse2 - positive uses the very number the lse2 summed."""
    for start in range(lo, hi, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)
        s, _, _, _ = _key_tile_logits(a0, A, row0, rows, a_in, a_sr, row_scale, K, k_sr, k_sc, start, keys,
                                      keys < hi, inv_k_ptr, valid_k_ptr, C, HAS_MASK, NORMALIZE,
                                      BLOCK_C, C_TILES, PRECISION)
        if HOLDS_POSITIVES:
            if (start < row0 + BLOCK_M) & (start + BLOCK_N > row0):
                pos += tl.sum(tl.where(keys[None, :] == rows[:, None], s, 0.0), 1)
        m_new = tl.maximum(m, tl.max(s, 1))
        l = l * tl.exp2(m - m_new) + tl.sum(tl.exp2(s - m_new[:, None]), 1)
        m = m_new
    return m, l, pos


@triton.jit
def _softmax_times_keys(acc, d, a0, A, row0, rows, a_in, a_sr, row_scale, lse2, oc,
                        K, k_sr, k_sc, lo, hi, inv_k_ptr, valid_k_ptr, C,
                        HOLDS_POSITIVES: tl.constexpr, HAS_MASK: tl.constexpr,
                        NORMALIZE: tl.constexpr, SCALE_WEIGHTS: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, C_TILES: tl.constexpr,
                        PRECISION: tl.constexpr):
    """Over key rows [lo, hi) of one source, with q = p - onehot(positive):
    acc += q @ k_hat[:, oc:oc + BLOCK_C] and d += sum_k q * logit2."""
    for start in range(lo, hi, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)
        s, k_ok, k0, inv_k = _key_tile_logits(a0, A, row0, rows, a_in, a_sr, row_scale, K, k_sr, k_sc, start, keys,
                                              keys < hi, inv_k_ptr, valid_k_ptr, C, HAS_MASK,
                                              NORMALIZE, BLOCK_C, C_TILES, PRECISION)
        p = tl.exp2(s - lse2[:, None])
        if HOLDS_POSITIVES:  # teacher pixels: key row i is anchor row i's positive
            p = tl.where(keys[None, :] == rows[:, None], p - 1.0, p)
        d += tl.sum(tl.where(k_ok[None, :], p * s, 0.0), 1)
        acc = accumulate_rows(acc, p, k0, K, start, keys, k_ok, k_sr, k_sc, inv_k, oc, C, NORMALIZE, SCALE_WEIGHTS,
                              BLOCK_C, C_TILES, PRECISION)
    return acc, d


@triton.jit
def _anchor_tile(n_rows, HW, valid_ptr, HAS_MASK: tl.constexpr, MODE: tl.constexpr,
                 BLOCK_M: tl.constexpr):
    """This program's anchor rows, which exist / are valid, and the pixel-key range they see."""
    local = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    if MODE == 1:  # "image": anchors and pixel keys of image program_id(1)
        seg_start = tl.program_id(1) * HW
        seg_len = HW
    else:
        seg_start = 0
        seg_len = n_rows
    rows = seg_start + local
    a_in = local < seg_len
    valid = a_in
    if HAS_MASK:
        valid = valid & (tl.load(valid_ptr + rows, mask=a_in, other=0) != 0)
    return seg_start + tl.program_id(0) * BLOCK_M, rows, a_in, valid, seg_start, seg_start + seg_len


@triton.jit(do_not_specialize=["TUNE_KEY"])
def _forward_kernel(
    A, T, X, x_sr, x_sc, n_extra, Q, q_sr, q_sc, n_queue,
    inv_a_ptr, inv_t_ptr, inv_x_ptr, inv_q_ptr, valid_ptr, valid_x_ptr,
    loss_ptr, lse_ptr, n_rows, HW, C, logit_scale, TUNE_KEY,
    MODE: tl.constexpr, HAS_MASK: tl.constexpr, HAS_EXTRA: tl.constexpr, HAS_QUEUE: tl.constexpr,
    NORMALIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
    C_TILES: tl.constexpr, PRECISION: tl.constexpr,
):
    row0, rows, a_in, valid, key_lo, key_hi = _anchor_tile(n_rows, HW, valid_ptr, HAS_MASK, MODE, BLOCK_M)
    a0 = load_chunk(A, row0, rows, a_in, C, 1, 0, C, BLOCK_C)
    row_scale = tl.full((BLOCK_M,), 1.0, tl.float32) * logit_scale
    if NORMALIZE:
        row_scale = row_scale * tl.load(inv_a_ptr + rows, mask=a_in, other=0.0)

    if MODE == 0:  # "none": the positive is a key of its own
        pos = _rowwise_dot(a0, A, T, row0, rows, a_in, C, C, BLOCK_C, C_TILES)
        if NORMALIZE:
            pos = pos * tl.load(inv_t_ptr + rows, mask=a_in, other=0.0)
        pos = pos * row_scale
        m = pos
        l = tl.full((BLOCK_M,), 1.0, tl.float32)
    else:  # the positive is among the teacher-pixel keys; picked out of its tile
        pos = tl.zeros((BLOCK_M,), tl.float32)
        m = tl.full((BLOCK_M,), MAX_INIT, tl.float32)
        l = tl.zeros((BLOCK_M,), tl.float32)
        m, l, pos = _lse_over_keys(m, l, pos, a0, A, rows, row0, a_in, C, row_scale, T, C, 1, key_lo,
                                   key_hi, inv_t_ptr, valid_ptr, C, True, HAS_MASK, NORMALIZE,
                                   BLOCK_M, BLOCK_N, BLOCK_C, C_TILES, PRECISION)
        if HAS_EXTRA:
            m, l, pos = _lse_over_keys(m, l, pos, a0, A, rows, row0, a_in, C, row_scale, X, x_sr, x_sc,
                                       0, n_extra, inv_x_ptr, valid_x_ptr, C, False, True, NORMALIZE,
                                       BLOCK_M, BLOCK_N, BLOCK_C, C_TILES, PRECISION)
    if HAS_QUEUE:
        m, l, pos = _lse_over_keys(m, l, pos, a0, A, rows, row0, a_in, C, row_scale, Q, q_sr, q_sc, 0,
                                   n_queue, inv_q_ptr, valid_ptr, C, False, False, NORMALIZE,
                                   BLOCK_M, BLOCK_N, BLOCK_C, C_TILES, PRECISION)
    lse2 = m + tl.log2(l)
    tl.store(loss_ptr + rows, tl.where(valid, (lse2 - pos) * LN2, 0.0), mask=a_in)
    # Saved in base 2: converting to natural log and back would move lse2 by an ulp of the
    # logits, which is all that p_positive - 1 is for saturated anchors.
    tl.store(lse_ptr + rows, tl.where(valid, lse2, 0.0), mask=a_in)


@triton.jit(do_not_specialize=["TUNE_KEY"])
def _backward_anchor_kernel(
    A, T, X, x_sr, x_sc, n_extra, Q, q_sr, q_sc, n_queue,
    inv_a_ptr, inv_t_ptr, inv_x_ptr, inv_q_ptr, valid_ptr, valid_x_ptr,
    loss_ptr, lse_ptr, grad_ptr, proj_ptr, OUT, n_rows, HW, C, logit_scale, inv_temperature, TUNE_KEY,
    MODE: tl.constexpr, HAS_MASK: tl.constexpr, HAS_EXTRA: tl.constexpr, HAS_QUEUE: tl.constexpr,
    NORMALIZE: tl.constexpr, SCALE_WEIGHTS: tl.constexpr, TEACHER_POSITIVES: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, C_TILES: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Writes the student's gradient into OUT, or with TEACHER_POSITIVES (negatives="none" only)
    the teacher's, which involves only each anchor's own positive: no key loop. Two launches
    rather than one writing both: the epilogue of one holding both spilled registers."""
    row0, rows, a_in, valid, key_lo, key_hi = _anchor_tile(n_rows, HW, valid_ptr, HAS_MASK, MODE, BLOCK_M)
    oc = tl.program_id(2) * BLOCK_C  # this program writes channels [oc, oc + BLOCK_C)
    lse2 = tl.load(lse_ptr + rows, mask=valid, other=0.0)
    # "none": the positive is not among the key tiles; its softmax share minus one is
    # exp2(-loss2) - 1, exact (0) for saturated anchors.
    loss2 = tl.load(loss_ptr + rows, mask=valid, other=0.0) * LOG2E
    pos2 = lse2 - loss2
    pos_weight = tl.exp2(-loss2) - 1.0
    inv_t = tl.full((BLOCK_M,), 1.0, tl.float32)
    if NORMALIZE:
        inv_t = tl.load(inv_t_ptr + rows, mask=a_in, other=0.0)

    if TEACHER_POSITIVES:
        scale = tl.load(grad_ptr + rows, mask=valid, other=0.0) * inv_temperature * pos_weight
        if NORMALIZE:
            scale = scale * tl.load(inv_a_ptr + rows, mask=a_in, other=0.0)
        grad = scale[:, None] * load_chunk(A, row0, rows, a_in, C, 1, oc, C, BLOCK_C).to(tl.float32)
        if NORMALIZE:
            dot_hat = tl.load(grad_ptr + rows, mask=valid, other=0.0) * pos_weight * pos2 * LN2  # t_hat . grad_hat
            grad = through_normalization(grad, dot_hat, T, row0, rows, a_in, C, 1, inv_t, proj_ptr, C, oc, False,
                                         BLOCK_C)
        store_rows(OUT, grad, row0, rows, a_in, valid, C, oc, BLOCK_C)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_C), tl.float32)  # sum_k (p - onehot)_ik k_hat_k, this chunk
        d = tl.zeros((BLOCK_M,), tl.float32)  # sum_k (p - onehot)_ik logit2_ik: gives a_hat . grad
        if MODE == 0:  # the positive's share, added before the loop while registers are free
            acc = (pos_weight * inv_t)[:, None] * load_chunk(T, row0, rows, a_in, C, 1, oc, C, BLOCK_C).to(tl.float32)
            d = pos_weight * pos2
        row_scale = tl.full((BLOCK_M,), 1.0, tl.float32) * logit_scale
        if NORMALIZE:
            row_scale = row_scale * tl.load(inv_a_ptr + rows, mask=a_in, other=0.0)
        a0 = load_chunk(A, row0, rows, a_in, C, 1, 0, C, BLOCK_C)
        if MODE != 0:
            acc, d = _softmax_times_keys(acc, d, a0, A, row0, rows, a_in, C, row_scale, lse2, oc,
                                         T, C, 1, key_lo, key_hi, inv_t_ptr, valid_ptr, C,
                                         True, HAS_MASK, NORMALIZE, SCALE_WEIGHTS, BLOCK_N, BLOCK_C,
                                         C_TILES, PRECISION)
            if HAS_EXTRA:
                acc, d = _softmax_times_keys(acc, d, a0, A, row0, rows, a_in, C, row_scale, lse2, oc,
                                             X, x_sr, x_sc, 0, n_extra, inv_x_ptr, valid_x_ptr, C,
                                             False, True, NORMALIZE, SCALE_WEIGHTS, BLOCK_N, BLOCK_C,
                                             C_TILES, PRECISION)
        if HAS_QUEUE:
            acc, d = _softmax_times_keys(acc, d, a0, A, row0, rows, a_in, C, row_scale, lse2, oc,
                                         Q, q_sr, q_sc, 0, n_queue, inv_q_ptr, valid_ptr, C,
                                         False, False, NORMALIZE, SCALE_WEIGHTS, BLOCK_N, BLOCK_C,
                                         C_TILES, PRECISION)
        # What the epilogue needs is loaded here (from L2), not kept in registers across the loop
        # beside the accumulator, where it spilled.
        _, _, _, valid, _, _ = _anchor_tile(n_rows, HW, valid_ptr, HAS_MASK, MODE, BLOCK_M)
        g = tl.load(grad_ptr + rows, mask=valid, other=0.0)
        store_gradient(OUT, acc, d, g, inv_temperature, A, row0, rows, a_in, valid, C, 1, inv_a_ptr, proj_ptr, C, oc,
                       NORMALIZE, False, BLOCK_C)


@triton.jit(do_not_specialize=["TUNE_KEY"])
def _backward_key_kernel(
    A, K, k_sr, k_sc, inv_a_ptr, inv_k_ptr, proj_k_ptr, valid_ptr,
    lse_ptr, grad_scaled_ptr, grad_max_ptr, DK,
    n_rows, n_keys, HW, C, logit_scale, inv_temperature, TUNE_KEY,
    MODE: tl.constexpr, KEYS_ARE_TEACHER: tl.constexpr, HAS_MASK: tl.constexpr,
    NORMALIZE: tl.constexpr, SCALE_WEIGHTS: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, C_TILES: tl.constexpr, PRECISION: tl.constexpr,
):
    local = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    oc = tl.program_id(2) * BLOCK_C
    k_start = 0
    k_len = n_keys
    a_lo = 0
    a_hi = n_rows
    if KEYS_ARE_TEACHER and MODE == 1:  # "image": pixels of image program_id(1), its anchors only
        k_start = tl.program_id(1) * HW
        k_len = HW
        a_lo = k_start
        a_hi = k_start + HW
    key0 = k_start + tl.program_id(0) * BLOCK_N
    keys = k_start + local
    k_in = local < k_len
    k_ok = k_in
    if KEYS_ARE_TEACHER and HAS_MASK:
        k_ok = k_ok & (tl.load(valid_ptr + keys, mask=k_in, other=0) != 0)
    k0 = load_chunk(K, key0, keys, k_in, k_sr, k_sc, 0, C, BLOCK_C)
    key_scale = tl.full((BLOCK_N,), 1.0, tl.float32) * logit_scale
    if NORMALIZE:
        key_scale = key_scale * tl.load(inv_k_ptr + keys, mask=k_in, other=0.0)

    acc = tl.zeros((BLOCK_N, BLOCK_C), tl.float32)  # sum_i (g_i / g_max) (p - onehot)_ik a_hat_i
    d = tl.zeros((BLOCK_N,), tl.float32)  # sum_i (g_i / g_max) (p - onehot)_ik logit2_ik
    for start in range(a_lo, a_hi, BLOCK_M):
        rows, r_in, r_ok = row_block(start, a_hi, valid_ptr, HAS_MASK, BLOCK_M)
        # Masked anchors are loaded as zeros: their values (NaN included) must not reach keys.
        a0 = load_chunk(A, start, rows, r_ok, C, 1, 0, C, BLOCK_C)
        # transposed logits (keys x anchors), base 2
        s = dot_rows(k0, K, key0, keys, k_in, k_sr, k_sc, a0, A, start, rows, r_ok, C, 1, C, BLOCK_C, C_TILES,
                      PRECISION)
        inv_a = tl.full((BLOCK_M,), 1.0, tl.float32)
        if NORMALIZE:
            inv_a = tl.load(inv_a_ptr + rows, mask=r_ok, other=0.0)
        s = s * key_scale[:, None] * inv_a[None, :]
        lse2 = tl.load(lse_ptr + rows, mask=r_ok, other=0.0)
        p = tl.exp2(s - lse2[None, :])
        if KEYS_ARE_TEACHER:  # teacher key k is the positive of the anchor at the same pixel
            p = tl.where(keys[:, None] == rows[None, :], p - 1.0, p)
        g_scaled = tl.load(grad_scaled_ptr + rows, mask=r_ok, other=0.0)
        w = tl.where(r_ok[None, :], p * g_scaled[None, :], 0.0)
        d += tl.sum(tl.where(r_ok[None, :], w * s, 0.0), 1)
        acc = accumulate_rows(acc, w, a0, A, start, rows, r_ok, C, 1, inv_a, oc, C, NORMALIZE, SCALE_WEIGHTS, BLOCK_C,
                              C_TILES, PRECISION)

    # g was divided by max|g| so that w fits half precision (mean reductions make g ~ 1/anchors).
    # What the epilogue needs is loaded again here (from L2), not kept in registers across the
    # loop beside the accumulator, where it spilled.
    if KEYS_ARE_TEACHER and HAS_MASK:
        k_ok = k_in & (tl.load(valid_ptr + keys, mask=k_in, other=0) != 0)
    store_gradient(DK, acc, d, tl.load(grad_max_ptr), inv_temperature, K, key0, keys, k_in, k_ok, k_sr, k_sc,
                   inv_k_ptr, proj_k_ptr, C, oc, NORMALIZE, True, BLOCK_C)


# ----------------------------------------------------------------------------------------------
# Launch configuration
# ----------------------------------------------------------------------------------------------

# (BLOCK_M, BLOCK_N, num_warps, num_stages) candidates for H100-class GPUs; BLOCK_M is the
# anchor tile, BLOCK_N the key tile. The autotuner keeps the fastest per kernel variant and size
# bucket; with PCD_KERNELS_AUTOTUNE=0 the first entry is used as is (the test suite does that:
# tuning every variant it compiles would take far longer than the tests).
# Read from their sm_90a SASS (bench/kernels.py, docs/performance.md), on Triton 3.6 and 3.9:
# - a warpgroup (4 warps) owns 64 rows of a warpgroup MMA, so each candidate has 4 warps per 64
#   rows of its dots' M side (the anchors in the forward and anchor kernels, the keys in the key
#   kernel): 8 warps over 64 rows compute every logit and exp twice, and fewer than 64 rows fall
#   back to warp MMA;
# - the backward kernels hold a (64 x 256) float32 accumulator per warpgroup at C = 256 (128
#   registers a thread): beside it, the logits of 64 keys (anchor kernel) per step spill, and
#   on Triton 3.6 so do 4-warp candidates; 8 warps over 128 rows with 16 or 32 keys (anchor
#   kernel) or anchors (key kernel) a step do not;
# - every candidate spills nothing in 16 bits and fits 227 KB of shared memory;
# - each warpgroup waits for its MMA before its exps (Triton emits the wait at the first use, and
#   neither warp specialisation nor a software-pipelined loop changes that on sm_90a: see
#   docs/performance.md), so the exps overlap the tensor cores only across resident programs:
#   the last two forward candidates take <= 97 KB, so that two programs share an SM.
_GPU_CONFIGS = {
    "forward": [(128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3), (64, 128, 4, 2), (128, 32, 4, 4),
                (64, 64, 4, 2), (64, 32, 4, 3)],
    "anchor": [(128, 32, 8, 3), (128, 32, 8, 2), (128, 16, 8, 3), (128, 16, 8, 4)],
    "key": [(32, 128, 8, 3), (32, 128, 8, 2), (32, 128, 8, 4), (16, 128, 8, 3)],
}
# float16 normalises each key or anchor tile in registers before the backward's second MMA (see
# _common.accumulate_rows): that costs the key kernel the registers of 16 anchors.
_FLOAT16_CONFIGS = dict(_GPU_CONFIGS,
                        anchor=[(128, 32, 8, 3), (128, 32, 8, 4), (128, 16, 8, 3), (128, 16, 8, 4)],
                        key=[(16, 128, 8, 3), (16, 128, 8, 4), (16, 128, 8, 2), (16, 64, 4, 3)])
# float32 without TF32 multiplies on CUDA cores (FMA loops, no warpgroup MMA), where the tiles
# above spill kilobytes inside the main loop: smaller tiles spread over 8 warps spill least.
_IEEE_CONFIGS = {
    "forward": [(64, 64, 8, 2), (32, 32, 4, 2), (32, 64, 4, 2)],
    "anchor": [(64, 64, 8, 2), (32, 32, 4, 2)],
    "key": [(64, 64, 8, 2), (64, 32, 4, 2), (32, 32, 4, 2)],
}
# The interpreter runs every program in numpy: small tiles keep CI fast and exercise tails.
INTERPRETER_BLOCKS = {"BLOCK_M": 16, "BLOCK_N": 16}
_KERNELS = {"forward": _forward_kernel, "anchor": _backward_anchor_kernel, "key": _backward_key_kernel}


def config_lists(precision, scale_weights=True):
    """The candidate lists for a matmul precision; scale_weights=False is float16's path."""
    if precision == "ieee":
        return _IEEE_CONFIGS
    return _GPU_CONFIGS if scale_weights else _FLOAT16_CONFIGS


def gpu_configs(kind, precision, scale_weights=True):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) candidates of a kernel."""
    return config_lists(precision, scale_weights)[kind]


LAUNCHERS = Launchers(_KERNELS, lambda kind, flags, tiles: gpu_configs(kind, flags["PRECISION"],
                                                                        flags.get("SCALE_WEIGHTS", True)),
                      tune_on=("C", "TUNE_KEY", "BLOCK_C"), interpreter_blocks=INTERPRETER_BLOCKS)
# The most rows a tile of this module's kernels holds: key matrices are addressed within one in 32 bits.
TILE_ROWS = largest_tile((_GPU_CONFIGS, _FLOAT16_CONFIGS, _IEEE_CONFIGS), INTERPRETER_BLOCKS)


# ----------------------------------------------------------------------------------------------
# Host-side wrappers
# ----------------------------------------------------------------------------------------------


class _Inputs:
    """The tensors and sizes every kernel reads, prepared once per call."""

    def __init__(self, student, teacher, queue, extra_keys, mask, extra_mask, negatives, temperature,
                 normalize):
        B, C, H, W = student.shape
        self.anchors = pixel_matrix(student)
        self.teacher = pixel_matrix(teacher)
        self.channels, self.hw, self.n_rows = C, H * W, B * H * W
        self.mode = NEGATIVES_MODES[negatives]
        self.normalize = normalize
        self.logit_scale = logit_scale(temperature)
        self.inv_temperature = 1.0 / temperature
        self.has_mask = mask is not None
        self.has_queue = queue is not None and queue.shape[0] > 0
        self.has_extra = (extra_keys is not None and extra_keys.shape[0] > 0
                          and self.mode == NEGATIVES_MODES["batch"])
        self.queue = int32_tile_offsets(queue, TILE_ROWS) if self.has_queue else None
        self.extra = int32_tile_offsets(extra_keys, TILE_ROWS) if self.has_extra else None
        self.n_queue = queue.shape[0] if self.has_queue else 0
        self.n_extra = extra_keys.shape[0] if self.has_extra else 0

        dummy = self.anchors.new_empty(1, dtype=torch.float32)  # stands for absent pointers
        norms = inverse_norms if normalize else (lambda x: dummy)
        self.inv_a, self.inv_t = norms(self.anchors), norms(self.teacher)
        self.inv_q = norms(queue) if self.has_queue else dummy
        self.inv_x = norms(extra_keys) if self.has_extra else dummy
        self.valid = mask_bytes(mask) if self.has_mask else dummy
        self.valid_x = dummy
        if self.has_extra:
            self.valid_x = (mask_bytes(extra_mask) if extra_mask is not None else
                            torch.ones(self.n_extra, dtype=torch.uint8, device=student.device))

        self.block_c = block_c(C, student.element_size())
        self.c_tiles = triton.cdiv(C, self.block_c)
        self.segments = B if self.mode == NEGATIVES_MODES["image"] else 1
        self.seg_len = H * W if self.mode == NEGATIVES_MODES["image"] else self.n_rows
        self.precision = matmul_precision(student.dtype)
        # Backward weights are divided by the key norms (one multiply per logit) unless float16,
        # whose range a zero vector's 1/||k|| = 1e12 would overflow.
        self.scale_weights = student.dtype != torch.float16

    def sources(self):
        """Anchors, teacher pixels, extra keys, queue rows: the arguments the anchor-tile kernels
        start with."""
        x = self.extra if self.has_extra else self.anchors
        q = self.queue if self.has_queue else self.anchors
        x_strides = (x.stride(0), x.stride(1)) if self.has_extra else (0, 0)
        q_strides = (q.stride(0), q.stride(1)) if self.has_queue else (0, 0)
        return (self.anchors, self.teacher, x, *x_strides, self.n_extra, q, *q_strides, self.n_queue,
                self.inv_a, self.inv_t, self.inv_x, self.inv_q, self.valid, self.valid_x)

    def flags(self):
        return dict(MODE=self.mode, HAS_MASK=self.has_mask, HAS_EXTRA=self.has_extra,
                    HAS_QUEUE=self.has_queue, NORMALIZE=self.normalize, BLOCK_C=self.block_c,
                    C_TILES=self.c_tiles, PRECISION=self.precision)

    def weight_flags(self):
        return dict(SCALE_WEIGHTS=self.scale_weights)


def forward_call(inp, loss, lse2):
    flags = inp.flags()
    bucket = tune_key(flags, inp.seg_len, inp.n_queue + inp.n_extra)
    args = (*inp.sources(), loss, lse2, inp.n_rows, inp.hw, inp.channels, inp.logit_scale, bucket)
    grid = lambda meta: (triton.cdiv(inp.seg_len, meta["BLOCK_M"]), inp.segments)
    return KernelCall(LAUNCHERS, "forward", args, flags, grid)


def anchor_backward_call(inp, loss, lse2, g, out, teacher_positives=False):
    """The student's gradient, or with teacher_positives the teacher's for negatives="none"
    (it involves only the positive), into a contiguous (rows, C) buffer."""
    flags = dict(inp.flags(), **inp.weight_flags(), TEACHER_POSITIVES=teacher_positives)
    bucket = tune_key(flags, inp.seg_len, inp.n_queue + inp.n_extra)
    rows, inv = (inp.teacher, inp.inv_t) if teacher_positives else (inp.anchors, inp.inv_a)
    proj = projection_scales(rows, inv) if inp.normalize else inv
    args = (*inp.sources(), loss, lse2, g, proj, out, inp.n_rows, inp.hw, inp.channels,
            inp.logit_scale, inp.inv_temperature, bucket)
    grid = lambda meta: (triton.cdiv(inp.seg_len, meta["BLOCK_M"]), inp.segments, inp.c_tiles)
    return KernelCall(LAUNCHERS, "anchor", args, flags, grid)


def key_backward_call(inp, lse2, g_scaled, g_max, grad_keys, keys_are_teacher):
    """Gradient of the teacher rows (keys_are_teacher) or of the queue rows, into a contiguous
    (rows, C) buffer."""
    if keys_are_teacher:
        keys, inv_k, n_keys, k_len, segments = inp.teacher, inp.inv_t, inp.n_rows, inp.seg_len, inp.segments
    else:
        keys, inv_k, n_keys, k_len, segments = inp.queue, inp.inv_q, inp.n_queue, inp.n_queue, 1
    flags = dict(MODE=inp.mode, KEYS_ARE_TEACHER=keys_are_teacher, HAS_MASK=inp.has_mask,
                 NORMALIZE=inp.normalize, BLOCK_C=inp.block_c, C_TILES=inp.c_tiles,
                 PRECISION=inp.precision, **inp.weight_flags())
    proj_k = projection_scales(keys, inv_k) if inp.normalize else inv_k
    args = (inp.anchors, keys, keys.stride(0), keys.stride(1), inp.inv_a, inv_k, proj_k, inp.valid,
            lse2, g_scaled, g_max, grad_keys, inp.n_rows, n_keys, inp.hw, inp.channels,
            inp.logit_scale, inp.inv_temperature, tune_key(flags, inp.seg_len, n_keys))
    grid = lambda meta: (triton.cdiv(k_len, meta["BLOCK_N"]), segments, inp.c_tiles)
    return KernelCall(LAUNCHERS, "key", args, flags, grid)


def _launch_backward(inp, grads, g, loss, lse2):
    """The backward kernels writing ``grads``' buffers, for anchor weights ``g``."""
    grad_a, grad_t, grad_q = grads.anchors, grads.teacher, grads.queue
    none_mode = inp.mode == NEGATIVES_MODES["none"]
    calls = []
    if grad_a is not None:
        calls.append(anchor_backward_call(inp, loss, lse2, g, grad_a))
    if grad_t is not None and none_mode:
        calls.append(anchor_backward_call(inp, loss, lse2, g, grad_t, teacher_positives=True))
    teacher_keys = grad_t is not None and not none_mode
    queue_keys = grad_q is not None and inp.has_queue
    if teacher_keys or queue_keys:
        g_scaled, g_max = key_side_weights(g)
        if teacher_keys:
            calls.append(key_backward_call(inp, lse2, g_scaled, g_max, grad_t, True))
        if queue_keys:
            calls.append(key_backward_call(inp, lse2, g_scaled, g_max, grad_q, False))
    for call in calls:
        call.launch()


# forward(...) -> (loss, lse2) and backward(...) -> gradients: the contract of docs/contributing.md.
_ENTRY_POINTS = PixelContrastiveKernels(_Inputs, lambda inp, loss, lse2: forward_call(inp, loss, lse2).launch(),
                                        _launch_backward, device_guard)
forward, backward = _ENTRY_POINTS.forward, _ENTRY_POINTS.backward


# ----------------------------------------------------------------------------------------------
# Ahead-of-time compilation (bench/kernels.py's SASS report, tests/test_triton_aot.py)
# ----------------------------------------------------------------------------------------------

# The SASS report's launches (bench/kernels.py): with a queue (negatives="none"), and with teacher keys
# (negatives="batch", masked).
AOT_REPRESENTATIVE = [dict(channels=256, negatives="none"), dict(channels=256, negatives="batch", masked=True)]


def aot_launches(dtype, channels=256, negatives="none", masked=False):
    """(kernel, variant, fn, args, constexprs, candidates) of every pixel_contrastive_loss kernel
    for these flags: 4 maps of 16x16 and a queue of 4,096 rows."""
    B, H, W, K, C = 4, 16, 16, 4096, channels
    s = torch.empty(B, C, H, W, dtype=dtype)
    mask = torch.ones(B, H, W, dtype=torch.bool) if masked else None
    inp = _Inputs(s, torch.empty_like(s), torch.empty(K, C, dtype=dtype), None, mask, None, negatives, 0.2, True)
    loss = torch.empty(B, H, W)
    rows = torch.empty(B * H * W, C, dtype=dtype)
    calls = [forward_call(inp, loss, loss),
             anchor_backward_call(inp, loss, loss, loss.reshape(-1), rows),
             key_backward_call(inp, loss, loss.reshape(-1), torch.ones(1), torch.empty(K, C, dtype=dtype), False)]
    if negatives == "none":
        calls.append(anchor_backward_call(inp, loss, loss, loss.reshape(-1), rows, teacher_positives=True))
    else:
        calls.append(key_backward_call(inp, loss, loss.reshape(-1), torch.ones(1), rows, True))
    return [(f"pixel_contrastive.{call.kind}" + ("[teacher keys]" if call.flags.get("KEYS_ARE_TEACHER") else "")
             + ("[teacher]" if call.flags.get("TEACHER_POSITIVES") else ""),
             f"negatives={negatives}", call.kernel, call.args, call.flags, call.candidates()) for call in calls]
