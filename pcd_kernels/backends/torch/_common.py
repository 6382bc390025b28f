"""What the torch backends of every op share: the chunk size that bounds their extra memory, the
normalisation (and its hand-written gradient), the valid-row index."""
from typing import Iterator, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from pcd_kernels._conventions import NORM_EPS

# Elements of one (chunk x keys) logit block in the chunked backend: 4 Mi float32 = 16 MiB,
# small enough for the memory bound, large enough that the per-chunk matmuls stay efficient.
CHUNK_ELEMENTS = 1 << 22


def prepared(x: Tensor, dtype: torch.dtype, normalize: bool) -> Tensor:
    x = x.to(dtype)
    return F.normalize(x, dim=1, eps=NORM_EPS) if normalize else x


def normalize_backward(x: Tensor, grad_hat: Tensor) -> Tensor:
    """Gradient through x -> x / max(||x||, eps), exactly as autograd differentiates F.normalize."""
    norm = torch.linalg.vector_norm(x, dim=1, keepdim=True)
    x_hat = x / norm.clamp_min(NORM_EPS)
    projected = grad_hat - x_hat * (x_hat * grad_hat).sum(1, keepdim=True)
    return torch.where(norm >= NORM_EPS, projected / norm.clamp_min(NORM_EPS), grad_hat / NORM_EPS)


def valid_rows(mask: Optional[Tensor], n: int, device) -> Tensor:
    if mask is None:
        return torch.arange(n, device=device)
    return mask.reshape(-1).nonzero().squeeze(1)


def chunks(rows: Tensor, n_keys: int) -> Iterator[Tuple[int, Tensor]]:
    step = max(1, CHUNK_ELEMENTS // max(n_keys, 1))
    for start in range(0, rows.numel(), step):
        yield start, rows[start:start + step]
