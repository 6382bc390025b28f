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
from kernels import SHARED_LIMIT, problems  # noqa: E402  (the SASS report's rules)

# One script for every family: bench/kernels.py builds the launches (the same the SASS report
# compiles), this compiles their first candidate (what the test suite and PCD_KERNELS_AUTOTUNE=0
# run) or all of them.
_SCRIPT = r"""
import json, sys, torch
sys.path.insert(0, "bench")
import kernels

family, arch, dtype, tf32, which, params = sys.argv[1:]
torch.backends.cuda.matmul.allow_tf32 = tf32 == "1"
results = []
for kernel, variant, fn, args, flags, candidates in getattr(kernels, family)(getattr(torch, dtype), *json.loads(params)):
    for candidate in candidates if which == "all" else candidates[:1]:
        usage = kernels.compile_candidate(fn, args, flags, candidate, int(arch))
        results.append(dict(usage, kernel=kernel, name=kernel.split(".", 1)[1], variant=variant,
                            dtype=dtype + ("+tf32" if tf32 == "1" else ""), config=list(candidate)))
print(json.dumps(results))
"""


def _compile(family, arch, dtype, params, tf32=0, which="first"):
    # Compile mode, and every candidate listed (the suite's PCD_KERNELS_AUTOTUNE=0 keeps the first only).
    env = {**{k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}, "PCD_KERNELS_AUTOTUNE": "1"}
    out = subprocess.run([sys.executable, "-c", _SCRIPT, family, str(arch), dtype, str(tf32), which,
                          json.dumps(params)], capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


CASES = [  # (arch, dtype, C, negatives, masked, allow_tf32): flags and tilings kernels are built with
    (90, "bfloat16", 256, "batch", 1, 0),
    (90, "float16", 384, "none", 0, 0),    # C > 256: chunked channels
    (90, "float32", 40, "image", 1, 0),    # C not a multiple of 16, IEEE float32 dot
    (90, "float32", 256, "batch", 0, 1),   # float32 rows wider than one tile, TF32 dot
    (80, "bfloat16", 128, "image", 0, 0),
]


OMNI_CASES = [  # (arch, dtype, dims per group, samples per patch, groups)
    (90, "bfloat16", 128, 256, 16),  # Cityscapes: C = 2048, 16 groups, 4x4 patches
    (90, "float32", 12, 96, 8),      # samples not a power of two
    (80, "float16", 32, 256, 16),
]


@pytest.mark.skipif(CUDA, reason="a GPU is here: the test suite runs the kernels on it instead")
@pytest.mark.parametrize("case", OMNI_CASES, ids=lambda c: "-".join(map(str, c)))
def test_omni_kernels_compile_for_gpu(case):
    arch, dtype, dims, samples, groups = case
    results = _compile("omni_launches", arch, dtype, [dims, samples, groups])
    assert len(results) == 3
    for r in results:
        assert r["shared_bytes"] <= SHARED_LIMIT[case[0]], r
        assert r["registers"] <= 255, r


@pytest.mark.skipif(CUDA, reason="a GPU is here: the test suite runs the kernels on it instead")
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_kernels_compile_for_gpu(case):
    arch, dtype, channels, negatives, masked, tf32 = case
    results = _compile("infonce_launches", arch, dtype, [channels, negatives, bool(masked)], tf32)
    assert len(results) == 4  # forward, anchor, key, and the pixel keys or (negatives="none") the teacher
    assert not problems(results, arch), "\n".join(problems(results, arch))
    for r in results:
        assert r["registers"] <= 255, r


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


ATTENTION_CASES = [  # (arch, dtype, head dim, heads, allow_tf32, configurations, spills allowed)
    (90, "bfloat16", 32, 8, 0, "all", False),   # the benchmark's shape: every autotune candidate
    (90, "bfloat16", 64, 8, 0, "first", False),
    (90, "float16", 128, 2, 0, "first", False),
    (90, "bfloat16", 256, 1, 0, "first", False),
    (90, "float32", 64, 2, 1, "first", False),  # TF32
    (90, "float32", 40, 2, 0, "first", True),   # IEEE float32 on CUDA cores: a correctness path
    (80, "bfloat16", 64, 4, 0, "first", True),
    (80, "float32", 256, 1, 1, "all", True),     # the widest tiles: must fit the A100's shared memory
]


@pytest.mark.skipif(CUDA, reason="a GPU is here: the test suite runs the kernels on it instead")
@pytest.mark.parametrize("case", ATTENTION_CASES, ids=lambda c: "-".join(map(str, c[:6])))
def test_attention_kernels_compile_for_gpu(case):
    arch, spills_allowed = case[0], case[6]
    _, dtype, head_dim, heads, tf32, which = case[:6]
    results = _compile("attention_launches", arch, dtype, [head_dim, heads], tf32, which)
    assert {r["name"] for r in results} == {"forward", "key_value", "query"}
    for r in results:
        assert r["shared_bytes"] <= SHARED_LIMIT[arch], r
        if not spills_allowed:
            assert r["stack_bytes"] == 0, f"registers spill: {r}"


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
