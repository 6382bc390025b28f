"""make gpu-smoke: the first GPU run in one command (at most about 7 minutes on an H200).

1. Builds the CUDA extension for sm_90a only, in the background, while the Triton checks start
   (installing CUTLASS's headers from .whl/ first where they are missing, as make gpu-install does).
2. Runs each CUDA kernel alone first (bench/cuda_kernel_check.py, its own subprocess and timeout),
   then checks every op x backend (triton, cuda) x dtype it takes (float32, float16, bfloat16; CUDA's
   pixel_contrastive_loss takes no float32), forward and every gradient, against the float64
   reference with the test suite's own comparisons (DESIGN.md 5) at its shapes (tile tails, several
   tiles, masks, NaN), the CUDA caching allocator poisoned with NaN before each test
   (PCD_KERNELS_POISON_CUDA=1). Each group runs in a subprocess with its own timeout, several at
   once (Triton compiles on the CPU), so a hang or a crash costs that group only.
3. Runs the trainer for 2 steps on CUDA with AMP and the ResNet-18 student (one process, no NCCL).
4. Measures every headline target (docs/verification.md) with bench/run.py, alone on the device.
5. Prints one table last, each check and each target: measured, goal, pass or miss, and writes
   ``gpu-smoke_<device>_<date>.{log,json}`` (+ the benchmark's JSON and the build log) into --out.

``--dry-run`` (``make gpu-smoke DRY_RUN=1``) runs the same script on a CPU: the Triton kernels in
the interpreter at the tests' small sizes, the benchmark's quick CPU cases with the torch backend
standing in for Triton's (verdicts "dry run"), the CUDA parts reported as skipped with the reason.
CI runs it, so the command a GPU lease depends on has run before it meets a GPU.
"""
import argparse
import concurrent.futures
import dataclasses
import datetime
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import Dict, List, Optional, Tuple

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))  # run.py (bench/run.py), imported where needed: it imports torch
DTYPES = ("float32", "float16", "bfloat16")


@dataclasses.dataclass
class Group:
    """One subprocess: a pytest selection, or a command."""
    name: str
    op: str
    backend: str
    argv: List[str]
    timeout: int
    needs_extension: bool = False
    pytest: bool = True
    skip: Optional[str] = None  # why it does not run here
    every_dtype: bool = False  # on a GPU, each of dtypes must have run tests, or the group fails
    dtypes: Tuple[str, ...] = DTYPES  # those of DTYPES its backend takes for its op


def check_groups(device: str, dry_run: bool) -> List[Group]:
    """The correctness groups: test functions of the suite per op of the registry and each of its
    GPU backends, all dtypes, with (on a GPU) the op's opcheck and allocation tests."""
    from common import registry

    from cuda_kernel_check import KERNELS

    ops = registry()
    # Each CUDA kernel alone, first (bench/cuda_kernel_check.py): one that hangs or faults costs its
    # own short timeout and is named before the op groups run it beside the others.
    groups = [Group(f"cuda kernel {kernel}", kernel.split(".")[0], "cuda", ["bench/cuda_kernel_check.py", kernel],
                    timeout=90, needs_extension=True, pytest=False,
                    skip="dry run: no CUDA device here (the CUDA backend needs one)" if dry_run else None)
              for kernel in KERNELS]
    for op in ops:
        # Each op's test file names its tests here: GPU_SMOKE, and GPU_SMOKE_DRY for the dry run (the
        # interpreter is slow: it checks the plumbing on fewer cases where that costs).
        path = f"tests/test_{ops[op].module}.py"
        tests = string_in_test_file(path, "GPU_SMOKE_DRY" if dry_run else "GPU_SMOKE")
        files = [path]
        # On a GPU, with every op's opcheck and allocation tests (test_compile.py, test_memory.py), ids "<op>-...".
        if not dry_run:
            files += ["tests/test_compile.py", "tests/test_memory.py"]
            tests = f"{tests} or ({op} and (test_opcheck or test_never_allocates))"
        for backend in (b for b in ops[op].backends if b != "torch"):
            dtypes = backend_dtypes(op, backend)
            cases = " or ".join(f"{backend}-{device}-{dtype}" for dtype in dtypes)
            skip = "dry run: no CUDA device here (the CUDA backend needs one)" if dry_run and backend == "cuda" else None
            groups.append(Group(f"{op} {backend}", op, backend, [*files, "-k", f"({tests}) and ({cases})"],
                                timeout=300, needs_extension=backend == "cuda", skip=skip, every_dtype=True,
                                dtypes=dtypes))
    # The modules built on the ops, and the kernels' own properties on the GPU.
    groups.append(Group("MHSA2d and Af-DCD modules triton", "modules", "triton",
                        ["tests/test_mhsa2d.py", "tests/test_afdcd.py", "-k", "triton"], timeout=300))
    if not dry_run:
        groups.append(Group("Triton determinism, limits, every autotune candidate", "kernels", "triton",
                            ["tests/test_pixel_contrastive.py", "tests/test_pixel_attention.py", "-k",
                             "triton_backward_is_deterministic or triton_is_deterministic or triton_refuses or "
                             "grid_limit or every_autotune_candidate"], timeout=300))
        groups.append(Group("CUDA determinism, limits, TMA and cp.async kernels", "kernels", "cuda",
                            ["tests/test_pixel_attention.py", "tests/test_pixel_contrastive.py", "-k",
                             "cuda_is_deterministic or cuda_refuses or 65535 or cuda_tma_and_cp_async_kernels_agree"],
                            timeout=150, needs_extension=True))
        groups.append(Group("extension build and probe", "build", "cuda", ["tests/test_build.py"], timeout=120,
                            needs_extension=True))
    return groups


def bench_environment(rows: List[Dict], env: Dict[str, str]) -> Tuple[Dict[str, str], str]:
    """The benchmark's environment after the checks ``rows``, and a note on what it changed: where a
    TMA kernel failed its own check, the benchmark runs the cp.async kernels
    (PCD_KERNELS_CUDA_TMA=0), since a kernel that traps there would leave a sticky CUDA error in
    the one process that measures every later provider and op."""
    environment = {**env, "PCD_KERNELS_AUTOTUNE": "1"}
    failed = [r["check"].split(".")[-1] for r in rows
              if r["check"].startswith("cuda kernel ") and r["check"].endswith("_tma_kernel") and r["verdict"] == "FAIL"]
    if not failed:
        return environment, ""
    environment["PCD_KERNELS_CUDA_TMA"] = "0"
    return environment, (f"{', '.join(failed)} failed: the benchmark runs the cp.async kernels "
                         f"(PCD_KERNELS_CUDA_TMA=0)")


def backend_dtypes(op: str, backend: str) -> Tuple[str, ...]:
    """Those of DTYPES that ``backend`` takes for ``op``, from the registry (the CUDA backend takes
    no float32). Imports neither the op's backend module nor the CUDA extension, which may be
    being rebuilt."""
    import torch

    from pcd_kernels.backends import dtypes

    takes = dtypes(op, backend)
    return tuple(d for d in DTYPES if takes is None or getattr(torch, d) in takes)


def string_in_test_file(path: str, name: str) -> str:
    """The string ``name`` that the test file ``path`` (relative to the repository) assigns at
    module level: a string literal (adjacent ones concatenate), or the name of another such
    string of the file. Read from its source, not imported: importing a test file here would
    import the kernels into this process."""
    import ast

    file = ROOT / path
    if not file.exists():
        raise LookupError(f"{path} does not exist: every op of the registry has its test file, defining {name}")
    values = {}
    for node in ast.parse(file.read_text(), str(file)).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            values[node.targets[0].id] = node.value
    seen = []
    while name not in seen:
        seen.append(name)
        value = values.get(name)
        if value is None:
            raise LookupError(f"{path} defines no {seen[0]}: add {seen[0]} = \"<pytest -k expression>\", the tests "
                              f"make gpu-smoke runs of it (GPU_SMOKE: on a GPU; GPU_SMOKE_DRY: on the CPU dry run, "
                              f"GPU_SMOKE_DRY = GPU_SMOKE for the same)")
        if isinstance(value, ast.Constant) and isinstance(value.value, str):
            return value.value
        if not isinstance(value, ast.Name):
            break
        name = value.id
    raise LookupError(f"{path}: {seen[0]} must be a string literal, or the name of one in the file")


def trainer_group(work: Path, dry_run: bool) -> Group:
    data, out = work / "images", work / "trainer"
    device = ["--device", "cpu", "--amp", "none", "--student", "cnn"] if dry_run else \
        ["--device", "cuda", "--amp", "bf16", "--student", "resnet18"]
    argv = ["-m", "pcd_kernels.train", "--data", str(data), "--teacher", "_train_factories:teacher_pair",
            *device, "--max-steps", "2", "--batch-size", "8", "--image-size", "64", "--queue-size", "64",
            "--workers", "0", "--no-progress", "--log-every", "1", "--output-dir", str(out)]
    name = "trainer: 2 steps, CPU, cnn student (dry run)" if dry_run else \
        "trainer: 2 steps, CUDA, bf16 autocast, ResNet-18"
    return Group(name, "trainer", "auto", argv, timeout=240, pytest=False)


# ------------------------------------------------------------------------------------------
# The headline targets (docs/verification.md), judged from bench/run.py's JSON
# ------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Target:
    name: str
    case: str
    kind: str  # speedup | memory | share | runs
    against: tuple = ()  # providers compared with (the fastest that ran)
    goal: Optional[float] = None
    provider: str = "ours-triton"
    dry_case: Optional[str] = None  # the quick CPU case standing in on a dry run


SDPA = ("sdpa-flash", "sdpa-efficient", "sdpa-cudnn")  # (sdpa-math is never the fastest, and slow)
TARGETS = [
    Target("InfoNCE 32,768 x 65,536 x 256 fwd+bwd vs naive", "pcd-target", "speedup", ("naive",), 3.0,
           dry_case="pcd-quick"),
    Target("InfoNCE vs FlexAttention (return_lse)", "pcd-target", "speedup", ("flex-attention",), 1.3,
           dry_case="pcd-quick"),
    Target("InfoNCE share of the measured bf16 matmul rate", "pcd-target", "share", (), 0.5, dry_case="pcd-quick"),
    Target("InfoNCE peak memory vs naive", "pcd-target", "memory", ("naive",), None, dry_case="pcd-quick"),
    Target("InfoNCE, CUDA backend vs naive", "pcd-target", "speedup", ("naive",), None, provider="ours-cuda",
           dry_case="pcd-quick"),
    # (on sm_90: the TMA kernels, their exps beside the MMAs, against the cp.async ones; report only)
    Target("InfoNCE, CUDA backend vs its cp.async kernels", "pcd-target", "speedup", ("ours-cuda-cp.async",), None,
           provider="ours-cuda", dry_case="pcd-quick"),
    Target("Af-DCD Cityscapes fwd+bwd vs official cdist", "citys", "speedup", ("naive",), 5.0, dry_case="citys-quick"),
    Target("Af-DCD Cityscapes peak memory vs official", "citys", "memory", ("naive",), 20.0, dry_case="citys-quick"),
    Target("Af-DCD unpooled 64x128 runs", "citys-unpooled", "runs", dry_case="citys-quick"),
    # CIRKD (report only: no goal was set before a measurement)
    Target("CIRKD mini-batch 8 x 64x128 fwd+bwd vs official", "citys-minibatch", "speedup", ("naive",), None,
           dry_case="citys-minibatch-quick"),
    Target("CIRKD memory term peak memory vs official", "citys-memory-pixels", "memory", ("naive",), None,
           dry_case="citys-memory-quick"),
    Target("MHSA2d 64x64 vs SDPA's fastest backend", "mhsa-64x64", "speedup", SDPA, 1.2, dry_case="mhsa-quick"),
    Target("MHSA2d 128x128 vs SDPA's fastest backend", "mhsa-128x128", "speedup", SDPA, 1.2, dry_case="mhsa-quick"),
    Target("attention 64x64 vs SDPA flash, same data", "attn-64x64", "speedup", ("sdpa-flash-prepermuted",), 0.8,
           dry_case="attn-quick"),
    Target("attention 128x128 vs SDPA flash, same data", "attn-128x128", "speedup", ("sdpa-flash-prepermuted",), 0.8,
           dry_case="attn-quick"),
]


def bench_argv(out: Path, dry_run: bool) -> List[str]:
    providers = {t.provider for t in TARGETS} | {p for t in TARGETS for p in t.against}
    if dry_run:
        cases = sorted({t.dry_case for t in TARGETS if t.dry_case})
        return ["bench/run.py", "--device", "cpu", "--quick", "--repeats", "1", "--no-sweeps", "--no-plots",
                "--cases", *cases, "--providers", "naive", "ours-torch", "sdpa-flash-prepermuted", "sdpa-math",
                "--out", str(out)]
    cases = sorted({t.case for t in TARGETS})
    return ["bench/run.py", "--device", "cuda", "--repeats", "5", "--no-sweeps", "--no-plots", "--cases", *cases,
            "--providers", *sorted(providers), "--out", str(out)]


def judge(target: Target, results: List[Dict], dry_run: bool) -> Dict:
    """The target's measured value, goal and verdict from the benchmark's results."""
    case = target.dry_case if dry_run else target.case
    provider = "ours-torch" if dry_run and target.provider == "ours-triton" else target.provider
    row = {"check": target.name, "goal": _goal_text(target), "case": case, "provider": provider}
    by_provider = {r["provider"]: r for r in results if r.get("case") == case}
    ours = by_provider.get(provider)
    if ours is None or ours.get("status") != "ok":
        if ours is None:
            why = "not measured on a dry run" if dry_run else "not measured: the benchmark ran out of time"
            return {**row, "measured": why, "verdict": "skip" if dry_run else "not measured"}
        why = f"{ours.get('status')}: {ours.get('reason', '')}"
        required = target.goal is not None or target.kind == "runs"
        return {**row, "measured": why[:120], "verdict": "skip" if dry_run or not required else "miss"}
    if ours.get("agrees_with_naive") is False:
        return {**row, "measured": "its loss or gradients differ from naive's", "verdict": "FAIL"}
    if target.kind == "runs":
        return {**row, "measured": f"{ours['total']['p50']:.3g} ms, {ours['peak_mb']:.0f} MB", "verdict": _verdict(
            True, dry_run)}
    if target.kind == "share":
        share = ours.get("share_of_matmul")
        return {**row, "measured": f"{100 * share:.0f} % ({ours.get('tflops', 0):.0f} TFLOP/s)" if share else "—",
                "verdict": _verdict(share is not None and share >= target.goal, dry_run)}
    rivals = [by_provider[p] for p in target.against if by_provider.get(p, {}).get("status") == "ok"]
    if not rivals:
        states = {p: by_provider[p].get("status") for p in target.against if p in by_provider}
        # A rival that runs out of memory where ours runs is the memory target met.
        oom = target.kind == "memory" and "oom" in states.values()
        return {**row, "measured": f"no rival ran ({states or 'none measured'})",
                "verdict": _verdict(True, dry_run, target.goal is None) if oom else "skip"}
    if target.kind == "memory":
        rival = max(rivals, key=lambda r: r["peak_mb"])
        ratio = rival["peak_mb"] / max(ours["peak_mb"], 1e-3)
        measured = f"{ratio:.1f}x smaller ({ours['peak_mb']:.0f} vs {rival['peak_mb']:.0f} MB, {rival['provider']})"
    else:
        rival = min(rivals, key=lambda r: r["total"]["p50"])
        ratio = rival["total"]["p50"] / ours["total"]["p50"]
        measured = f"{ratio:.2f}x ({ours['total']['p50']:.3g} vs {rival['total']['p50']:.3g} ms, {rival['provider']})"
    return {**row, "measured": measured, "ratio": ratio,
            "verdict": _verdict(target.goal is None or ratio >= target.goal, dry_run, target.goal is None)}


def annotated(bench: Dict) -> List[Dict]:
    """The benchmark's results with bench/run.py's derived figures (ratio to naive, agreement with
    it, share of the matmul rate, share of the modelled bound), which it adds only when it finishes:
    a run the budget cut short is judged the same way."""
    import run

    results = bench.get("results", [])
    naive = {(r["op"], r["case"]): r for r in results if r["provider"] == "naive" and r["status"] == "ok"}
    for r in results:
        if r["status"] == "ok" and "tflops" not in r:
            run.annotate(r, naive.get((r["op"], r["case"])), bench["meta"]["roofline"])
    return results


def _goal_text(target: Target) -> str:
    if target.goal is None:
        return "reported" if target.kind != "runs" else "runs"
    return f">= {100 * target.goal:.0f} %" if target.kind == "share" else f">= {target.goal:g}x"


def _verdict(ok: bool, dry_run: bool, report_only: bool = False) -> str:
    if dry_run:
        return "dry run"
    if report_only:
        return "info"
    return "pass" if ok else "miss"


# ------------------------------------------------------------------------------------------
# Running
# ------------------------------------------------------------------------------------------

class Log:
    """Everything the subprocesses print, in one file, a section per group; and the console."""

    def __init__(self, path: Path):
        self.path, self.lock = path, threading.Lock()
        path.write_text("")

    def write(self, text: str, echo: bool = True) -> None:
        with self.lock:
            with self.path.open("a") as f:
                f.write(text if text.endswith("\n") else text + "\n")
            if echo:
                print(text.rstrip("\n"), flush=True)


def run_group(group: Group, env: Dict[str, str], work: Path, log: Log, dry_run: bool) -> Dict:
    started = time.perf_counter()
    if group.skip:
        return {"check": group.name, "op": group.op, "backend": group.backend, "verdict": "skip",
                "measured": group.skip, "seconds": 0.0}
    junit = work / f"junit-{abs(hash(group.name))}.xml"
    argv = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", f"--junitxml={junit}",
            *group.argv] if group.pytest else [sys.executable, *group.argv]
    output, code = run_bounded(argv, env, group.timeout)
    seconds = time.perf_counter() - started
    log.write(f"\n===== {group.name} ({seconds:.0f} s, exit {code}) =====\n{output[-20000:]}", echo=False)
    row = {"check": group.name, "op": group.op, "backend": group.backend, "seconds": round(seconds, 1)}
    if code is None:
        return {**row, "verdict": "FAIL", "measured": f"timed out after {group.timeout} s"}
    if not group.pytest:
        if code == 0 and _last_line(output).startswith("skip "):  # a command that says why it did not apply here
            return {**row, "verdict": "skip", "measured": _last_line(output)[len("skip "):]}
        return {**row, "verdict": "pass" if code == 0 else "FAIL",
                "measured": "ran" if code == 0 else f"exit {code}: {_last_line(output)}"}
    counts, by_dtype, failures = _junit_counts(junit)
    measured = ", ".join(f"{k} {v}" for k, v in counts.items() if v) or "no tests selected"
    if by_dtype:
        measured += " (" + "; ".join(f"{d}: {c['passed']}/{c['total']}" for d, c in by_dtype.items()) + ")"
    if code not in (0, 1) and not failures:  # a crash of the whole process (a fault, an abort)
        failures = [f"pytest exited {code}: {_last_line(output)}"]
    # On a GPU nothing here may skip wholesale: a group whose tests all skipped (the extension not
    # built, no device seen), or a dtype none of whose tests ran, is a failure, not a pass.
    unchecked = [d for d in group.dtypes if by_dtype.get(d, {}).get("total", 0) == 0] if group.every_dtype else []
    if code != 0:
        verdict = "FAIL"
    elif counts["passed"] == 0 or (unchecked and not dry_run):
        verdict = "skip" if dry_run else "FAIL"
        if unchecked and not dry_run:
            measured += f"; nothing ran in {', '.join(unchecked)}"
    else:
        verdict = "pass"
    return {**row, "verdict": verdict, "measured": measured, "counts": counts, "by_dtype": by_dtype,
            "failures": failures[:10]}


def run_bounded(argv: List[str], env: Dict[str, str], timeout: float):
    """(output, exit code, or None when it ran out of time). The command runs in a session of its
    own, so a timeout kills everything it started (compilers, workers), not just the process."""
    process = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    try:
        output, _ = process.communicate(timeout=timeout)
        return output, process.returncode
    except subprocess.TimeoutExpired:
        _kill_session(process)
        output, _ = process.communicate()
        return output, None


def _kill_session(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _junit_counts(path: Path):
    counts = {"passed": 0, "failed": 0, "skipped": 0}
    by_dtype: Dict[str, Dict[str, int]] = {}
    failures = []
    if not path.exists():
        return counts, by_dtype, failures
    for case in ElementTree.parse(path).iter("testcase"):
        name = case.get("name", "")
        if case.find("failure") is not None or case.find("error") is not None:
            state = "failed"
            failures.append(name)
        elif case.find("skipped") is not None:
            state = "skipped"
        else:
            state = "passed"
        counts[state] += 1
        found = re.search(r"(?<![a-z])(b?float(?:16|32))", name)  # "float16" is inside "bfloat16"
        dtype = found.group(1) if found else None
        if dtype:
            entry = by_dtype.setdefault(dtype, {"passed": 0, "total": 0})
            entry["total"] += state != "skipped"
            entry["passed"] += state == "passed"
    return counts, by_dtype, failures


def _last_line(output: str) -> str:
    lines = [line for line in output.splitlines() if line.strip()]
    return lines[-1][:160] if lines else ""


def start_build(env: Dict[str, str], log_path: Path, dry_run: bool
                ) -> Tuple[Optional[subprocess.Popen], Optional[str]]:
    """pip install -e . for sm_90a only, in the background (nothing to build on a dry run): the
    build, or None, and why it cannot start, or None."""
    if dry_run:
        return None, None
    if extension_is_current(env):
        # Rebuilding would rewrite the library that running groups have loaded.
        log_path.write_text("pcd_kernels._C is already built for sm_90a from the current sources: not rebuilt\n")
        return None, None
    missing = install_cutlass(env, log_path)
    if missing:
        with log_path.open("a") as f:
            f.write(missing + "\n")
        return None, missing
    build_env = {**env, "PCD_KERNELS_CUDA_ARCHS": "90a", "MAX_JOBS": str(os.cpu_count() or 8)}
    with log_path.open("a") as f:
        return subprocess.Popen([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "-e",
                                 ".", "--no-build-isolation", "--no-deps"], cwd=ROOT, env=build_env, stdout=f,
                                stderr=subprocess.STDOUT, start_new_session=True), None


# The extension's build reads CUTLASS's headers from the nvidia-cutlass wheel (CMakeLists.txt). The
# GPU machine has no package index: the wheel travels in .whl/ (make gpu-install does the same).
CUTLASS_WHEELS = ".whl/nvidia_cutlass-*.whl"
CUTLASS_HINT = ("bring the wheel: `pip download --no-deps nvidia-cutlass -d .whl` on a machine with a package "
                "index, into this checkout's .whl/")


def install_cutlass(env: Dict[str, str], log_path: Path) -> Optional[str]:
    """Installs the newest .whl/nvidia_cutlass-*.whl (offline) when this Python has no
    cutlass_library (what CMakeLists.txt looks for); why the build cannot have CUTLASS, or None."""
    import importlib.util

    if importlib.util.find_spec("cutlass_library") is not None:
        return None
    wheels = sorted(ROOT.glob(CUTLASS_WHEELS), key=lambda w: [int(n) for n in re.findall(r"\d+", w.name.split("-")[1])])
    if not wheels:
        return (f"the extension build needs CUTLASS: cutlass_library is not installed and there is no "
                f"{CUTLASS_WHEELS}; {CUTLASS_HINT}")
    output, code = run_bounded([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check",
                                "--no-index", "--no-deps", str(wheels[-1])], env, 180)
    log_path.write_text(f"installing {wheels[-1].name} (cutlass_library was missing)\n{output}")
    if code != 0:
        return f"installing {wheels[-1].relative_to(ROOT)} failed ({'timed out' if code is None else f'exit {code}'})"
    return None


def extension_is_current(env: Dict[str, str]) -> bool:
    """Whether pcd_kernels/_C is built for sm_90a alone and newer than every source it is built from."""
    built = sorted((ROOT / "pcd_kernels").glob("_C*.so"))
    sources = [p for folder in ("csrc", "python") for p in (ROOT / folder).rglob("*") if p.is_file()]
    sources += [ROOT / "CMakeLists.txt", ROOT / "setup.py"]
    if not built or max(p.stat().st_mtime for p in sources) > built[-1].stat().st_mtime:
        return False
    output, code = run_bounded([sys.executable, "-c", "import pcd_kernels._C as c; print(c.cuda_architectures)"],
                               env, 60)
    # Exactly sm_90a: the build and probe group checks the archs it was built for.
    return code == 0 and output.strip().splitlines()[-1:] == ["90a"]


def write_images(folder: Path, count: int = 16) -> None:
    import torch
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        pixels = (torch.rand(72, 80, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"{i}.png")


def table(rows: List[Dict]) -> str:
    lines = ["| check or target | measured | goal | verdict |", "|---|---|---|---|"]
    for r in rows:
        measured = str(r.get("measured", "")).replace("|", "/")
        lines.append(f"| {r['check']} | {measured} | {r.get('goal', 'all pass')} | {r['verdict']} |")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python bench/gpu_smoke.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="on a CPU: interpreter, tiny sizes, CUDA parts skipped")
    p.add_argument("--out", default=None, help="where the log and JSON go (default: bench/results, or bench/runs "
                   "on a dry run)")
    p.add_argument("--jobs", type=int, default=None, help="check groups run at once (default: 6 on a GPU, 2 dry)")
    p.add_argument("--budget", type=float, default=None, help="seconds for everything (default: 420 on a GPU, "
                   "900 on a dry run, whose CPU may be shared); the checks get all but --bench-seconds of it, and "
                   "a group not started in time is reported as not run")
    p.add_argument("--bench-seconds", type=float, default=200.0, help="the part of --budget kept for measuring "
                   "the targets (default: %(default)s); what it cannot reach is reported as not measured")
    p.add_argument("--no-bench", action="store_true", help="checks only")
    args = p.parse_args(argv)
    if args.budget is None:
        args.budget = 900.0 if args.dry_run else 420.0
    started = time.perf_counter()
    deadline = started + args.budget - (0 if args.no_bench else args.bench_seconds)

    import torch

    dry_run = args.dry_run
    if not dry_run and not torch.cuda.is_available():
        p.error("no CUDA device: run it on a GPU machine, or with --dry-run (make gpu-smoke DRY_RUN=1) on a CPU")
    device_name = torch.cuda.get_device_name() if not dry_run else f"CPU ({platform.machine()}, dry run)"
    out = Path(args.out) if args.out else ROOT / "bench" / ("runs" if dry_run else "results")
    out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now(datetime.timezone.utc)
    from run import file_slug

    base = out / f"gpu-smoke_{file_slug(device_name)}_{stamp:%Y%m%d-%H%M%S}"
    log = Log(base.with_suffix(".log"))
    log.write(f"# make gpu-smoke{' (dry run)' if dry_run else ''}: {device_name}, torch {torch.__version__}, "
              f"{stamp:%Y-%m-%d %H:%M} UTC")

    work = Path(tempfile.mkdtemp(prefix="gpu-smoke-"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests"),
                                                        os.environ.get("PYTHONPATH", "")]),
           "PYTHONUNBUFFERED": "1", "PCD_KERNELS_AUTOTUNE": "0"}
    if dry_run:
        env["TRITON_INTERPRET"] = "1"
    else:
        # The extension is built for sm_90a only, and tests/test_build.py checks what it was built for.
        env.update(PCD_KERNELS_POISON_CUDA="1", PCD_KERNELS_CUDA_ARCHS="90a")
        env.pop("TRITON_INTERPRET", None)
    build_log = Path(str(base) + "_build.log")
    build, build_error = start_build(env, build_log, dry_run)
    device = "cpu" if dry_run else "cuda"
    groups = check_groups(device, dry_run) + [trainer_group(work, dry_run)]
    write_images(work / "images")
    rows: List[Dict] = []
    build_state: Dict[str, Optional[str]] = {"error": build_error}

    def wait_for_build() -> Optional[str]:
        if build is None:
            return build_state["error"]
        if build.poll() is None:
            try:
                build.wait(timeout=max(1.0, deadline - time.perf_counter()))
            except subprocess.TimeoutExpired:
                _kill_session(build)
                build.wait()
                build_state["error"] = "the extension build ran out of time"
        if build.returncode not in (0, None) and build_state["error"] is None:
            build_state["error"] = f"the extension build failed (exit {build.returncode}; see {build_log.name})"
        return build_state["error"]

    def run(group: Group) -> Dict:
        if group.needs_extension and not group.skip:
            error = wait_for_build()
            if error:
                return {"check": group.name, "op": group.op, "backend": group.backend, "verdict": "FAIL",
                        "measured": error}
        if time.perf_counter() > deadline:
            return {"check": group.name, "op": group.op, "backend": group.backend, "verdict": "not run",
                    "measured": f"the {args.budget:.0f} s budget was spent"}
        row = run_group(dataclasses.replace(group, timeout=int(min(group.timeout, max(
            30.0, deadline - time.perf_counter())))), env, work, log, dry_run)
        log.write(f"{row['verdict']:>7}  {row['check']}: {row.get('measured', '')} ({row.get('seconds', 0):.0f} s)")
        return row

    # The CUDA kernels alone first (they wait for the build: a minute for sm_90a), the groups that
    # do not need the extension beside them, then the op groups of the CUDA backend.
    kernel_checks = [g for g in groups if g.name.startswith("cuda kernel ")]
    ordered = kernel_checks + sorted((g for g in groups if g not in kernel_checks), key=lambda g: g.needs_extension)
    jobs = args.jobs or (2 if dry_run else 6)
    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        rows = list(pool.map(run, ordered))
    if build is not None:
        wait_for_build()

    targets: List[Dict] = []
    bench_json = None
    if not args.no_bench:
        bench_out = work / "bench"
        remaining = int(started + args.budget - time.perf_counter())
        log.write(f"# targets: {' '.join(bench_argv(bench_out, dry_run))} (at most {remaining} s)")
        environment, note = bench_environment(rows, env)
        if note:
            log.write(f"# {note}")
        output, code = run_bounded([sys.executable, *bench_argv(bench_out, dry_run)], environment, max(remaining, 90))
        log.write(output[-25000:] + ("\nthe benchmark ran out of time" if code is None else ""), echo=False)
        found = sorted(bench_out.glob("*.json"))
        results = []
        if found:
            bench = json.loads(found[-1].read_text())
            results = annotated(bench)
            bench_json = Path(str(base) + "_bench.json")
            bench_json.write_text(json.dumps(bench, indent=1))
        targets = [judge(t, results, dry_run) for t in TARGETS]

    everything = rows + targets
    failed = [r for r in rows if r["verdict"] in ("FAIL", "not run")]
    summary = {"device": device_name, "dry_run": dry_run, "date_utc": stamp.isoformat(),
               "torch": torch.__version__, "seconds": round(time.perf_counter() - started, 1),
               "checks": rows, "targets": targets, "build_log": build_log.name if build_log.exists() else None,
               "bench_json": bench_json.name if bench_json else None}
    base.with_suffix(".json").write_text(json.dumps(summary, indent=1))
    shutil.rmtree(work, ignore_errors=True)
    log.write("\n" + table(everything))
    log.write(f"\n{len(rows) - len(failed)} of {len(rows)} checks passed or skipped with a reason; "
              f"targets: {sum(t['verdict'] == 'pass' for t in targets)} met, "
              f"{sum(t['verdict'] == 'miss' for t in targets)} missed; {summary['seconds']:.0f} s. "
              f"Files: {base.name}.log, .json" + (f", {bench_json.name}" if bench_json else "")
              + (f", {build_log.name}" if build_log.exists() else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
