"""Benchmark cases and providers for ``pixel_attention`` and the ``MHSA2d`` module.

Kernel level: q, k, v are (B, C, H, W) maps as a 1x1-conv projection produces them. Rivals are
the eager softmax attention (``pcd_kernels.reference.naive_pixel_attention``, which builds the
(H*W x H*W) matrix), ``torch.compile`` of it, and ``F.scaled_dot_product_attention`` pinned to each of its backends,
called with the reshapes, permutes and copies a user has to write around it
(``pcd_kernels/backends/torch/pixel_attention.py``), plus SDPA-flash on inputs already in its
(B, heads, H*W, d) layout, copied outside the timing: the kernel alone.

Module level: ``MHSA2d`` (fused 1x1-conv QKV, attention, 1x1-conv projection, residual) with
its attention done by ours, by each SDPA backend (with the permutes) or eagerly.

FLOPs: attention forward 4*B*L*Lk*C (two matmuls of 2*B*heads*L*Lk*d, C = heads*d), backward
2.5x the forward (five matmuls, flash-attention's convention; the recomputation is not counted),
total 3.5x. The module adds its 1x1 convolutions, 2*B*L*C*4C forward and twice that backward.

Exps: one per query-key score and head, B*heads*L*Lk forward and again in the backward's recompute.

Bytes: each input read once and each output written once (e the element size, L = H*W):
attention forward e*4*B*L*C (q, k, v read, the output written), backward e*8*B*L*C (q, k, v,
output and its gradient read, three gradients written); the module adds its convolutions' maps,
e*6*B*L*C forward (x read, q/k/v written, the attention output read, y written) and twice that
backward.
"""
from dataclasses import dataclass, replace

import torch

import common
from common import MapCase, Unavailable, by_mode, cuda_extension_reason
from pcd_kernels import MHSA2d, pixel_attention
from pcd_kernels._conventions import attention_heads
from pcd_kernels.backends.torch.pixel_attention import attention as sdpa_pixel_attention
from pcd_kernels.reference import naive_pixel_attention

OP = "pixel_attention"
TENSOR_CORES = True
COMPILE_MAX_PIXELS = 64 * 64
SDPA_BACKENDS = {"flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION",
                 "cudnn": "CUDNN_ATTENTION", "math": "MATH"}


@dataclass(frozen=True)
class Case(MapCase):
    heads: int = 8
    module: bool = False
    sweep: str = ""  # the size this case varies, in a sweep ("" for a fixed case)
    x: int = 0  # that size's value

    @property
    def op_name(self) -> str:
        return "MHSA2d" if self.module else OP

    @property
    def pixels(self) -> int:
        return self.height * self.width

    def flops(self, mode: str) -> int:
        attention = 4 * self.batch * self.pixels ** 2 * self.channels
        convs = 2 * self.batch * self.pixels * self.channels * 4 * self.channels if self.module else 0
        return int(by_mode(mode, attention + convs, 2.5 * attention + 2 * convs))

    def exps(self, mode: str) -> int:
        per_pass = self.batch * self.heads * self.pixels ** 2
        return by_mode(mode, per_pass, per_pass)

    def bytes_moved(self, mode: str, element_size: int) -> int:
        maps = self.batch * self.pixels * self.channels
        forward = 4 * maps + (6 * maps if self.module else 0)
        backward = 8 * maps + (12 * maps if self.module else 0)
        return element_size * by_mode(mode, forward, backward)

    def describe(self) -> str:
        what = "MHSA2d forward+backward" if self.module else "attention q, k, v"
        return f"{what}: {self.maps} {self.heads} heads x {self.channels // self.heads} dims"


def cases(device: str, quick: bool):
    if device == "cuda":
        if quick:
            return [Case("attn-32x32-quick", 4, 256, 32, 32), Case("mhsa-32x32-quick", 4, 256, 32, 32, module=True)]
        return [Case("attn-32x32", 32, 256, 32, 32), Case("attn-64x64", 8, 256, 64, 64),
                Case("attn-128x128", 2, 256, 128, 128), Case("attn-256x256", 1, 256, 256, 256),
                Case("mhsa-64x64", 8, 256, 64, 64, module=True),
                Case("mhsa-128x128", 2, 256, 128, 128, module=True)]
    if quick:
        return [Case("attn-quick", 1, 32, 12, 12, heads=2), Case("mhsa-quick", 1, 32, 12, 12, heads=2, module=True)]
    return [Case("attn-cpu-32x32", 2, 64, 32, 32, heads=4), Case("attn-cpu-64x64", 1, 64, 64, 64, heads=4),
            Case("mhsa-cpu-32x32", 2, 64, 32, 32, heads=4, module=True)]


# Sweeps run these providers only: each torch.compile'd rival would recompile for every size.
SWEEP_PROVIDERS = ("naive", "sdpa-flash", "ours-torch", "ours-triton", "ours-cuda")


def sweeps(device: str, quick: bool):
    """Attention cases that vary the map side (pixels grow with its square) and the head dim (C
    over 8 heads on CUDA, 4 on CPU)."""
    if quick:
        return []
    if device == "cuda":
        sides, base, channels = [32, 64, 96, 128, 192], Case("", 1, 256, 64, 64), [128, 256, 512, 1024]
    else:
        sides, base, channels = [16, 24, 32, 48], Case("", 1, 64, 24, 24, heads=4), [32, 64, 128, 256]
    maps = [replace(base, height=v, width=v, name=f"sweep-map-{v}", sweep="map", x=v) for v in sides]
    dims = [replace(base, channels=c, name=f"sweep-d-{c // base.heads}", sweep="d", x=c // base.heads)
            for c in channels]
    return maps + dims


def make_inputs(case: Case, device: str, dtype: torch.dtype, seed: int):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    shape = (case.batch, case.channels, case.height, case.width)
    if case.module:
        return (torch.randn(shape, generator=gen).to(device, dtype).requires_grad_(),)
    # q, k, v as channel slices of one projection output, the layout MHSA2d hands over
    qkv = torch.randn(case.batch, 3 * case.channels, case.height, case.width, generator=gen)
    return tuple(x.requires_grad_() for x in qkv.to(device, dtype).chunk(3, dim=1))


def _sdpa_context(name: str, device: str):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = getattr(SDPBackend, SDPA_BACKENDS[name], None)
    if backend is None:
        raise Unavailable(f"this torch ({torch.__version__}) has no SDPA backend {SDPA_BACKENDS[name]}")
    if device == "cpu" and name in ("efficient", "cudnn"):
        raise Unavailable(f"SDPA's {name} backend runs on CUDA only")
    return lambda: sdpa_kernel(backend)


def _with_context(fn, context):
    def run(*inputs):
        with context():
            return fn(*inputs)

    return run


class _EagerAttention(MHSA2d):
    """MHSA2d with the attention a user writes eagerly (softmax over the full matrix)."""

    def attention(self, q, k, v):
        return naive_pixel_attention(q, k, v, self.num_heads)


def providers(case: Case, device: str):
    def triton_reason():
        return common.triton_reason(device)

    def module(cls=MHSA2d, backend="torch", context=None):
        torch.manual_seed(0)  # the same weights for every provider
        block = cls(case.channels, case.heads, backend=backend).to(device)
        call = block if context is None else _with_context(block, context)

        def run(x):
            if block.qkv.weight.dtype != x.dtype:  # the parameters in the benchmark's dtype
                block.to(x.dtype)
            return call(x)

        run.zero_grad = lambda: block.zero_grad(set_to_none=True)
        run.parameters = block.parameters
        return run

    def kernel(fn, context=None):
        run = lambda q, k, v: fn(q, k, v)
        return run if context is None else _with_context(run, context)

    def naive():
        if case.module:
            return module(_EagerAttention)
        return kernel(lambda q, k, v: naive_pixel_attention(q, k, v, case.heads))

    def naive_compiled():
        # what torch.compile makes of the eager code (inductor may match it to SDPA)
        if case.pixels > COMPILE_MAX_PIXELS:
            raise Unavailable(f"not run above {COMPILE_MAX_PIXELS} pixels: compiling it takes most of "
                              "a 10-minute GPU slot, and the eager matrix it starts from is the limit")
        if case.module:
            run = module(_EagerAttention)
            compiled = torch.compile(run)
            compiled.zero_grad, compiled.parameters = run.zero_grad, run.parameters
            return compiled
        return torch.compile(lambda q, k, v: naive_pixel_attention(q, k, v, case.heads))

    def sdpa(name):
        def make():
            context = _sdpa_context(name, device)
            if case.module:
                return module(context=context)
            scale = (case.channels // case.heads) ** -0.5
            return kernel(lambda q, k, v: sdpa_pixel_attention(q, k, v, case.heads, scale), context)

        return make

    def sdpa_flash_prepermuted():
        if case.module:
            raise Unavailable("kernel-level only: the module's input is a map")
        context = _sdpa_context("flash", device)
        fn = _with_context(lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(q, k, v), context)
        fn.prepare = lambda inputs: tuple(attention_heads(x.detach(), case.heads).contiguous().requires_grad_()
                                          for x in inputs)
        map_shape = (case.batch, case.channels, case.height, case.width)
        fn.grad_output = lambda make: attention_heads(make(map_shape), case.heads).contiguous()
        return fn

    def ours_triton():
        reason = triton_reason()
        if reason is not None:
            raise Unavailable(reason)
        if case.module:
            return module(backend="triton")
        return kernel(lambda q, k, v: pixel_attention(q, k, v, num_heads=case.heads, backend="triton"))

    def ours_cuda():
        reason = cuda_extension_reason(device)
        if reason is not None:
            raise Unavailable(reason)
        if case.module:
            return module(backend="cuda")
        return kernel(lambda q, k, v: pixel_attention(q, k, v, num_heads=case.heads, backend="cuda"))

    out = {"naive": naive, "naive+compile": naive_compiled}
    out.update({f"sdpa-{name}": sdpa(name) for name in SDPA_BACKENDS})
    if not case.module:
        out["sdpa-flash-prepermuted"] = sdpa_flash_prepermuted
        out["ours-torch"] = lambda: kernel(lambda q, k, v: pixel_attention(q, k, v, num_heads=case.heads,
                                                                           backend="torch"))
    out["ours-triton"] = ours_triton
    out["ours-cuda"] = ours_cuda
    return out
