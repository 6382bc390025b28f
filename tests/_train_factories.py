"""Model factories the trainer's command-line tests name as ``--teacher _train_factories:...``."""
from pcd_kernels.train.models import CompactCNN, mlp_head


def headless_teacher():
    """A module that gives maps itself: the trainer applies no head to it."""
    return CompactCNN((8, 16))


def teacher_pair():
    """A (backbone, pooled-feature MLP head) pair: the trainer makes the head a SpatialAdaptor."""
    return CompactCNN((8, 16)), mlp_head(16, 32, 8)
