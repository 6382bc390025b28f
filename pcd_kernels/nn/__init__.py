"""nn.Module forms of the ops."""
from pcd_kernels.nn.adaptor import SpatialAdaptor, SpatialReLU
from pcd_kernels.nn.afdcd import AfDCDLoss, EnhancedProjector
from pcd_kernels.nn.attention import MHSA2d, LayerNorm2d, sinusoidal_position_encoding
from pcd_kernels.nn.pixel_contrastive import PixelContrastiveLoss

__all__ = ["PixelContrastiveLoss", "AfDCDLoss", "EnhancedProjector", "MHSA2d", "LayerNorm2d",
           "sinusoidal_position_encoding", "SpatialAdaptor", "SpatialReLU"]
