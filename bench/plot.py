"""python bench/plot.py: the size sweeps in bench/results/results.csv as PNGs.

For every benchmark run in the CSV (one device, one start time) and every sweep in it (an op
varying N, K, C, the map side or the head dim), one figure: total time (forward + backward,
median with its p20-p80 band) and peak memory against the swept size, log-log, one line per
provider. Providers that ran out of memory are marked at the sizes where they did.

    python bench/plot.py                        # the latest run of each device
    python bench/plot.py --all                  # every run in the CSV
    python bench/plot.py --csv other.csv --out some/dir

Files are named <device>_<date>_<op>_<sweep>.png, under bench/results/plots/ by default.
"""
import argparse
import csv
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
AXES = {"N": "anchors N", "K": "queue keys K", "C": "channels C", "map": "map side (pixels)",
        "d": "head dim d"}


def read_rows(csv_path):
    with open(csv_path, newline="") as f:
        return list(csv.DictReader(f))


def runs(rows):
    """{(device, timestamp): rows}, in the CSV's order."""
    out = defaultdict(list)
    for row in rows:
        out[(row["device"], row["timestamp"])].append(row)
    return out


def latest_runs(rows):
    """The newest run of each device that has sweep rows."""
    newest = {}
    for (device, stamp), run_rows in runs(rows).items():
        if any(r["sweep"] for r in run_rows) and stamp > newest.get(device, ("", ""))[0]:
            newest[device] = (stamp, run_rows)
    return {(device, stamp): run_rows for device, (stamp, run_rows) in newest.items()}


def slug(text):
    return "".join(c if c.isalnum() else "-" for c in text).strip("-").lower()[:40]


def figure_name(device, stamp, op, sweep):
    return f"{slug(device)}_{stamp[:10].replace('-', '')}_{op}_{sweep}.png"


def _series(run_rows, op, sweep):
    """{provider: {"x": [...], "ms": [(p50, p20, p80)], "mb": [...], "oom": [x...]}}"""
    series = defaultdict(lambda: {"x": [], "ms": [], "mb": [], "oom": []})
    by_point = defaultdict(dict)
    for r in run_rows:
        if r["op"] != op or r["sweep"] != sweep:
            continue
        key = (r["provider"], int(r["x"]))
        if r["status"] == "oom":
            series[r["provider"]]["oom"].append(int(r["x"]))
        elif r["status"] == "ok":
            by_point[key][(r["mode"], r["metric"])] = r
    for (provider, x), metrics in sorted(by_point.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        total, peak = metrics.get(("total", "ms")), metrics.get(("total", "peak_mb"))
        if total is None or peak is None:
            continue
        s = series[provider]
        s["x"].append(x)
        s["ms"].append(tuple(float(total[q]) for q in ("p50", "p20", "p80")))
        s["mb"].append(max(float(peak["p50"]), 1e-3))  # log scale: a provider may add ~0 MB
    return series


def plot_sweep(run_rows, device, stamp, op, sweep, out_dir):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = _series(run_rows, op, sweep)
    if not any(s["x"] for s in series.values()):
        return None
    points = [r for r in run_rows if r["op"] == op and r["sweep"] == sweep]
    shape = max(points, key=lambda r: int(r["x"]))["shape"]
    dtype = next((r["dtype"] for r in run_rows if r["op"] == op), "")
    fig, (ax_time, ax_mem) = plt.subplots(1, 2, figsize=(11, 4.2))
    for provider, s in sorted(series.items()):
        if s["x"]:
            p50 = [m[0] for m in s["ms"]]
            low = [m[0] - m[1] for m in s["ms"]]
            high = [m[2] - m[0] for m in s["ms"]]
            line = ax_time.errorbar(s["x"], p50, yerr=[low, high], marker="o", capsize=3, label=provider)
            ax_mem.plot(s["x"], s["mb"], marker="o", color=line[0].get_color(), label=provider)
            color = line[0].get_color()
        else:
            color = None
        for x in s["oom"]:
            for ax in (ax_time, ax_mem):
                ax.axvline(x, color=color or "grey", linestyle=":", alpha=0.6)
                ax.annotate(f"{provider}: OOM", (x, 0.95), xycoords=("data", "axes fraction"), rotation=90,
                            fontsize=7, ha="right", va="top", color=color or "grey")
    for ax, label in ((ax_time, "forward + backward, ms (median, p20-p80)"), (ax_mem, "peak memory above inputs, MB")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(AXES.get(sweep, sweep))
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    ax_time.legend(fontsize=8)
    fig.suptitle(f"{op}, sweep over {AXES.get(sweep, sweep)} — {device}, {dtype}, {stamp[:10]}\n"
                 f"(last point: {shape})", fontsize=9)
    fig.tight_layout()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / figure_name(device, stamp, op, sweep)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_runs(selected, out_dir):
    """Every sweep figure of the given runs; returns the files written."""
    written = []
    for (device, stamp), run_rows in selected.items():
        sweeps = sorted({(r["op"], r["sweep"]) for r in run_rows if r["sweep"]})
        for op, sweep in sweeps:
            path = plot_sweep(run_rows, device, stamp, op, sweep, out_dir)
            if path is not None:
                written.append(path)
    return written


def plot_run(csv_path, stamp, out_dir):
    """The figures of the run that started at ``stamp`` (what bench/run.py calls at its end)."""
    selected = {key: rows for key, rows in runs(read_rows(csv_path)).items() if key[1] == stamp}
    return plot_runs(selected, Path(out_dir))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--csv", default=str(ROOT / "bench" / "results" / "results.csv"))
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "plots"))
    parser.add_argument("--all", action="store_true", help="every run in the CSV, not only each device's latest")
    args = parser.parse_args(argv)
    rows = read_rows(args.csv)
    selected = runs(rows) if args.all else latest_runs(rows)
    written = plot_runs(selected, Path(args.out))
    for path in written:
        print(f"wrote {path}")
    if not written:
        print(f"no sweep results in {args.csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
