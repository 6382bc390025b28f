"""Benchmark cases and providers for ``pixel_relation_loss`` (CIRKD).

The official formulas are imported from ``pcd_kernels.reference`` (checked against the official
code in tests/test_pixel_relation.py): the mini-batch loss loops over the B² image pairs, each an
(H·W × H·W) similarity matrix per map; the memory term multiplies every valid pixel of both maps
by the sampled memory rows: CIRKD's train_cirkd.py samples 4,096 // 19 + 1 = 216 slots per class
of the pixel memory and 1,024 // 19 + 1 = 54 of the region memory, (pixels × 4,104) and
(pixels × 1,026) logits each.

FLOPs: with N anchors, K keys per anchor and C channels, the forward forms the teacher's and the
student's logits (2·N·K·C each); the backward recomputes both and forms the student's gradient,
as an anchor (2·N·K·C) and, in the mini-batch loss, as a key (2·N·K·C more). The mini-batch loss
has N·K = B²·(H·W)² pairs: forward 4·B²·(HW)²·C, backward 8·B²·(HW)²·C. The memory term has
N = B·H·W and K memory rows: forward 4·N·K·C, backward 6·N·K·C.

Exps: two per pair (both softmaxes), in the forward and again in the backward (the fused
kernels' count; the official formula takes a third, P_t from its log).

Bytes: each input read once and each output written once: forward both maps (and the memory),
backward both maps and the memory read, the student's gradient written.
"""
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from common import MapCase, by_mode, require_triton, student_and_teacher
from pcd_kernels import pixel_relation_loss
from pcd_kernels.reference import official_cirkd_memory_loss, official_cirkd_minibatch_loss

OP = "pixel_relation_loss"
TENSOR_CORES = True
MINIBATCH_TEMPERATURE = 1.0  # CIRKD's defaults
CONTRAST_TEMPERATURE, CONTRAST_KD_TEMPERATURE = 0.1, 1.0


@dataclass(frozen=True)
class Case(MapCase):
    memory: int = 0  # memory rows (classes x sampled slots); 0: the mini-batch (cross-image) loss
    sweep: str = ""
    x: int = 0

    @property
    def pairs(self) -> int:
        hw = self.height * self.width
        return self.batch * hw * (self.memory if self.memory else self.batch * hw)

    def flops(self, mode: str) -> int:
        return by_mode(mode, 4 * self.pairs * self.channels, (8 if not self.memory else 6) * self.pairs * self.channels)

    def exps(self, mode: str) -> int:
        return by_mode(mode, 2 * self.pairs, 2 * self.pairs)

    def bytes_moved(self, mode: str, element_size: int) -> int:
        maps, memory = self.map_elements, self.memory * self.channels
        return by_mode(mode, (2 * maps + memory) * element_size, (3 * maps + memory) * element_size)

    def describe(self) -> str:
        keys = f"memory of {self.memory} rows" if self.memory else "cross-image (mini-batch)"
        return f"{self.maps}, {keys}"


def cases(device: str, quick: bool):
    if device == "cuda":
        if quick:
            return [Case("citys-minibatch-small", 4, 256, 32, 64), Case("citys-memory-small", 4, 256, 32, 64, 19 * 216)]
        # Cityscapes: 8 crops of 512x1024 -> 64x128 maps; memory samples of 19 classes x 216
        # pixels and 19 x 54 regions per step (train_cirkd.py)
        return [Case("citys-minibatch", 8, 256, 64, 128), Case("citys-memory-pixels", 8, 256, 64, 128, 19 * 216),
                Case("citys-memory-regions", 8, 256, 64, 128, 19 * 54)]
    if quick:
        return [Case("citys-minibatch-quick", 2, 64, 8, 16), Case("citys-memory-quick", 2, 64, 8, 16, 19 * 32)]
    return [Case("citys-minibatch-cpu", 4, 128, 32, 64), Case("citys-memory-cpu", 4, 128, 16, 32, 19 * 256)]


SWEEP_PROVIDERS = ("naive", "ours-torch", "ours-triton")


def sweeps(device: str, quick: bool):
    """The mini-batch loss over the map size (H x 2H): the official pairs grow as (H·W)²."""
    if quick:
        return []
    base, sides = (Case("", 4, 256, 16, 32), [16, 32, 48, 64]) if device == "cuda" else \
        (Case("", 2, 64, 8, 16), [8, 12, 16, 24])
    return [replace(base, height=v, width=2 * v, name=f"sweep-map-{v}", sweep="map", x=v) for v in sides]


def make_inputs(case: Case, device: str, dtype: torch.dtype, seed: int):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    student, teacher = student_and_teacher(case, device, dtype, gen)
    if not case.memory:
        return student, teacher
    memory = F.normalize(torch.randn(case.memory, case.channels, generator=gen), dim=1).to(device, dtype)
    return student, teacher, memory


def providers(case: Case, device: str):
    tau = CONTRAST_TEMPERATURE * CONTRAST_KD_TEMPERATURE

    def official():
        if not case.memory:
            return lambda s, t: official_cirkd_minibatch_loss(s, t, MINIBATCH_TEMPERATURE)
        return lambda s, t, m: official_cirkd_memory_loss(s, t, m, CONTRAST_TEMPERATURE, CONTRAST_KD_TEMPERATURE)

    def ours(backend):
        if not case.memory:
            return lambda s, t: pixel_relation_loss(s, t, temperature=MINIBATCH_TEMPERATURE, backend=backend)
        return lambda s, t, m: pixel_relation_loss(s, t, m, temperature=tau, backend=backend) * CONTRAST_KD_TEMPERATURE ** 2

    def triton():
        require_triton(device)
        return ours("triton")

    return {"naive": official, "ours-torch": lambda: ours("torch"), "ours-triton": triton}
