"""CUDA kernels for ``pixel_attention`` (``csrc/pixel_attention.cu``, DESIGN.md 3.4).

The same ``forward`` / ``backward`` as ``pcd_kernels.backends.triton.pixel_attention``: q (B, C, LQ), k and v
(B, C, LK) with any strides, C = heads * d, head h = channels [h*d, (h+1)*d). The kernels are
flash-attention-2 style on CuTe (16-byte cp.async into swizzled shared memory, two stages,
ldmatrix, mma.sync with float32 accumulation; float16 and bfloat16 only): a forward per (query
tile, batch*head) with an online softmax, and a backward made of a delta = rowsum(dO * O)
pre-pass, a dK/dV kernel per key tile looping over query tiles and a dQ kernel per query tile
looping over key tiles (no atomics: deterministic). Head dims are padded on chip to 32, 64 or
128; wider heads are refused (``limits``).

The kernels read q, k, v and grad_out as rows (:func:`_rows`): per (batch, head, position) d
contiguous elements, 16-byte aligned, zeros up to a multiple of 8; a map that is not laid out so
is copied once per call (O(B * C * L)). They write the output and the gradients through their
strides.
"""
from typing import Optional, Tuple

import torch
from torch import Tensor

from pcd_kernels.backends._host import attention_gradients, attention_outputs
from pcd_kernels.backends.cuda import _extension
from pcd_kernels.backends.cuda._extension import ROW_ALIGN, aligned_row_length

# The widest head the kernels take (the padded tile widths are 32, 64 and 128).
MAX_HEAD_DIM = 128
# Positions per tile (query tile of the forward and dQ kernels, key tile of the dK/dV kernel).
TILE = 64
# One block per (tile, batch * head), all on the grid's x axis: at most 2^31 - 1 blocks, so there
# is no 65,535 cap on batch x heads as on a grid's y axis.
MAX_BLOCKS = 2 ** 31 - 1


def limits(*, dtype, auto, batch: int, num_heads: int, head_dim: int, lq: int, lk: int) -> Optional[str]:
    """What the kernels cannot take about these sizes ("takes head dims up to ..."), or None."""
    hint = "; use backend='triton' or 'torch'"
    if head_dim > MAX_HEAD_DIM:
        return f"takes head dims up to {MAX_HEAD_DIM}, got {head_dim}{hint}"
    tiles = max(-(-lq // TILE), -(-lk // TILE), 1)
    if batch * num_heads * tiles > MAX_BLOCKS:
        return (f"takes batch x heads x tiles of {TILE} pixels up to {MAX_BLOCKS} blocks, got {batch} x "
                f"{num_heads} x {tiles}{hint}")
    if max(lq, lk) > MAX_BLOCKS - 2 * TILE:
        return f"takes maps of fewer than 2^31 - {2 * TILE} pixels, got {max(lq, lk)}{hint}"
    return None


def _rows(x: Tensor, num_heads: int) -> Tuple[Tensor, Tuple[int, int, int]]:
    """A (B, C, L) map as the rows the kernels read (``AttentionRows``): (tensor, (batch, head,
    position) strides in elements) such that row (b, h, l) starts at b * s_b + h * s_h + l * s_l and
    holds the d = C / heads channels of head h contiguously, 16-byte aligned, followed by zeros up
    to a multiple of ROW_ALIGN when d is not one. ``x`` itself when it already is such rows
    (channels-last, d and the strides multiples of ROW_ALIGN); else a contiguous (B, heads, L,
    d rounded up) copy."""
    B, C, L = x.shape
    d = C // num_heads
    stride_b, stride_c, stride_l = x.stride()
    # (the stride of a dimension of size 1 is never used)
    stride_b, stride_l = (0 if B == 1 else stride_b), (0 if L == 1 else stride_l)
    if stride_c == 1 and d % ROW_ALIGN == 0 and stride_b % ROW_ALIGN == 0 \
            and stride_l % ROW_ALIGN == 0 and x.data_ptr() % 16 == 0:
        return x, (stride_b, d, stride_l)
    ld = aligned_row_length(d)
    rows = x.new_empty((B, num_heads, L, ld))
    if ld != d:
        rows[..., d:].zero_()
    rows[..., :d].copy_(x.view(B, num_heads, d, L).transpose(2, 3))
    return rows, (num_heads * L * ld, L * ld, ld)


class _Launch:
    """The launchers' ``PixelAttentionParams`` for operands q, k, v (and grad_out) as rows, maps by
    field name (out, grad_q, grad_k, grad_v; None or left out: absent) and lse2, delta
    ((B * heads, LQ) float32). Keeps the row copies alive until it is dropped: a launch is enqueued
    before that."""

    def __init__(self, q, k, v, num_heads, scale, lse2, delta=None, grad_out=None, **maps):
        for name, t in (("k", k), ("v", v)) + ((("grad_out", grad_out),) if grad_out is not None else ()):
            if t.dtype != q.dtype or t.device != q.device:
                raise TypeError(f"backend='cuda' needs q and {name} of one dtype and device, got {q.dtype} on "
                                f"{q.device} and {t.dtype} on {t.device}")
        ext = _extension.extension()
        B, C, LQ = q.shape
        self.tensors = []
        fields = {}
        for name, t in dict(q=q, k=k, v=v, grad_out=grad_out).items():
            if t is None:
                fields[name] = ext.AttentionRows()
                continue
            rows, (stride_b, stride_h, stride_l) = _rows(t, num_heads)
            self.tensors.append(rows)
            fields[name] = _extension.struct(ext.AttentionRows, data=rows.data_ptr(), stride_b=stride_b,
                                             stride_h=stride_h, stride_l=stride_l)
        for name, t in maps.items():
            fields[name] = _map(t)
        self.params = _extension.params(ext.PixelAttentionParams, q, batch=B, heads=num_heads,
                                        head_dim=C // num_heads, lq=LQ, lk=k.shape[2], scale=float(scale),
                                        lse2=_extension.pointer(lse2), delta=_extension.pointer(delta), **fields)


def _map(t):
    """A (B, C, L) tensor as the kernels' AttentionMap: device pointer and (batch, channel,
    position) strides; absent for None."""
    if t is None:
        return _extension.extension().AttentionMap()
    stride_b, stride_c, stride_l = t.stride()
    return _extension.struct(_extension.extension().AttentionMap, data=t.data_ptr(), stride_b=stride_b,
                             stride_c=stride_c, stride_l=stride_l)


def forward(q, k, v, num_heads, scale):
    """Output (B, C, LQ) contiguous and the lse2 (base 2) (B * heads, LQ) float32."""
    out, lse2 = attention_outputs(q, num_heads)
    if out.numel() == 0:
        return out, lse2
    with torch.cuda.device(q.device):
        launch = _Launch(q, k, v, num_heads, scale, lse2, out=out)
        _extension.extension().pixel_attention_forward(launch.params)
    return out, lse2


def backward(grad_out, q, k, v, out, lse2, num_heads, scale, needs_q=True, needs_kv=True):
    """Gradients of sum(grad_out * out) for q, k, v (each in its input's layout when that is
    dense); None for those not needed, whose kernel does not run."""
    grad_q, grad_k, grad_v, empty = attention_gradients(q, k, v, needs_q, needs_kv)
    if empty:
        return grad_q, grad_k, grad_v
    B, _, LQ = q.shape
    grad_out = grad_out.to(q.dtype)
    lse2 = lse2.contiguous()
    delta = torch.empty((B * num_heads, LQ), dtype=torch.float32, device=q.device)
    ext = _extension.extension()
    with torch.cuda.device(q.device):
        launch = _Launch(q, k, v, num_heads, scale, lse2, delta, grad_out=grad_out, out=out, grad_q=grad_q,
                         grad_k=grad_k, grad_v=grad_v)
        ext.pixel_attention_backward_delta(launch.params)
        if needs_kv:
            ext.pixel_attention_backward_kv(launch.params)
        if needs_q:
            ext.pixel_attention_backward_q(launch.params)
    return grad_q, grad_k, grad_v
