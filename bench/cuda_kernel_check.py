"""One kernel of the CUDA backend, alone, on small problems against the float64 reference.

``make gpu-smoke`` runs this first on a GPU, one subprocess per kernel with its own short timeout,
so that a kernel that hangs, faults or computes wrongly costs seconds and is named, before the
op-level test groups (which run every kernel of an op together) start.

    python bench/cuda_kernel_check.py KERNEL      # KERNEL one of --list
    python bench/cuda_kernel_check.py --list
    python bench/cuda_kernel_check.py KERNEL --backend torch --device cpu   # the problems themselves

Each problem is chosen so that only the named kernel runs beyond the ones checked before it (the
TMA kernels first, on sm_90 GPUs, required (PCD_KERNELS_CUDA_TMA=1): forward, anchor backward,
key backward; then the cp.async kernels with PCD_KERNELS_CUDA_TMA=0; the forwards' checks run no
backward; the anchor kernels' ask for no key-side gradient; the key kernels' for no student gradient; attention's dK/dV and dQ kernels run apart), in float16 and
bfloat16: for pixel_contrastive in every negatives mode, with masks, C that is no multiple of 8
(padded operands) and C above 256 (gradient slices, chunked logits); for pixel_attention at odd
head dims and map sizes, cross-attention and several tiles.
The comparison is the test suite's (tests/_helpers.py ``check_against_reference``). Prints one
line per problem; exit 0 when every problem matched, 1 at the first mismatch.
"""
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

# (B, C, H, W, queue rows): one channel chunk of 64 with tile tails (81 pixels, C = 40 padded to
# 40, queue 100); and C = 300 (two chunks of 256, two gradient slices), 65 pixels, queue 70.
SHAPES = ((2, 40, 9, 9, 100), (1, 300, 5, 13, 70))
# The TMA forward takes one chunk (C <= 256): chunks of 64, 256 and 128 channels with 8 key tiles
# per block in "batch" mode, so that its ring of 3 (2 at 256 channels) stages turns more than twice
# (each mbarrier's phase returns to 0); 1 and 2 tiles ("none" mode without a queue, and with 50 rows: the
# tails after its loop); C = 160 in 256-channel tiles, whose last 64-channel box lies wholly past C.
TMA_SHAPES = ((2, 40, 9, 9, 300), (2, 200, 7, 11, 300), (1, 128, 8, 8, 400), (2, 160, 5, 7, 0), (1, 64, 4, 4, 50))
# The TMA backward kernels' ring has 4 stages: the key kernel streams anchors, 9 tiles of them per
# block at 544 pixels ("batch", and the queue's keys), 5 per image; 1 tile in an image of 16 pixels.
# C = 100: rows padded to 104 channels, the second 64-channel box partly past C.
TMA_BACKWARD_SHAPES = (*TMA_SHAPES, (2, 100, 17, 16, 70))
DTYPES = ("float16", "bfloat16")


def _contrastive(grads_by_mode, shapes=SHAPES):
    def check(dtype, backend, device):
        from test_pixel_contrastive import check_op, make_inputs

        for shape in shapes:
            for negatives, grads in grads_by_mode.items():
                yield f"negatives={negatives} shape={shape}", lambda: check_op(
                    backend, device, dtype, make_inputs(*shape, masked=True), grads=grads, negatives=negatives)
    return check


# pixel_attention: tests/test_pixel_attention.py's shapes (head dims 12, 20, 16, 32 and 128,
# cross-attention, a scale) and one of two tiles each way (90 queries, 88 keys).
ATTENTION_SHAPES = ((1, 64, 1, (9, 10), (11, 8), None),)


def _attention(grads):
    def check(dtype, backend, device):
        import torch
        from _helpers import check_against_reference
        from test_pixel_attention import SHAPES, make
        from pcd_kernels.reference import naive_pixel_attention

        for shape in (*SHAPES, *ATTENTION_SHAPES):
            inputs = make(shape)
            yield f"shape={shape}", lambda: check_against_reference(
                "pixel_attention", naive_pixel_attention, inputs, backend, device, dtype, grads=grads,
                weight=torch.randn_like(inputs[0]), names="qkv", out_dtype=dtype, plain_device="device",
                num_heads=shape[2], scale=shape[5])
    return check


# kernel -> the problems that run it: (student, teacher, queue) or (q, k, v) gradients asked for
# (per mode). Each pixel_contrastive kernel has two versions on an sm_90 GPU: *_tma_kernel (TMA,
# exps beside the MMAs) where one 256-channel chunk holds C, the default there; the cp.async one
# elsewhere, for C > 256, and with PCD_KERNELS_CUDA_TMA=0, which the checks after the TMA ones set
# so that each runs only the kernel it names beyond those already checked.
FORWARD = {"none": (False, False, False), "image": (False, False, False), "batch": (False, False, False)}
# "none" also writes the teacher's gradient from the anchor kernel
ANCHOR_BACKWARD = {"none": (True, True, False), "image": (True, False, False), "batch": (True, False, False)}
KEY_BACKWARD = {"none": (False, False, True), "image": (False, True, True), "batch": (False, True, True)}
KERNELS = {
    "pixel_contrastive.forward_tma_kernel": _contrastive(FORWARD, TMA_SHAPES),
    "pixel_contrastive.anchor_backward_tma_kernel": _contrastive(ANCHOR_BACKWARD, TMA_BACKWARD_SHAPES),
    "pixel_contrastive.key_backward_tma_kernel": _contrastive(KEY_BACKWARD, TMA_BACKWARD_SHAPES),
    "pixel_contrastive.forward_kernel": _contrastive(FORWARD),
    "pixel_contrastive.anchor_backward_kernel": _contrastive(ANCHOR_BACKWARD),
    "pixel_contrastive.key_backward_kernel": _contrastive(KEY_BACKWARD),
    "pixel_attention.forward_kernel": _attention((False, False, False)),
    # each after the delta kernel (rowsum(dO * O)), which every backward runs first
    "pixel_attention.backward_kernel(dK, dV)": _attention((False, True, True)),
    "pixel_attention.backward_kernel(dQ)": _attention((True, False, False)),
}


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python bench/cuda_kernel_check.py", description=__doc__.split("\n\n")[0])
    p.add_argument("kernel", nargs="?", choices=list(KERNELS))
    p.add_argument("--list", action="store_true", help="print the kernels")
    p.add_argument("--backend", default="cuda", help="run the same problems on another backend (default: cuda)")
    p.add_argument("--device", default="cuda", help="and device (default: cuda)")
    args = p.parse_args(argv)
    if args.list:
        print("\n".join(KERNELS))
        return 0
    if args.kernel is None:
        p.error("name a kernel (--list prints them)")
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("cuda_kernel_check: needs a CUDA device", file=sys.stderr)
        return 2
    if args.backend == "cuda" and args.kernel.endswith("_tma_kernel"):
        if torch.cuda.get_device_capability()[0] != 9:
            print(f"skip {args.kernel}: the TMA kernels run on sm_90 GPUs only, this is "
                  f"{torch.cuda.get_device_name()}", flush=True)
            return 0
        os.environ["PCD_KERNELS_CUDA_TMA"] = "1"  # required: an error where it cannot run, not the other kernel
    elif args.backend == "cuda":
        os.environ["PCD_KERNELS_CUDA_TMA"] = "0"  # (the extension reads it at each launch)
    for dtype_name in DTYPES:
        dtype = getattr(torch, dtype_name)
        for label, problem in KERNELS[args.kernel](dtype, args.backend, args.device):
            started = time.perf_counter()
            try:
                problem()
                if args.device == "cuda":
                    torch.cuda.synchronize()
            except Exception as error:  # the mismatch or the CUDA error, named, then stop
                print(f"FAIL {args.kernel} {dtype_name} {label}: {type(error).__name__}: {error}", flush=True)
                return 1
            print(f"ok   {args.kernel} {dtype_name} {label} ({time.perf_counter() - started:.2f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
