"""``pixel_attention``: multi-head softmax attention over the pixels of channel-major maps.

The public function checks arguments and dispatches: the Triton kernels
(``pcd_kernels/backends/triton/pixel_attention.py``) or the CUDA extension's
(``pcd_kernels/backends/cuda/pixel_attention.py``, ``csrc/pixel_attention.cu``) through
``torch.library`` custom ops that read the (B, heads*d, H, W) layout in place, or
``F.scaled_dot_product_attention`` on reshaped views (the torch backend,
``pcd_kernels/backends/torch/pixel_attention.py``). Math: DESIGN.md section 3.4.
"""
import math
import numbers
from typing import Optional, Tuple

import torch
from torch import Tensor

from pcd_kernels.ops._checks import check_choice, check_float, check_same_device, check_tensor
from pcd_kernels.ops._dispatch import BACKENDS, Op, autocast_dtype, implementation, register, resolve, run_backend

_OP = register(Op("pixel_attention", "pixel_attention", ("torch", "triton", "cuda"))).name


@torch.library.custom_op("pcd_kernels::pixel_attention_forward", mutates_args=())
def _forward_op(q: Tensor, k: Tensor, v: Tensor, num_heads: int, scale: float,
                backend: str) -> Tuple[Tensor, Tensor]:
    """(output (B, C, Lq), lse2 (base 2, (B * heads, Lq)) float32) of (B, C, L) maps, any strides."""
    return run_backend(_OP, backend, "forward", q.device, q, k, v, num_heads, scale)


@_forward_op.register_fake
def _forward_fake(q, k, v, num_heads, scale, backend):
    B, C, LQ = q.shape
    return q.new_empty((B, C, LQ)), q.new_empty((B * num_heads, LQ), dtype=torch.float32)


@torch.library.custom_op("pcd_kernels::pixel_attention_backward", mutates_args=())
def _backward_op(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse2: Tensor,
                 num_heads: int, scale: float, backend: str, needs_q: bool,
                 needs_kv: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """Gradients for q, k, v; an empty tensor stands for one not asked for (the kernel that
    computes it does not run)."""
    grads = run_backend(_OP, backend, "backward", q.device, grad_out, q, k, v, out, lse2, num_heads, scale, needs_q,
                        needs_kv)
    return tuple(g if g is not None else q.new_empty(0) for g in grads)


@_backward_op.register_fake
def _backward_fake(grad_out, q, k, v, out, lse2, num_heads, scale, backend, needs_q, needs_kv):
    # (separate empties: outputs of a custom op must not alias each other)
    return tuple(torch.empty_like(x) if needed else q.new_empty(0)
                 for x, needed in ((q, needs_q), (k, needs_kv), (v, needs_kv)))


def _setup_context(ctx, inputs, output):
    q, k, v, num_heads, scale, backend = inputs
    ctx.save_for_backward(q, k, v, *output)
    ctx.options = (num_heads, scale, backend)


def _backward(ctx, grad_out, grad_lse2):
    q, k, v, out, lse2 = ctx.saved_tensors
    need_q, need_k, need_v = ctx.needs_input_grad[:3]
    grads = torch.ops.pcd_kernels.pixel_attention_backward(grad_out, q, k, v, out, lse2, *ctx.options,
                                                           need_q, need_k or need_v)
    return (*(g if need else None for g, need in zip(grads, (need_q, need_k, need_v))), None, None, None)


_forward_op.register_autograd(_backward, setup_context=_setup_context)


def _check_num_heads(num_heads, channels: int) -> int:
    if isinstance(num_heads, bool) or not isinstance(num_heads, numbers.Integral) or num_heads < 1:
        raise ValueError(f"num_heads must be an int >= 1, got {num_heads!r}")
    if channels % num_heads:
        raise ValueError(f"channels ({channels}) must be divisible by num_heads ({num_heads})")
    return int(num_heads)


def _check_scale(scale, head_dim: int) -> float:
    if scale is None:
        return head_dim ** -0.5
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        hint = " (pass a Python number, e.g. float(s))" if isinstance(scale, torch.Tensor) else ""
        raise TypeError(f"scale must be a real number or None, got {type(scale).__name__}{hint}")
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    return float(scale)


def pixel_attention(q: Tensor, k: Tensor, v: Tensor, *, num_heads: int, scale: Optional[float] = None,
                    backend: str = "auto") -> Tensor:
    r"""Multi-head softmax attention over the pixels of channel-major feature maps.

    For each head h (channels ``[h*d, (h+1)*d)``, ``d = C / num_heads``) and query pixel i:
    ``out[:, h, i] = sum_j softmax_j(q_i . k_j * scale) v_j``, the sums running over every
    pixel j of the key map. This is ``F.scaled_dot_product_attention`` on the maps reshaped to
    (B, heads, H*W, d), without the reshapes: the Triton kernels read and write the
    (B, heads*d, H, W) layout a 1x1-conv projection produces (any strides, including channel
    slices of one fused QKV projection), never build the (H*W x Hk*Wk) matrix, and keep only
    the per-query logsumexp for the backward; so do the CUDA extension's kernels.

    Args:
        q: (B, heads*d, H, W) queries.
        k, v: (B, heads*d, Hk, Wk) keys and values (self-attention: the same map size as q;
            cross-attention: any other size).
        num_heads: heads; the channel count must be divisible by it.
        scale: logit scale, default ``d ** -0.5``.
        backend: ``"auto"`` (Triton for CUDA tensors with head dims up to 256, in 16-bit or in
            float32 with TF32 allowed; SDPA otherwise),
            ``"triton"``, ``"torch"`` (SDPA on reshaped views), ``"cuda"`` (the compiled
            extension's tensor-core kernels, ``pip install -e .`` with nvcc: CUDA tensors in
            float16 or bfloat16, head dims up to 128; ``"auto"`` does not choose it yet).

    Returns:
        (B, heads*d, H, W) in the inputs' (promoted) dtype; under ``torch.autocast`` float32
        inputs run in the autocast dtype, as ``scaled_dot_product_attention`` does. Gradients
        reach q, k and v.

    Example::

        >>> import torch
        >>> from pcd_kernels import pixel_attention
        >>> qkv = torch.nn.Conv2d(64, 3 * 64, 1)(torch.randn(2, 64, 12, 20))
        >>> q, k, v = qkv.chunk(3, dim=1)
        >>> out = pixel_attention(q, k, v, num_heads=4)
        >>> out.shape
        torch.Size([2, 64, 12, 20])
    """
    for name, x in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, x, 4, "(B, heads*d, H, W) ")
        check_float(name, x)
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[:2] != k.shape[:2]:
        raise ValueError(f"q and k must have the same batch size and channels, got {tuple(q.shape)} "
                         f"and {tuple(k.shape)}")
    check_same_device("q", q, k=k, v=v)
    B, C, H, W = q.shape
    if C == 0:
        raise ValueError(f"q, k and v must have at least one channel, got q of shape {tuple(q.shape)}")
    num_heads = _check_num_heads(num_heads, C)
    head_dim = C // num_heads
    scale = _check_scale(scale, head_dim)
    check_choice("backend", backend, BACKENDS)
    if k.shape[2] * k.shape[3] == 0 and H * W > 0:
        raise ValueError(f"the key map must have at least one pixel for the query map's {H}x{W}, got k "
                         f"of shape {tuple(k.shape)}")

    dtype = torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)
    autocast = autocast_dtype(q.device)
    if autocast is not None and dtype == torch.float32:
        dtype = autocast
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    backend = resolve(_OP, backend, q.device, dtype, batch=B, num_heads=num_heads, head_dim=head_dim, lq=H * W,
                      lk=k.shape[2] * k.shape[3])
    if backend == "torch":  # SDPA, differentiable by itself: no custom op
        return implementation(_OP, "torch").attention(q, k, v, num_heads, scale)
    # (B, C, H, W) -> (B, C, H*W): a view whenever the map's rows are evenly strided
    out, _ = torch.ops.pcd_kernels.pixel_attention_forward(q.flatten(2), k.flatten(2), v.flatten(2),
                                                           num_heads, scale, backend)
    return out.view(B, C, H, W)
