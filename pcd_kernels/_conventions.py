"""The conventions every layer shares (the reference formulas, the backends, the ops): the order of
pixel rows, the dtype results are computed in, ``F.normalize``'s eps, the base of the saved
logsumexps, and the packed layouts of the omni-contrastive and attention ops. Nothing here
computes a loss."""
import math
from typing import Tuple

import torch
from torch import Tensor

NORM_EPS = 1e-12  # F.normalize's eps: vectors are divided by max(||x||, NORM_EPS)
# ``lse`` is a natural logsumexp, ``lse2`` a base-2 one (log2 sum 2^(logit * LOG2E)), what the
# kernels compute, save and read: their exp is exp2, one instruction. lse2 = lse * LOG2E.
LN2 = math.log(2.0)
LOG2E = 1.0 / LN2


def logit_scale(temperature: float) -> float:
    """The factor that turns a dot product into a base-2 logit (the kernels' exp is exp2)."""
    return 1.0 / (temperature * LN2)


# pixel_contrastive_loss's negatives modes as its kernels number them. csrc/ has the same numbers
# in its Negatives enum; tests/test_csrc.py checks that both agree.
NEGATIVES_MODES = {"none": 0, "image": 1, "batch": 2}


def pixel_rows(x: Tensor) -> Tensor:
    """(B, C, H, W) map -> (B*H*W, C) rows in (b, h, w) order: the anchor/key index used everywhere."""
    return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Losses are computed and returned in float32, or float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


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


def attention_heads(x: Tensor, num_heads: int) -> Tensor:
    """(B, heads*d, H, W) map -> (B, heads, H*W, d): the (batch, head, token, dim) layout attention
    libraries expect, as a strided view (a transpose)."""
    B, C, H, W = x.shape
    return x.reshape(B, num_heads, C // num_heads, H * W).transpose(2, 3)
