"""python bench/kernels.py --arch 90a --out DIR: every Triton kernel x autotune candidate x dtype,
compiled ahead of time for a GPU architecture on any machine (no GPU), with what its SASS shows.

Writes DIR/kernels.json, a list with one object per compiled configuration: ``kernel``, ``dtype``,
``config`` [BLOCK_M, BLOCK_N, num_warps, num_stages], ``variant`` (the flags that select the
code), ``cubin`` (its path under DIR), ``registers``, ``stack_bytes``, ``shared_bytes``, and
``instructions``: counts of HGMMA, HMMA, MUFU.EX2, LDGSTS, UTMALDG, LDL and STL in the whole kernel
and in its main loop (pcd_kernels/triton/_aot.py). Then it prints a table and, with ``--check``,
exits 1 when a 16-bit configuration spills (stack or local memory), a configuration does not fit
the chip's shared memory, or a 16-bit multiplying kernel on sm_90a has no HGMMA. CI runs it
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


def launches(dtype_name: str):
    """(kernel, variant, fn, args, constexprs, candidates) for every kernel the library launches,
    at representative sizes and flags: the InfoNCE with a queue (negatives="none") and with
    pixel keys (negatives="batch", masked), attention at head dims 32 and 64, Af-DCD."""
    import math

    import torch

    from pcd_kernels.triton import omni_contrastive as oc
    from pcd_kernels.triton import pixel_attention as pa
    from pcd_kernels.triton import pixel_contrastive as pc

    dtype = getattr(torch, dtype_name)
    out = []
    B, H, W, K, C = 4, 16, 16, 4096, 256
    for negatives, masked in (("none", False), ("batch", True)):
        s = torch.empty(B, C, H, W, dtype=dtype)
        q = torch.empty(K, C, dtype=dtype)
        inp = pc._Inputs(s, torch.empty_like(s), q, None, torch.ones(B, H, W, dtype=torch.bool) if masked else None,
                         None, negatives, 0.2, True)
        loss = torch.empty(B, H, W)
        rows = torch.empty(B * H * W, C, dtype=dtype)
        calls = [pc.forward_call(inp, loss, loss),
                 pc.anchor_backward_call(inp, loss, loss, loss.reshape(-1), rows, rows if negatives == "none" else None),
                 pc.key_backward_call(inp, loss, loss.reshape(-1), torch.ones(1), torch.empty(K, C, dtype=dtype),
                                      False)]
        if negatives != "none":
            calls.append(pc.key_backward_call(inp, loss, loss.reshape(-1), torch.ones(1), rows, True))
        for call in calls:
            name = f"pixel_contrastive.{call.kind}" + ("[pixel keys]" if call.flags.get("KEYS_ARE_PIXELS") else "")
            out.append((name, f"negatives={negatives}", pc._KERNELS[call.kind], call.args, call.flags,
                        pc.gpu_configs(call.kind, call.flags["PRECISION"])))
    for head_dim, heads in ((32, 8), (64, 4)):
        qkv = torch.empty(2, 3 * heads * head_dim, 4096, dtype=dtype)[:, :heads * head_dim]
        o = torch.empty(2, heads * head_dim, 4096, dtype=dtype)
        lse = torch.empty(2 * heads, 4096)
        calls = [pa.forward_call(qkv, qkv, qkv, o, lse, heads, head_dim ** -0.5)]
        calls += pa.backward_calls(o, qkv, qkv, qkv, lse, lse, o, o, o, heads, head_dim ** -0.5)
        for call in calls:
            out.append((f"pixel_attention.{call.kind}", f"head_dim={head_dim}", pa._KERNELS[call.kind], call.args,
                        call.flags, pa.gpu_configs(call.kind, head_dim, call.element_size, call.flags["PRECISION"])))
    dims, samples, groups = 128, 256, 16
    packed = torch.empty(8, dims, samples, dtype=dtype)
    per_sample = torch.empty(8, samples)
    blocks = dict(SAMPLES_BLOCK=oc.samples_block(samples))
    scales = (dims, samples, groups, 1.0 / (0.07 * math.log(2.0)))
    options = oc._launch_options()
    config = [(0, 0, options["num_warps"], options["num_stages"])]
    for fn, args, constexprs in (
            (oc._forward_kernel, (packed, packed, per_sample, per_sample, *scales),
             dict(blocks, BLOCK_A=oc.tile(samples))),
            (oc._anchor_backward_kernel, (packed, packed, per_sample, per_sample, packed, *scales, 1 / 0.07),
             dict(blocks, BLOCK_A=oc.tile(samples))),
            (oc._key_backward_kernel, (packed, packed, per_sample, per_sample, packed, *scales, 1 / 0.07),
             dict(blocks, BLOCK_K=oc.tile(samples)))):
        out.append((f"omni_contrastive.{fn.__name__.strip('_')}", f"dims={dims}", fn, args, constexprs, config))
    return out


def _compile_all(job):
    """One dtype's kernels, in a worker process: every candidate of every launch."""
    arch, dtype_name, tf32, out_dir, only, first = job
    os.environ.pop("TRITON_INTERPRET", None)
    sys.path.insert(0, str(ROOT))
    import torch

    from pcd_kernels.triton._aot import compile_launch

    torch.backends.cuda.matmul.allow_tf32 = tf32
    label = dtype_name + ("+tf32" if tf32 else "")
    reports = []
    for kernel, variant, fn, args, constexprs, candidates in launches(dtype_name):
        if only and not any(name in kernel for name in only):
            continue
        for bm, bn, warps, stages in candidates[:1] if first else candidates:
            tiles = {} if bm == 0 else {"BLOCK_M": bm, "BLOCK_N": bn}
            config = [bm, bn, warps, stages] if bm else [warps, stages]
            slug = "".join(c if c.isalnum() else "_" for c in f"{kernel}_{variant}_{label}_{config}")
            cubin = Path(out_dir) / "cubins" / f"{slug}.cubin"
            entry = {"kernel": kernel, "variant": variant, "dtype": label, "config": config,
                     "cubin": str(cubin.relative_to(out_dir)), "arch": f"sm_{arch}{'a' if arch == 90 else ''}"}
            try:
                usage = compile_launch(fn, args, dict(constexprs, **tiles), arch, warps, stages, str(cubin), sass=True)
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
        multiplies = not r["kernel"].startswith("omni_contrastive")
        if arch == 90 and sixteen_bit and multiplies and not r["instructions"]["kernel"]["HGMMA"]:
            found.append(f"{name}: no HGMMA (warpgroup MMA) on sm_90a")
    return found


def table(reports) -> str:
    lines = ["| kernel | variant | dtype | config | regs | stack B | smem KB | HGMMA | HMMA | EX2 | LDGSTS | "
             "UTMALDG | LDL/STL | main loop: HGMMA, EX2, LDL/STL |", "|" + "---|" * 14]
    for r in reports:
        if "error" in r:
            lines.append(f"| {r['kernel']} | {r['variant']} | {r['dtype']} | {r['config']} | error: "
                         f"{r['error'][:80]} |" + " |" * 9)
            continue
        k, m = r["instructions"]["kernel"], r["instructions"]["main_loop"] or {}
        loop = f"{m.get('HGMMA', 0)}, {m.get('MUFU.EX2', 0)}, {m.get('LDL', 0)}/{m.get('STL', 0)}" if m else "—"
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
