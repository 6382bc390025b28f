"""Benchmark cases and providers for ``pixel_contrastive_loss``.

Every provider computes the same loss from the same inputs; the naive baselines are imported from
``pcd_kernels.reference`` (the test suite's ground truth), so they cannot drift from what is tested.

FLOPs: a forward pass costs 2*N*K*C (one multiply-add per anchor, key and channel); the backward
for the student recomputes the logits (2*N*K*C) and forms p @ keys (2*N*K*C). Forward + backward
is counted as 6*N*K*C, N = anchors, K = keys per anchor (whatever an implementation does beyond
that is its own overhead).

Exps: one exponential per anchor-key logit, N*K in the forward and again in the backward's
recompute (bench/model.py turns FLOPs, exps and bytes into a bound on the time).

Bytes: each input read once and each output written once, in the input dtype (e the element
size): forward e*(2*N*C + Q*C) + 4*N (student and teacher maps, Q queue rows; the per-anchor
float32 loss), backward e*(3*N*C + Q*C) + 4*N (the maps and queue again, the per-anchor state,
the student's gradient written).
"""
import os
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from common import MapCase, Unavailable, by_mode, cuda_extension_reason, require_triton, student_and_teacher
from pcd_kernels import pixel_contrastive_loss
from pcd_kernels.reference import naive_pixel_contrastive_loss, official_pcd_loss

OP = "pixel_contrastive_loss"
TEMPERATURE = 0.2


@dataclass(frozen=True)
class Case(MapCase):
    negatives: str
    queue: int
    sweep: str = ""  # the size this case varies, in a sweep ("" for a fixed case)
    x: int = 0  # that size's value

    @property
    def anchors(self) -> int:
        return self.batch * self.height * self.width

    @property
    def keys(self) -> int:
        pixels = {"none": 1, "image": self.height * self.width, "batch": self.anchors}[self.negatives]
        return pixels + self.queue

    def flops(self, mode: str) -> int:
        per_pass = 2 * self.anchors * self.keys * self.channels
        return by_mode(mode, per_pass, 2 * per_pass)

    def exps(self, mode: str) -> int:
        per_pass = self.anchors * self.keys
        return by_mode(mode, per_pass, per_pass)

    def bytes_moved(self, mode: str, element_size: int) -> int:
        maps, queue = self.anchors * self.channels, self.queue * self.channels
        return by_mode(mode, element_size * (2 * maps + queue) + 4 * self.anchors,
                       element_size * (3 * maps + queue) + 4 * self.anchors)

    def describe(self) -> str:
        return f"{self.negatives}: {self.maps} K={self.queue} (N={self.anchors}, keys/anchor={self.keys})"


def cases(device: str, quick: bool):
    if device == "cuda":
        if quick:
            return [Case("pcd-small", 8, 128, 32, 32, "none", 8192)]
        return [
            # The GPU target: 32,768 anchors, 65,536 queue keys, C=256.
            Case("pcd-target", 32, 256, 32, 32, "none", 65536),
            Case("in-batch", 8, 256, 64, 64, "batch", 0),
            Case("in-image", 8, 256, 64, 64, "image", 0),
        ]
    if quick:
        return [Case("pcd-quick", 2, 64, 16, 16, "none", 8192)]
    # The CPU target (torch backend within 1.5x of naive time, <300 MB extra), and a
    # smaller in-batch case.
    return [Case("pcd-cpu", 4, 64, 32, 32, "none", 65536),
            Case("in-batch-cpu", 2, 64, 32, 32, "batch", 4096)]


# Sweeps run these providers only: each torch.compile'd rival would recompile for every size.
SWEEP_PROVIDERS = ("naive", "ours-torch", "ours-triton", "ours-cuda")


def sweeps(device: str, quick: bool):
    """Cases that vary one size at a time: N (anchors, through the batch), K (queue keys), C, and
    the map side (in-batch negatives, where the keys grow with the map)."""
    def vary(base, axis, field, values, x=None):
        value = x or (lambda case: getattr(case, field))
        cases = [replace(base, **{field: v}) for v in values]
        return [replace(case, name=f"sweep-{axis}-{value(case)}", sweep=axis, x=value(case)) for case in cases]

    anchors = lambda case: case.anchors
    if quick:
        small = Case("", 1, 32, 8, 8, "none", 1024)
        return vary(small, "K", "queue", [1024, 4096])
    if device == "cuda":
        base, in_batch = Case("", 8, 256, 32, 32, "none", 65536), Case("", 2, 256, 16, 16, "batch", 0)
        n, k, c = [2, 4, 8, 16, 32], [8192, 16384, 32768, 65536, 131072], [64, 128, 256, 512]
        sides = [16, 32, 48, 64, 96]
    else:
        base, in_batch = Case("", 2, 64, 16, 16, "none", 16384), Case("", 1, 64, 16, 16, "batch", 0)
        n, k, c, sides = [1, 2, 4, 8], [4096, 16384, 65536], [32, 64, 128, 256], [16, 24, 32, 48]
    square = [replace(in_batch, height=v, width=v) for v in sides]
    return (vary(base, "N", "batch", n, anchors) + vary(base, "K", "queue", k) + vary(base, "C", "channels", c)
            + [replace(case, name=f"sweep-map-{case.height}", sweep="map", x=case.height) for case in square])


def make_inputs(case: Case, device: str, dtype: torch.dtype, seed: int):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    student, teacher = student_and_teacher(case, device, dtype, gen)
    queue = F.normalize(torch.randn(case.queue, case.channels, generator=gen), dim=1).to(device, dtype)
    return student, teacher, queue


def _naive(case):
    if case.negatives == "none":
        # the official PCD code, with its (C, K) queue buffer
        return lambda s, t, q: official_pcd_loss(s, t, q.t(), TEMPERATURE)
    return lambda s, t, q: naive_pixel_contrastive_loss(
        s, t, q if case.queue else None, negatives=case.negatives, temperature=TEMPERATURE)


def _ours(case, backend):
    # (the torch backend accumulates in float32 whatever the input dtype: on CUDA it is a
    # memory-bounded fallback, not a fast path)
    return lambda s, t, q: pixel_contrastive_loss(
        s, t, q if case.queue else None, negatives=case.negatives, temperature=TEMPERATURE, backend=backend)


def _flex(case, device):
    """FlexAttention with return_lse=True: the logsumexp over keys without the logit matrix,
    loss = lse - positive (logaddexp with the positive for "none"). Only the lse is used, so the
    values are a 16-wide zero tensor (C-wide where a torch version wants equal head dims)."""
    if device != "cuda":
        raise Unavailable("FlexAttention has no backward on CPU (and no return_lse under compile)")
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    flex = torch.compile(flex_attention, dynamic=False)
    hw = case.height * case.width
    block_mask = None
    if case.negatives == "image":
        n = case.anchors
        block_mask = create_block_mask(lambda b, h, q, k: (q // hw) == (k // hw), None, None, n, n,
                                       device=device)

    value_dim = [16]

    def attend(query, keys):
        value = keys.new_zeros(1, 1, keys.shape[0], value_dim[0])
        return flex(query, keys[None, None], value, block_mask=block_mask, scale=1.0 / TEMPERATURE,
                    return_lse=True)[1]

    def loss(s, t, q):
        s_hat = F.normalize(s.permute(0, 2, 3, 1).reshape(-1, case.channels), dim=1)
        t_hat = F.normalize(t.permute(0, 2, 3, 1).reshape(-1, case.channels), dim=1)
        pos = (s_hat * t_hat).sum(1).float() / TEMPERATURE
        keys = t_hat if case.negatives in ("batch", "image") else None
        if case.queue:
            keys = q if keys is None else torch.cat([keys, q])
        try:
            lse = attend(s_hat[None, None], keys)
        except Exception:
            if value_dim[0] == case.channels:
                raise
            value_dim[0] = case.channels
            lse = attend(s_hat[None, None], keys)
        lse = lse[0, 0].float()
        if case.negatives == "none":
            lse = torch.logaddexp(lse, pos)
        loss.notes["value_dim"] = value_dim[0]  # C-wide values do about twice the work
        return (lse - pos).mean()

    loss.notes = {}
    return loss


def providers(case: Case, device: str):
    """name -> factory() returning loss_fn(student, teacher, queue), or raising Unavailable."""
    def triton():
        require_triton(device)
        return _ours(case, "triton")

    def cuda():
        reason = cuda_extension_reason(device)
        if reason is not None:
            raise Unavailable(reason)
        return _ours(case, "cuda")

    def cuda_cp_async():
        """The CUDA backend with its cp.async kernels: PCD_KERNELS_CUDA_TMA=0 (read by the extension
        at each launch) from here on, through every forward and backward of the provider's steps
        (bench/run.py run_provider restores the environment after it): beside ours-cuda, what the
        TMA kernels gain on sm_90."""
        loss = cuda()
        os.environ["PCD_KERNELS_CUDA_TMA"] = "0"
        return loss

    return {
        "naive": lambda: _naive(case),
        "naive+compile": lambda: torch.compile(_naive(case)),
        "ours-torch": lambda: _ours(case, "torch"),
        "ours-triton": triton,
        "ours-cuda": cuda,
        "ours-cuda-cp.async": cuda_cp_async,
        "flex-attention": lambda: _flex(case, device),
    }
