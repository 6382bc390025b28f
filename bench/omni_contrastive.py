"""Benchmark cases and providers for ``omni_contrastive_loss`` (Af-DCD).

The official formula (``torch.cdist(p=1)`` over every patch's 256 x 256 samples, whose CUDA
backward allocates a (patches, 256, 256, C/groups) buffer) is imported from
``pcd_kernels.reference``, the test suite's ground truth.

FLOPs: the forward forms P*K*K*D absolute differences (subtract, abs, add: 3 FLOPs each), P
patches, K samples per patch, D = C / groups dims; the backward forms the sign-weighted sums for
both maps (subtract, sign, multiply-add: 3 FLOPs each, twice). Forward 3*P*K*K*D, backward
6*P*K*K*D. These are CUDA-core operations: no share of the tensor-core peak is quoted.

Exps: one per sample pair of a patch's softmax, P*K*K forward and again in the backward.

Bytes: each input read once and each output written once, float32 (4 bytes): forward 4*2*B*C*H*W
(both maps), backward 4*3*B*C*H*W (both maps read, the student's gradient written).
"""
from dataclasses import dataclass, replace

import torch

from common import MapCase, by_mode, require_triton, student_and_teacher
from pcd_kernels import omni_contrastive_loss
from pcd_kernels.reference import official_omni_contrastive_loss

OP = "omni_contrastive_loss"
TENSOR_CORES = False
# torch.cdist has no half-precision kernels (and the official code trains in float32): this op
# is measured in float32 whatever --dtype says.
DTYPE = torch.float32
TEMPERATURE = 0.07


@dataclass(frozen=True)
class Case(MapCase):
    pool: int
    groups: int = 16
    patch: int = 4
    sweep: str = ""  # the size this case varies, in a sweep ("" for a fixed case)
    x: int = 0  # that size's value

    @property
    def pooled(self):
        f = self.pool or 1
        return self.height // f, self.width // f

    @property
    def patches(self) -> int:
        h, w = self.pooled
        return self.batch * (h // self.patch) * (w // self.patch)

    @property
    def samples(self) -> int:
        return self.patch * self.patch * self.groups

    def flops(self, mode: str) -> int:
        per = 3 * self.patches * self.samples ** 2 * (self.channels // self.groups)
        return by_mode(mode, per, 2 * per)

    def exps(self, mode: str) -> int:
        per_pass = self.patches * self.samples ** 2
        return by_mode(mode, per_pass, per_pass)

    def bytes_moved(self, mode: str, element_size: int) -> int:
        return by_mode(mode, 2 * self.map_elements * element_size, 3 * self.map_elements * element_size)

    def describe(self) -> str:
        return (f"{self.maps} pool {self.pool} groups {self.groups} patch {self.patch}x{self.patch} "
                f"({self.patches} patches)")


def cases(device: str, quick: bool):
    if device == "cuda":
        if quick:
            return [Case("citys-small", 2, 512, 64, 128, 4)]
        return [Case("citys", 16, 2048, 64, 128, 4),          # Cityscapes, after the generator
                Case("citys-unpooled", 16, 2048, 64, 128, 0)]  # the official formula cannot fit this
    if quick:
        return [Case("citys-quick", 1, 256, 32, 64, 4)]
    return [Case("citys-cpu", 2, 512, 64, 128, 4), Case("citys-unpooled-cpu", 1, 256, 32, 64, 0)]


SWEEP_PROVIDERS = ("naive", "ours-torch", "ours-triton")


def sweeps(device: str, quick: bool):
    """Cases that vary the map (H x 2H, unpooled: the patches grow with it) and C."""
    if quick:
        return []
    if device == "cuda":
        base, sides, channels = Case("", 2, 256, 32, 64, 0), [16, 32, 64, 128], [256, 512, 1024, 2048]
    else:
        base, sides, channels = Case("", 1, 128, 32, 64, 0), [16, 32, 48], [64, 128, 256]
    maps = [replace(base, height=v, width=2 * v, name=f"sweep-map-{v}", sweep="map", x=v) for v in sides]
    dims = [replace(base, channels=c, name=f"sweep-C-{c}", sweep="C", x=c) for c in channels]
    return maps + dims


def make_inputs(case: Case, device: str, dtype: torch.dtype, seed: int):
    return student_and_teacher(case, device, dtype, torch.Generator(device="cpu").manual_seed(seed))


def providers(case: Case, device: str):
    options = dict(groups=case.groups, patch_size=(case.patch, case.patch), pool_size=case.pool,
                   temperature=TEMPERATURE)

    def official():
        return lambda s, t: official_omni_contrastive_loss(s, t, case.groups, (case.patch, case.patch),
                                                           case.pool, TEMPERATURE)

    def ours(backend):
        return lambda s, t: omni_contrastive_loss(s, t, backend=backend, **options)

    def triton():
        require_triton(device)
        return ours("triton")

    # (off CPU the torch backend forms its gradient sums with a Python loop over dimension
    # chunks: a memory-bounded reference, not a competitor)
    return {"naive": official, "ours-torch": lambda: ours("torch"), "ours-triton": triton}
