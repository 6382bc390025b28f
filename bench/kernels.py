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


def _module(op):
    """The Triton backend module of an op (by module name): it builds its launches (aot_launches,
    AOT_REPRESENTATIVE)."""
    import importlib

    return importlib.import_module(f"pcd_kernels.backends.triton.{op}")


def op_launches(op, dtype, *sizes):
    """(kernel, variant, fn, args, constexprs, candidates) of an op's kernels at these sizes and
    flags (its aot_launches' arguments)."""
    return _module(op).aot_launches(dtype, *sizes)


def representative_launches(op, dtype):
    """An op's launches at the representative sizes and flags its Triton module names."""
    module = _module(op)
    return [launch for sizes in module.AOT_REPRESENTATIVE for launch in module.aot_launches(dtype, **sizes)]


def triton_ops():
    """The module names of the ops of the registry (pcd_kernels.backends.OPS) with a Triton backend."""
    from common import registry

    return [op.module for op in registry().values() if "triton" in op.backends]


def launches(dtype_name: str):
    """Every kernel the library launches: the representative launches of each op with a Triton
    backend."""
    import torch

    dtype = getattr(torch, dtype_name)
    return [launch for op in triton_ops() for launch in representative_launches(op, dtype)]


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
