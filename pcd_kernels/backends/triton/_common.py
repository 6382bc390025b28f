"""What every op's Triton kernels share: base-2 constants, the tile loads of (rows, C) matrices, the
interpreter check, the device guard, the autotune switch, the matmul precision,
and the launch machinery (candidate lists -> one autotuned launcher per list, the interpreter's
fixed small blocks). One op's kernels live in ``backends/triton/<op>.py`` and import from here;
no op module imports another."""
import contextlib
import os
import zlib

import torch
import triton
import triton.language as tl

from pcd_kernels._conventions import LN2 as _LN2
from pcd_kernels._conventions import pixel_rows

LOG2E = tl.constexpr(1.0 / _LN2)
LN2 = tl.constexpr(_LN2)
# A finite "minus infinity" for running maxima, so that a tile whose keys are all masked gives
# exp2(-inf - m) = 0 instead of exp2(-inf + inf) = NaN.
MAX_INIT = tl.constexpr(-1.0e30)
# Within a tile the kernels address rows with 32-bit offsets (load_chunk).
INT32_OFFSETS = 2 ** 31
# Rows of up to 512 bytes (C <= 256 in 16-bit, C <= 128 in float32) are one tile: the anchor
# tile stays on chip across all key tiles. Wider rows go in 256-byte chunks (128 / 64 channels),
# which keeps the pipelined tiles within shared memory; the backward then recomputes the logits
# once per output chunk.
SINGLE_TILE_MAX_BYTES = 512
CHUNK_BYTES = 256
# The interpreter runs every program in numpy: narrow channel tiles keep CI fast and exercise the
# channel loop.
INTERPRETER_MAX_BLOCK_C = 32


@triton.jit
def load_chunk(X, start, rows, ok, s_r, s_c, c_start, C, BLOCK_C: tl.constexpr):
    """(rows, BLOCK_C) tile of channels [c_start, c_start + BLOCK_C) of a row matrix; 0 outside.
    rows = start + arange: the tile's first row is a 64-bit scalar offset and the rest 32-bit
    offsets within the tile (the host keeps those below 2**31). 64-bit offsets per element cost
    two registers each and, computed once for the loads before and after the key loop, spilled."""
    cols = c_start + tl.arange(0, BLOCK_C)
    ptrs = (X + tl.cast(start, tl.int64) * s_r) + ((rows - start)[:, None] * s_r + cols[None, :] * s_c)
    return tl.load(ptrs, mask=ok[:, None] & (cols < C)[None, :], other=0.0)


@triton.jit
def row_block(start, end, valid_ptr, HAS_MASK: tl.constexpr, BLOCK: tl.constexpr):
    """Rows [start, start + BLOCK), which exist (< end) and which are valid (existing and, with
    HAS_MASK, marked valid in the byte mask)."""
    rows = start + tl.arange(0, BLOCK)
    r_in = rows < end
    r_ok = r_in
    if HAS_MASK:
        r_ok = r_ok & (tl.load(valid_ptr + rows, mask=r_in, other=0) != 0)
    return rows, r_in, r_ok


@triton.jit
def dot_rows(x0, X, x_start, x_rows, x_ok, x_sr, x_sc, y0, Y, y_start, y_rows, y_ok, y_sr, y_sc, C,
             BLOCK_C: tl.constexpr, C_TILES: tl.constexpr, PRECISION: tl.constexpr):
    """(rows of X) . (rows of Y) over all C channels, float32; x0 and y0 are the first chunks."""
    acc = tl.dot(x0, tl.trans(y0), input_precision=PRECISION)
    for ci in range(1, C_TILES):
        x = load_chunk(X, x_start, x_rows, x_ok, x_sr, x_sc, ci * BLOCK_C, C, BLOCK_C)
        y = load_chunk(Y, y_start, y_rows, y_ok, y_sr, y_sc, ci * BLOCK_C, C, BLOCK_C)
        acc = tl.dot(x, tl.trans(y), acc, input_precision=PRECISION)
    return acc


@triton.jit
def accumulate_rows(acc, w, x0, X, start, rows, ok, s_r, s_c, inv, c_start, C, NORMALIZE: tl.constexpr,
                    SCALE_WEIGHTS: tl.constexpr, BLOCK_C: tl.constexpr, C_TILES: tl.constexpr,
                    PRECISION: tl.constexpr):
    """acc + w @ x_hat over channels [c_start, c_start + BLOCK_C) of the rows of X: a backward
    kernel's second MMA. x0 is the rows' first chunk, which is the whole row when C_TILES == 1.
    With NORMALIZE, w is divided by the rows' norms (``inv``; one multiply per weight, the raw tile
    feeds the MMA) unless not SCALE_WEIGHTS: float16, where a zero row's 1/||x|| = 1e12 would
    overflow the weights, normalises the tile in registers instead (a zero row's tile is 0)."""
    if C_TILES == 1:
        x = x0
    else:
        x = load_chunk(X, start, rows, ok, s_r, s_c, c_start, C, BLOCK_C)
    if NORMALIZE:
        if SCALE_WEIGHTS:
            w = w * inv[None, :]
        else:
            x = (x.to(tl.float32) * inv[:, None]).to(X.dtype.element_ty)
    return tl.dot(w.to(x.dtype), x, acc, input_precision=PRECISION)


@triton.jit
def through_normalization(grad, dot_hat, X, start, rows, r_in, s_r, s_c, inv, proj_ptr, C, c_start,
                          WIDE_OFFSETS: tl.constexpr, BLOCK_C: tl.constexpr):
    """A gradient G (rows, BLOCK_C) with respect to x_hat = x / max(||x||, eps), taken to x: inv G -
    proj (x_hat . G) x, with ``dot_hat`` = x_hat . G accumulated in the kernel's loop (the
    backends' projection_scales gives proj). WIDE_OFFSETS reads x with 64-bit offsets per element:
    the key kernels' epilogues do, because with load_chunk's the compiler would keep the offsets
    of the tile loaded before their loop alive across it to reuse them here, and spill."""
    if WIDE_OFFSETS:
        cols = c_start + tl.arange(0, BLOCK_C)
        x = tl.load(X + rows.to(tl.int64)[:, None] * s_r + cols.to(tl.int64)[None, :] * s_c,
                    mask=r_in[:, None] & (cols < C)[None, :], other=0.0)
    else:
        x = load_chunk(X, start, rows, r_in, s_r, s_c, c_start, C, BLOCK_C)
    proj = tl.load(proj_ptr + rows, mask=r_in, other=0.0)
    return inv[:, None] * grad - (proj * dot_hat)[:, None] * x.to(tl.float32)


@triton.jit
def store_rows(OUT, grad, start, rows, r_in, r_ok, C, c_start, BLOCK_C: tl.constexpr):
    """Channels [c_start, c_start + BLOCK_C) of rows' gradients into a row-major (rows, C) buffer,
    0 at rows that are not ok (masked: their values, NaN included, must reach nothing)."""
    grad = tl.where(r_ok[:, None], grad, 0.0)
    cols = c_start + tl.arange(0, BLOCK_C)
    out = (OUT + start.to(tl.int64) * C) + ((rows - start)[:, None] * C + cols[None, :])
    tl.store(out, grad.to(OUT.dtype.element_ty), mask=r_in[:, None] & (cols < C)[None, :])


@triton.jit
def store_gradient(OUT, acc, d, g, inv_temperature, X, start, rows, r_in, r_ok, s_r, s_c, inv_ptr, proj_ptr, C,
                   c_start, NORMALIZE: tl.constexpr, WIDE_OFFSETS: tl.constexpr, BLOCK_C: tl.constexpr):
    """The epilogue of a backward kernel: rows' gradient g * acc / temperature (g per row, or one
    number for all), through the normalisation when NORMALIZE (x_hat . G = g * d * ln 2, with d
    the loop's sum of weights times base-2 logits), stored by store_rows."""
    g = tl.zeros_like(d) + g
    grad = (g * inv_temperature)[:, None] * acc
    if NORMALIZE:
        inv = tl.load(inv_ptr + rows, mask=r_in, other=0.0)
        grad = through_normalization(grad, g * d * LN2, X, start, rows, r_in, s_r, s_c, inv, proj_ptr, C, c_start,
                                     WIDE_OFFSETS, BLOCK_C)
    store_rows(OUT, grad, start, rows, r_in, r_ok, C, c_start, BLOCK_C)


def is_interpreter() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1 at import)."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(load_chunk, InterpretedFunction)


def device_guard(t):
    """Launch on ``t``'s device, whatever the current one."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def autotune_enabled() -> bool:
    """PCD_KERNELS_AUTOTUNE=0 keeps every kernel's first candidate (the test suite sets it)."""
    return os.environ.get("PCD_KERNELS_AUTOTUNE", "1") != "0"


def tf32_allowed() -> bool:
    """Whether the user allowed TF32 for float32 matmuls, through either of torch's APIs."""
    try:
        return bool(torch.backends.cuda.matmul.allow_tf32)
    except RuntimeError:  # torch >= 2.9 refuses the legacy flag once fp32_precision was set
        return torch.backends.cuda.matmul.fp32_precision == "tf32"


def matmul_precision(dtype) -> str:
    """tl.dot's input precision: float32 inputs use TF32 tensor cores only when the user allowed
    it for matmuls; "ieee" multiplies on CUDA cores."""
    if dtype == torch.float32 and not tf32_allowed():
        return "ieee"
    return "tf32"


def tune_key(flags, *sizes) -> int:
    """One autotuning bucket per kernel variant (its constexpr flags) and per power-of-two size
    range: re-tune when a size changes by more than 2x, not on every new batch shape."""
    variant = sorted(flags.items()), [int(s).bit_length() for s in sizes]
    # crc32, not hash(): string hashes change between processes, and Triton specialises
    # integer arguments by value (== 1, divisible by 16).
    return zlib.crc32(repr(variant).encode()) & 0x7FFFFFFF


def block_c(channels: int, element_size: int) -> int:
    """Channels per tile (a power of two, at least 16 for tl.dot)."""
    if is_interpreter():
        return max(16, min(triton.next_power_of_2(channels), INTERPRETER_MAX_BLOCK_C))
    if channels * element_size <= SINGLE_TILE_MAX_BYTES:
        return max(16, triton.next_power_of_2(channels))
    return CHUNK_BYTES // element_size


def pixel_matrix(x):
    """(B, C, H, W) map -> contiguous (B*H*W, C) rows: a view for channels_last maps."""
    return pixel_rows(x).contiguous()


def largest_tile(config_lists, interpreter_blocks) -> int:
    """The most rows any candidate, or the interpreter, puts in one tile."""
    rows = [max(c[0], c[1]) for lists in config_lists for cands in lists.values() for c in cands]
    return max(rows + list(interpreter_blocks.values()))


def int32_tile_offsets(rows, tile_rows: int):
    """Key rows whose offsets within a tile (up to ``tile_rows`` rows, all channels) fit in 32
    bits, as load_chunk reads them: the rows themselves, or a contiguous copy when they do not
    (only a queue of more than 2**31 / C rows passed transposed, as the official (C, K) buffer's
    .t())."""
    span = (tile_rows - 1) * rows.stride(0) + (rows.shape[1] - 1) * rows.stride(1)
    return rows if span < INT32_OFFSETS else rows.contiguous()


class Launchers:
    """The launchers of one op's kernels. ``candidates(kind, flags, tiles)`` gives a launch's
    (BLOCK_M, BLOCK_N, num_warps, num_stages) list; each distinct list gets one autotuner over it
    (keyed on ``tune_on``), built on first use, with only the first candidate under
    PCD_KERNELS_AUTOTUNE=0. The interpreter runs the plain kernel with ``interpreter_blocks``."""

    def __init__(self, kernels, candidates, tune_on, interpreter_blocks):
        self.kernels, self.candidates = kernels, candidates
        self.tune_on, self.interpreter_blocks = list(tune_on), dict(interpreter_blocks)
        self._tuned = {}

    def launch(self, call):
        if is_interpreter():
            self.kernels[call.kind][call.grid](*call.args, **call.flags, **self.interpreter_blocks)
            return
        candidates = tuple(self.candidates(call.kind, call.flags, call.tiles))
        key = (call.kind, candidates)
        if key not in self._tuned:
            configs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
                       for bm, bn, w, s in candidates]
            configs = configs if autotune_enabled() else configs[:1]
            self._tuned[key] = triton.autotune(configs=configs, key=self.tune_on)(self.kernels[call.kind])
        self._tuned[key][call.grid](*call.args, **call.flags)


class KernelCall:
    """One kernel launch: which kernel, its arguments, constexpr flags and grid, and ``tiles``,
    whatever else its candidate list depends on. ``bench/kernels.py`` and the AOT tests compile
    these without launching them."""

    def __init__(self, launchers: Launchers, kind, args, flags, grid, tiles=None):
        self.launchers, self.kind, self.args, self.flags, self.grid, self.tiles = \
            launchers, kind, args, flags, grid, tiles

    @property
    def kernel(self):
        return self.launchers.kernels[self.kind]

    def candidates(self):
        """Every autotuning candidate of this launch (whatever PCD_KERNELS_AUTOTUNE says)."""
        return list(self.launchers.candidates(self.kind, self.flags, self.tiles))

    def launch(self):
        self.launchers.launch(self)
