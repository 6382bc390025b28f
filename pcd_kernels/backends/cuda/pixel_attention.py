"""CUDA kernels for ``pixel_attention`` (``csrc/pixel_attention.cu``, DESIGN.md 3.4).

The same ``forward`` / ``backward`` as ``pcd_kernels.backends.triton.pixel_attention``: q (B, C, LQ), k and v
(B, C, LK) with any strides, C = heads * d, head h = channels [h*d, (h+1)*d). The kernels are
flash-attention-2 style tensor-core kernels (mma.sync; float32 through 3xTF32, as accurate as an
FP32 product): a forward per (query tile, batch*head) with an online softmax, and a backward made
of a delta = rowsum(dO * O) pre-pass, a dK/dV kernel per key tile looping over query tiles and a dQ
kernel per query tile looping over key tiles (no atomics: deterministic). Head dims are padded on
chip to 16, 32, 64 or 128; wider heads are refused (``limits``).
"""
from typing import Optional

import torch

from pcd_kernels.backends._host import attention_gradients, attention_outputs
from pcd_kernels.backends.cuda import _extension

# The widest head the kernels take (the padded tile widths are 16, 32, 64 and 128).
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


def _map(t):
    """A (B, C, L) tensor as the kernels' AttentionMap: device pointer and (batch, channel,
    position) strides; absent for None."""
    if t is None:
        return _extension.extension().AttentionMap()
    stride_b, stride_c, stride_l = t.stride()
    return _extension.struct(_extension.extension().AttentionMap, data=t.data_ptr(), stride_b=stride_b,
                             stride_c=stride_c, stride_l=stride_l)


def _params(q, k, v, num_heads, scale, lse2, delta=None, **maps):
    """The launchers' ``PixelAttentionParams`` for maps q, k, v and ``maps`` (out, grad_out,
    grad_q, grad_k, grad_v by field name; None or left out: absent), whose lse2 and delta are
    (B * heads, LQ) float32. q, k, v must share a CUDA device and a dtype (pixel_attention converts
    them)."""
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype or t.device != q.device:
            raise TypeError(f"backend='cuda' needs q and {name} of one dtype and device, got {q.dtype} on "
                            f"{q.device} and {t.dtype} on {t.device}")
    B, C, LQ = q.shape
    maps = {name: _map(t) for name, t in dict(q=q, k=k, v=v, **maps).items()}
    return _extension.params(_extension.extension().PixelAttentionParams, q, batch=B, heads=num_heads,
                             head_dim=C // num_heads, lq=LQ, lk=k.shape[2], scale=float(scale),
                             lse2=_extension.pointer(lse2), delta=_extension.pointer(delta), **maps)


def forward(q, k, v, num_heads, scale):
    """Output (B, C, LQ) contiguous and the lse2 (base 2) (B * heads, LQ) float32."""
    out, lse2 = attention_outputs(q, num_heads)
    if out.numel() == 0:
        return out, lse2
    with torch.cuda.device(q.device):
        _extension.extension().pixel_attention_forward(_params(q, k, v, num_heads, scale, lse2, out=out))
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
        params = _params(q, k, v, num_heads, scale, lse2, delta, out=out, grad_out=grad_out, grad_q=grad_q,
                         grad_k=grad_k, grad_v=grad_v)
        ext.pixel_attention_backward_delta(params)
        if needs_kv:
            ext.pixel_attention_backward_kv(params)
        if needs_q:
            ext.pixel_attention_backward_q(params)
    return grad_q, grad_k, grad_v
