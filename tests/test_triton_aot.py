"""Every Triton kernel compiles for sm_90 (H100/H200) and sm_80 (A100) with Triton's own ptxas,
no GPU needed, and the configurations tried first fit the chip's shared memory.

This does not show the kernels are right or fast on a GPU (that needs `make gpu-check`); it
catches what the CPU interpreter cannot: code that does not compile, or does not fit."""
import json
import os
import subprocess
import sys

import pytest

from _helpers import CUDA

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
from kernels import problems, triton_ops  # noqa: E402  (the SASS report's rules)

# One script for every op: bench/kernels.py builds the launches (the same the SASS report
# compiles), this compiles their first candidate (what the test suite and PCD_KERNELS_AUTOTUNE=0
# run) or all of them.
_SCRIPT = r"""
import json, sys, torch
sys.path.insert(0, "bench")
import kernels

op, arch, dtype, tf32, which, params = sys.argv[1:]
torch.backends.cuda.matmul.allow_tf32 = tf32 == "1"
results = []
sizes = json.loads(params)
dtype_ = getattr(torch, dtype)
launches = kernels.representative_launches(op, dtype_) if sizes is None else kernels.op_launches(op, dtype_, *sizes)
for kernel, variant, fn, args, flags, candidates in launches:
    for candidate in candidates if which == "all" else candidates[:1]:
        usage = kernels.compile_candidate(fn, args, flags, candidate, int(arch))
        results.append(dict(usage, kernel=kernel, name=kernel.split(".", 1)[1], variant=variant,
                            dtype=dtype + ("+tf32" if tf32 == "1" else ""), config=list(candidate)))
print(json.dumps(results))
"""


def _compile(op, arch, dtype, params, tf32=0, which="first"):
    # Compile mode, and every candidate listed (the suite's PCD_KERNELS_AUTOTUNE=0 keeps the first only).
    env = {**{k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}, "PCD_KERNELS_AUTOTUNE": "1"}
    out = subprocess.run([sys.executable, "-c", _SCRIPT, op, str(arch), dtype, str(tf32), which,
                          json.dumps(params)], capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


# Every op with a Triton backend (the registry's): its launches' names, and the flags and tilings
# its kernels are built with, (arch, dtype, bench/kernels.py's launch parameters, allow_tf32, the
# candidates compiled, what of the SASS report's problems is let pass: "spills" (registers may
# spill), "no HGMMA").
LAUNCH_NAMES = {
    "pixel_contrastive": [{"forward", "anchor", "key", "key[teacher keys]"},  # teacher keys as negatives
                          {"forward", "anchor", "key", "anchor[teacher]"}],  # negatives="none"
    "omni_contrastive": [{"forward", "anchor", "key"}],
    "pixel_relation": [{"forward", "anchor", "key"}],
    "pixel_attention": [{"forward", "key_value", "query"}],
}
CASES = {
    "pixel_contrastive": [  # [C, negatives, masked]
        (90, "bfloat16", [256, "batch", True], 0, "first", ()),
        (90, "float16", [384, "none", False], 0, "first", ()),   # C > 256: chunked channels
        (90, "float32", [40, "image", True], 0, "first", ("spills",)),  # C not a multiple of 16, IEEE float32 dot
        (90, "float32", [256, "batch", False], 1, "first", ("spills",)),  # float32 rows wider than one tile, TF32
        (80, "bfloat16", [128, "image", False], 0, "first", ()),
    ],
    "omni_contrastive": [  # [dims per group, samples per patch, groups]
        (90, "bfloat16", [128, 256, 16], 0, "first", ()),  # Cityscapes: C = 2048, 16 groups, 4x4 patches
        (90, "float32", [12, 96, 8], 0, "first", ()),  # samples not a power of two
        (80, "float16", [32, 256, 16], 0, "first", ()),
    ],
    "pixel_relation": [  # [C, keys (0: across images), masked, teacher C]
        (90, "bfloat16", [256, 0, True], 0, "first", ()),
        (90, "float16", [128, 4104, False], 0, "first", ()),  # CIRKD's pixel memory sample
        (90, "bfloat16", [128, 0, False, 320], 0, "first", ()),  # a teacher with other channels
        (90, "float32", [40, 0, True], 0, "first", ("spills",)),  # C not a multiple of 16, IEEE float32 dot
    ],
    "pixel_attention": [  # [head dim, heads]
        (90, "bfloat16", [32, 8], 0, "all", ()),  # the benchmark's shape: every autotune candidate
        (90, "bfloat16", [64, 8], 0, "first", ()),
        (90, "float16", [128, 2], 0, "first", ()),
        (90, "bfloat16", [256, 1], 0, "first", ("no HGMMA",)),  # the backward's tiles are too small for it
        (90, "float32", [64, 2], 1, "first", ()),  # TF32
        (90, "float32", [40, 2], 0, "first", ("spills",)),  # IEEE float32 on CUDA cores: a correctness path
        (80, "bfloat16", [64, 4], 0, "first", ("spills",)),
        (80, "float32", [256, 1], 1, "all", ("spills",)),  # the widest tiles: must fit the A100's shared memory
    ],
}


# An op listed in neither table gets this case: its Triton module's representative launches
# (AOT_REPRESENTATIVE), sm_90a, bfloat16, first candidates, no problem let pass.
DEFAULT_CASES = [(90, "bfloat16", None, 0, "first", ())]


def _case_id(case):
    arch, dtype, params, tf32, which, _ = case
    return "-".join(map(str, (arch, dtype, *(params or ("representative",)), tf32, which)))


def test_the_tables_name_only_triton_ops():
    assert set(CASES) | set(LAUNCH_NAMES) <= set(triton_ops())


@pytest.mark.skipif(CUDA, reason="a GPU is here: the test suite runs the kernels on it instead")
@pytest.mark.parametrize("op,case", [(op, case) for op in triton_ops() for case in CASES.get(op, DEFAULT_CASES)],
                         ids=lambda v: v if isinstance(v, str) else _case_id(v))
def test_kernels_compile_for_gpu(op, case):
    """The launches' first candidate (or all) compile, fit the chip's shared memory and 255
    registers, and show none of the SASS report's problems (a 16-bit spill, an sm_90a multiplying
    kernel in 16 bits or TF32 without warpgroup MMA) but those the case lets pass; where registers
    may not spill, no stack."""
    arch, dtype, params, tf32, which, allowed = case
    results = _compile(op, arch, dtype, params, tf32, which)
    assert op not in LAUNCH_NAMES or {r["name"] for r in results} in LAUNCH_NAMES[op], results
    found = [p for p in problems(results, arch) if not any(f": {kind}" in p for kind in allowed)]
    assert not found, "\n".join(found)
    for r in results:
        assert r["registers"] <= 255, r
        assert "spills" in allowed or r["stack_bytes"] == 0, f"registers spill: {r}"


@pytest.mark.skipif(CUDA, reason="a GPU is here: the test suite runs the kernels on it instead")
def test_sass_report_finds_no_problem(tmp_path):
    """bench/kernels.py --check: every kernel x autotune candidate x dtype for sm_90a; it fails on
    a spill in 16 bits, a configuration over 227 KB of shared memory, or a 16-bit multiplying
    kernel without warpgroup MMA."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "bench/kernels.py", "--arch", "90a", "--out", str(tmp_path), "--check"],
                         capture_output=True, text=True, timeout=1200, env=env, cwd=ROOT)
    problems = [line for line in out.stdout.splitlines() if line.startswith("problem:")]
    assert out.returncode == 0, "\n".join(problems) or out.stderr[-4000:]
    reports = json.loads((tmp_path / "kernels.json").read_text())
    assert {r["dtype"] for r in reports} == {"bfloat16", "float16", "float32", "float32+tf32"}
    assert len(reports) > 150, len(reports)  # every candidate, not the first of each


def test_instruction_counts_find_the_main_loop_and_the_exps_under_mma():
    """count_instructions on a hand-written listing: the loop is the backward branch's body; exps
    between an HGMMA and the WARPGROUP.DEPBAR that waits for it count as overlapped."""
    from pcd_kernels.backends.triton._aot import count_instructions

    body = ["LDGSTS.E.BYPASS.128 [R1], desc[UR4][R2.64]", "MUFU.EX2 R3, R3", "WARPGROUP.ARRIVE",
            "HGMMA.64x64x16.F32.BF16 R24, gdesc[UR12], RZ", "MUFU.EX2 R4, R4", "@P0 MUFU.EX2 R5, R5",
            "WARPGROUP.DEPBAR.LE gsb0, 0x1", "MUFU.EX2 R8, R8",  # one MMA still in flight
            "WARPGROUP.DEPBAR.LE gsb0, 0x0", "MUFU.EX2 R6, R6", "LDL R7, [R1]", "@!P1 BRA 0x0010"]
    lines = ["MOV R1, RZ"] + body + ["STL [R1], R7", "EXIT"]
    listing = "\n".join(f"        /*{16 * i:04x}*/                   {line} ;" for i, line in enumerate(lines))
    counts = count_instructions(listing)
    loop = counts["main_loop"]
    assert (loop["HGMMA"], loop["MUFU.EX2"], loop["EX2_UNDER_MMA"], loop["LDL"], loop["STL"]) == (1, 5, 3, 1, 0)
    assert (counts["kernel"]["STL"], counts["kernel"]["LDGSTS"]) == (1, 1)
