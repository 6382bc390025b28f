"""Framework-neutral loss adapters the mmrazor and torchdistill shims register.

Frameworks call a loss once per step and never call ``enqueue``, so the queue variant refreshes
its queue itself: after computing the loss against a snapshot of the queue, it pushes the pooled
teacher map. The snapshot is needed because the backward reads the queue and the push happens
before the backward.
"""
from typing import Optional

import torch
from torch import Tensor, nn

from pcd_kernels.nn.adaptor import SpatialAdaptor
from pcd_kernels.nn.afdcd import AfDCDLoss
from pcd_kernels.nn.pixel_contrastive import PixelContrastiveLoss
from pcd_kernels.ops.omni_contrastive import omni_contrastive_loss


class SelfQueueingPixelContrastiveLoss(PixelContrastiveLoss):
    """``PixelContrastiveLoss`` that enqueues the pooled teacher map on every call made with
    gradients enabled (training, not evaluation) when it owns a queue and ``auto_enqueue`` is set;
    the loss is multiplied by ``loss_weight``."""

    def __init__(self, temperature: float = 0.2, negatives: str = "batch", normalize: bool = True,
                 queue_size: int = 0, dim: Optional[int] = None, *, auto_enqueue: bool = True,
                 loss_weight: float = 1.0, backend: str = "auto"):
        super().__init__(temperature, negatives, normalize, "mean", queue_size, dim, backend=backend)
        self.auto_enqueue, self.loss_weight = auto_enqueue, float(loss_weight)

    def forward(self, student: Tensor, teacher: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        queue = self.queue_on(student)
        if queue is None or queue is not self.queue or not self.auto_enqueue or not torch.is_grad_enabled():
            # (no queue, a meta copy of it, evaluation, or enqueueing left to the caller)
            return self.loss_weight * self.loss(student, teacher, mask, queue)
        loss = self.loss(student, teacher, mask, queue.clone())
        self.enqueue(teacher.detach().float().mean(dim=(2, 3)))
        return self.loss_weight * loss


class WeightedOmniContrastiveLoss(nn.Module):
    """``omni_contrastive_loss`` (Af-DCD's contrastive term on given maps) times ``loss_weight``."""

    def __init__(self, temperature: float = 0.07, groups: int = 16, pool_size: int = 4,
                 patch_size=(4, 4), loss_weight: float = 1.0, backend: str = "auto"):
        super().__init__()
        self.kwargs = dict(temperature=temperature, groups=groups, pool_size=pool_size,
                           patch_size=tuple(patch_size), backend=backend)
        self.loss_weight = float(loss_weight)

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        return self.loss_weight * omni_contrastive_loss(student, teacher, **self.kwargs)


class SummedAfDCDLoss(AfDCDLoss):
    """``AfDCDLoss`` returning ``loss_weight * (fd_loss + ctr_loss)``, one tensor, as mmrazor's
    loss dictionaries need. Its generator holds parameters, so it belongs where the framework
    optimises loss modules (mmrazor's distiller does)."""

    def __init__(self, *args, loss_weight: float = 1.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.loss_weight = float(loss_weight)

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        fd_loss, ctr_loss = super().forward(student, teacher)
        return self.loss_weight * (fd_loss + ctr_loss)


def spatial_adaptor_from_checkpoint(in_channels: int, hidden_channels: int, out_channels: int,
                                    last_bn: bool = True, checkpoint: Optional[str] = None, prefix: str = "",
                                    frozen: bool = True) -> nn.Module:
    """A MoCo v3-style MLP head (Linear-BN-ReLU-Linear[-BN without affine], no biases) of these
    sizes, with weights from ``checkpoint`` keys under ``prefix`` (e.g. ``module.base_encoder.fc.``),
    as a SpatialAdaptor; ``frozen`` keeps it in eval mode without gradients (a teacher's head)."""
    from pcd_kernels.train.models import Teacher, encoder_state_dict, mlp_head, read_checkpoint

    head = mlp_head(in_channels, hidden_channels, out_channels, last_bn=last_bn)
    if checkpoint is not None:
        head.load_state_dict(encoder_state_dict(read_checkpoint(checkpoint, "checkpoint"), prefix))
    return Teacher(nn.Identity(), head) if frozen else SpatialAdaptor.from_mlp(head)
