"""``AfDCDLoss``: Af-DCD's masked feature mimicking + omni-contrastive loss, a drop-in for the
official ``OmniContrastiveFeatureLoss`` (OSVAI/Af-DCD) with its contrastive term fused."""
import numbers
from typing import Tuple

import torch
from torch import Tensor, nn

from pcd_kernels.ops._checks import check_choice, check_float, check_positive_finite, check_tensor
from pcd_kernels.backends import BACKENDS
from pcd_kernels.ops.omni_contrastive import _check_int, _check_patch_size, omni_contrastive_loss

CAMVID_CROP = 44  # the official code's CamVid branch crops both maps to 44 x 44 and does not pool


class EnhancedProjector(nn.Module):
    """Af-DCD's two-branch generator: two 3x3 conv + ReLU blocks, each followed by its own 3x3
    adaptor, averaged. The adaptors keep the official attribute names (``adpator_1``, ``adpator_2``,
    sic) so that state dicts load both ways."""

    def __init__(self, in_channels: int = 2048, out_channels: int = 2048):
        super().__init__()
        self.block_1 = nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, padding=1), nn.ReLU(inplace=True))
        self.block_2 = nn.Sequential(nn.Conv2d(out_channels, out_channels, 3, padding=1), nn.ReLU(inplace=True))
        self.adpator_1 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.adpator_2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        x_1 = self.block_1(x)
        x_2 = self.block_2(x_1)
        return (self.adpator_1(x_1) + self.adpator_2(x_2)) / 2.0


class AfDCDLoss(nn.Module):
    """Af-DCD (NeurIPS 2023) distillation loss: ``forward(feat_S, feat_T) -> (fd_loss, ctr_loss)``.

    Same constructor and semantics as the official ``OmniContrastiveFeatureLoss``:

    * ``align``: a 1x1 conv from ``student_channels`` to ``teacher_channels`` (identity when they
      are equal, where the official code crashes);
    * a pixel mask: each pixel of the aligned student map is zeroed with probability
      ``mask_ratio`` (``rand_mask=True``), or the central third block is (``rand_mask=False``);
    * the generator ``projetor`` (sic; also reachable as ``generator``): 3x3 conv, ReLU, 3x3 conv
      on the masked map (``EnhancedProjector`` when ``enhance_projector=True``);
    * ``fd_loss = sum((generator(masked) - feat_T)^2) / B``;
    * ``ctr_loss = omni_contrastive_loss(generator(masked), feat_T)`` with ``M_ocd`` groups,
      ``patch_size``, ``pool_size`` and ``tau_ocd``; ``dataset="camvid"`` crops both maps to
      44x44 and does not pool (the official CamVid branch), any other dataset pools.

    The parameters keep the official names (``align.*``, ``projetor.*``, the enhanced projector's
    ``adpator_*``), so a state dict loads into the official module and back as it is. State dicts
    that earlier pcd_kernels commits saved under other names (``generator.*``, ``adaptor_*``)
    still load.

    Example::

        >>> import torch
        >>> from pcd_kernels import AfDCDLoss
        >>> criterion = AfDCDLoss(student_channels=32, teacher_channels=64, M_ocd=16)
        >>> feat_S, feat_T = torch.randn(2, 32, 32, 32), torch.randn(2, 64, 32, 32)
        >>> fd_loss, ctr_loss = criterion(feat_S, feat_T)
        >>> (fd_loss + ctr_loss).backward()
    """

    def __init__(self, student_channels: int = 512, teacher_channels: int = 2048, tau_ocd: float = 0.07,
                 M_ocd: int = 16, pool_size: int = 4, patch_size: Tuple[int, int] = (4, 4),
                 rand_mask: bool = True, mask_ratio: float = 0.75, enhance_projector: bool = False,
                 dataset: str = "citys", *, backend: str = "auto"):
        super().__init__()
        self.student_channels = student_channels = _check_int("student_channels", student_channels, 1)
        self.teacher_channels = teacher_channels = _check_int("teacher_channels", teacher_channels, 1)
        self.tau_ocd = check_positive_finite("tau_ocd", tau_ocd)
        self.M_ocd = _check_int("M_ocd", M_ocd, 1)
        if teacher_channels % self.M_ocd:
            raise ValueError(f"teacher_channels = {teacher_channels} must be divisible by M_ocd = {M_ocd}")
        self.pool_size = _check_int("pool_size", pool_size, 0)
        self.patch_size = _check_patch_size(patch_size)
        if not isinstance(mask_ratio, numbers.Real) or not 0 <= mask_ratio <= 1:
            raise ValueError(f"mask_ratio must be a number in [0, 1], got {mask_ratio!r}")
        self.mask_ratio = float(mask_ratio)
        self.rand_mask = bool(rand_mask)
        if not isinstance(dataset, str):
            raise TypeError(f"dataset must be a string, got {type(dataset).__name__}")
        self.dataset = dataset
        self.backend = check_choice("backend", backend, BACKENDS)
        self.align = (nn.Conv2d(student_channels, teacher_channels, kernel_size=1)
                      if student_channels != teacher_channels else nn.Identity())
        if enhance_projector:
            self.projetor = EnhancedProjector(teacher_channels, teacher_channels)
        else:
            self.projetor = nn.Sequential(nn.Conv2d(teacher_channels, teacher_channels, 3, padding=1),
                                           nn.ReLU(inplace=True),
                                           nn.Conv2d(teacher_channels, teacher_channels, 3, padding=1))
        self.register_load_state_dict_pre_hook(_earlier_keys)

    @property
    def generator(self) -> nn.Module:
        """The generator network (the official code's ``projetor``)."""
        return self.projetor

    def pixel_mask(self, batch: int, height: int, width: int, device, dtype=torch.float32) -> Tensor:
        """(B, 1, H, W) of 0 (masked) and 1 (kept).

        The random mask is drawn from the CPU generator and then moved, as the official code
        does, so that a seeded run draws the same masks and leaves the same random stream."""
        if self.rand_mask:
            draw = torch.rand(batch, 1, height, width)
            return (draw <= 1 - self.mask_ratio).to(device=device, dtype=dtype)
        mask = torch.ones(batch, 1, height, width, dtype=dtype, device=device)
        mask[:, :, height // 3:2 * height // 3, width // 3:2 * width // 3] = 0
        return mask

    def forward(self, feat_S: Tensor, feat_T: Tensor) -> Tuple[Tensor, Tensor]:
        for name, x, channels in (("feat_S", feat_S, self.student_channels), ("feat_T", feat_T, self.teacher_channels)):
            check_tensor(name, x, 4, "(B, C, H, W) ")
            check_float(name, x)
            if x.shape[1] != channels:
                raise ValueError(f"{name} must have {channels} channels, got shape {tuple(x.shape)}")
        feat_S = self.align(feat_S)
        if feat_S.shape != feat_T.shape:
            raise ValueError(f"aligned student features {tuple(feat_S.shape)} and teacher features "
                             f"{tuple(feat_T.shape)} must have the same shape")
        B, _, H, W = feat_T.shape
        generated = self.projetor(feat_S * self.pixel_mask(B, H, W, feat_S.device, feat_S.dtype))
        fd_loss = (generated - feat_T).pow(2).sum() / B
        if self.dataset == "camvid":
            crop = (slice(None), slice(None), slice(0, CAMVID_CROP), slice(0, CAMVID_CROP))
            ctr_loss = omni_contrastive_loss(generated[crop], feat_T[crop], groups=self.M_ocd,
                                             patch_size=self.patch_size, pool_size=0,
                                             temperature=self.tau_ocd, backend=self.backend)
        else:
            ctr_loss = omni_contrastive_loss(generated, feat_T, groups=self.M_ocd, patch_size=self.patch_size,
                                             pool_size=self.pool_size, temperature=self.tau_ocd,
                                             backend=self.backend)
        return fd_loss, ctr_loss

    def extra_repr(self) -> str:
        return (f"tau_ocd={self.tau_ocd}, M_ocd={self.M_ocd}, pool_size={self.pool_size}, "
                f"patch_size={self.patch_size}, rand_mask={self.rand_mask}, mask_ratio={self.mask_ratio}, "
                f"dataset={self.dataset!r}")


def _earlier_keys(module, state_dict, prefix, *args):
    """Rename, in place, the keys of a state dict saved by pcd_kernels before it kept the official
    names: generator -> projetor, adaptor_ -> adpator_."""
    for key in [k for k in state_dict if k.startswith(prefix + "generator.")]:
        rest = key[len(prefix + "generator."):]  # (the prefix may hold "adaptor_" too: leave it)
        if rest.startswith("adaptor_"):
            rest = "adpator_" + rest[len("adaptor_"):]
        state_dict[prefix + "projetor." + rest] = state_dict.pop(key)
