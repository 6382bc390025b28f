"""pcd_kernels: fused Triton and CUDA kernels for dense (pixel-wise) contrastive distillation."""
from pcd_kernels.nn.adaptor import SpatialAdaptor, SpatialReLU
from pcd_kernels.nn.afdcd import AfDCDLoss
from pcd_kernels.nn.attention import MHSA2d
from pcd_kernels.nn.pixel_contrastive import PixelContrastiveLoss
from pcd_kernels.ops.omni_contrastive import omni_contrastive_loss
from pcd_kernels.ops.pixel_attention import pixel_attention
from pcd_kernels.ops.pixel_contrastive import pixel_contrastive_loss
from pcd_kernels.ops.pixel_relation import pixel_relation_loss

__version__ = "0.1.0"

__all__ = ["pixel_contrastive_loss", "PixelContrastiveLoss", "omni_contrastive_loss", "AfDCDLoss",
           "pixel_relation_loss", "pixel_attention", "MHSA2d", "SpatialAdaptor", "SpatialReLU", "__version__"]
