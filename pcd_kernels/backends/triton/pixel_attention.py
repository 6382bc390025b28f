"""Triton kernels for ``pixel_attention`` (DESIGN.md 3.4): flash attention on channel-major maps.

q, k, v arrive as (B, heads * d, L) tensors with any batch, channel and position strides: the
layout a 1x1-conv projection produces is (batch HWC, channel L, position 1), and channel slices of
one fused QKV projection are views of it. Every tile is loaded through those strides, so no
permute or contiguous copy is ever made; Triton lays each tile out for the tensor cores on chip.

* ``_forward_kernel``: per (batch*head, query tile): online softmax over key tiles, output and
  the per-query base-2 logsumexp (kept for the backward).
* ``_delta_kernel``: delta_i = sum_d dO_id * O_id, the softmax-backward row term.
* ``_key_value_backward_kernel``: per (batch*head, key tile): recomputes P^T tile by tile over all
  queries, dV = P^T dO and dK = scale * dS^T Q with dS = P * (dO V^T - delta).
* ``_query_backward_kernel``: per (batch*head, query tile): dQ = scale * dS K over all key tiles.

Each gradient element has exactly one writer: deterministic, no atomics. Head dims that are not a
power of two are padded on chip (masked loads), as are query/key counts that are not a multiple
of a tile.

Modelled bound (bench/model.py; not measured): 4*d FLOPs and one exp per query-key pair and head
in the forward; with head dim 32 an H200's exps (16 per clock per SM) take as long as its bf16
MMAs, so the forward + backward is bound at about 49 % of the bf16 peak (MHSA2d's default at
C = 256 is 8 heads of 32); head dim 64 raises the bound to 65 %.
"""
import torch
import triton
import triton.language as tl

from pcd_kernels._conventions import LOG2E
from pcd_kernels.backends._host import attention_gradients, attention_outputs
from pcd_kernels.backends.triton._common import KernelCall, Launchers, device_guard, matmul_precision, tune_key


@triton.jit
def _tile(ptr, rows, row_ok, row_stride, dims, dim_ok, dim_stride):
    """A (rows, dims) tile: rows are positions, dims are a head's channels."""
    offsets = rows.to(tl.int64)[:, None] * row_stride + dims.to(tl.int64)[None, :] * dim_stride
    return tl.load(ptr + offsets, mask=row_ok[:, None] & dim_ok[None, :], other=0.0)


@triton.jit
def _tile_t(ptr, rows, row_ok, row_stride, dims, dim_ok, dim_stride):
    """The transposed (dims, rows) tile."""
    offsets = dims.to(tl.int64)[:, None] * dim_stride + rows.to(tl.int64)[None, :] * row_stride
    return tl.load(ptr + offsets, mask=dim_ok[:, None] & row_ok[None, :], other=0.0)


@triton.jit
def _head_base(bh, HEADS, D, sb, sc):
    """Offset of head ``bh % HEADS`` of batch ``bh // HEADS``: its first channel, position 0."""
    return (bh // HEADS).to(tl.int64) * sb + (bh % HEADS).to(tl.int64) * D * sc


@triton.jit
def _program_tile(length, D, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's batch x head, its tile of positions along program_id(0) (and which exist),
    and the head's dims (and which exist)."""
    positions = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    dims = tl.arange(0, BLOCK_D)
    return tl.program_id(1), positions, positions < length, dims, dims < D


@triton.jit
def _forward_kernel(Q, K, V, O, LSE, LQ, LK, HEADS, D, qk_scale2,
                    sqb, sqc, sql, skb, skc, skl, svb, svc, svl, sob, soc, sol,
                    TUNE_KEY, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                    PRECISION: tl.constexpr):
    bh, queries, q_ok, dims, d_ok = _program_tile(LQ, D, BLOCK_M, BLOCK_D)
    Q += _head_base(bh, HEADS, D, sqb, sqc)
    K += _head_base(bh, HEADS, D, skb, skc)
    V += _head_base(bh, HEADS, D, svb, svc)
    q = _tile(Q, queries, q_ok, sql, dims, d_ok, sqc)
    m = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for start in range(0, LK, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)
        k_ok = keys < LK
        k_t = _tile_t(K, keys, k_ok, skl, dims, d_ok, skc)
        s = tl.dot(q, k_t, input_precision=PRECISION) * qk_scale2  # base-2 logits
        s = tl.where(k_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        # exps relative to 0 while a row's maximum is -inf (a first tile whose logits all overflowed
        # float32 to -inf): exp2(-inf - 0) = 0, where exp2(-inf + inf) would be NaN
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_shift[:, None])
        alpha = tl.exp2(m - m_shift)
        l = l * alpha + tl.sum(p, 1)
        v = _tile(V, keys, k_ok, svl, dims, d_ok, svc)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m = m_new
    acc = acc / l[:, None]
    O += _head_base(bh, HEADS, D, sob, soc)
    offsets = queries.to(tl.int64)[:, None] * sol + dims.to(tl.int64)[None, :] * soc
    tl.store(O + offsets, acc.to(O.dtype.element_ty), mask=q_ok[:, None] & d_ok[None, :])
    tl.store(LSE + bh.to(tl.int64) * LQ + queries, m + tl.log2(l), mask=q_ok)


@triton.jit
def _delta_kernel(O, DO, DELTA, LQ, HEADS, D, sob, soc, sol, sdb, sdc, sdl,
                  BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    bh, queries, q_ok, dims, d_ok = _program_tile(LQ, D, BLOCK_M, BLOCK_D)
    o = _tile(O + _head_base(bh, HEADS, D, sob, soc), queries, q_ok, sol, dims, d_ok, soc)
    do = _tile(DO + _head_base(bh, HEADS, D, sdb, sdc), queries, q_ok, sdl, dims, d_ok, sdc)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + bh.to(tl.int64) * LQ + queries, delta, mask=q_ok)


@triton.jit
def _key_value_backward_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, LQ, LK, HEADS, D, qk_scale2, scale,
                               sqb, sqc, sql, skb, skc, skl, svb, svc, svl, sdb, sdc, sdl,
                               sgkb, sgkc, sgkl, sgvb, sgvc, sgvl, TUNE_KEY, BLOCK_M: tl.constexpr,
                               BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    bh, keys, k_ok, dims, d_ok = _program_tile(LK, D, BLOCK_N, BLOCK_D)
    Q += _head_base(bh, HEADS, D, sqb, sqc)
    DO += _head_base(bh, HEADS, D, sdb, sdc)
    k = _tile(K + _head_base(bh, HEADS, D, skb, skc), keys, k_ok, skl, dims, d_ok, skc)
    v = _tile(V + _head_base(bh, HEADS, D, svb, svc), keys, k_ok, svl, dims, d_ok, svc)
    LSE += bh.to(tl.int64) * LQ
    DELTA += bh.to(tl.int64) * LQ
    dk = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    for start in range(0, LQ, BLOCK_M):
        queries = start + tl.arange(0, BLOCK_M)
        q_ok = queries < LQ
        q_t = _tile_t(Q, queries, q_ok, sql, dims, d_ok, sqc)
        lse2 = tl.load(LSE + queries, mask=q_ok, other=0.0)
        s_t = tl.dot(k, q_t, input_precision=PRECISION) * qk_scale2  # (keys, queries)
        p_t = tl.where(q_ok[None, :], tl.exp2(s_t - lse2[None, :]), 0.0)
        do = _tile(DO, queries, q_ok, sdl, dims, d_ok, sdc)
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        delta = tl.load(DELTA + queries, mask=q_ok, other=0.0)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q_t.dtype), tl.trans(q_t), input_precision=PRECISION)
    mask = k_ok[:, None] & d_ok[None, :]
    offsets = keys.to(tl.int64)[:, None] * sgkl + dims.to(tl.int64)[None, :] * sgkc
    tl.store(DK + _head_base(bh, HEADS, D, sgkb, sgkc) + offsets, (dk * scale).to(DK.dtype.element_ty),
             mask=mask)
    offsets = keys.to(tl.int64)[:, None] * sgvl + dims.to(tl.int64)[None, :] * sgvc
    tl.store(DV + _head_base(bh, HEADS, D, sgvb, sgvc) + offsets, dv.to(DV.dtype.element_ty), mask=mask)


@triton.jit
def _query_backward_kernel(Q, K, V, DO, LSE, DELTA, DQ, LQ, LK, HEADS, D, qk_scale2, scale,
                           sqb, sqc, sql, skb, skc, skl, svb, svc, svl, sdb, sdc, sdl,
                           sgqb, sgqc, sgql, TUNE_KEY, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                           BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    bh, queries, q_ok, dims, d_ok = _program_tile(LQ, D, BLOCK_M, BLOCK_D)
    q = _tile(Q + _head_base(bh, HEADS, D, sqb, sqc), queries, q_ok, sql, dims, d_ok, sqc)
    do = _tile(DO + _head_base(bh, HEADS, D, sdb, sdc), queries, q_ok, sdl, dims, d_ok, sdc)
    lse2 = tl.load(LSE + bh.to(tl.int64) * LQ + queries, mask=q_ok, other=0.0)
    delta = tl.load(DELTA + bh.to(tl.int64) * LQ + queries, mask=q_ok, other=0.0)
    K += _head_base(bh, HEADS, D, skb, skc)
    V += _head_base(bh, HEADS, D, svb, svc)
    dq = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for start in range(0, LK, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)
        k_ok = keys < LK
        k = _tile(K, keys, k_ok, skl, dims, d_ok, skc)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale2
        p = tl.where(k_ok[None, :], tl.exp2(s - lse2[:, None]), 0.0)
        v_t = _tile_t(V, keys, k_ok, svl, dims, d_ok, svc)
        dp = tl.dot(do, v_t, input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    offsets = queries.to(tl.int64)[:, None] * sgql + dims.to(tl.int64)[None, :] * sgqc
    tl.store(DQ + _head_base(bh, HEADS, D, sgqb, sgqc) + offsets, (dq * scale).to(DQ.dtype.element_ty),
             mask=q_ok[:, None] & d_ok[None, :])


# ----------------------------------------------------------------------------------------------
# Launch configuration
# ----------------------------------------------------------------------------------------------

# (BLOCK_M, BLOCK_N, num_warps, num_stages) candidates for H100-class GPUs, BLOCK_M the query
# tile and BLOCK_N the key tile, per padded head dim in 16-bit elements (up to 64, 128, 256, and
# 512 for float32 at 256: tiles of the same bytes); the key/value backward
# keeps a key tile and walks the queries (small BLOCK_M), the query backward the reverse. The
# first entry is used as is with PCD_KERNELS_AUTOTUNE=0 (the test suite): it must compile for sm_90
# without register spills for 16-bit and TF32 inputs (tests/test_triton_aot.py checks it).
_GPU_CONFIGS = {
    64: {"forward": [(128, 64, 4, 3), (128, 128, 8, 3), (64, 64, 4, 3), (128, 32, 4, 4), (64, 128, 4, 3)],
         "key_value": [(64, 64, 4, 3), (32, 128, 8, 3), (64, 128, 8, 3), (32, 64, 4, 4)],
         "query": [(128, 32, 4, 3), (64, 64, 4, 3), (128, 64, 8, 3), (64, 32, 4, 4)]},
    128: {"forward": [(128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3), (128, 32, 8, 3)],
          "key_value": [(32, 128, 8, 3), (64, 64, 8, 3), (16, 128, 8, 3), (32, 64, 4, 3)],
          "query": [(128, 32, 8, 3), (64, 64, 8, 3), (128, 64, 8, 2), (64, 32, 4, 3)]},
    256: {"forward": [(64, 32, 8, 2), (64, 64, 8, 2)],
          "key_value": [(16, 32, 8, 2), (16, 64, 8, 2)],
          "query": [(32, 32, 8, 2), (64, 16, 8, 2)]},
    512: {"forward": [(32, 32, 8, 2)], "key_value": [(16, 32, 8, 2), (16, 16, 8, 2)],  # float32, d = 256
          "query": [(32, 16, 8, 2)]},
}
# float32 without TF32 multiplies on CUDA cores (tl.dot's "ieee" precision): small tiles.
_IEEE_CONFIGS = {"forward": [(32, 32, 4, 2), (64, 32, 4, 2)], "key_value": [(16, 32, 4, 2), (32, 32, 4, 2)],
                 "query": [(32, 32, 4, 2), (64, 32, 4, 2)]}
INTERPRETER_BLOCKS = {"BLOCK_M": 16, "BLOCK_N": 16}
DELTA_BLOCK_M = 64
# The largest head dimension the kernels take (a query tile of that many floats per row stays in
# registers); wider heads go to the torch backend.
MAX_HEAD_DIM = 256
# (batch x heads) is the grid's second axis, which CUDA caps at 65,535 programs.
MAX_BATCH_HEADS = 65535


def limits(*, dtype, auto, batch, num_heads, head_dim, lq, lk):
    if auto and matmul_precision(dtype) == "ieee":
        # float32 without TF32 multiplies on CUDA cores in the kernels: SDPA is faster there
        return "multiplies float32 on CUDA cores when TF32 is not allowed; SDPA is faster"
    if head_dim > MAX_HEAD_DIM:
        return f"takes head dims up to {MAX_HEAD_DIM}, got {head_dim}; use backend='torch'"
    if batch * num_heads > MAX_BATCH_HEADS:
        return f"takes batch x heads up to {MAX_BATCH_HEADS}, got {batch} x {num_heads}; use backend='torch'"
    return None


_KERNELS = {"forward": _forward_kernel, "key_value": _key_value_backward_kernel,
            "query": _query_backward_kernel}


def block_d(head_dim: int) -> int:
    """Head dims padded on chip to a power of two, at least 16 for tl.dot."""
    return max(16, triton.next_power_of_2(head_dim))


def _config_class(head_dim: int, element_size: int, precision: str):
    """Which candidate list serves: tiles of 4-byte (TF32) elements take the list of a head dim
    twice as wide."""
    if precision == "ieee":
        return "ieee"
    return max(64, block_d(head_dim) * element_size // 2)


def gpu_configs(kind: str, head_dim: int, element_size: int, precision: str):
    """The autotuning candidates of a kernel."""
    width = _config_class(head_dim, element_size, precision)
    return _IEEE_CONFIGS[kind] if width == "ieee" else _GPU_CONFIGS[width][kind]


LAUNCHERS = Launchers(_KERNELS, lambda kind, flags, tiles: gpu_configs(kind, *tiles, flags["PRECISION"]),
                      tune_on=("TUNE_KEY", "BLOCK_D"), interpreter_blocks=INTERPRETER_BLOCKS)


def _grid(block, length, batch_heads):
    return lambda meta: (triton.cdiv(length, meta[block]), batch_heads)


def _common(q, k, num_heads, scale):
    LQ, LK = q.shape[2], k.shape[2]
    D = q.shape[1] // num_heads
    precision = matmul_precision(q.dtype)
    flags = {"BLOCK_D": block_d(D), "PRECISION": precision}
    tiles = (D, q.element_size())
    # one autotuning bucket per power-of-two range of query and key counts and per dtype
    bucket = tune_key(dict(flags, dtype=str(q.dtype)), LQ, LK)
    return LQ, LK, D, flags, tiles, bucket, scale * LOG2E


def forward_call(q, k, v, out, lse2, num_heads, scale):
    LQ, LK, D, flags, tiles, bucket, qk_scale2 = _common(q, k, num_heads, scale)
    batch_heads = q.shape[0] * num_heads
    args = (q, k, v, out, lse2, LQ, LK, num_heads, D, qk_scale2,
            *q.stride(), *k.stride(), *v.stride(), *out.stride(), bucket)
    return KernelCall(LAUNCHERS, "forward", args, flags, _grid("BLOCK_M", LQ, batch_heads), tiles)


def backward_calls(grad_out, q, k, v, lse2, delta, grad_q, grad_k, grad_v, num_heads, scale):
    LQ, LK, D, flags, tiles, bucket, qk_scale2 = _common(q, k, num_heads, scale)
    batch_heads = q.shape[0] * num_heads
    shared = (LQ, LK, num_heads, D, qk_scale2, scale, *q.stride(), *k.stride(), *v.stride(),
              *grad_out.stride())
    key_value = (q, k, v, grad_out, lse2, delta, grad_k, grad_v, *shared, *grad_k.stride(),
                 *grad_v.stride(), bucket)
    query = (q, k, v, grad_out, lse2, delta, grad_q, *shared, *grad_q.stride(), bucket)
    return [KernelCall(LAUNCHERS, "key_value", key_value, flags, _grid("BLOCK_N", LK, batch_heads), tiles),
            KernelCall(LAUNCHERS, "query", query, flags, _grid("BLOCK_M", LQ, batch_heads), tiles)]


def forward(q, k, v, num_heads, scale):
    """Output (B, C, LQ) contiguous and the lse2 (base 2) (B * heads, LQ) float32."""
    out, lse2 = attention_outputs(q, num_heads)
    if out.numel() == 0:
        return out, lse2
    with device_guard(q):
        forward_call(q, k, v, out, lse2, num_heads, scale).launch()
    return out, lse2


def backward(grad_out, q, k, v, out, lse2, num_heads, scale, needs_q=True, needs_kv=True):
    """Gradients of sum(grad_out * out) for q, k, v (each in its input's layout when that is
    dense); None for those not needed, whose kernel does not run."""
    B, C, LQ = q.shape
    grad_q, grad_k, grad_v, empty = attention_gradients(q, k, v, needs_q, needs_kv)
    if empty:
        return grad_q, grad_k, grad_v
    D = C // num_heads
    delta = torch.empty((B * num_heads, LQ), dtype=torch.float32, device=q.device)
    dummy = q.new_empty((1, 1, 1))  # stands for a gradient not asked for (never written)
    with device_guard(q):
        _delta_kernel[(triton.cdiv(LQ, DELTA_BLOCK_M), B * num_heads)](
            out, grad_out, delta, LQ, num_heads, D, *out.stride(), *grad_out.stride(),
            BLOCK_M=DELTA_BLOCK_M, BLOCK_D=block_d(D))
        key_value, query = backward_calls(grad_out, q, k, v, lse2, delta, *(g if g is not None else dummy
                                                                         for g in (grad_q, grad_k, grad_v)),
                                          num_heads, scale)
        if needs_kv:
            key_value.launch()
        if needs_q:
            query.launch()
    return grad_q, grad_k, grad_v


# ----------------------------------------------------------------------------------------------
# Ahead-of-time compilation (bench/kernels.py's SASS report, tests/test_triton_aot.py)
# ----------------------------------------------------------------------------------------------

# The SASS report's launches (bench/kernels.py): head dims 32 and 64.
AOT_REPRESENTATIVE = [dict(head_dim=32, heads=8), dict(head_dim=64, heads=4)]


def aot_launches(dtype, head_dim, heads):
    """pixel_attention's kernels on q, k, v as channel slices of one fused projection (what
    MHSA2d passes), 2 maps of 64x64."""
    qkv = torch.empty(2, 3 * heads * head_dim, 4096, dtype=dtype)[:, :heads * head_dim]
    out = torch.empty(2, heads * head_dim, 4096, dtype=dtype)
    lse = torch.empty(2 * heads, 4096)
    calls = [forward_call(qkv, qkv, qkv, out, lse, heads, head_dim ** -0.5)]
    calls += backward_calls(out, qkv, qkv, qkv, lse, lse, out, out, out, heads, head_dim ** -0.5)
    return [(f"pixel_attention.{call.kind}", f"head_dim={head_dim}", call.kernel, call.args, call.flags,
             call.candidates()) for call in calls]
