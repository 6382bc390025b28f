"""The torch backend of ``pixel_attention``: ``F.scaled_dot_product_attention``, differentiable by
itself, so the op calls it directly instead of through its custom ops. Math: DESIGN.md section 3.4."""
import torch.nn.functional as F
from torch import Tensor

from pcd_kernels._conventions import attention_heads


def limits(**problem):
    """No limit beyond the public function's argument checks."""
    return None


def attention(q: Tensor, k: Tensor, v: Tensor, num_heads: int, scale: float) -> Tensor:
    """``pixel_attention`` through ``F.scaled_dot_product_attention`` on the reshaped maps, with the permutes and
    copies a user writes around it. The fused SDPA kernels
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
