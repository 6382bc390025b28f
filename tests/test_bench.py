"""bench/run.py, the README's main job, runs end to end (CPU, quick sizes) and writes its table,
JSON, CSV and sweep plot, by default into the ignored bench/runs/; bench/readme.py turns the
published results (bench/results/) into docs/performance.md's measured section."""
import argparse
import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pcd_kernels.backends import OPS

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("bench")
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "run.py"), "--quick", "--device", "cpu",
                          "--providers", "naive", "ours-torch", "ours-triton", "sdpa-flash", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return tmp_path, out


def test_quick_benchmark_runs_and_providers_agree(quick_run):
    tmp_path, out = quick_run
    header = "| op | case | provider | fwd ms | bwd ms | total ms | peak MB | × vs naive | TFLOP/s | % matmul"
    assert header in out.stdout
    (result_file,) = tmp_path.glob("*_quick.json")
    data = json.loads(result_file.read_text())
    assert data["meta"]["device"].startswith("CPU") and data["meta"]["versions"]["torch"]
    by_case = {}
    for r in data["results"]:
        by_case.setdefault((r["op"], r["case"]), {})[r["provider"]] = r
    # every op of the registry is measured (pixel_attention also as the MHSA2d module)
    assert {op for op, _ in by_case} == set(OPS) | {"MHSA2d"}
    for (op, case), by_provider in by_case.items():
        assert f"| {op} |" in out.stdout
        # naive, ours-torch (no module provider) and SDPA (attention's) run and agree with naive
        wanted = ("naive",) + (("ours-torch",) if op != "MHSA2d" else ()) + (
            ("sdpa-flash",) if op in ("pixel_attention", "MHSA2d") else ())
        for provider in wanted:
            assert by_provider[provider]["status"] == "ok", (op, case, by_provider[provider])
            assert by_provider[provider]["agrees_with_naive"] is True, (op, case, provider)
        triton = by_provider["ours-triton"]
        assert triton["status"] == "unavailable" and "CUDA" in triton["reason"], (op, case, triton)
    # (No peak-memory comparison at these sizes: the quick case's 16 MB logit matrix is under
    # glibc's dynamic mmap threshold once warm-up has freed one, so resident-set sampling misses it
    # and both providers read about 1 MB, in either order. tests/test_memory.py tests memory.)
    # results.csv: a row per result, mode and metric, matching the JSON.
    with open(tmp_path / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    ok = [r for r in data["results"] if r["status"] == "ok"]
    per_ok = lambda r: 6 + (r["speedup_vs_naive"] is not None)  # 3 ms, peak, TFLOP/s, GB/s, × naive
    assert len(rows) == sum(map(per_ok, ok)) + (len(data["results"]) - len(ok))
    for r in ok:
        mine = {(row["mode"], row["metric"]): row for row in rows
                if (row["op"], row["case"], row["provider"]) == (r["op"], r["case"], r["provider"])}
        assert float(mine[("total", "ms")]["p50"]) == pytest.approx(r["total"]["p50"], rel=1e-3)
        assert float(mine[("backward", "ms")]["p80"]) == pytest.approx(r["backward"]["p80"], rel=1e-3)
        assert float(mine[("total", "peak_mb")]["p50"]) == pytest.approx(r["peak_mb"], rel=1e-3, abs=1e-3)
        assert mine[("total", "ms")]["device"] == data["meta"]["device"]
        assert float(mine[("total", "tflops")]["p50"]) == pytest.approx(r["tflops"], rel=1e-3)
    assert {row["status"] for row in rows} >= {"ok", "unavailable"}
    # the ceilings measured at start, and each result's share of them
    roofline = data["meta"]["roofline"]
    assert roofline["matmul_tflops"] > 0 and roofline["copy_gbps"] > 0
    for r in ok:
        assert r["tflops"] == pytest.approx(r["flops"]["total"] / (r["total"]["p50"] * 1e-3) / 1e12)
        assert r["share_of_copy"] == pytest.approx(r["bytes"]["total"] / (r["total"]["p50"] * 1e-3) / 1e9
                                                   / roofline["copy_gbps"])
        assert r["rotation"] >= 1
    assert "Bytes:" not in data["meta"]["flop_formulas"]["pixel_contrastive_loss"]
    assert "6*N*K*C" in data["meta"]["flop_formulas"]["pixel_contrastive_loss"]


def test_quick_benchmark_sweep_and_plot(quick_run):
    tmp_path, out = quick_run
    with open(tmp_path / "results.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["sweep"] == "K" and r["metric"] == "ms" and r["mode"] == "total"]
    xs = sorted({(r["provider"], int(r["x"])) for r in rows})
    assert xs == [("naive", 1024), ("naive", 4096), ("ours-torch", 1024), ("ours-torch", 4096)]
    (png,) = (tmp_path / "plots").glob("*_pixel_contrastive_loss_K.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert f"wrote {png}" in out.stdout


def test_readme_section_is_generated_from_a_run(quick_run, tmp_path):
    import readme

    results, _ = quick_run
    (run,) = results.glob("*_quick.json")
    data = json.loads(run.read_text())
    data["meta"]["quick"] = False  # readme.py skips quick runs
    (tmp_path / run.name).write_text(json.dumps(data))
    text = readme.section(results_dir=tmp_path, page_dir=tmp_path)
    assert text.startswith(readme.BEGIN) and text.endswith(readme.END)
    assert "No GPU results yet" in text and f"### {data['meta']['device']} — CPU only" in text
    naive = next(r for r in data["results"] if r["op"] == "pixel_contrastive_loss" and r["provider"] == "naive"
                 and not r["sweep"])
    assert f"| {naive['case']} | naive | {naive['forward']['p50']:.2f} |" in text
    assert "| pcd-quick | ours-triton | unavailable:" in text
    assert "copy" in text and data["meta"]["git_commit"] in text


def test_performance_page_matches_the_committed_results():
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "readme.py"), "--check"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    page = (ROOT / "docs" / "performance.md").read_text()
    # every file the page links exists (the plots and JSON, relative to docs/)
    for link in re.findall(r"\]\((\.\./bench/[^)]+)\)", page):
        assert (ROOT / "docs" / link).resolve().is_file(), link
    readme = (ROOT / "README.md").read_text()
    assert "performance:begin" not in readme and "docs/performance.md" in readme


def test_bench_writes_to_an_ignored_folder_unless_published():
    import run

    parser = argparse.ArgumentParser()
    default = argparse.Namespace(out=None, publish=False, quick=False)
    assert run.output_dir(default, parser) == ROOT / "bench" / "runs"
    assert run.output_dir(argparse.Namespace(out=None, publish=True, quick=False), parser) == ROOT / "bench" / "results"
    assert run.output_dir(argparse.Namespace(out="/tmp/x", publish=False, quick=True), parser) == Path("/tmp/x")
    ignored = subprocess.run(["git", "check-ignore", "-q", "bench/runs/results.csv"], cwd=ROOT)
    assert ignored.returncode == 0, "bench/runs/ must be in .gitignore"
    for flags in (["--publish", "--quick"], ["--publish", "--out", "/tmp/x"]):
        out = subprocess.run([sys.executable, str(ROOT / "bench" / "run.py"), "--device", "cpu"] + flags,
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 2 and "--publish" in out.stderr, out.stderr[-2000:]


def test_modelled_bound_adds_exps_to_matmuls_and_meets_the_infonce_goal():
    import model
    import pixel_contrastive

    device = model.Device("test", sms=2, clock_ghz=1.0, bf16_tflops=1e-3, fp32_tflops=1e-4, memory_gbps=1.0)
    b = model.bound(flops=2e9, exps=64e9, bytes_moved=1e9, device=device)  # 2 s + 2 s, or 1 s of memory
    assert (b["tensor_ms"], b["exp_ms"], b["memory_ms"], b["bound_ms"]) == pytest.approx((2e3, 2e3, 1e3, 4e3))
    assert b["peak_share_at_bound"] == pytest.approx(0.5) and b["limit"] == "compute + exp"
    assert model.bound(2e9, 0, 8e9, device)["limit"] == "memory"
    # The goal: the InfoNCE forward + backward at 32,768 x 65,536 x 256 has a bound of at
    # least 70 % of the bf16 peak on an H200; the forward alone, one exp per 2*C FLOPs, less.
    target = next(c for c in pixel_contrastive.cases("cuda", quick=False) if c.name == "pcd-target")
    assert model.case_bound(pixel_contrastive, target)["peak_share_at_bound"] >= 0.70
    assert model.case_bound(pixel_contrastive, target, mode="forward")["peak_share_at_bound"] < 0.70
    measured = model.H200.measured({"matmul_dtype": "bfloat16", "matmul_tflops": 800.0, "copy_gbps": 4300.0,
                                    "sms": 132})
    assert (measured.bf16_tflops, measured.memory_gbps) == (800.0, 4300.0)
    assert model.H200.measured({"matmul_dtype": "float32", "matmul_tflops": 0.2, "copy_gbps": 28.0}) == model.H200


def test_cuda_bound_overlaps_where_the_tma_kernels_run_and_counts_the_preparation():
    import dataclasses

    import model
    import pixel_contrastive

    device = model.Device("test", sms=2, clock_ghz=1.0, bf16_tflops=1e-3, fp32_tflops=1e-4, memory_gbps=1.0)
    target = next(c for c in pixel_contrastive.cases("cuda", quick=False) if c.name == "pcd-target")
    for channels, overlapped in ((256, True), (512, False)):  # one 256-channel chunk: the TMA kernels
        case = dataclasses.replace(target, channels=channels)
        forward = model.case_bound(pixel_contrastive, case, mode="forward", device=device)
        backward = model.case_bound(pixel_contrastive, case, mode="backward", device=device)
        got = model.cuda_contrastive_bound(case, device)
        assert got["forward_ms"] == pytest.approx(forward["overlapped_ms" if overlapped else "bound_ms"])
        assert got["forward_ms"] < forward["bound_ms"] if overlapped else True
        # the backward's exps beside its S, half its MMAs; its products still wait for them
        half = backward["tensor_ms"] / 2
        assert got["backward_ms"] == pytest.approx(
            max(half + max(half, backward["exp_ms"]), backward["memory_ms"]) if overlapped else backward["bound_ms"])
        assert backward["overlapped_ms"] <= got["backward_ms"] <= backward["bound_ms"]
        elements = (2 * case.anchors + case.queue) * channels  # student, teacher, queue: 6 B each, per pass
        assert got["preparation_ms"] == pytest.approx(2 * 6 * elements / 1e9 * 1e3)
        assert got["bound_ms"] == pytest.approx(got["forward_ms"] + got["backward_ms"] + got["preparation_ms"])
    # C = 4 on a device of fast MMAs: the exps outweigh half the backward's MMAs (4 N K C flops,
    # N K exps in the model's count), which then wait for them: tensor / 2 + exp.
    fast = model.Device("test", sms=2, clock_ghz=1.0, bf16_tflops=1.0, fp32_tflops=0.1, memory_gbps=1e6)
    case = dataclasses.replace(target, channels=4)
    pairs = case.anchors * case.keys
    tensor_ms, exp_ms = 4 * pairs * 4 / 1e12 * 1e3, pairs / (2 * 1e9 * 16) * 1e3
    assert exp_ms > tensor_ms / 2
    assert model.cuda_contrastive_bound(case, fast)["backward_ms"] == pytest.approx(tensor_ms / 2 + exp_ms)
    # on an H200 the GPU target's CUDA bound passes the serial one (Triton's), as docs/performance.md says
    assert model.cuda_contrastive_bound(target)["bound_ms"] < model.case_bound(pixel_contrastive, target)["bound_ms"]
    # docs/performance.md quotes the table python bench/model.py prints
    doc = (Path(__file__).resolve().parents[1] / "docs" / "performance.md").read_text()
    rows = [line for line in model.cuda_table().splitlines() if line.startswith("| ")]
    assert len(rows) == 4 and all(row in doc for row in rows), "rerun python bench/model.py into performance.md"


def test_cuda_cp_async_provider_runs_forward_and_backward_with_tma_off_and_restores_the_environment(monkeypatch):
    import os

    import pixel_contrastive
    import run
    import torch

    seen = []

    class Op(torch.autograd.Function):  # records the variable where the extension would read it
        @staticmethod
        def forward(ctx, s):
            seen.append(("forward", os.environ.get("PCD_KERNELS_CUDA_TMA")))
            ctx.shape = s.shape
            return s.sum()

        @staticmethod
        def backward(ctx, grad):
            seen.append(("backward", os.environ.get("PCD_KERNELS_CUDA_TMA")))
            return grad.expand(ctx.shape)

    monkeypatch.setattr(pixel_contrastive, "cuda_extension_reason", lambda device: None)
    monkeypatch.setattr(pixel_contrastive, "_ours",
                        lambda case, backend: lambda s, t, q: seen.append(backend) or Op.apply(s))
    case = pixel_contrastive.cases("cpu", quick=True)[0]
    for before in (None, "1"):
        if before is None:
            monkeypatch.delenv("PCD_KERNELS_CUDA_TMA", raising=False)
        else:
            monkeypatch.setenv("PCD_KERNELS_CUDA_TMA", before)
        result = run.run_provider(pixel_contrastive, case, "ours-cuda-cp.async", "cpu", torch.float16, repeats=2,
                                  warmup=1)
        assert result["status"] == "ok", result
        # every step's forward and backward ran the cuda backend with the cp.async kernels
        assert seen[0] == "cuda" and set(seen) == {"cuda", ("forward", "0"), ("backward", "0")}
        assert os.environ.get("PCD_KERNELS_CUDA_TMA") == before
        seen.clear()


def test_what_a_provider_sets_in_the_environment_ends_with_it_even_when_its_backward_raises(monkeypatch):
    """bench/run.py run_provider restores the environment: ours-cuda-cp.async sets
    PCD_KERNELS_CUDA_TMA=0 until its op's backward has run, and a backward that raises must not
    leave every later ours-cuda measuring the cp.async kernels."""
    import os

    import pixel_contrastive
    import run
    import torch

    class Failing(torch.autograd.Function):
        @staticmethod
        def forward(ctx, s):
            return s.sum()

        @staticmethod
        def backward(ctx, grad):
            raise RuntimeError("the kernel failed")

    def factory():
        def loss_fn(s, t, q):
            os.environ["PCD_KERNELS_CUDA_TMA"] = "0"
            return Failing.apply(s)
        return loss_fn

    monkeypatch.setattr(pixel_contrastive, "providers", lambda case, device: {"failing": factory})
    monkeypatch.delenv("PCD_KERNELS_CUDA_TMA", raising=False)
    case = pixel_contrastive.cases("cpu", quick=True)[0]
    result = run.run_provider(pixel_contrastive, case, "failing", "cpu", torch.float32, repeats=1, warmup=1)
    assert result["status"] == "error" and "the kernel failed" in result["reason"]
    assert "PCD_KERNELS_CUDA_TMA" not in os.environ


def test_gpu_results_are_reported_against_the_bound():
    import run

    r = {"op": "pixel_contrastive_loss", "case": "c", "provider": "ours-triton", "status": "ok", "loss": 1.0,
         "forward": {"p50": 1.0}, "backward": {"p50": 2.0}, "total": {"p50": 8.0}, "peak_mb": 1.0,
         "flops": {"total": 4e12}, "exps": {"total": 4.18e9}, "bytes": {"total": 1e6}}
    roofline = {"matmul_dtype": "bfloat16", "matmul_tflops": 1000.0, "copy_gbps": 4000.0, "sms": 132}
    table = run.report([r], roofline)
    # 4 ms of tensor-core work and 1 ms of exps: a 5 ms bound, 62.5 % of it reached in 8 ms.
    assert r["bound_ms"] == pytest.approx(5.0, rel=1e-3) and r["share_of_bound"] == pytest.approx(0.625, rel=1e-3)
    assert "| 50 | 62 |" in table  # % matmul, then % of bound
    cpu = dict(r)
    run.annotate(cpu, None, {"matmul_dtype": "float32", "matmul_tflops": 0.2, "copy_gbps": 28.0})
    assert cpu["share_of_bound"] is None
