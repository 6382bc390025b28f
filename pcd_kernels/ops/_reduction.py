"""The reductions of the per-anchor losses, shared by the ops that return one value per pixel."""
from typing import Callable, Optional

from torch import Tensor

REDUCTIONS = ("mean", "sum", "none")


def reduce_per_anchor(values: Tensor, mask: Optional[Tensor], reduction: str,
                      anchor_count: Optional[Callable] = None) -> Tensor:
    """``values`` (B, H, W), 0 at masked pixels, reduced: ``"none"`` as is, ``"sum"``, or ``"mean"``
    over the valid anchors (0, not NaN, when there is none). ``anchor_count`` maps this call's
    count of valid anchors to the one to divide by (a process group's average)."""
    if reduction == "none":
        return values
    total = values.sum()
    if reduction == "sum":
        return total
    count = mask.sum() if mask is not None else values.numel()
    if anchor_count is not None:
        count = anchor_count(count)
    if isinstance(count, int):
        return total / max(count, 1)
    return total / count.clamp_min(1)
