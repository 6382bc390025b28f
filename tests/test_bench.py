"""bench/run.py, the README's main job, runs end to end (CPU, quick sizes) and writes its JSON and CSV."""
import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_quick_benchmark_runs_and_providers_agree(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "run.py"), "--quick", "--device", "cpu",
                          "--providers", "naive", "ours-torch", "ours-triton", "sdpa-flash", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    (result_file,) = tmp_path.glob("*_quick.json")
    data = json.loads(result_file.read_text())
    assert data["meta"]["device"].startswith("CPU") and data["meta"]["versions"]["torch"]
    for op in ("pixel_contrastive_loss", "omni_contrastive_loss"):
        assert f"| {op} |" in out.stdout
        by_provider = {r["provider"]: r for r in data["results"] if r["op"] == op}
        assert by_provider["naive"]["status"] == "ok" and by_provider["ours-torch"]["status"] == "ok"
        assert by_provider["ours-torch"]["agrees_with_naive"] is True
        triton = by_provider["ours-triton"]
        assert triton["status"] == "unavailable" and "CUDA" in triton["reason"]
    for op in ("pixel_attention", "MHSA2d"):
        assert f"| {op} |" in out.stdout
        by_provider = {r["provider"]: r for r in data["results"] if r["op"] == op}
        for provider in ("naive", "sdpa-flash") + (("ours-torch",) if op == "pixel_attention" else ()):
            assert by_provider[provider]["status"] == "ok", by_provider[provider]
            assert by_provider[provider]["agrees_with_naive"] is True
        assert by_provider["ours-triton"]["status"] == "unavailable"
    pcd = {r["provider"]: r for r in data["results"] if r["op"] == "pixel_contrastive_loss"}
    assert pcd["ours-torch"]["peak_mb"] < pcd["naive"]["peak_mb"]
    # results.csv: a row per result, mode and metric, matching the JSON.
    with open(tmp_path / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    ok = [r for r in data["results"] if r["status"] == "ok"]
    assert len(rows) == 4 * len(ok) + (len(data["results"]) - len(ok))
    for r in ok:
        mine = {(row["mode"], row["metric"]): row for row in rows
                if (row["op"], row["case"], row["provider"]) == (r["op"], r["case"], r["provider"])}
        assert float(mine[("total", "ms")]["p50"]) == pytest.approx(r["total"]["p50"], rel=1e-3)
        assert float(mine[("backward", "ms")]["p80"]) == pytest.approx(r["backward"]["p80"], rel=1e-3)
        assert float(mine[("total", "peak_mb")]["p50"]) == pytest.approx(r["peak_mb"], rel=1e-3, abs=1e-3)
        assert mine[("total", "ms")]["device"] == data["meta"]["device"]
    assert {row["status"] for row in rows} >= {"ok", "unavailable"}
