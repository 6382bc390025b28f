"""CUDA kernels for ``pixel_attention`` (``csrc/pixel_attention.cu``, DESIGN.md 3.3).

The same ``forward`` / ``backward`` as ``pcd_kernels.backends.triton.pixel_attention``: q (B, C, LQ), k and v
(B, C, LK) with any strides, C = heads * d, head h = channels [h*d, (h+1)*d). The kernels are
flash-attention-2 style tensor-core kernels (mma.sync; float32 through 3xTF32, as accurate as an
FP32 product): a forward per (query tile, batch*head) with an online softmax, and a backward made
of a delta = rowsum(dO * O) pre-pass, a dK/dV kernel per key tile looping over query tiles and a dQ
kernel per query tile looping over key tiles (no atomics: deterministic). Head dims are padded on
chip to 16, 32, 64 or 128; wider heads are refused (``limit_reason``).
"""
from typing import Optional

import torch

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
    """(device pointer, batch stride, channel stride, position stride) of a (B, C, L) tensor."""
    return (t.data_ptr(), *t.stride())


def _launch_args(q, k, v, num_heads):
    """(sizes, dtype code, device index, stream) of a launch; q, k, v must share a CUDA device and a
    dtype (pixel_attention converts them)."""
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype or t.device != q.device:
            raise TypeError(f"backend='cuda' needs q and {name} of one dtype and device, got {q.dtype} on "
                            f"{q.device} and {t.dtype} on {t.device}")
    B, C, LQ = q.shape
    shape = (B, num_heads, C // num_heads, LQ, k.shape[2])
    return shape, _extension.dtype_code(q), q.device.index, _extension.stream_of(q)


def forward(q, k, v, num_heads, scale):
    """Output (B, C, LQ) contiguous and the base-2 lse (B * heads, LQ) float32."""
    B, C, LQ = q.shape
    out = q.new_empty((B, C, LQ))
    lse = torch.empty((B * num_heads, LQ), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    ext = _extension.extension()
    with torch.cuda.device(q.device):
        shape, dtype, device, stream = _launch_args(q, k, v, num_heads)
        ext.pixel_attention_forward(_map(q), _map(k), _map(v), _map(out), lse.data_ptr(), shape, float(scale), dtype,
                                    device, stream)
    return out, lse


def backward(grad_out, q, k, v, out, lse, num_heads, scale, needs_q=True, needs_kv=True):
    """Gradients of sum(grad_out * out) for q, k, v (each in its input's layout when that is
    dense); None for those not needed, whose kernel does not run."""
    B, C, LQ = q.shape
    grad_q = torch.empty_like(q) if needs_q else None
    grad_k, grad_v = (torch.empty_like(k), torch.empty_like(v)) if needs_kv else (None, None)
    if q.numel() == 0 or k.numel() == 0:
        return tuple(g.zero_() if g is not None else None for g in (grad_q, grad_k, grad_v))
    if grad_out.dtype != q.dtype:
        grad_out = grad_out.to(q.dtype)
    lse = lse.contiguous()
    ext = _extension.extension()
    delta = torch.empty((B * num_heads, LQ), dtype=torch.float32, device=q.device)
    with torch.cuda.device(q.device):
        shape, dtype, device, stream = _launch_args(q, k, v, num_heads)
        ext.pixel_attention_backward_delta(_map(out), _map(grad_out), delta.data_ptr(), shape, dtype, device, stream)
        common = (_map(q), _map(k), _map(v), _map(grad_out), lse.data_ptr(), delta.data_ptr())
        if needs_kv:
            ext.pixel_attention_backward_kv(*common, _map(grad_k), _map(grad_v), shape, float(scale), dtype, device,
                                            stream)
        if needs_q:
            ext.pixel_attention_backward_q(*common, _map(grad_q), shape, float(scale), dtype, device, stream)
    return grad_q, grad_k, grad_v
