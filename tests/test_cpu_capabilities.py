"""The part of the suite whose numbers come from torch's own CPU kernels, again under every
instruction set this CPU supports.

torch picks its CPU kernels by ATEN_CPU_CAPABILITY (default, avx2, avx512) and MKL its float32
matmul path by MKL_ENABLE_INSTRUCTIONS, so one machine's green run says little about the next:
torch 2.13's AVX-512 SDPA turned a NaN query into 0 where the AVX2 kernel kept it, and MKL's
AVX-512 path broke a tie in a ranking the other way. The suite itself runs at one setting (the
CPU's own unless ATEN_CPU_CAPABILITY says otherwise); here every other setting the CPU supports
runs the CPU-numeric tests in a subprocess, each capability with the MKL path a CPU of that kind
would take. The Triton interpreter's tests are left
out (their kernels compute in numpy, and they are most of the suite's time).
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import SEED, inductor_cache_dir
from pcd_kernels.backends import OPS

TESTS = Path(__file__).resolve().parent
# Tests whose results come from torch's CPU kernels: every op's torch backend (the test file of
# each op of the registry), the modules, the drop-ins and the memory bounds.
FILES = [f"test_{op.module}.py" for op in OPS.values()] + [
    "test_mhsa2d.py", "test_afdcd.py", "test_module.py", "test_adaptor.py", "test_integrations.py", "test_memory.py",
    "test_bad_input.py", "test_compile.py::test_opcheck"]
# ATEN_CPU_CAPABILITY, lowest first, and the MKL path a CPU of that kind takes.
LEVELS = [("default", "SSE4_2"), ("avx2", "AVX2"), ("avx512", "AVX512")]


def _capabilities():
    """(the capability this process runs at, the highest this CPU supports), lower case."""
    env = {k: v for k, v in os.environ.items() if k not in ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS")}
    out = subprocess.run([sys.executable, "-c", "import torch; print(torch.backends.cpu.get_cpu_capability())"],
                         capture_output=True, text=True, env=env, check=True)
    return torch.backends.cpu.get_cpu_capability().lower(), out.stdout.strip().lower()


def _other_levels():
    """Every level this CPU supports but the one the suite runs at; none on a CPU whose capability
    torch does not name (not x86)."""
    names = [name for name, _ in LEVELS]
    current, highest = _capabilities()
    if highest not in names:
        return []
    return [level for level in LEVELS[:names.index(highest) + 1] if level[0] != current]


OTHERS = _other_levels()


@pytest.mark.skipif(not OTHERS, reason="this CPU supports no x86 instruction set other than the one the suite "
                                       "runs at (or torch names none)")
@pytest.mark.parametrize("capability,mkl", OTHERS or [("none", "none")], ids=[c for c, _ in OTHERS] or ["none"])
def test_cpu_numeric_tests_pass_at_every_other_instruction_set(capability, mkl):
    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability, MKL_ENABLE_INSTRUCTIONS=mkl, PCD_TEST_SEED=str(SEED),
               TORCHINDUCTOR_CACHE_DIR=inductor_cache_dir(capability))
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x", "-k", "not triton and not cuda",
               *(str(TESTS / f) for f in FILES)]
    try:  # (a hang here would hang the whole suite)
        result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=TESTS.parent, timeout=1800)
    except subprocess.TimeoutExpired as timeout:
        pytest.fail(f"ATEN_CPU_CAPABILITY={capability}: the tests ran past {timeout.timeout} s:\n"
                    f"{(timeout.stdout or b'')[-3000:]!r}")
    summary = "\n".join(result.stdout.strip().splitlines()[-40:])
    assert result.returncode == 0, (f"with ATEN_CPU_CAPABILITY={capability} MKL_ENABLE_INSTRUCTIONS={mkl} "
                                    f"(PCD_TEST_SEED={SEED}):\n{summary}\n{result.stderr[-2000:]}")
    assert " passed" in summary, summary
