"""python bench/kernels.py --arch 90a --out DIR: every Triton kernel x autotune candidate x dtype,
compiled ahead of time for a GPU architecture on any machine (no GPU), with what its SASS shows.

Writes DIR/kernels.json, a list with one object per compiled configuration: ``kernel``, ``dtype``,
``config`` [BLOCK_M, BLOCK_N, num_warps, num_stages], ``variant`` (the flags that select the
code), ``cubin`` (its path under DIR), ``registers``, ``stack_bytes``, ``shared_bytes``, and
``instructions``: counts of HGMMA, HMMA, MUFU.EX2, LDGSTS, UTMALDG, LDL and STL in the whole kernel
and in its main loop, and EX2_UNDER_MMA, the exps issued while a warpgroup MMA is in flight
(pcd_kernels/backends/triton/_aot.py). Then it prints a table and, with ``--check``,
exits 1 when a 16-bit configuration spills (stack or local memory), a configuration does not fit
the chip's shared memory, or a multiplying kernel in 16 bits or TF32 on sm_90a has no HGMMA. CI runs it
(tests/test_triton_aot.py).

This shows what the compiler made, not how fast it runs: that needs a GPU (make gpu-smoke).
"""
import argparse
import concurrent.futures
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED_LIMIT = {90: 227 * 1024, 80: 163 * 1024}
DTYPES = ("bfloat16", "float16", "float32")


def infonce_launches(dtype, channels=256, negatives="none", masked=False):
    """(kernel, variant, fn, args, constexprs, candidates) of every pixel_contrastive_loss kernel
    for these flags: 4 maps of 16x16 and a queue of 4,096 rows."""
    import torch

    from pcd_kernels.backends.triton import pixel_contrastive as pc

    B, H, W, K, C = 4, 16, 16, 4096, channels
    s = torch.empty(B, C, H, W, dtype=dtype)
    mask = torch.ones(B, H, W, dtype=torch.bool) if masked else None
    inp = pc._Inputs(s, torch.empty_like(s), torch.empty(K, C, dtype=dtype), None, mask, None, negatives, 0.2, True)
    loss = torch.empty(B, H, W)
    rows = torch.empty(B * H * W, C, dtype=dtype)
    calls = [pc.forward_call(inp, loss, loss),
             pc.anchor_backward_call(inp, loss, loss, loss.reshape(-1), rows),
             pc.key_backward_call(inp, loss, loss.reshape(-1), torch.ones(1), torch.empty(K, C, dtype=dtype), False)]
    if negatives == "none":
        calls.append(pc.anchor_backward_call(inp, loss, loss, loss.reshape(-1), rows, teacher_positives=True))
    else:
        calls.append(pc.key_backward_call(inp, loss, loss.reshape(-1), torch.ones(1), rows, True))
    return [(f"pixel_contrastive.{call.kind}" + ("[teacher keys]" if call.flags.get("KEYS_ARE_TEACHER") else "")
             + ("[teacher]" if call.flags.get("TEACHER_POSITIVES") else ""),
             f"negatives={negatives}", call.kernel, call.args, call.flags, call.candidates()) for call in calls]


def relation_launches(dtype, channels=256, keys=0, masked=False, teacher_channels=None):
    """pixel_relation_loss's kernels: cross-image over 4 maps of 16x16 (keys=0), or against a
    (keys, C) memory."""
    import torch

    from pcd_kernels.backends.triton import pixel_relation as pr

    B, H, W = 4, 16, 16
    s = torch.empty(B, channels, H, W, dtype=dtype)
    t = torch.empty(B, teacher_channels or channels, H, W, dtype=dtype)
    memory = torch.empty(keys, channels, dtype=dtype) if keys else None
    mask = torch.ones(B, H, W, dtype=torch.bool) if masked else None
    inp = pr._Inputs(s, t, memory, mask, 0.5, True)
    values = torch.empty(B, H, W)
    lse = torch.empty(pr.saved_shape(s, memory))
    g = values.reshape(-1)
    rows = torch.empty(B * H * W, channels, dtype=dtype)
    calls = [pr.forward_call(inp, values, lse), pr.anchor_backward_call(inp, lse, g, rows),
             pr.key_backward_call(inp, lse, g, torch.ones(1), memory if keys else rows)]
    variant = f"keys={keys}" if keys else "cross-image" + (f", teacher C={teacher_channels}" if teacher_channels else "")
    return [(f"pixel_relation.{call.kind}", variant, call.kernel, call.args, call.flags, call.candidates())
            for call in calls]


def attention_launches(dtype, head_dim, heads):
    """pixel_attention's kernels on q, k, v as channel slices of one fused projection (what
    MHSA2d passes), 2 maps of 64x64."""
    import torch

    from pcd_kernels.backends.triton import pixel_attention as pa

    qkv = torch.empty(2, 3 * heads * head_dim, 4096, dtype=dtype)[:, :heads * head_dim]
    out = torch.empty(2, heads * head_dim, 4096, dtype=dtype)
    lse = torch.empty(2 * heads, 4096)
    calls = [pa.forward_call(qkv, qkv, qkv, out, lse, heads, head_dim ** -0.5)]
    calls += pa.backward_calls(out, qkv, qkv, qkv, lse, lse, out, out, out, heads, head_dim ** -0.5)
    return [(f"pixel_attention.{call.kind}", f"head_dim={head_dim}", call.kernel, call.args, call.flags,
             call.candidates()) for call in calls]


def omni_launches(dtype, dims=128, samples=256, groups=16):
    """omni_contrastive_loss's kernels: the forward and the backward for each side, anchors (the
    student's gradient) and keys (the teacher's). One launch configuration each: candidates (0, 0,
    warps, stages), no tiles to choose."""
    import torch

    from pcd_kernels.backends.triton import omni_contrastive as oc
    from pcd_kernels.backends.triton._common import logit_scale

    packed = torch.empty(8, dims, samples, dtype=dtype)
    per_sample = torch.empty(8, samples)
    blocks = dict(SAMPLES_BLOCK=oc.samples_block(samples))
    scales = (dims, samples, groups, logit_scale(0.07))
    backward = (packed, packed, per_sample, per_sample, packed, *scales, 1 / 0.07)
    options = oc._launch_options()
    config = [(0, 0, options["num_warps"], options["num_stages"])]
    return [(f"omni_contrastive.{name}", f"dims={dims}", fn, args, constexprs, config)
            for name, fn, args, constexprs in (
                ("forward", oc._forward_kernel, (packed, packed, per_sample, per_sample, *scales),
                 dict(blocks, BLOCK_A=oc.tile(samples))),
                ("anchor", oc._backward_kernel, backward, dict(blocks, BLOCK=oc.tile(samples), KEY_SIDE=False)),
                ("key", oc._backward_kernel, backward, dict(blocks, BLOCK=oc.tile(samples), KEY_SIDE=True)))]


# Each op's launches (op module -> (dtype, *sizes and flags) -> launches).
LAUNCHES = {"pixel_contrastive": infonce_launches, "pixel_relation": relation_launches,
            "pixel_attention": attention_launches, "omni_contrastive": omni_launches}
# Each op's launches at representative sizes and flags (op module -> dtype -> launches): the
# InfoNCE with a queue (negatives="none") and with teacher keys (negatives="batch", masked), CIRKD's
# relation loss across images (masked) and against a memory, attention at head dims 32 and 64, Af-DCD.
REPRESENTATIVE = {
    "pixel_contrastive": lambda dtype: (infonce_launches(dtype, 256, "none")
                                        + infonce_launches(dtype, 256, "batch", masked=True)),
    "pixel_relation": lambda dtype: (relation_launches(dtype, 256, masked=True)
                                     + relation_launches(dtype, 256, keys=4104)),
    "pixel_attention": lambda dtype: attention_launches(dtype, 32, 8) + attention_launches(dtype, 64, 4),
    "omni_contrastive": omni_launches,
}


def triton_ops():
    """The module names of the ops of the registry (pcd_kernels.backends.OPS) with a Triton backend."""
    from common import registry

    return [op.module for op in registry().values() if "triton" in op.backends]


def launches(dtype_name: str):
    """Every kernel the library launches: the representative launches of each op with a Triton
    backend."""
    import torch

    dtype = getattr(torch, dtype_name)
    return [launch for op in triton_ops() for launch in REPRESENTATIVE[op](dtype)]


def compile_candidate(fn, args, constexprs, candidate, arch, cubin_path=None, sass=True):
    """compile_launch for one (BLOCK_M, BLOCK_N, warps, stages) candidate; (0, 0, ...) has no tiles."""
    from pcd_kernels.backends.triton._aot import compile_launch

    bm, bn, warps, stages = candidate
    tiles = {"BLOCK_M": bm, "BLOCK_N": bn} if bm else {}
    return compile_launch(fn, args, dict(constexprs, **tiles), arch, warps, stages, cubin_path, sass=sass)


def _compile_all(job):
    """One dtype's kernels, in a worker process: every candidate of every launch."""
    arch, dtype_name, tf32, out_dir, only, first = job
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ["PCD_KERNELS_AUTOTUNE"] = "1"  # list every candidate (0 keeps only the first)
    sys.path.insert(0, str(ROOT))
    import torch

    torch.backends.cuda.matmul.allow_tf32 = tf32
    label = dtype_name + ("+tf32" if tf32 else "")
    reports = []
    for kernel, variant, fn, args, constexprs, candidates in launches(dtype_name):
        if only and not any(name in kernel for name in only):
            continue
        for bm, bn, warps, stages in candidates[:1] if first else candidates:
            config = [bm, bn, warps, stages] if bm else [warps, stages]
            slug = "".join(c if c.isalnum() else "_" for c in f"{kernel}_{variant}_{label}_{config}")
            cubin = Path(out_dir) / "cubins" / f"{slug}.cubin"
            entry = {"kernel": kernel, "variant": variant, "dtype": label, "config": config,
                     "cubin": str(cubin.relative_to(out_dir)), "arch": f"sm_{arch}{'a' if arch == 90 else ''}"}
            try:
                usage = compile_candidate(fn, args, constexprs, (bm, bn, warps, stages), arch, str(cubin))
            except Exception as error:  # a candidate that does not compile is itself a finding
                reports.append(dict(entry, error=f"{type(error).__name__}: {str(error)[:300]}"))
                continue
            reports.append(dict(entry, **usage))
    return reports


def problems(reports, arch: int):
    """What --check fails on, one line each."""
    found = []
    for r in reports:
        name = f"{r['kernel']} ({r['variant']}, {r['dtype']}, {r['config']})"
        if "error" in r:
            found.append(f"{name}: does not compile: {r['error']}")
            continue
        sixteen_bit = r["dtype"] in ("bfloat16", "float16")
        if sixteen_bit and (r["stack_bytes"] or r["local_bytes"] or r["instructions"]["kernel"]["LDL"]):
            found.append(f"{name}: spills ({r['stack_bytes']} B stack, {r['instructions']['kernel']['LDL']} LDL)")
        if r["shared_bytes"] > SHARED_LIMIT[arch]:
            found.append(f"{name}: {r['shared_bytes']} B of shared memory, more than {SHARED_LIMIT[arch]}")
        # Af-DCD's kernels and the teacher gradient of negatives="none" (no key loop) multiply nothing.
        multiplies = not (r["kernel"].startswith("omni_contrastive") or r["kernel"].endswith("[teacher]"))
        tensor_cores = sixteen_bit or r["dtype"].endswith("+tf32")
        if arch == 90 and tensor_cores and multiplies and not r["instructions"]["kernel"]["HGMMA"]:
            found.append(f"{name}: no HGMMA (warpgroup MMA) on sm_90a")
    return found


def table(reports) -> str:
    lines = ["| kernel | variant | dtype | config | regs | stack B | smem KB | HGMMA | HMMA | EX2 | LDGSTS | "
             "UTMALDG | LDL/STL | main loop: HGMMA, EX2 (under MMA), LDL/STL |", "|" + "---|" * 14]
    for r in reports:
        if "error" in r:
            lines.append(f"| {r['kernel']} | {r['variant']} | {r['dtype']} | {r['config']} | error: "
                         f"{r['error'][:80]} |" + " |" * 9)
            continue
        k, m = r["instructions"]["kernel"], r["instructions"]["main_loop"] or {}
        loop = (f"{m.get('HGMMA', 0)}, {m.get('MUFU.EX2', 0)} ({m.get('EX2_UNDER_MMA', 0)}), "
                f"{m.get('LDL', 0)}/{m.get('STL', 0)}") if m else "—"
        lines.append(f"| {r['kernel']} | {r['variant']} | {r['dtype']} | {r['config']} | {r['registers']} | "
                     f"{r['stack_bytes']} | {r['shared_bytes'] / 1024:.1f} | {k['HGMMA']} | {k['HMMA']} | "
                     f"{k['MUFU.EX2']} | {k['LDGSTS']} | {k['UTMALDG']} | {k['LDL']}/{k['STL']} | {loop} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python bench/kernels.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="90a", choices=("90a", "80"), help="(default: %(default)s)")
    p.add_argument("--out", required=True, help="folder for kernels.json and the cubins")
    p.add_argument("--dtypes", nargs="+", default=list(DTYPES) + ["float32+tf32"],
                   choices=list(DTYPES) + ["float32+tf32"])
    p.add_argument("--kernels", nargs="+", default=None, help="only kernels whose name contains one of these")
    p.add_argument("--first", action="store_true", help="only each kernel's first candidate (what "
                   "PCD_KERNELS_AUTOTUNE=0 and the test suite run)")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 2)
    p.add_argument("--check", action="store_true", help="exit 1 on a spill, an oversized or an HGMMA-less "
                   "configuration (see problems())")
    args = p.parse_args(argv)
    arch = int(args.arch.rstrip("a"))
    out = Path(args.out).resolve()
    (out / "cubins").mkdir(parents=True, exist_ok=True)
    jobs = [(arch, d.split("+")[0], d.endswith("+tf32"), str(out), args.kernels, args.first) for d in args.dtypes]
    with concurrent.futures.ProcessPoolExecutor(max_workers=min(args.jobs, len(jobs))) as pool:
        reports = [r for batch in pool.map(_compile_all, jobs) for r in batch]
    (out / "kernels.json").write_text(json.dumps(reports, indent=1))
    print(table(reports))
    found = problems(reports, arch)
    print(f"\n{len(reports)} configurations compiled for sm_{args.arch}; wrote {out / 'kernels.json'}")
    for line in found:
        print(f"problem: {line}")
    return 1 if args.check and found else 0


if __name__ == "__main__":
    sys.exit(main())
