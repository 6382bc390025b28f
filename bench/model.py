"""A model of each op's least GPU time, from the work it must do and the device's ceilings.

Three ceilings bound a fused kernel of this library:
- the tensor cores: the op's matrix FLOPs (each case's ``flops``) at the dense bf16/fp16 rate (an op
  that does not multiply on tensor cores, ``TENSOR_CORES = False``, at the plain fp32 instruction
  rate: half the datasheet's fp32 FLOP rate, which counts a fused multiply-add as two, while such
  an op's FLOPs are counted one per instruction);
- the exponentials: each softmax term costs one ``ex2`` on the multi-function unit (MUFU), 16 per
  clock per SM on Hopper (each case's ``exps``: forward, and again in the backward's recompute);
- the memory: each case's ``bytes_moved`` at the HBM bandwidth.

Within one warpgroup the exponentials wait for the MMA that produced their logits and the next
MMA waits for them, so without ping-pong scheduling of two warpgroups (FlashAttention-3's) the
two add up. The modelled bound is therefore the serial one, ``max(tensor + exp, memory)``: what a
kernel that does not overlap its exps with its MMAs cannot beat (this library's Triton kernels do
not; bench/kernels.py shows each wgmma waited on before the exps). It is not a hard floor: two
resident programs per SM, or warp specialisation, overlap them, down to ``overlapped_ms`` =
``max(tensor, exp, memory)``, so a kernel that overlaps (SDPA's flash backend) can exceed 100 % of
it. "% of peak at the bound" is the tensor-core time over the serial bound, the best share of the
bf16 peak a serial kernel can show. A result is printed as "% of bound" (bound / measured) beside
"% of peak".

The device's figures: the H200's datasheet, replaced by what bench/run.py measured at start (its
matmul rate, copy bandwidth and SM count) when given; the MUFU rate assumes Hopper's 16 exps per
clock per SM at 1.98 GHz, on any GPU. ``python bench/model.py`` prints the bound of every
headline case on an H200.
"""
import dataclasses
import sys
from pathlib import Path
from typing import Dict, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))


@dataclasses.dataclass(frozen=True)
class Device:
    name: str
    sms: int
    clock_ghz: float  # boost clock, the rate the MUFU figure assumes
    bf16_tflops: float  # dense tensor-core rate
    fp32_tflops: float  # plain (CUDA-core) fp32 rate
    memory_gbps: float
    exps_per_clock_per_sm: int = 16  # Hopper's MUFU.EX2 throughput

    @property
    def exps_per_s(self) -> float:
        return self.exps_per_clock_per_sm * self.sms * self.clock_ghz * 1e9

    def measured(self, roofline: Optional[Dict]) -> "Device":
        """The same device with bench/run.py's measured matmul rate and copy bandwidth."""
        if not roofline or roofline.get("matmul_dtype") not in ("bfloat16", "float16"):
            return self
        return dataclasses.replace(self, bf16_tflops=roofline["matmul_tflops"], memory_gbps=roofline["copy_gbps"],
                                   sms=roofline.get("sms", self.sms))


# NVIDIA's H200 SXM datasheet (the H100's compute, HBM3e); 1.98 GHz was read on one here.
H200 = Device("NVIDIA H200", sms=132, clock_ghz=1.98, bf16_tflops=989.4, fp32_tflops=66.9, memory_gbps=4800.0)


def bound(flops: float, exps: float, bytes_moved: float, device: Device = H200, tensor_cores: bool = True) -> Dict:
    """Times in ms of each ceiling, the serial bound and the overlapped one, and the share of the peak
    a serial kernel at the bound shows."""
    rate = (device.bf16_tflops if tensor_cores else device.fp32_tflops / 2) * 1e12
    tensor_ms = flops / rate * 1e3
    exp_ms = exps / device.exps_per_s * 1e3
    memory_ms = bytes_moved / (device.memory_gbps * 1e9) * 1e3
    bound_ms = max(tensor_ms + exp_ms, memory_ms)
    return {"tensor_ms": tensor_ms, "exp_ms": exp_ms, "memory_ms": memory_ms, "bound_ms": bound_ms,
            "overlapped_ms": max(tensor_ms, exp_ms, memory_ms),
            "peak_share_at_bound": tensor_ms / bound_ms if bound_ms > 0 else None,
            "limit": "memory" if memory_ms > tensor_ms + exp_ms else ("compute + exp" if exp_ms else "compute")}


def case_bound(op_module, case, mode: str = "total", element_size: int = 2, device: Device = H200) -> Dict:
    return bound(case.flops(mode), case.exps(mode), case.bytes_moved(mode, element_size), device,
                 getattr(op_module, "TENSOR_CORES", True))


def table(device: Device = H200) -> str:
    from common import op_modules

    lines = [f"Modelled bound on an {device.name} (bf16 {device.bf16_tflops:.0f} TFLOP/s, "
             f"{device.exps_per_s / 1e12:.2f} T exp/s, {device.memory_gbps / 1e3:.1f} TB/s), forward + backward:", "",
             "| op | case | GFLOP | G exp | MB | tensor ms | exp ms | memory ms | bound ms | % of peak at the bound |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for op in op_modules().values():
        for case in op.cases("cuda", quick=False):
            b = case_bound(op, case, device=device)
            share = "—" if not getattr(op, "TENSOR_CORES", True) else f"{100 * b['peak_share_at_bound']:.0f}"
            lines.append(f"| {getattr(case, 'op_name', op.OP)} | {case.name} | {case.flops('total') / 1e9:.0f} | "
                         f"{case.exps('total') / 1e9:.1f} | {case.bytes_moved('total', 2) / 1e6:.0f} | "
                         f"{b['tensor_ms']:.3f} | {b['exp_ms']:.3f} | {b['memory_ms']:.3f} | {b['bound_ms']:.3f} | "
                         f"{share} |")
    return "\n".join(lines)


# Bytes per element of the student, teacher and queue that the CUDA backend's host spends on its
# operands per pass (backends/cuda/pixel_contrastive.py ``_operand``: the norms read the input, the
# product reads it again and writes the copy: 2 + 2 + 2 in 16 bits), in the forward and again in the
# backward.
CUDA_PREPARATION_BYTES_PER_ELEMENT = 6
TMA_MAX_CHANNELS = 256  # the TMA kernels (forward_tma_kernel, *_backward_tma_kernel): one channel chunk


def cuda_contrastive_bound(case, device: Device = H200) -> Dict:
    """The CUDA backend's bound for a pixel_contrastive_loss case, forward + backward, plus the
    host's operand preparation at the HBM bandwidth. Where its TMA kernels run (sm_90, C <= 256)
    each tile's exps run beside the next tile's S wgmma: the forward, whose MMAs are all S, at its
    overlapped bound; each backward kernel's product (half its MMAs: S, then the weights times the
    tile) still waits for the exps, so the backward at ``tensor / 2 + max(tensor / 2, exp)``
    (bench results permitting). Elsewhere both are serial. Returns the parts in ms, the
    preparation in GB and ``bound_ms`` with its share of the peak."""
    forward = bound(case.flops("forward"), case.exps("forward"), case.bytes_moved("forward", 2), device)
    backward = bound(case.flops("backward"), case.exps("backward"), case.bytes_moved("backward", 2), device)
    tma = case.channels <= TMA_MAX_CHANNELS
    elements = 2 * case.anchors * case.channels + case.queue * case.channels
    preparation = 2 * CUDA_PREPARATION_BYTES_PER_ELEMENT * elements
    preparation_ms = preparation / (device.memory_gbps * 1e9) * 1e3
    forward_ms = forward["overlapped_ms"] if tma else forward["bound_ms"]
    half = backward["tensor_ms"] / 2
    backward_ms = max(half + max(half, backward["exp_ms"]), backward["memory_ms"]) if tma else backward["bound_ms"]
    total = forward_ms + backward_ms + preparation_ms
    return {"forward_ms": forward_ms, "backward_ms": backward_ms, "preparation_gb": preparation / 1e9,
            "preparation_ms": preparation_ms, "bound_ms": total, "tma": tma,
            "peak_share_at_bound": (forward["tensor_ms"] + backward["tensor_ms"]) / total}


def cuda_table(device: Device = H200) -> str:
    """pixel_contrastive_loss's GPU cases: the serial bound (the Triton kernels') beside the CUDA
    backend's (:func:`cuda_contrastive_bound`)."""
    import pixel_contrastive

    lines = ["pixel_contrastive_loss, forward + backward: the serial bound (Triton) and the CUDA backend's:", "",
             "| case | serial bound ms (% of peak) | CUDA forward ms | CUDA backward ms | preparation GB | "
             "CUDA bound ms (% of peak) |",
             "|---|---:|---:|---:|---:|---:|"]
    for case in pixel_contrastive.cases("cuda", quick=False):
        serial, cuda = case_bound(pixel_contrastive, case, device=device), cuda_contrastive_bound(case, device)
        lines.append(f"| {case.name} | {serial['bound_ms']:.3f} ({100 * serial['peak_share_at_bound']:.0f}) | "
                     f"{cuda['forward_ms']:.3f}{'' if cuda['tma'] else ' (serial)'} | "
                     f"{cuda['backward_ms']:.3f}{'' if cuda['tma'] else ' (serial)'} | {cuda['preparation_gb']:.2f} | "
                     f"{cuda['bound_ms']:.3f} ({100 * cuda['peak_share_at_bound']:.0f}) |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table())
    print()
    print(cuda_table())
