"""PCD's SpatialAdaptor: a teacher's MLP head applied to every pixel of its feature map.

A head trained on globally pooled features (Linear / BatchNorm1d / ReLU) becomes 1x1 convs /
BatchNorm2d / SpatialReLU with the same weights and running statistics. Every layer then commutes
with global average pooling (in eval mode), so pooling the adaptor's output map gives exactly the
head's output on the pooled input, while each pixel gets a vector in the head's embedding space.
"""
from typing import List

import torch
from torch import Tensor, nn

from pcd_kernels.ops._checks import check_float, check_tensor


class SpatialReLU(nn.Module):
    """Keeps or zeroes each channel of each map by the sign of its spatial mean.

    ``GAP(SpatialReLU(x)) == ReLU(GAP(x))``: the ReLU of a pooled vector, made spatial. A channel
    whose mean is exactly 0 is zeroed (either choice pools to 0). NaN propagates: a channel with a
    NaN mean is multiplied by 0, which keeps its NaN.
    """

    def forward(self, x: Tensor) -> Tensor:
        check_tensor("x", x)
        if x.dim() < 3:
            raise ValueError(f"x must be a (B, C, *spatial) tensor, got shape {tuple(x.shape)}")
        check_float("x", x)  # (a sign of the mean needs real numbers)
        keep = x.mean(dim=tuple(range(2, x.dim())), keepdim=True) > 0
        return x * keep.to(x.dtype)


def _leaf_layers(module: nn.Module) -> List[nn.Module]:
    if isinstance(module, nn.Sequential):
        return [layer for child in module for layer in _leaf_layers(child)]
    return [module]


def _convert(layer: nn.Module, index: int) -> nn.Module:
    if isinstance(layer, nn.Linear):
        conv = nn.Conv2d(layer.in_features, layer.out_features, 1, bias=layer.bias is not None)
        conv.to(device=layer.weight.device, dtype=layer.weight.dtype)
        with torch.no_grad():
            conv.weight.copy_(layer.weight[:, :, None, None])
            if layer.bias is not None:
                conv.bias.copy_(layer.bias)
        return conv
    if type(layer) in (nn.BatchNorm1d, nn.SyncBatchNorm):  # (a DDP-converted head has SyncBatchNorm)
        if not layer.track_running_stats:
            # It then normalises with the variance of the batch's pooled vectors, in eval mode
            # too; a BatchNorm2d would use the variance over the pixels as well, so pooling the
            # adaptor's output would no longer give the head's output.
            raise ValueError(f"SpatialAdaptor.from_mlp: layer {index} ({type(layer).__name__}) has "
                             "track_running_stats=False: it normalises with the statistics of each "
                             "batch of pooled vectors, which no per-pixel BatchNorm2d reproduces; "
                             "convert a head whose batch norms have running statistics")
        norm = nn.BatchNorm2d(layer.num_features, eps=layer.eps, momentum=layer.momentum, affine=layer.affine,
                              track_running_stats=layer.track_running_stats)
        floats = [t for t in (*layer.parameters(), *layer.buffers()) if t.is_floating_point()]
        if floats:
            norm.to(device=floats[0].device, dtype=floats[0].dtype)
        norm.load_state_dict(layer.state_dict())
        return norm.train(layer.training)
    if type(layer) is nn.ReLU:
        return SpatialReLU()
    if isinstance(layer, nn.Identity):
        return nn.Identity()
    raise TypeError(f"SpatialAdaptor.from_mlp: layer {index} ({type(layer).__name__}) is not supported; "
                    "the head must be made of Linear, BatchNorm1d (or SyncBatchNorm), ReLU and Identity layers")


class SpatialAdaptor(nn.Sequential):
    """A teacher's MLP head turned into per-pixel layers; build it with :meth:`from_mlp`.

    Example::

        >>> import torch
        >>> from torch import nn
        >>> from pcd_kernels import SpatialAdaptor
        >>> head = nn.Sequential(nn.Linear(32, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 16)).eval()
        >>> adaptor = SpatialAdaptor.from_mlp(head).eval()
        >>> x = torch.randn(2, 32, 7, 9)
        >>> torch.allclose(adaptor(x).mean((2, 3)), head(x.mean((2, 3))), atol=1e-5)
        True
    """

    @classmethod
    def from_mlp(cls, mlp: nn.Module) -> "SpatialAdaptor":
        """1x1 convs / BatchNorm2d / SpatialReLU with the MLP's weights, running statistics and
        train/eval mode; nested ``nn.Sequential`` are flattened. In eval mode, global-average-
        pooling the adaptor's output equals the MLP applied to the pooled input."""
        if not isinstance(mlp, nn.Module):
            raise TypeError(f"mlp must be an nn.Module, got {type(mlp).__name__}")
        adaptor = cls(*(_convert(layer, i) for i, layer in enumerate(_leaf_layers(mlp))))
        return adaptor.train(mlp.training)
