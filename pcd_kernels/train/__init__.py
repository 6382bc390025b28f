"""The thin PCD trainer: ``python -m pcd_kernels.train`` (see ``--help``), or from Python with
your own teacher and images (README, "Train with PCD").

It distils a frozen teacher (its pooled-feature MLP head made spatial by ``SpatialAdaptor``) into a
student backbone + ``MHSA2d`` + projector + predictor with ``pixel_contrastive_loss`` against a
queue of pooled teacher vectors, on two geometrically aligned views. It runs one process or many
under ``torchrun`` (DDP), writes atomic checkpoints and resumes exactly.
"""
from pcd_kernels.train.data import Augmentation, ImageFolder, ViewPairs
from pcd_kernels.train.engine import TrainConfig, symmetric_loss, train
from pcd_kernels.train.errors import TrainError
from pcd_kernels.train.models import CompactCNN, Student, Teacher, load_mocov3_resnet50, mlp_head
from pcd_kernels.train.optim import LARS, learning_rate, parameter_groups

__all__ = ["TrainConfig", "train", "symmetric_loss", "Teacher", "Student", "CompactCNN", "mlp_head",
           "load_mocov3_resnet50",
           "Augmentation", "ImageFolder", "ViewPairs", "LARS", "learning_rate", "parameter_groups", "TrainError"]
