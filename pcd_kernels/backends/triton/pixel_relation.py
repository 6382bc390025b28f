"""Triton kernels for ``pixel_relation_loss`` (DESIGN.md 3.3), none of which stores anything of
size anchors x keys.

The keys come in segments: without ``keys``, segment j is image j's pixels (teacher rows for the
teacher's distribution, student rows for the student's; an image with no valid pixel is skipped),
with ``keys`` one segment of K rows shared by both.

* ``_forward_kernel``: one program per tile of anchors streams each segment's key tiles and keeps,
  per anchor, two online logsumexps (base 2) and the running sum of P_t (u - v) rescaled with the
  teacher's; the segment's KL is that sum / l_t - lse_t + lse_s. It writes the anchor's value (the
  mean over segments) and both lse2 per segment, what the backward reads.
* ``_backward_anchor_kernel``: recomputes each anchor's two softmaxes tile by tile and accumulates
  sum_k (P_s - P_t)_k k_hat_k: the student's gradient as an anchor.
* ``_backward_key_kernel``: one program per tile of a segment's keys loops over every anchor and
  accumulates sum_i g_i (P_s - P_t)_ik s_hat_i: the gradient of the student-side keys (the
  student's pixels as keys, or ``keys``). Every output element has one writer: no atomics.

Normalisation is fused as in ``pixel_contrastive``: raw rows, inverse norms on the logits, and the
gradient through the normalisation from a per-row sum of (P_s - P_t) * logit.

Modelled bound (bench/model.py; not measured): per anchor-key pair the forward does 4*C FLOPs on
the tensor cores (both maps' logits) and 2 exps; each backward kernel recomputes both (4*C, 2
exps) and forms one gradient (2*C). At CIRKD's Cityscapes mini-batch (8 maps of 256 x 64 x 128,
4.3e9 pairs) that is at least 6.5 ms forward and 28 ms forward + backward on an H200 with the exps
not overlapping the MMAs (78 % of the bf16 peak at that bound).
"""
import torch
import triton
import triton.language as tl

from pcd_kernels._conventions import logit_scale
from pcd_kernels.backends._host import anchor_weights, inverse_norms, key_side_weights, mask_bytes, projection_scales
from pcd_kernels.backends.triton._common import (CHUNK_BYTES, KernelCall, LN2, Launchers, MAX_INIT, accumulate_rows,
                                                 block_c, device_guard, dot_rows, int32_tile_offsets, is_interpreter,
                                                 largest_tile, load_chunk, matmul_precision, pixel_matrix, row_block,
                                                 store_gradient, store_rows, through_normalization, tune_key)


def limits(*, dtype, auto):
    """Any size the public function accepts (images are skipped on device, not on a grid axis)."""
    return None


@triton.jit
def _segment(seg, seg_len, count_ptr, HAS_KEY_MASK: tl.constexpr):
    """First key row of segment seg, and whether it has a valid key."""
    present = True
    if HAS_KEY_MASK:
        present = tl.load(count_ptr + seg) > 0
    return seg * seg_len, present


@triton.jit
def _tile_logits(a0, A, row0, rows, a_in, a_scale, K, k_sr, k_sc, k0, start, keys, k_ok, inv_k_ptr, C,
                 NORMALIZE: tl.constexpr, BLOCK_C: tl.constexpr, C_TILES: tl.constexpr, PRECISION: tl.constexpr):
    """Base-2 logits (rows x keys), -inf at keys that are absent or masked, and the keys' inverse norms."""
    dots = dot_rows(a0, A, row0, rows, a_in, C, 1, k0, K, start, keys, k_ok, k_sr, k_sc, C, BLOCK_C, C_TILES,
                     PRECISION)
    inv_k = tl.full(keys.shape, 1.0, tl.float32)
    if NORMALIZE:
        inv_k = tl.load(inv_k_ptr + keys, mask=k_ok, other=0.0)
    return tl.where(k_ok[None, :], dots * a_scale[:, None] * inv_k[None, :], float("-inf")), inv_k


@triton.jit
def _key_tile(SK, sk_sr, sk_sc, TK, tk_sr, tk_sc, key_valid_ptr, start, local, seg_len, CS, CT,
              HAS_KEY_MASK: tl.constexpr, SHARED_KEYS: tl.constexpr, BLOCK_CS: tl.constexpr,
              BLOCK_CT: tl.constexpr):
    """A tile of a segment's keys: rows, which are valid, the first row, and both sides' first
    channel chunks (one tile when both sides share the keys)."""
    keys = start + local
    k_ok = local < seg_len
    if HAS_KEY_MASK:
        k_ok = k_ok & (tl.load(key_valid_ptr + keys, mask=k_ok, other=0) != 0)
    key0 = start + tl.min(local, 0)
    tk0 = load_chunk(TK, key0, keys, k_ok, tk_sr, tk_sc, 0, CT, BLOCK_CT)
    if SHARED_KEYS:
        sk0 = tk0
    else:
        sk0 = load_chunk(SK, key0, keys, k_ok, sk_sr, sk_sc, 0, CS, BLOCK_CS)
    return keys, k_ok, key0, tk0, sk0


@triton.jit
def _both_logits(S, T, SK, sk_sr, sk_sc, TK, tk_sr, tk_sc, inv_sk_ptr, inv_tk_ptr, key_valid_ptr, s0, t0, row0,
                 rows, a_in, s_scale, t_scale, start, kb, seg_len, CS, CT, HAS_KEY_MASK: tl.constexpr,
                 SHARED_KEYS: tl.constexpr, NORMALIZE: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_CS: tl.constexpr, CS_TILES: tl.constexpr, BLOCK_CT: tl.constexpr, CT_TILES: tl.constexpr,
                 PRECISION: tl.constexpr):
    """Key tile kb of a segment against this program's anchors: its rows, which are valid, its
    first row and student-side chunk, and both maps' base-2 logits (teacher u, student v), with
    the student-side keys' inverse norms."""
    keys, k_ok, key0, tk0, sk0 = _key_tile(SK, sk_sr, sk_sc, TK, tk_sr, tk_sc, key_valid_ptr, start,
                                           kb + tl.arange(0, BLOCK_N), seg_len, CS, CT, HAS_KEY_MASK, SHARED_KEYS,
                                           BLOCK_CS, BLOCK_CT)
    u, _ = _tile_logits(t0, T, row0, rows, a_in, t_scale, TK, tk_sr, tk_sc, tk0, key0, keys, k_ok, inv_tk_ptr,
                        CT, NORMALIZE, BLOCK_CT, CT_TILES, PRECISION)
    v, inv_sk = _tile_logits(s0, S, row0, rows, a_in, s_scale, SK, sk_sr, sk_sc, sk0, key0, keys, k_ok,
                             inv_sk_ptr, CS, NORMALIZE, BLOCK_CS, CS_TILES, PRECISION)
    return keys, k_ok, key0, sk0, u, v, inv_sk


@triton.jit
def _anchor_tile(S, T, inv_s_ptr, inv_t_ptr, valid_ptr, n_rows, CS, CT, logit_scale, HAS_MASK: tl.constexpr,
                 NORMALIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_CS: tl.constexpr, BLOCK_CT: tl.constexpr):
    """This program's anchor rows (which exist, which are valid), both maps' first channel chunks
    and their base-2 logit scales (1 / (temperature ln 2), times the inverse norms)."""
    row0 = tl.program_id(0) * BLOCK_M
    rows, a_in, valid = row_block(row0, n_rows, valid_ptr, HAS_MASK, BLOCK_M)
    s0 = load_chunk(S, row0, rows, a_in, CS, 1, 0, CS, BLOCK_CS)
    t0 = load_chunk(T, row0, rows, a_in, CT, 1, 0, CT, BLOCK_CT)
    s_scale = tl.full((BLOCK_M,), 1.0, tl.float32) * logit_scale
    t_scale = tl.full((BLOCK_M,), 1.0, tl.float32) * logit_scale
    if NORMALIZE:
        s_scale = s_scale * tl.load(inv_s_ptr + rows, mask=a_in, other=0.0)
        t_scale = t_scale * tl.load(inv_t_ptr + rows, mask=a_in, other=0.0)
    return row0, rows, a_in, valid, s0, t0, s_scale, t_scale


@triton.jit(do_not_specialize=["TUNE_KEY"])
def _forward_kernel(
    S, T, SK, sk_sr, sk_sc, TK, tk_sr, tk_sc, inv_s_ptr, inv_t_ptr, inv_sk_ptr, inv_tk_ptr, valid_ptr,
    key_valid_ptr, count_ptr, share_ptr, value_ptr, lse_ptr, n_rows, n_seg, seg_len, CS, CT, logit_scale, TUNE_KEY,
    HAS_MASK: tl.constexpr, HAS_KEY_MASK: tl.constexpr, SHARED_KEYS: tl.constexpr, NORMALIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_CS: tl.constexpr, CS_TILES: tl.constexpr,
    BLOCK_CT: tl.constexpr, CT_TILES: tl.constexpr, PRECISION: tl.constexpr,
):
    row0, rows, a_in, valid, s0, t0, s_scale, t_scale = _anchor_tile(
        S, T, inv_s_ptr, inv_t_ptr, valid_ptr, n_rows, CS, CT, logit_scale, HAS_MASK, NORMALIZE, BLOCK_M, BLOCK_CS,
        BLOCK_CT)
    total = tl.zeros((BLOCK_M,), tl.float32)
    for seg in range(0, n_seg):
        start, present = _segment(seg, seg_len, count_ptr, HAS_KEY_MASK)
        if present:
            m_t = tl.full((BLOCK_M,), MAX_INIT, tl.float32)
            m_s = tl.full((BLOCK_M,), MAX_INIT, tl.float32)
            l_t = tl.zeros((BLOCK_M,), tl.float32)
            l_s = tl.zeros((BLOCK_M,), tl.float32)
            cross = tl.zeros((BLOCK_M,), tl.float32)  # sum_k exp2(u - m_t) (u - v)
            for kb in range(0, seg_len, BLOCK_N):
                keys, k_ok, key0, sk0, u, v, inv_sk = _both_logits(
                    S, T, SK, sk_sr, sk_sc, TK, tk_sr, tk_sc, inv_sk_ptr, inv_tk_ptr, key_valid_ptr, s0, t0, row0,
                    rows, a_in, s_scale, t_scale, start, kb, seg_len, CS, CT, HAS_KEY_MASK, SHARED_KEYS, NORMALIZE,
                    BLOCK_N, BLOCK_CS, CS_TILES, BLOCK_CT, CT_TILES, PRECISION)
                m_new = tl.maximum(m_t, tl.max(u, 1))
                alpha = tl.exp2(m_t - m_new)
                p = tl.exp2(u - m_new[:, None])
                l_t = l_t * alpha + tl.sum(p, 1)
                cross = cross * alpha + tl.sum(tl.where(k_ok[None, :], p * (u - v), 0.0), 1)
                m_t = m_new
                m_new = tl.maximum(m_s, tl.max(v, 1))
                l_s = l_s * tl.exp2(m_s - m_new) + tl.sum(tl.exp2(v - m_new[:, None]), 1)
                m_s = m_new
            lse_t = m_t + tl.log2(l_t)
            lse_s = m_s + tl.log2(l_s)
            total += (cross / l_t - lse_t + lse_s) * LN2
            # Saved in base 2, (rows, 2, segments): what the backward kernels read.
            tl.store(lse_ptr + rows.to(tl.int64) * (2 * n_seg) + seg, lse_t, mask=a_in)
            tl.store(lse_ptr + rows.to(tl.int64) * (2 * n_seg) + n_seg + seg, lse_s, mask=a_in)
    share = tl.load(share_ptr)
    tl.store(value_ptr + rows, tl.where(valid, total * share, 0.0), mask=a_in)


@triton.jit
def _weights(u, v, lse_ptr, rows, r_ok, n_seg, seg, ROWS_FIRST: tl.constexpr):
    """P_s - P_t from base-2 logits and the saved lse2 of these anchors (rows of the tile when
    ROWS_FIRST, else its columns), 0 at absent keys and anchors."""
    base = lse_ptr + rows.to(tl.int64) * (2 * n_seg) + seg
    lse_t = tl.load(base, mask=r_ok, other=0.0)
    lse_s = tl.load(base + n_seg, mask=r_ok, other=0.0)
    if ROWS_FIRST:
        w = tl.where(r_ok[:, None], tl.exp2(v - lse_s[:, None]) - tl.exp2(u - lse_t[:, None]), 0.0)
    else:
        w = tl.where(r_ok[None, :], tl.exp2(v - lse_s[None, :]) - tl.exp2(u - lse_t[None, :]), 0.0)
    return w


@triton.jit(do_not_specialize=["TUNE_KEY"])
def _backward_anchor_kernel(
    S, T, SK, sk_sr, sk_sc, TK, tk_sr, tk_sc, inv_s_ptr, inv_t_ptr, inv_sk_ptr, inv_tk_ptr, valid_ptr,
    key_valid_ptr, count_ptr, share_ptr, lse_ptr, grad_ptr, proj_ptr, OUT, n_rows, n_seg, seg_len, CS, CT, logit_scale,
    inv_temperature, TUNE_KEY,
    HAS_MASK: tl.constexpr, HAS_KEY_MASK: tl.constexpr, SHARED_KEYS: tl.constexpr, NORMALIZE: tl.constexpr,
    SCALE_WEIGHTS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_CS: tl.constexpr,
    CS_TILES: tl.constexpr, BLOCK_CT: tl.constexpr, CT_TILES: tl.constexpr, PRECISION: tl.constexpr,
):
    row0, rows, a_in, valid, s0, t0, s_scale, t_scale = _anchor_tile(
        S, T, inv_s_ptr, inv_t_ptr, valid_ptr, n_rows, CS, CT, logit_scale, HAS_MASK, NORMALIZE, BLOCK_M, BLOCK_CS,
        BLOCK_CT)
    oc = tl.program_id(1) * BLOCK_CS  # this program writes channels [oc, oc + BLOCK_CS)
    acc = tl.zeros((BLOCK_M, BLOCK_CS), tl.float32)  # sum_k (P_s - P_t)_k sk_hat_k, this chunk
    d = tl.zeros((BLOCK_M,), tl.float32)  # sum_k (P_s - P_t)_k v_k: gives s_hat . grad
    for seg in range(0, n_seg):
        start, present = _segment(seg, seg_len, count_ptr, HAS_KEY_MASK)
        if present:
            for kb in range(0, seg_len, BLOCK_N):
                keys, k_ok, key0, sk0, u, v, inv_sk = _both_logits(
                    S, T, SK, sk_sr, sk_sc, TK, tk_sr, tk_sc, inv_sk_ptr, inv_tk_ptr, key_valid_ptr, s0, t0, row0,
                    rows, a_in, s_scale, t_scale, start, kb, seg_len, CS, CT, HAS_KEY_MASK, SHARED_KEYS, NORMALIZE,
                    BLOCK_N, BLOCK_CS, CS_TILES, BLOCK_CT, CT_TILES, PRECISION)
                w = _weights(u, v, lse_ptr, rows, valid, n_seg, seg, True)
                w = tl.where(k_ok[None, :], w, 0.0)
                d += tl.sum(tl.where(k_ok[None, :], w * v, 0.0), 1)
                acc = accumulate_rows(acc, w, sk0, SK, key0, keys, k_ok, sk_sr, sk_sc, inv_sk, oc, CS, NORMALIZE,
                                      SCALE_WEIGHTS, BLOCK_CS, CS_TILES, PRECISION)
    g = tl.load(grad_ptr + rows, mask=valid, other=0.0) * tl.load(share_ptr)
    store_gradient(OUT, acc, d, g, inv_temperature, S, row0, rows, a_in, valid, CS, 1, inv_s_ptr, proj_ptr, CS, oc,
                   NORMALIZE, False, BLOCK_CS)


@triton.jit(do_not_specialize=["TUNE_KEY"])
def _backward_key_kernel(
    S, T, SK, sk_sr, sk_sc, TK, tk_sr, tk_sc, inv_s_ptr, inv_t_ptr, inv_sk_ptr, inv_tk_ptr, valid_ptr,
    key_valid_ptr, count_ptr, share_ptr, lse_ptr, grad_scaled_ptr, grad_max_ptr, proj_ptr, DK, n_rows, n_seg, seg_len, CS, CT,
    logit_scale, inv_temperature, TUNE_KEY,
    HAS_MASK: tl.constexpr, HAS_KEY_MASK: tl.constexpr, SHARED_KEYS: tl.constexpr, NORMALIZE: tl.constexpr,
    SCALE_WEIGHTS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_CS: tl.constexpr,
    CS_TILES: tl.constexpr, BLOCK_CT: tl.constexpr, CT_TILES: tl.constexpr, PRECISION: tl.constexpr,
):
    seg = tl.program_id(1)
    oc = tl.program_id(2) * BLOCK_CS
    start, present = _segment(seg, seg_len, count_ptr, HAS_KEY_MASK)
    local = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    keys, k_ok, key0, tk0, sk0 = _key_tile(SK, sk_sr, sk_sc, TK, tk_sr, tk_sc, key_valid_ptr, start, local,
                                           seg_len, CS, CT, HAS_KEY_MASK, SHARED_KEYS, BLOCK_CS, BLOCK_CT)
    tk_scale = tl.full((BLOCK_N,), 1.0, tl.float32) * logit_scale
    sk_scale = tl.full((BLOCK_N,), 1.0, tl.float32) * logit_scale
    if NORMALIZE:
        tk_scale = tk_scale * tl.load(inv_tk_ptr + keys, mask=k_ok, other=0.0)
        sk_scale = sk_scale * tl.load(inv_sk_ptr + keys, mask=k_ok, other=0.0)
    acc = tl.zeros((BLOCK_N, BLOCK_CS), tl.float32)  # sum_i (g_i / g_max) (P_s - P_t)_ik s_hat_i
    d = tl.zeros((BLOCK_N,), tl.float32)  # sum_i (g_i / g_max) (P_s - P_t)_ik v_ik
    if present:
        for a_start in range(0, n_rows, BLOCK_M):
            rows, r_in, r_ok = row_block(a_start, n_rows, valid_ptr, HAS_MASK, BLOCK_M)
            # Masked anchors are loaded as zeros: their values (NaN included) must not reach keys.
            ta0 = load_chunk(T, a_start, rows, r_ok, CT, 1, 0, CT, BLOCK_CT)
            sa0 = load_chunk(S, a_start, rows, r_ok, CS, 1, 0, CS, BLOCK_CS)
            inv_ta = tl.full((BLOCK_M,), 1.0, tl.float32)
            inv_sa = tl.full((BLOCK_M,), 1.0, tl.float32)
            if NORMALIZE:
                inv_ta = tl.load(inv_t_ptr + rows, mask=r_ok, other=0.0)
                inv_sa = tl.load(inv_s_ptr + rows, mask=r_ok, other=0.0)
            # transposed logits (keys x anchors), base 2
            u = dot_rows(tk0, TK, key0, keys, k_ok, tk_sr, tk_sc, ta0, T, a_start, rows, r_ok, CT, 1, CT, BLOCK_CT,
                          CT_TILES, PRECISION) * tk_scale[:, None] * inv_ta[None, :]
            v = dot_rows(sk0, SK, key0, keys, k_ok, sk_sr, sk_sc, sa0, S, a_start, rows, r_ok, CS, 1, CS, BLOCK_CS,
                          CS_TILES, PRECISION) * sk_scale[:, None] * inv_sa[None, :]
            w = _weights(u, v, lse_ptr, rows, r_ok, n_seg, seg, False)
            w = w * tl.load(grad_scaled_ptr + rows, mask=r_ok, other=0.0)[None, :]
            d += tl.sum(w * v, 1)
            acc = accumulate_rows(acc, w, sa0, S, a_start, rows, r_ok, CS, 1, inv_sa, oc, CS, NORMALIZE, SCALE_WEIGHTS,
                                  BLOCK_CS, CS_TILES, PRECISION)
    # g was divided by max|g| so that the weights fit half precision (see key_side_weights). The
    # key rows and masks are recomputed here rather than kept across the loop beside the
    # accumulator, where they spilled.
    local = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    keys = start + local
    k_in = local < seg_len
    k_ok = k_in
    if HAS_KEY_MASK:
        k_ok = k_ok & (tl.load(key_valid_ptr + keys, mask=k_in, other=0) != 0)
    # One scale for every key (store_gradient would spread it over the rows: on Triton 3.6 that
    # register made the float16 candidate spill); the keys' loads masked to the valid ones.
    scale = tl.load(grad_max_ptr) * tl.load(share_ptr)
    grad = acc * (scale * inv_temperature)
    if NORMALIZE:
        inv_sk = tl.load(inv_sk_ptr + keys, mask=k_ok, other=0.0)
        grad = through_normalization(grad, d * (scale * LN2), SK, key0, keys, k_ok, sk_sr, sk_sc, inv_sk, proj_ptr,
                                     CS, oc, True, BLOCK_CS)
    store_rows(DK, grad, key0, keys, k_in, k_ok, CS, oc, BLOCK_CS)


# ----------------------------------------------------------------------------------------------
# Launch configuration
# ----------------------------------------------------------------------------------------------

# (BLOCK_M, BLOCK_N, num_warps, num_stages) candidates for H100-class GPUs, read from their sm_90a
# SASS (bench/kernels.py, Triton 3.6 and 3.9): two logit tiles per step (teacher's and
# student's) beside the backward's accumulator, so the steps are narrower than
# pixel_contrastive's; the cross-image forward holds both maps' anchor tiles and both sides' key
# tiles in shared memory, which two stages of 32 keys at 128 anchors keep under 200 KB. None
# spills in 16 bits.
_GPU_CONFIGS = {
    "forward": [(128, 32, 8, 2), (128, 16, 8, 3), (64, 32, 4, 3)],
    "anchor": [(128, 16, 8, 3)],  # (128, 16, 8, 2) spills in float16 on Triton 3.6
    "key": [(16, 128, 8, 4)],  # two and three stages spill on Triton 3.6
}
_IEEE_CONFIGS = {
    "forward": [(32, 32, 4, 2), (64, 32, 8, 2)],
    "anchor": [(32, 32, 4, 2)],
    "key": [(32, 32, 4, 2)],
}
_KERNELS = {"forward": _forward_kernel, "anchor": _backward_anchor_kernel, "key": _backward_key_kernel}


def gpu_configs(kind, precision, scale_weights=True):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) candidates of a kernel."""
    return (_IEEE_CONFIGS if precision == "ieee" else _GPU_CONFIGS)[kind]


# The interpreter runs every program in numpy: small tiles keep CI fast and exercise tails, and
# BLOCK_M != BLOCK_N catches a tile shape used on the wrong side.
INTERPRETER_BLOCKS = {"BLOCK_M": 16, "BLOCK_N": 32}


LAUNCHERS = Launchers(_KERNELS, lambda kind, flags, tiles: gpu_configs(kind, flags["PRECISION"]),
                      tune_on=("CS", "CT", "TUNE_KEY"), interpreter_blocks=INTERPRETER_BLOCKS)


class _Inputs:
    """The tensors and sizes every kernel reads, prepared once per call."""

    def __init__(self, student, teacher, keys, mask, temperature, normalize):
        B, CS, H, W = student.shape
        CT = teacher.shape[1]
        self.students, self.teachers = pixel_matrix(student), pixel_matrix(teacher)
        self.n_rows, self.cs, self.ct = B * H * W, CS, CT
        self.normalize = normalize
        self.logit_scale = logit_scale(temperature)
        self.inv_temperature = 1.0 / temperature
        device = student.device
        dummy = self.students.new_empty(1, dtype=torch.float32)
        norms = inverse_norms if normalize else (lambda x: dummy)
        self.inv_s, self.inv_t = norms(self.students), norms(self.teachers)
        self.has_mask = mask is not None
        self.valid = mask_bytes(mask) if self.has_mask else dummy
        if keys is not None:
            self.keys = int32_tile_offsets(keys, largest_tile((_GPU_CONFIGS, _IEEE_CONFIGS), INTERPRETER_BLOCKS))
            self.inv_k = norms(keys)
            self.n_seg, self.seg_len = 1, keys.shape[0]
            self.counts = dummy
            self.share = torch.ones(1, dtype=torch.float32, device=device)
            strides = (self.keys.stride(0), self.keys.stride(1))
            self.student_keys = (self.keys, *strides, self.inv_k)
            self.teacher_keys = (self.keys, *strides, self.inv_k)
        else:
            self.keys = None
            self.n_seg, self.seg_len = B, H * W
            # Images without a valid pixel are skipped (their count is 0), and the mean over images
            # divides by how many have one: both on the device, no host sync.
            counts = (mask.reshape(B, -1).sum(1) if self.has_mask
                      else torch.full((B,), H * W, device=device)).to(torch.int32)
            self.counts = counts.contiguous()
            self.share = (1.0 / (counts > 0).sum().clamp_min(1).to(torch.float32)).reshape(1)
            self.student_keys = (self.students, CS, 1, self.inv_s)
            self.teacher_keys = (self.teachers, CT, 1, self.inv_t)
        self.block_cs, self.block_ct = block_c(CS, student.element_size()), block_c(CT, teacher.element_size())
        self.cs_tiles, self.ct_tiles = triton.cdiv(CS, self.block_cs), triton.cdiv(CT, self.block_ct)
        self.precision = matmul_precision(student.dtype)
        self.scale_weights = student.dtype != torch.float16

    def sources(self):
        sk, sk_sr, sk_sc, inv_sk = self.student_keys
        tk, tk_sr, tk_sc, inv_tk = self.teacher_keys
        return (self.students, self.teachers, sk, sk_sr, sk_sc, tk, tk_sr, tk_sc, self.inv_s, self.inv_t, inv_sk,
                inv_tk, self.valid, self.valid, self.counts, self.share)

    def flags(self):
        return dict(HAS_MASK=self.has_mask, HAS_KEY_MASK=self.keys is None and self.has_mask,
                    SHARED_KEYS=self.keys is not None, NORMALIZE=self.normalize, BLOCK_CS=self.block_cs,
                    CS_TILES=self.cs_tiles, BLOCK_CT=self.block_ct, CT_TILES=self.ct_tiles,
                    PRECISION=self.precision)

    def sizes(self):
        return (self.n_rows, self.n_seg, self.seg_len, self.cs, self.ct, self.logit_scale)


def forward_call(inp, values, lse2):
    flags = inp.flags()
    args = (*inp.sources(), values, lse2, *inp.sizes(), tune_key(flags, inp.n_rows, inp.seg_len))
    grid = lambda meta: (triton.cdiv(inp.n_rows, meta["BLOCK_M"]),)
    return KernelCall(LAUNCHERS, "forward", args, flags, grid)


def anchor_backward_call(inp, lse2, g, grad_rows):
    flags = dict(inp.flags(), SCALE_WEIGHTS=inp.scale_weights)
    proj = projection_scales(inp.students, inp.inv_s) if inp.normalize else inp.inv_s
    args = (*inp.sources(), lse2, g, proj, grad_rows, *inp.sizes(), inp.inv_temperature,
            tune_key(flags, inp.n_rows, inp.seg_len))
    grid = lambda meta: (triton.cdiv(inp.n_rows, meta["BLOCK_M"]), inp.cs_tiles)
    return KernelCall(LAUNCHERS, "anchor", args, flags, grid)


def key_backward_call(inp, lse2, g_scaled, g_max, grad_keys):
    flags = dict(inp.flags(), SCALE_WEIGHTS=inp.scale_weights)
    # The gradient of given keys (a memory that requires grad: rare) goes in channel chunks: beside
    # a whole-row accumulator its bfloat16 SASS spilled (tests/test_triton_aot.py). Each chunk's
    # program recomputes the logits. (The interpreter's chunk is smaller, so that tests run it.)
    chunk = 16 if is_interpreter() else CHUNK_BYTES // inp.students.element_size()
    if inp.keys is not None and inp.block_cs > chunk:
        tiles = triton.cdiv(inp.cs, chunk)
        flags.update(BLOCK_CS=chunk, CS_TILES=tiles, BLOCK_CT=chunk, CT_TILES=tiles)
    sk, _, _, inv_sk = inp.student_keys
    proj = projection_scales(sk, inv_sk) if inp.normalize else inv_sk
    args = (*inp.sources(), lse2, g_scaled, g_max, proj, grad_keys, *inp.sizes(), inp.inv_temperature,
            tune_key(flags, inp.n_rows, inp.seg_len))
    grid = lambda meta: (triton.cdiv(inp.seg_len, meta["BLOCK_N"]), inp.n_seg, flags["CS_TILES"])
    return KernelCall(LAUNCHERS, "key", args, flags, grid)


def saved_shape(student, keys):
    """The shape of the lse2 the forward saves: (anchors, 2, segments), float32."""
    B, _, H, W = student.shape
    return (B * H * W, 2, 1 if keys is not None else B)


def forward(student, teacher, keys, mask, temperature, normalize):
    """Per-anchor values (B, H, W) float32, 0 at masked pixels, and the lse2 (base 2) of both
    distributions per segment (saved_shape), what the backward kernels read."""
    B, _, H, W = student.shape
    values = torch.zeros((B, H, W), dtype=torch.float32, device=student.device)
    lse2 = torch.zeros(saved_shape(student, keys), dtype=torch.float32, device=student.device)
    if values.numel() == 0 or (keys is not None and keys.shape[0] == 0):
        return values, lse2
    inp = _Inputs(student, teacher, keys, mask, temperature, normalize)
    with device_guard(student):
        forward_call(inp, values, lse2).launch()
    return values, lse2


def backward(grad_values, student, teacher, keys, mask, lse2, temperature, normalize, needs_student, needs_keys):
    """Gradients (student, keys) of sum(grad_values * values), None where not needed: the student's
    as a channels_last (B, C, H, W) tensor, the keys' as a contiguous (K, C) one."""
    B, C, H, W = student.shape
    rows = lambda n, dtype: torch.zeros((n, C), dtype=dtype, device=student.device)  # the student side's C
    # Without keys the student's gradient has an anchor part and a key part: both in float32,
    # added, then rounded once.
    cross = keys is None
    grad_s = rows(B * H * W, torch.float32 if cross else student.dtype) if needs_student else None
    grad_k = rows(keys.shape[0], keys.dtype) if (needs_keys and keys is not None) else None
    as_map = lambda r: r.view(B, H, W, C).permute(0, 3, 1, 2) if r is not None else None
    if B * H * W == 0 or (keys is not None and keys.shape[0] == 0):
        return as_map(grad_s), grad_k
    inp = _Inputs(student, teacher, keys, mask, temperature, normalize)
    g = anchor_weights(grad_values, mask)
    calls = []
    if grad_s is not None:
        calls.append(anchor_backward_call(inp, lse2, g, grad_s))
    as_keys = rows(B * H * W, torch.float32) if (cross and grad_s is not None) else grad_k
    if as_keys is not None:
        g_scaled, g_max = key_side_weights(g)
        calls.append(key_backward_call(inp, lse2, g_scaled, g_max, as_keys))
    with device_guard(student):
        for call in calls:
            call.launch()
    if cross and grad_s is not None:  # the student's pixels are keys too
        grad_s = (grad_s + as_keys).to(student.dtype)
    return as_map(grad_s), grad_k


# ----------------------------------------------------------------------------------------------
# Ahead-of-time compilation (bench/kernels.py's SASS report, tests/test_triton_aot.py)
# ----------------------------------------------------------------------------------------------

# The SASS report's launches (bench/kernels.py): across images (masked), and against a memory.
AOT_REPRESENTATIVE = [dict(channels=256, masked=True), dict(channels=256, keys=4104)]


def aot_launches(dtype, channels=256, keys=0, masked=False, teacher_channels=None):
    """pixel_relation_loss's kernels: cross-image over 4 maps of 16x16 (keys=0), or against a
    (keys, C) memory."""
    B, H, W = 4, 16, 16
    s = torch.empty(B, channels, H, W, dtype=dtype)
    t = torch.empty(B, teacher_channels or channels, H, W, dtype=dtype)
    memory = torch.empty(keys, channels, dtype=dtype) if keys else None
    mask = torch.ones(B, H, W, dtype=torch.bool) if masked else None
    inp = _Inputs(s, t, memory, mask, 0.5, True)
    values = torch.empty(B, H, W)
    lse = torch.empty(saved_shape(s, memory))
    g = values.reshape(-1)
    rows = torch.empty(B * H * W, channels, dtype=dtype)
    calls = [forward_call(inp, values, lse), anchor_backward_call(inp, lse, g, rows),
             key_backward_call(inp, lse, g, torch.ones(1), memory if keys else rows)]
    variant = f"keys={keys}" if keys else "cross-image" + (f", teacher C={teacher_channels}" if teacher_channels else "")
    return [(f"pixel_relation.{call.kind}", variant, call.kernel, call.args, call.flags, call.candidates())
            for call in calls]
