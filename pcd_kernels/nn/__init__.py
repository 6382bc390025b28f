"""nn.Module forms of the ops."""
from pcd_kernels.nn.afdcd import AfDCDLoss, EnhancedProjector
from pcd_kernels.nn.pixel_contrastive import PixelContrastiveLoss

__all__ = ["PixelContrastiveLoss", "AfDCDLoss", "EnhancedProjector"]
