"""Triton kernels for ``omni_contrastive_loss`` (Af-DCD, DESIGN.md 3.2).

The maps arrive packed as (patches, dims, samples): every patch's samples (position n, group m)
with one dimension of all of them contiguous. Inside a patch every anchor sample meets every key
sample, so a program holds a whole (anchor tile x all samples) block of L1 distances in registers,
built one dimension at a time from two contiguous vectors: CUDA-core work, no tensor cores, and no
(pairs x dims) buffer anywhere.

* ``_forward_kernel``: distances, logits -|s - t|_1 / tau over the allowed keys (the positive and
  every sample of another group), logsumexp, per-sample loss and lse2.
* ``_backward_kernel``: recomputes the block, weights w_ij = g_i (p_ij - [i = j]), then per
  dimension d/ds_i = -sum_j w_ij sign(s_i - t_j) / tau for its anchors; with KEY_SIDE the
  transposed block (all anchors x a tile of keys), per dimension d/dt_j = +sum_i (same).

Modelled bound (bench/model.py; not measured): 3 CUDA-core instructions per sample pair and
dimension forward, 6 backward, at an H200's plain fp32 instruction rate (33.5 T/s); the Cityscapes
case (16 x 2048 x 64 x 128, pool 4) then takes at least 1.2 ms for both passes, about twice its
memory time.

Each gradient element has exactly one writer: deterministic, no atomics.
"""
import torch
import triton
import triton.language as tl

from pcd_kernels._conventions import logit_scale
from pcd_kernels.backends.triton._common import LN2, device_guard, is_interpreter

# Elements of the (tile x samples) block a program keeps in registers; the tile of anchors (or
# keys) is this divided by the padded number of samples per patch.
BLOCK_ELEMENTS = 8192
INTERPRETER_BLOCK_ELEMENTS = 4096
# A program holds a (tile x samples) block of distances in registers: past this many samples per
# patch the tile would be a single row and spill.
MAX_SAMPLES = 4096


def limits(*, dtype, auto, samples, patch_size, groups):
    if samples > MAX_SAMPLES:
        return (f"takes up to {MAX_SAMPLES} samples per patch (patch positions x groups), got "
                f"{patch_size[0]}x{patch_size[1]} x {groups} = {samples}; use backend='torch'")
    return None


@triton.jit
def _distances(S, T, base, anchors, a_ok, keys, k_ok, D, SAMPLES,
               BLOCK_A: tl.constexpr, BLOCK_K: tl.constexpr):
    """L1 distances (BLOCK_A, BLOCK_K) between anchor samples of S and key samples of T."""
    dist = tl.zeros((BLOCK_A, BLOCK_K), tl.float32)
    for d in range(D):
        row = base + d * SAMPLES
        s = tl.load(S + row + anchors, mask=a_ok, other=0.0).to(tl.float32)
        t = tl.load(T + row + keys, mask=k_ok, other=0.0).to(tl.float32)
        dist += tl.abs(s[:, None] - t[None, :])
    return dist


@triton.jit
def _logits2(dist, anchors, a_ok, keys, k_ok, GROUPS, logit_scale):
    """Base-2 logits over the allowed keys (the positive, or another group), -inf elsewhere."""
    allowed = ((keys[None, :] % GROUPS) != (anchors[:, None] % GROUPS)) | (keys[None, :] == anchors[:, None])
    allowed = allowed & k_ok[None, :] & a_ok[:, None]
    return tl.where(allowed, -dist * logit_scale, float("-inf")), allowed


@triton.jit
def _forward_kernel(S, T, loss_ptr, lse_ptr, D, SAMPLES, GROUPS, logit_scale,
                    BLOCK_A: tl.constexpr, SAMPLES_BLOCK: tl.constexpr):
    patch = tl.program_id(0).to(tl.int64)
    anchors = tl.program_id(1) * BLOCK_A + tl.arange(0, BLOCK_A)
    a_ok = anchors < SAMPLES
    keys = tl.arange(0, SAMPLES_BLOCK)
    k_ok = keys < SAMPLES
    base = patch * D * SAMPLES
    dist = _distances(S, T, base, anchors, a_ok, keys, k_ok, D, SAMPLES, BLOCK_A, SAMPLES_BLOCK)
    logits, _ = _logits2(dist, anchors, a_ok, keys, k_ok, GROUPS, logit_scale)
    # every existing anchor has its positive among the allowed keys, so the max is finite
    m = tl.max(logits, 1)
    m = tl.where(a_ok, m, 0.0)
    lse2 = m + tl.log2(tl.sum(tl.exp2(logits - m[:, None]), 1))
    positive = tl.sum(tl.where(keys[None, :] == anchors[:, None], logits, 0.0), 1)
    out = patch * SAMPLES + anchors
    tl.store(loss_ptr + out, (lse2 - positive) * LN2, mask=a_ok)
    tl.store(lse_ptr + out, lse2, mask=a_ok)  # base 2, what the backward kernels read


@triton.jit
def _weights(dist, anchors, a_ok, keys, k_ok, GROUPS, logit_scale, lse2, g):
    """w_ij = g_i (p_ij - [i = j]) over allowed pairs, 0 elsewhere."""
    logits, allowed = _logits2(dist, anchors, a_ok, keys, k_ok, GROUPS, logit_scale)
    p = tl.exp2(logits - lse2[:, None])
    p = tl.where(keys[None, :] == anchors[:, None], p - 1.0, p)
    return tl.where(allowed, p * g[:, None], 0.0)


@triton.jit
def _sign(x):
    return tl.where(x > 0, 1.0, tl.where(x < 0, -1.0, 0.0))


@triton.jit
def _backward_weights(S, T, lse_ptr, grad_ptr, patch, anchors, a_ok, keys, k_ok, D, SAMPLES, GROUPS, logit_scale,
                      BLOCK_A: tl.constexpr, BLOCK_K: tl.constexpr):
    """w_ij of these anchors and keys (see _weights), their distances recomputed."""
    lse2 = tl.load(lse_ptr + patch * SAMPLES + anchors, mask=a_ok, other=0.0)
    g = tl.load(grad_ptr + patch * SAMPLES + anchors, mask=a_ok, other=0.0)
    dist = _distances(S, T, patch * D * SAMPLES, anchors, a_ok, keys, k_ok, D, SAMPLES, BLOCK_A, BLOCK_K)
    return _weights(dist, anchors, a_ok, keys, k_ok, GROUPS, logit_scale, lse2, g)


@triton.jit
def _signed_weights(w, S, T, row, anchors, a_ok, keys, k_ok):
    """w_ij sign(s_i - t_j) in one dimension (``row`` its offset): d distance_ij / d s_i."""
    s = tl.load(S + row + anchors, mask=a_ok, other=0.0).to(tl.float32)
    t = tl.load(T + row + keys, mask=k_ok, other=0.0).to(tl.float32)
    return w * _sign(s[:, None] - t[None, :])


@triton.jit
def _backward_kernel(S, T, lse_ptr, grad_ptr, OUT, D, SAMPLES, GROUPS, logit_scale, inv_temperature,
                     BLOCK: tl.constexpr, SAMPLES_BLOCK: tl.constexpr, KEY_SIDE: tl.constexpr):
    """A tile of anchors against every key (the student's gradient, d/ds_i = -sum_j ...), or with
    KEY_SIDE a tile of keys against every anchor (the teacher's, d/dt_j = +sum_i ...), into OUT."""
    patch = tl.program_id(0).to(tl.int64)
    tile = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    every = tl.arange(0, SAMPLES_BLOCK)
    if KEY_SIDE:
        anchors, keys = every, tile
        w = _backward_weights(S, T, lse_ptr, grad_ptr, patch, anchors, anchors < SAMPLES, keys, keys < SAMPLES, D,
                              SAMPLES, GROUPS, logit_scale, SAMPLES_BLOCK, BLOCK)
    else:
        anchors, keys = tile, every
        w = _backward_weights(S, T, lse_ptr, grad_ptr, patch, anchors, anchors < SAMPLES, keys, keys < SAMPLES, D,
                              SAMPLES, GROUPS, logit_scale, BLOCK, SAMPLES_BLOCK)
    for d in range(D):
        row = patch * D * SAMPLES + d * SAMPLES
        signed = _signed_weights(w, S, T, row, anchors, anchors < SAMPLES, keys, keys < SAMPLES)
        if KEY_SIDE:
            grad = tl.sum(signed, 0) * inv_temperature
        else:
            grad = -tl.sum(signed, 1) * inv_temperature
        tl.store(OUT + row + tile, grad.to(OUT.dtype.element_ty), mask=tile < SAMPLES)


def samples_block(samples: int) -> int:
    return triton.next_power_of_2(samples)


def tile(samples: int) -> int:
    """Anchors (or keys) per program: the (tile x padded samples) block fits BLOCK_ELEMENTS."""
    budget = INTERPRETER_BLOCK_ELEMENTS if is_interpreter() else BLOCK_ELEMENTS
    return max(1, min(samples_block(samples), budget // samples_block(samples)))


def _launch_options():
    return {} if is_interpreter() else {"num_warps": 8, "num_stages": 2}


def forward(student, teacher, groups, temperature):
    """Per-sample loss (natural log) and lse2 (base 2), (patches, samples) float32 each."""
    P, D, K = student.shape
    student, teacher = student.contiguous(), teacher.contiguous()
    loss = torch.empty((P, K), dtype=torch.float32, device=student.device)
    lse2 = torch.empty_like(loss)
    if loss.numel() == 0:
        return loss, lse2
    block = tile(K)
    with device_guard(student):
        _forward_kernel[(P, triton.cdiv(K, block))](
            student, teacher, loss, lse2, D, K, groups, logit_scale(temperature),
            BLOCK_A=block, SAMPLES_BLOCK=samples_block(K), **_launch_options())
    return loss, lse2


def backward(grad_loss, student, teacher, lse2, groups, temperature, needs_student, needs_teacher):
    """Gradients of sum(grad_loss * loss) for the packed maps (None where not needed)."""
    P, D, K = student.shape
    student, teacher = student.contiguous(), teacher.contiguous()
    grad_loss = grad_loss.to(torch.float32).contiguous()
    grad_s = torch.empty_like(student) if needs_student else None
    grad_t = torch.empty_like(teacher) if needs_teacher else None
    if P * K == 0:
        return (grad_s.zero_() if grad_s is not None else None,
                grad_t.zero_() if grad_t is not None else None)
    block = tile(K)
    args = (student, teacher, lse2, grad_loss)
    scales = (D, K, groups, logit_scale(temperature), 1.0 / temperature)
    with device_guard(student):
        if grad_s is not None:
            _backward_kernel[(P, triton.cdiv(K, block))](
                *args, grad_s, *scales, BLOCK=block, SAMPLES_BLOCK=samples_block(K), KEY_SIDE=False,
                **_launch_options())
        if grad_t is not None:
            _backward_kernel[(P, triton.cdiv(K, block))](
                *args, grad_t, *scales, BLOCK=block, SAMPLES_BLOCK=samples_block(K), KEY_SIDE=True,
                **_launch_options())
    return grad_s, grad_t


# ----------------------------------------------------------------------------------------------
# Ahead-of-time compilation (bench/kernels.py's SASS report, tests/test_triton_aot.py)
# ----------------------------------------------------------------------------------------------

# The SASS report's launches (bench/kernels.py): Cityscapes' 128 dims per group.
AOT_REPRESENTATIVE = [dict()]


def aot_launches(dtype, dims=128, samples=256, groups=16):
    """omni_contrastive_loss's kernels: the forward and the backward for each side, anchors (the
    student's gradient) and keys (the teacher's). One launch configuration each: candidates (0, 0,
    warps, stages), no tiles to choose."""
    packed = torch.empty(8, dims, samples, dtype=dtype)
    per_sample = torch.empty(8, samples)
    blocks = dict(SAMPLES_BLOCK=samples_block(samples))
    scales = (dims, samples, groups, logit_scale(0.07))
    backward = (packed, packed, per_sample, per_sample, packed, *scales, 1 / 0.07)
    options = _launch_options()
    config = [(0, 0, options["num_warps"], options["num_stages"])]
    return [(f"omni_contrastive.{name}", f"dims={dims}", fn, args, constexprs, config)
            for name, fn, args, constexprs in (
                ("forward", _forward_kernel, (packed, packed, per_sample, per_sample, *scales),
                 dict(blocks, BLOCK_A=tile(samples))),
                ("anchor", _backward_kernel, backward, dict(blocks, BLOCK=tile(samples), KEY_SIDE=False)),
                ("key", _backward_kernel, backward, dict(blocks, BLOCK=tile(samples), KEY_SIDE=True)))]
