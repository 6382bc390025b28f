"""``MHSA2d``: PCD's plug-in multi-head self-attention over a feature map, on ``pixel_attention``."""
import math
import numbers
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pcd_kernels.ops._checks import check_bool, check_choice, check_float, check_tensor
from pcd_kernels.backends import BACKENDS
from pcd_kernels.ops.pixel_attention import pixel_attention

POS_EMBEDS = ("sinusoidal", "learned", None)
NORMS = ("batch", "layer", None)


def sinusoidal_position_encoding(channels: int, height: int, width: int, *,
                                 device=None, dtype=torch.float32, temperature: float = 10000.0) -> Tensor:
    """A fixed 2-D sine/cosine encoding, (1, channels, height, width).

    Pixel centres are placed on [0, 2 pi) along each axis ((i + 0.5) / size * 2 pi), so a map of
    any size gets an encoding of the same range, as in DETR. Channels [0, 2n) encode the row
    (sin and cos of n frequencies 1 / temperature^(i/n)), channels [2n, 4n) the column, with
    n = channels // 4; the channels % 4 left over are zero.
    """
    n = channels // 4
    encoding = torch.zeros(channels, height, width, device=device, dtype=torch.float32)
    if n and height and width:
        freqs = temperature ** (-torch.arange(n, device=device, dtype=torch.float32) / n)
        rows = (torch.arange(height, device=device, dtype=torch.float32) + 0.5) * (2 * math.pi / height)
        cols = (torch.arange(width, device=device, dtype=torch.float32) + 0.5) * (2 * math.pi / width)
        y, x = rows[None, :] * freqs[:, None], cols[None, :] * freqs[:, None]  # (n, H), (n, W)
        encoding[0:n] = y.sin()[:, :, None]
        encoding[n:2 * n] = y.cos()[:, :, None]
        encoding[2 * n:3 * n] = x.sin()[:, None, :]
        encoding[3 * n:4 * n] = x.cos()[:, None, :]
    return encoding.to(dtype).unsqueeze(0)


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of every pixel of a (B, C, H, W) map, without a permute;
    statistics in float32 whatever the map's dtype."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        mean = x32.mean(1, keepdim=True)
        var = (x32 - mean).square().mean(1, keepdim=True)
        normed = ((x32 - mean) * torch.rsqrt(var + self.eps)).to(x.dtype)
        return normed * self.weight[:, None, None] + self.bias[:, None, None]


class MHSA2d(nn.Module):
    r"""Multi-head self-attention over the pixels of a (B, C, H, W) feature map.

    ``y = x + pos``; ``q, k, v`` = one fused 1x1 conv of ``y`` (3C output channels: q, then k,
    then v, each heads x d; the position encoding reaches the values too, as in ViT, not only
    the queries and keys as in DETR); ``a = pixel_attention(q, k, v)`` per head over all H*W pixels;
    ``out = proj(a)`` (1x1 conv), plus ``x`` when ``residual``, then ``norm`` when given. The
    attention reads q, k and v as channel slices of the projection, in place: no permute or
    contiguous copy of the map, and no (H*W x H*W) matrix on the Triton path.

    Args:
        channels: C, divisible by ``num_heads``.
        num_heads: heads; each sees d = C / num_heads channels.
        qkv_bias: a bias on the q/k/v projection.
        pos_embed: ``"sinusoidal"`` (fixed, :func:`sinusoidal_position_encoding`, any map size),
            ``"learned"`` (a (1, C, *pos_embed_size) parameter, bilinearly interpolated to other
            map sizes) or None.
        residual: add the input to the output.
        norm: None, ``"batch"`` (BatchNorm2d) or ``"layer"`` (LayerNorm over channels per pixel),
            applied last.
        pos_embed_size: (rows, cols) of the learned encoding.
        backend: passed to :func:`pcd_kernels.pixel_attention`.

    Example::

        >>> import torch
        >>> from pcd_kernels import MHSA2d
        >>> block = MHSA2d(64, num_heads=4)
        >>> block(torch.randn(2, 64, 15, 22)).shape
        torch.Size([2, 64, 15, 22])
    """

    def __init__(self, channels: int, num_heads: int = 8, qkv_bias: bool = True,
                 pos_embed: Optional[str] = "sinusoidal", residual: bool = True, norm: Optional[str] = None,
                 *, pos_embed_size: Tuple[int, int] = (16, 16), backend: str = "auto"):
        super().__init__()
        for name, value in (("channels", channels), ("num_heads", num_heads)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if channels % num_heads:
            raise ValueError(f"channels ({channels}) must be divisible by num_heads ({num_heads})")
        check_bool("qkv_bias", qkv_bias)
        check_bool("residual", residual)
        if pos_embed not in POS_EMBEDS:
            raise ValueError(f"pos_embed must be 'sinusoidal', 'learned' or None, got {pos_embed!r}")
        if norm not in NORMS:
            raise ValueError(f"norm must be 'batch', 'layer' or None, got {norm!r}")
        check_choice("backend", backend, BACKENDS)
        self.channels, self.num_heads = int(channels), int(num_heads)
        self.pos_embed_kind, self.residual, self.backend = pos_embed, residual, backend
        if pos_embed == "learned":
            if (len(pos_embed_size) != 2 or any(isinstance(s, bool) or not isinstance(s, numbers.Integral)
                                                or s < 1 for s in pos_embed_size)):
                raise ValueError(f"pos_embed_size must be two ints >= 1, got {pos_embed_size!r}")
            self.pos_embed = nn.Parameter(torch.empty(1, channels, *pos_embed_size))
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        else:
            self.register_parameter("pos_embed", None)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1, bias=qkv_bias)
        self.proj = nn.Conv2d(channels, channels, 1)
        self.norm = {"batch": lambda: nn.BatchNorm2d(channels), "layer": lambda: LayerNorm2d(channels),
                     None: lambda: None}[norm]()

    def extra_repr(self) -> str:
        return (f"channels={self.channels}, num_heads={self.num_heads}, pos_embed={self.pos_embed_kind!r}, "
                f"residual={self.residual}, backend={self.backend!r}")

    def position_encoding(self, height: int, width: int, device, dtype) -> Optional[Tensor]:
        """The (1, C, height, width) encoding added to the input, or None."""
        if self.pos_embed_kind == "sinusoidal":
            return sinusoidal_position_encoding(self.channels, height, width, device=device, dtype=dtype)
        if self.pos_embed_kind == "learned":
            pos = self.pos_embed
            if pos.shape[2:] != (height, width):
                pos = F.interpolate(pos, size=(height, width), mode="bilinear", align_corners=False)
            return pos.to(dtype)
        return None

    def attention(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return pixel_attention(q, k, v, num_heads=self.num_heads, backend=self.backend)

    def forward(self, x: Tensor) -> Tensor:
        check_tensor("x", x)
        check_float("x", x)
        if x.dim() != 4 or x.shape[1] != self.channels:
            raise ValueError(f"x must be a (B, {self.channels}, H, W) map, got shape {tuple(x.shape)}")
        pos = self.position_encoding(x.shape[2], x.shape[3], x.device, x.dtype)
        q, k, v = self.qkv(x if pos is None else x + pos).chunk(3, dim=1)
        out = self.proj(self.attention(q, k, v))
        if self.residual:
            out = out + x
        return out if self.norm is None else self.norm(out)
