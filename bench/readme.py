"""python bench/readme.py: the measured results in docs/performance.md, generated from bench/results/.

Everything between docs/performance.md's `<!-- performance:begin -->` and `<!-- performance:end -->`
markers is written here from the newest full (not --quick) run of each op on each device in
bench/results/*.json, with the device, date, versions and commit it came from, the ceilings
measured at the run's start, and the sweep plots bench/plot.py drew from it. It says which
devices have no results: no figure in that section is typed by hand. `python bench/run.py
--publish` runs it after a run; runs into bench/runs/ (the default) change nothing here.

    python bench/readme.py            # rewrite the section
    python bench/readme.py --check    # exit 1 if the page is not what the results give (CI)
"""
import argparse
import json
import os
import sys
from pathlib import Path

import plot

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
PAGE = ROOT / "docs" / "performance.md"
BEGIN, END = "<!-- performance:begin -->", "<!-- performance:end -->"
# The columns of the fixed-case tables, from a result dict.
COLUMNS = ("case", "provider", "fwd ms", "bwd ms", "total ms", "peak MB", "× vs naive", "% matmul", "% of bound",
           "% copy BW")


def load_runs(results_dir=RESULTS):
    """Full runs (JSON files) with the new-style metadata, oldest first."""
    runs = []
    for path in sorted(results_dir.glob("*.json")):
        data = json.loads(path.read_text())
        meta = data.get("meta", {})
        if meta.get("quick") or "roofline" not in meta:
            continue
        runs.append((meta["date_utc"], path, data))
    return [(path, data) for _, path, data in sorted(runs, key=lambda run: run[0])]


def newest_per_op(runs):
    """{device: {op: (path, data)}}: for every op, the newest run of it on each device."""
    table = {}
    for path, data in runs:
        for op in {r["op"] for r in data["results"]}:
            table.setdefault(data["meta"]["device"], {})[op] = (path, data)
    return table


def _fmt(x, digits=2):
    if x is None:
        return "—"
    if abs(x) >= 100:
        digits = 0
    return f"{x:.{digits}f}"


def _row(r):
    if r["status"] != "ok":
        return [r["case"], r["provider"], f"{r['status']}: {r.get('reason', '')}"] + [""] * (len(COLUMNS) - 3)
    share = lambda x: f"{100 * x:.0f}" if x is not None else "—"
    return [r["case"], r["provider"], _fmt(r["forward"]["p50"]), _fmt(r["backward"]["p50"]), _fmt(r["total"]["p50"]),
            _fmt(r["peak_mb"], 0), _fmt(r.get("speedup_vs_naive")), share(r.get("share_of_matmul")),
            share(r.get("share_of_bound")), share(r.get("share_of_copy"))]


def _table(rows):
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return lines


def _relative(path, base):
    """``path`` as a link from a page in ``base`` (``../bench/...`` from docs/)."""
    return Path(os.path.relpath(path, base)).as_posix()


def device_section(device, ops, results_dir, page_dir):
    lines = []
    sources = {path: data for path, data in ops.values()}
    is_gpu = not device.startswith("CPU")
    lines.append(f"### {device}" + ("" if is_gpu else " — CPU only"))
    lines.append("")
    for path, data in sorted(sources.items(), key=lambda item: item[1]["meta"]["date_utc"]):
        meta, roof = data["meta"], data["meta"]["roofline"]
        versions = meta["versions"]
        when = meta["date_utc"][:16].replace("T", " ")
        lines.append(f"- [`{path.name}`]({_relative(path, page_dir)}): {when} UTC, {meta['dtype']}, "
                     f"torch {versions['torch']}, triton {versions['triton'] or '—'}, "
                     f"commit {meta['git_commit'] or '?'}; "
                     f"measured at start: {roof['matmul_dtype']} matmul {roof['matmul_tflops']:.3g} TFLOP/s, "
                     f"copy {roof['copy_gbps']:.0f} GB/s")
    lines.append("")
    if not is_gpu:
        lines.append("Wall-clock medians on a CPU; peak = resident memory above the inputs, in a subprocess "
                     "per provider. These say nothing about GPU speed: the Triton and CUDA kernels do not "
                     "run here.")
        lines.append("")
    for op, (path, data) in sorted(ops.items()):
        fixed = [r for r in data["results"] if r["op"] == op and not r.get("sweep")]
        if fixed:
            lines.append(f"**{op}** — " + "; ".join(sorted({f"{r['case']}: {r['describe']}" for r in fixed})))
            lines.append("")
            lines += _table([_row(r) for r in fixed])
            lines.append("")
        stamp = data["meta"]["date_utc"]
        for sweep in sorted({r["sweep"] for r in data["results"] if r["op"] == op and r.get("sweep")}):
            png = results_dir / "plots" / plot.figure_name(device, stamp, op, sweep)
            if png.exists():
                lines.append(f"![{op}, sweep over {plot.AXES.get(sweep, sweep)} on {device}]"
                             f"({_relative(png, page_dir)})")
                lines.append("")
    return lines


def section(results_dir=RESULTS, page_dir=PAGE.parent):
    by_device = newest_per_op(load_runs(results_dir))
    lines = [BEGIN, "<!-- generated by `python bench/readme.py` from bench/results/; do not edit by hand -->", ""]
    gpus = [d for d in by_device if not d.startswith("CPU")]
    if not gpus:
        lines.append("**No GPU results yet.** No GPU has run `make gpu-check` for this project, so every "
                     "figure below is CPU wall-clock, and the Triton and CUDA kernels, FlexAttention and "
                     "SDPA's CUDA backends have not been timed at all. The GPU speed and memory targets "
                     "(see [verification.md](verification.md)) are unmeasured.")
        lines.append("")
    for device in sorted(by_device, key=lambda d: (d.startswith("CPU"), d)):
        lines += device_section(device, by_device[device], results_dir, page_dir)
    if not by_device:
        lines.append("No full benchmark run has been recorded: run `python bench/run.py --publish`.")
        lines.append("")
    lines.append(END)
    return "\n".join(lines)


def render(page_text, new_section):
    if BEGIN not in page_text or END not in page_text:
        raise SystemExit(f"{PAGE.relative_to(ROOT)} has no {BEGIN} ... {END} markers")
    head, rest = page_text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return head + new_section + tail


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="exit 1 if the page's section is out of date")
    args = parser.parse_args(argv)
    name = PAGE.relative_to(ROOT)
    text = PAGE.read_text()
    updated = render(text, section())
    if args.check:
        if updated != text:
            print(f"{name}'s measured results are not what bench/results gives: run python bench/readme.py")
            return 1
        print(f"{name}'s measured results match bench/results")
        return 0
    PAGE.write_text(updated)
    print(f"{name}'s measured results rewritten from bench/results")
    return 0


if __name__ == "__main__":
    sys.exit(main())
