"""bench/gpu_smoke.py (make gpu-smoke): how it judges the targets and reads the test groups. The
whole script runs on CI as ``make gpu-smoke DRY_RUN=1`` (.ci/run)."""
import os
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import gpu_smoke  # noqa: E402


def _result(case, provider, ms, peak_mb=100.0, status="ok", **extra):
    return {"case": case, "provider": provider, "status": status, "total": {"p50": ms}, "peak_mb": peak_mb, **extra}


@pytest.mark.parametrize("ours_ms, verdict", [(20.0, "pass"), (40.0, "miss")])
def test_a_speed_target_compares_with_the_fastest_rival_that_ran(ours_ms, verdict):
    target = gpu_smoke.Target("mhsa", "mhsa-64x64", "speedup", gpu_smoke.SDPA, 1.2)
    results = [_result("mhsa-64x64", "ours-triton", ours_ms), _result("mhsa-64x64", "sdpa-flash", 30.0),
               _result("mhsa-64x64", "sdpa-math", 90.0), _result("mhsa-64x64", "sdpa-cudnn", 1.0, status="error"),
               _result("other", "sdpa-efficient", 1.0)]
    row = gpu_smoke.judge(target, results, dry_run=False)
    assert row["verdict"] == verdict and row["ratio"] == pytest.approx(30.0 / ours_ms)
    assert "sdpa-flash" in row["measured"]


def test_memory_share_and_runs_targets():
    results = [_result("citys", "ours-triton", 10.0, peak_mb=50.0, share_of_matmul=0.62, tflops=600.0),
               _result("citys", "naive", 80.0, peak_mb=2000.0)]
    memory = gpu_smoke.judge(gpu_smoke.Target("m", "citys", "memory", ("naive",), 20.0), results, False)
    assert memory["verdict"] == "pass" and memory["ratio"] == pytest.approx(40.0)
    share = gpu_smoke.judge(gpu_smoke.Target("s", "citys", "share", (), 0.7), results, False)
    assert share["verdict"] == "miss" and share["measured"].startswith("62 %")
    assert gpu_smoke.judge(gpu_smoke.Target("r", "citys", "runs"), results, False)["verdict"] == "pass"
    # What the budget did not reach is "not measured", not a miss; what failed to run misses its goal
    # (a report-only target is skipped); a result that disagrees with naive fails; a rival out of
    # memory meets a memory goal, one that errs judges nothing; a dry run judges nothing.
    absent = gpu_smoke.Target("x", "absent", "speedup", ("naive",), 3.0)
    assert gpu_smoke.judge(absent, results, False)["verdict"] == "not measured"
    broken = results + [_result("absent", "ours-triton", 1.0, status="oom")]
    assert gpu_smoke.judge(absent, broken, False)["verdict"] == "miss"
    assert gpu_smoke.judge(gpu_smoke.Target("u", "absent", "runs"), broken, False)["verdict"] == "miss"
    assert gpu_smoke.judge(gpu_smoke.Target("x", "absent", "speedup", ("naive",)), broken, False)["verdict"] == "skip"
    wrong = [_result("citys", "ours-triton", 1.0, agrees_with_naive=False), _result("citys", "naive", 80.0)]
    assert gpu_smoke.judge(gpu_smoke.Target("w", "citys", "speedup", ("naive",), 5.0), wrong, False)["verdict"] \
        == "FAIL"
    for status, verdict in (("oom", "pass"), ("error", "skip")):
        rival = [_result("citys", "ours-triton", 1.0), _result("citys", "naive", 1.0, status=status)]
        target = gpu_smoke.Target("m", "citys", "memory", ("naive",), 20.0)
        assert gpu_smoke.judge(target, rival, False)["verdict"] == verdict
    dry = gpu_smoke.Target("d", "pcd-target", "speedup", ("naive",), 3.0, dry_case="citys")
    assert gpu_smoke.judge(dry, results + [_result("citys", "ours-torch", 20.0)], True)["verdict"] == "dry run"


def test_junit_counts_per_dtype_and_failures(tmp_path):
    xml = tmp_path / "r.xml"
    xml.write_text('<testsuites><testsuite>'
                   '<testcase name="test_a[triton-cuda-float32]"/>'
                   '<testcase name="test_a[triton-cuda-bfloat16]"><failure message="x"/></testcase>'
                   '<testcase name="test_b[triton-cuda-bfloat16]"/>'
                   '<testcase name="test_c[triton-cuda-float16]"><skipped message="why"/></testcase>'
                   '</testsuite></testsuites>')
    counts, by_dtype, failures = gpu_smoke._junit_counts(xml)
    assert counts == {"passed": 2, "failed": 1, "skipped": 1}
    assert by_dtype == {"float32": {"passed": 1, "total": 1}, "bfloat16": {"passed": 1, "total": 2},
                        "float16": {"passed": 0, "total": 0}}
    assert failures == ["test_a[triton-cuda-bfloat16]"]


def test_a_command_that_says_skip_is_reported_as_skipped(tmp_path):
    """A command group (bench/cuda_kernel_check.py) whose last line says why it did not apply here
    (a TMA kernel on a GPU that is not sm_90) is a skip, not a pass."""
    log = gpu_smoke.Log(tmp_path / "log")
    for line, verdict in (("skip k: the TMA kernels run on sm_90 GPUs only", "skip"), ("ok   k", "pass")):
        command = gpu_smoke.Group("k", "op", "cuda", ["-c", f"print({line!r})"], 10, pytest=False)
        row = gpu_smoke.run_group(command, {**os.environ}, tmp_path, log, False)
        assert row["verdict"] == verdict, row


def test_a_gpu_group_where_a_dtype_or_everything_skipped_fails(tmp_path, monkeypatch):
    group = gpu_smoke.Group("g", "op", "triton", ["tests/x.py"], timeout=10, every_dtype=True)
    xml = ('<testsuites><testsuite><testcase name="t[triton-cuda-float32]"/><testcase name="t[triton-cuda-float16]"/>'
           '<testcase name="t[triton-cuda-bfloat16]"><skipped message="no"/></testcase></testsuite></testsuites>')

    def fake_run(argv, env, timeout):
        junit = next(a for a in argv if a.startswith("--junitxml="))[len("--junitxml="):]
        Path(junit).write_text(xml)
        return "", 0

    monkeypatch.setattr(gpu_smoke, "run_bounded", fake_run)
    log = gpu_smoke.Log(tmp_path / "log")
    on_gpu = gpu_smoke.run_group(group, {}, tmp_path, log, dry_run=False)
    assert on_gpu["verdict"] == "FAIL" and "nothing ran in bfloat16" in on_gpu["measured"]
    assert gpu_smoke.run_group(group, {}, tmp_path, log, dry_run=True)["verdict"] == "pass"
    xml = '<testsuites><testsuite><testcase name="t[cuda-cuda-float32]"><skipped message="no"/></testcase>' \
          '</testsuite></testsuites>'
    assert gpu_smoke.run_group(gpu_smoke.Group("c", "op", "cuda", [], 10), {}, tmp_path, log, False)["verdict"] \
        == "FAIL"


def test_a_timeout_kills_what_the_command_started():
    started = time.time()
    output, code = gpu_smoke.run_bounded([sys.executable, "-c", "import subprocess, sys; subprocess.Popen("
                                          "[sys.executable, '-c', 'import time; time.sleep(60)']); "
                                          "print('child started', flush=True); import time; time.sleep(60)"],
                                         dict(os.environ), timeout=3)
    assert code is None and "child started" in output and time.time() - started < 30


def test_each_op_test_file_names_the_tests_to_run_and_says_what_is_missing(tmp_path, monkeypatch):
    """check_groups reads each op's -k expressions, GPU_SMOKE and GPU_SMOKE_DRY, from its test file
    (found from the registry); a test file without one fails saying what to add where."""
    from common import registry

    for dry_run in (True, False):
        assert {g.op for g in gpu_smoke.check_groups("cpu", dry_run)} >= set(registry())
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_new_op.py").write_text('GPU_SMOKE = ("test_a or "\n             "test_b")\n'
                                                      'GPU_SMOKE_DRY = GPU_SMOKE\nOTHER = 3\n')
    monkeypatch.setattr(gpu_smoke, "ROOT", tmp_path)
    for name in ("GPU_SMOKE", "GPU_SMOKE_DRY"):
        assert gpu_smoke.string_in_test_file("tests/test_new_op.py", name) == "test_a or test_b"
    with pytest.raises(LookupError, match="tests/test_new_op.py defines no MISSING: add MISSING = "):
        gpu_smoke.string_in_test_file("tests/test_new_op.py", "MISSING")
    with pytest.raises(LookupError, match="OTHER must be a string"):
        gpu_smoke.string_in_test_file("tests/test_new_op.py", "OTHER")
    with pytest.raises(LookupError, match="tests/test_absent.py does not exist"):
        gpu_smoke.string_in_test_file("tests/test_absent.py", "GPU_SMOKE")


def test_every_group_selects_tests_and_every_target_names_a_benchmark_case():
    import subprocess

    for group in gpu_smoke.check_groups("cuda", dry_run=False):
        if not group.pytest:  # a script: each CUDA kernel alone (the next test runs its problems)
            assert group.argv[0] == "bench/cuda_kernel_check.py" and group.needs_extension, group
            continue
        listed = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                                 *group.argv], capture_output=True, text=True, cwd=gpu_smoke.ROOT)
        assert listed.returncode == 0 and " tests collected" in listed.stdout, (group.name, listed.stdout[-500:])
        if group.op == "kernels":  # a list of names: each must still name a test (a renamed one would not)
            files, expression = group.argv[:group.argv.index("-k")], group.argv[group.argv.index("-k") + 1]
            every = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                                    *files], capture_output=True, text=True, cwd=gpu_smoke.ROOT).stdout.lower()
            for term in expression.split(" or "):
                assert term.strip().lower() in every, (group.name, term)
    from common import op_modules

    names = {c.name for op in op_modules().values() for device, quick in (("cuda", False), ("cpu", True))
             for c in op.cases(device, quick)}
    for target in gpu_smoke.TARGETS:
        assert target.case in names and target.dry_case in names, target


def test_each_cuda_kernel_runs_alone_first_and_its_problems_are_well_posed(capsys):
    """make gpu-smoke runs each CUDA kernel by itself before any op group (bench/cuda_kernel_check.py):
    here its problems on the torch backend, which must match the reference as the kernels must."""
    import cuda_kernel_check

    groups = gpu_smoke.check_groups("cuda", dry_run=False)
    kernels = [g.argv[1] for g in groups if not g.pytest]
    assert kernels == list(cuda_kernel_check.KERNELS) and [g.argv[1] for g in groups[:len(kernels)]] == kernels
    assert all(g.skip for g in gpu_smoke.check_groups("cpu", dry_run=True) if not g.pytest)
    for kernel in kernels:
        assert cuda_kernel_check.main([kernel, "--backend", "torch", "--device", "cpu"]) == 0, capsys.readouterr().out
        lines = capsys.readouterr().out.splitlines()
        assert lines and all(line.startswith("ok ") for line in lines), lines


def test_the_benchmark_runs_the_cp_async_kernels_where_a_tma_kernel_failed_its_check():
    import gpu_smoke

    def rows(verdict):
        return [{"check": "cuda kernel pixel_contrastive.forward_kernel", "verdict": "FAIL"},
                {"check": "cuda kernel pixel_contrastive.key_backward_tma_kernel", "verdict": verdict},
                {"check": "pixel_contrastive_loss triton", "verdict": "pass"}]

    env = {"PATH": "/bin"}
    for verdict in ("pass", "skip"):
        assert gpu_smoke.bench_environment(rows(verdict), env) == ({"PATH": "/bin", "PCD_KERNELS_AUTOTUNE": "1"}, "")
    environment, note = gpu_smoke.bench_environment(rows("FAIL"), env)
    assert environment == {"PATH": "/bin", "PCD_KERNELS_AUTOTUNE": "1", "PCD_KERNELS_CUDA_TMA": "0"}
    assert note.startswith("key_backward_tma_kernel failed: the benchmark runs the cp.async kernels")
