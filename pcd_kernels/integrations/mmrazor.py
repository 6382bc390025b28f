"""pcd_kernels' losses and a SpatialAdaptor connector in mmrazor's ``MODELS`` registry.

Importing this module registers (``custom_imports = dict(imports=["pcd_kernels.integrations.mmrazor"])``
in a config does it):

- ``PixelContrastiveLoss``: ``forward(preds_S, preds_T)``, ``loss_weight``; with ``queue_size`` and
  ``dim`` it owns a MoCo queue and pushes the pooled teacher map after each call;
- ``OmniContrastiveLoss``: Af-DCD's omni-contrastive term on given maps;
- ``AfDCDLoss``: Af-DCD's masked generation + omni-contrastive terms, summed (its generator is
  trained with the distiller);
- ``SpatialAdaptorConnector``: a teacher connector applying the teacher's MLP head per pixel.

See ``docs/integrations.md`` for a config that swaps a CIRKD/CWD-style loss for these.
"""
try:
    from mmrazor.registry import MODELS
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError("pcd_kernels.integrations.mmrazor needs mmrazor (pip install mmrazor, with mmengine and "
                      "mmcv); pcd_kernels itself does not") from error

from torch import Tensor, nn

from pcd_kernels.integrations import _losses


class PixelContrastiveLoss(_losses.SelfQueueingPixelContrastiveLoss):
    """mmrazor form of :class:`pcd_kernels.PixelContrastiveLoss` (see the module docstring)."""

    def forward(self, preds_S: Tensor, preds_T: Tensor) -> Tensor:
        return super().forward(preds_S, preds_T)


class OmniContrastiveLoss(_losses.WeightedOmniContrastiveLoss):
    def forward(self, preds_S: Tensor, preds_T: Tensor) -> Tensor:
        return super().forward(preds_S, preds_T)


class AfDCDLoss(_losses.SummedAfDCDLoss):
    def forward(self, preds_S: Tensor, preds_T: Tensor) -> Tensor:
        return super().forward(preds_S, preds_T)


class SpatialAdaptorConnector(nn.Module):
    """Teacher connector: the teacher's pooled-feature MLP head applied to every pixel (see
    :func:`pcd_kernels.integrations._losses.spatial_adaptor_from_checkpoint` for the arguments)."""

    def __init__(self, in_channels: int, hidden_channels: int, out_channels: int, last_bn: bool = True,
                 checkpoint=None, prefix: str = "", frozen: bool = True, init_cfg=None):
        super().__init__()
        self.adaptor = _losses.spatial_adaptor_from_checkpoint(in_channels, hidden_channels, out_channels,
                                                               last_bn, checkpoint, prefix, frozen)

    def forward(self, feature: Tensor) -> Tensor:
        return self.adaptor(feature)


def register(registry=MODELS) -> None:
    """Registers the four classes in ``registry`` (mmrazor's MODELS by default); idempotent.

    It reads ``module_dict`` rather than calling ``registry.get``, which first imports all of
    ``mmrazor.models``: with mmrazor 1.0.0 that import fails on torch >= 2.1 (its quantization code
    imports ``torch.ao`` names that torch removed), and it would fail this import with it."""
    for cls in (PixelContrastiveLoss, OmniContrastiveLoss, AfDCDLoss, SpatialAdaptorConnector):
        if registry.module_dict.get(cls.__name__) is not cls:
            registry.register_module(name=cls.__name__, module=cls, force=True)


register()
