"""bench/gpu_smoke.py (make gpu-smoke): how it judges the targets and reads the test groups. The
whole script runs on CI as ``make gpu-smoke DRY_RUN=1`` (.ci/run)."""
import sys
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
    # What did not run misses its goal (a report-only target is skipped); a dry run judges nothing.
    assert gpu_smoke.judge(gpu_smoke.Target("x", "absent", "speedup", ("naive",), 3.0), results, False)["verdict"] \
        == "miss"
    assert gpu_smoke.judge(gpu_smoke.Target("x", "absent", "speedup", ("naive",)), results, False)["verdict"] == "skip"
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


def test_every_group_selects_tests_and_every_target_names_a_benchmark_case():
    import subprocess

    for group in gpu_smoke.check_groups("cuda", dry_run=False):
        listed = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                                 *group.argv], capture_output=True, text=True, cwd=gpu_smoke.ROOT)
        assert listed.returncode == 0 and " tests collected" in listed.stdout, (group.name, listed.stdout[-500:])
    sys.path.insert(0, str(gpu_smoke.ROOT / "bench"))
    import omni_contrastive
    import pixel_attention
    import pixel_contrastive

    names = {c.name for op in (pixel_contrastive, omni_contrastive, pixel_attention)
             for device, quick in (("cuda", False), ("cpu", True)) for c in op.cases(device, quick)}
    for target in gpu_smoke.TARGETS:
        assert target.case in names and target.dry_case in names, target
