"""python bench/run.py: pcd_kernels side by side with what users would otherwise run.

For every case and provider it measures forward, backward and forward+backward (medians and
p20/p80 over repeats), peak memory above the inputs, the ratio to the naive official formula and,
on CUDA, achieved TFLOP/s and the share of the bf16 matmul rate measured at start on the same
device. It prints a markdown table and writes JSON, CSV rows and sweep plots.

Where the files go: by default bench/runs/ (ignored by git), so trying the benchmark changes no
tracked file. --publish writes into bench/results/ (the committed record) and then regenerates
docs/performance.md from it (bench/readme.py); --out DIR writes anywhere else.

On CPU each provider runs in a subprocess of its own, so its peak RSS is its own; on CUDA all run
in this process and peak memory is torch.cuda.max_memory_allocated above the inputs. A provider
that cannot run is listed with the reason; running out of memory is recorded as OOM.

    python bench/run.py                    # every op, this machine's device, full sizes -> bench/runs/
    python bench/run.py --quick            # small sizes (CPU: 1-2 minutes) -> bench/runs/
    python bench/run.py --publish          # -> bench/results/, then docs/performance.md is regenerated
    python bench/run.py --device cuda --dtype bfloat16 --out /tmp/bench
    python bench/run.py --cases pcd-target --providers naive ours-triton   # a subset
"""
import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402

import model  # noqa: E402
from common import Unavailable, op_modules  # noqa: E402

OPS = op_modules()  # bench/<op module>.py of every op of the registry, by module name
OPS_BY_NAME = {module.OP: module for module in OPS.values()}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
RUNS = ROOT / "bench" / "runs"  # default output: ignored by git
RESULTS = ROOT / "bench" / "results"  # --publish: the committed record that docs/performance.md shows


# ------------------------------------------------------------------------------------------
# Measurement
# ------------------------------------------------------------------------------------------


def _percentiles(samples):
    ordered = sorted(samples)

    def pick(q):
        return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]

    return {"p50": statistics.median(ordered), "p20": pick(0.2), "p80": pick(0.8), "n": len(ordered)}


class _RssSampler:
    """Peak resident memory of this process above a baseline, sampled every millisecond."""

    def __init__(self):
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.baseline = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _rss(self):
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(0.001)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())

    @property
    def extra_mb(self):
        return (self.peak - self.baseline) / 2**20


def _timed_steps(loss_fn, input_sets, device, repeats, warmup, grad_outputs):
    """(forward ms, backward ms, total ms) samples of loss_fn(*inputs) and its backward, and
    checksums of the result (the loss; for a map, its mean square) and of the inputs' gradients
    (their mean square). Step i takes input_sets[i % len(input_sets)]: rotating through sets
    larger than the cache together keeps a step from reading what the previous one left there.
    A map is back-propagated with a fixed random gradient, made once (``grad_outputs`` keeps it
    across calls), outside the timing."""
    fwd, bwd, tot = [], [], []
    zero_grad = getattr(loss_fn, "zero_grad", lambda: None)
    for i in range(warmup + repeats):
        inputs = input_sets[i % len(input_sets)]
        for x in inputs:
            x.grad = None
        zero_grad()
        if device == "cuda":
            events = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
            events[0].record()
        t0 = time.perf_counter()
        out = loss_fn(*inputs)
        if device == "cuda":
            events[1].record()
        t1 = time.perf_counter()
        if out.dim() and "grad" not in grad_outputs:
            if device == "cuda":
                torch.cuda.synchronize()
            # the same values for every provider (one that returns another layout says how the
            # map's gradient looks in it)
            make = lambda shape: torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(out)
            layout = getattr(loss_fn, "grad_output", None)
            grad_outputs["grad"] = layout(make) if layout else make(out.shape)
            if device == "cuda":
                events[1].record()
                torch.cuda.synchronize()
            t1 = time.perf_counter()
        out.backward(grad_outputs["grad"] if out.dim() else None)
        if device == "cuda":
            events[2].record()
            torch.cuda.synchronize()
            f, b = events[0].elapsed_time(events[1]), events[1].elapsed_time(events[2])
        else:
            t2 = time.perf_counter()
            f, b = (t1 - t0) * 1e3, (t2 - t1) * 1e3
        if i >= warmup:
            fwd.append(f)
            bwd.append(b)
            tot.append(f + b)
    checksum = out.detach().float()
    # (a module's parameters count too: its input's gradient may be dominated by a residual)
    with_grad = [x for x in (*inputs, *getattr(loss_fn, "parameters", list)()) if x.grad is not None]
    grads = [x.grad.float().square().sum() for x in with_grad]
    grad_checksum = float(sum(grads) / sum(x.numel() for x in with_grad)) if grads else None
    return fwd, bwd, tot, (float(checksum if not checksum.dim() else checksum.square().mean()), grad_checksum)


def _is_oom(exc):
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def dtype_refused(op_name, provider, dtype):
    """Why ``provider`` cannot run ``op_name`` in ``dtype``, or None: an ``ours-<backend>`` provider
    whose backend takes other dtypes for this op (the registry's: CUDA's pixel_contrastive_loss
    takes no float32). Ask once the provider is set up (its backend's modules import)."""
    from pcd_kernels.backends import OPS, dtypes

    # (ours-<backend>, or ours-<backend>-<variant> such as ours-cuda-cp.async)
    backend = provider[len("ours-"):].split("-")[0] if provider.startswith("ours-") else None
    if op_name not in OPS or backend not in OPS[op_name].backends:
        return None
    takes = dtypes(op_name, backend)
    if takes is None or dtype in takes:
        return None
    names = [str(d).replace("torch.", "") for d in takes]
    return (f"backend={backend!r} takes {', '.join(names[:-1])} and {names[-1]} inputs for {op_name}, not "
            f"{str(dtype).replace('torch.', '')}")


def run_provider(op, case, provider, device, dtype, repeats, warmup, cache=0, seed=0):
    """One provider on one case: a result dict (status ok / unavailable / oom / error). The
    timed steps cycle through input sets of different seeds, as many as make twice ``cache``
    bytes together (at most 8). What the provider sets in the environment (ours-cuda-cp.async: the
    CUDA kernel choice) holds through its steps and ends with it, also where a step raised."""
    environment = dict(os.environ)
    try:
        return _run_provider(op, case, provider, device, dtype, repeats, warmup, cache, seed)
    finally:
        if os.environ != environment:
            os.environ.clear()
            os.environ.update(environment)


def _run_provider(op, case, provider, device, dtype, repeats, warmup, cache, seed):
    dtype = getattr(op, "DTYPE", None) or dtype
    result = {"op": getattr(case, "op_name", op.OP), "case": case.name, "provider": provider, "describe": case.describe(),
              "dtype": str(dtype).replace("torch.", ""), "sweep": case.sweep, "x": case.x}
    try:
        loss_fn = op.providers(case, device)[provider]()
    except Unavailable as exc:
        return dict(result, status="unavailable", reason=str(exc))
    except Exception as exc:  # a provider failing to set up must not end the benchmark
        return dict(result, status="error", reason=_one_line(exc))
    refused = dtype_refused(result["op"], provider, dtype)
    if refused:
        return dict(result, status="unavailable", reason=refused)
    try:
        prepare = getattr(loss_fn, "prepare", None)  # a layout change the provider does untimed
        input_sets = [op.make_inputs(case, device, dtype, seed)]
        rotation = rotation_for(input_sets[0], cache)
        # fresh random data per set (set 0 is what providers are compared on)
        input_sets += [op.make_inputs(case, device, dtype, seed + i) for i in range(1, rotation)]
        if prepare:
            input_sets = [prepare(inputs) for inputs in input_sets]
        grads = {}
        steps = lambda n, warm, sets=input_sets: _timed_steps(loss_fn, sets, device, n, warm, grads)

        def clear():
            for x in (x for inputs in input_sets for x in inputs):
                x.grad = None

        if device == "cuda":
            torch.cuda.synchronize()
            # warm-up (compilation, autotuning) before the peak-memory pass
            steps(0, warmup)
            clear()
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            steps(1, 0, input_sets[:1])
            peak_mb = (torch.cuda.max_memory_allocated() - base) / 2**20
            clear()
            fwd, bwd, tot, _ = steps(repeats, 0)
        else:
            steps(0, warmup)
            clear()
            with _RssSampler() as rss:
                steps(1, 0, input_sets[:1])
            peak_mb = rss.extra_mb
            clear()
            fwd, bwd, tot, _ = steps(repeats, 0)
        # the checksums every provider is compared on: one more step on set 0
        _, _, _, (loss, grad_checksum) = steps(1, 0, input_sets[:1])
    except Exception as exc:  # a provider failing must not end the benchmark
        if _is_oom(exc):
            return dict(result, status="oom", reason="out of memory")
        return dict(result, status="error", reason=_one_line(exc))
    finally:
        if device == "cuda":
            try:
                torch.cuda.empty_cache()
            except RuntimeError:  # after a sticky CUDA error; the next provider will say so
                pass
    notes = getattr(loss_fn, "notes", None)
    return dict(result, status="ok", loss=loss, grad_checksum=grad_checksum, peak_mb=peak_mb,
                forward=_percentiles(fwd),
                backward=_percentiles(bwd), total=_percentiles(tot),
                flops={m: case.flops(m) for m in ("forward", "backward", "total")},
                exps={m: case.exps(m) for m in ("forward", "backward", "total")},
                bytes={m: case.bytes_moved(m, torch.empty(0, dtype=dtype).element_size())
                       for m in ("forward", "backward", "total")},
                rotation=rotation,
                **({"notes": dict(notes)} if notes else {}))


def _one_line(exc):
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]


def _median_ms(fn, device, repeats, warmup):
    times = []
    for i in range(warmup + repeats):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            elapsed = start.elapsed_time(end)
        else:
            t0 = time.perf_counter()
            fn()
            elapsed = (time.perf_counter() - t0) * 1e3
        if i >= warmup:
            times.append(elapsed)
    return statistics.median(times)


def device_roofline(device):
    """The two ceilings every kernel is measured against, measured now on ``device``:
    the matmul rate (TFLOP/s of a square matmul: bfloat16 8192^3 on CUDA, the tensor-core peak a
    kernel can reach; float32 2048^3 on CPU, the dtype the CPU runs use) and the copy bandwidth
    (GB/s of bytes read + written by a tensor copy: 1 GiB on CUDA, 256 MiB on CPU)."""
    if device == "cuda":
        n, dtype, copy_bytes, repeats = 8192, torch.bfloat16, 2**30, 20
    else:
        n, dtype, copy_bytes, repeats = 2048, torch.float32, 2**28, 5
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    matmul_ms = _median_ms(lambda: a @ b, device, repeats, warmup=3)
    src = torch.randn(copy_bytes // 4, device=device)
    dst = torch.empty_like(src)
    copy_ms = _median_ms(lambda: dst.copy_(src), device, repeats, warmup=3)
    sms = {"sms": torch.cuda.get_device_properties(device).multi_processor_count} if device == "cuda" else {}
    return {**sms, "matmul_dtype": str(dtype).replace("torch.", ""), "matmul_size": n,
            "matmul_tflops": 2 * n**3 / (matmul_ms * 1e-3) / 1e12,
            "copy_gbps": 2 * copy_bytes / (copy_ms * 1e-3) / 1e9}


def cache_bytes(device):
    """The last-level cache the rotating input sets must outgrow: the GPU's L2, or the CPU's
    largest cache (sysfs; 32 MiB when unknown)."""
    if device == "cuda":
        return getattr(torch.cuda.get_device_properties(torch.cuda.current_device()), "L2_cache_size", 50 * 2**20)
    sizes = []
    for f in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = f.read_text().strip()
        scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
        try:
            sizes.append(int(text.rstrip("KMG")) * scale)
        except ValueError:
            pass
    return max(sizes, default=32 * 2**20)


def rotation_for(inputs, cache, max_sets=8):
    """How many sets like ``inputs`` make together at least twice the cache (at most max_sets)."""
    size = sum(x.numel() * x.element_size() for x in inputs)
    return max(1, min(max_sets, -(-2 * cache // max(size, 1))))


# ------------------------------------------------------------------------------------------
# Driver and report
# ------------------------------------------------------------------------------------------


def file_slug(device_name):
    """A device name as a file-name part: 'NVIDIA H200' -> 'nvidia-h200'."""
    return "".join(c if c.isalnum() else "-" for c in device_name).strip("-").lower()[:40]


def _device_name(device):
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def _git_commit():
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, timeout=10).stdout.strip() or None
    except OSError:
        return None


def _versions():
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"torch": torch.__version__, "triton": triton_version, "python": platform.python_version()}


def _run_in_subprocess(job, timeout):
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(job)]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"status": "error", "reason": f"timed out after {timeout} s"}
    if out.returncode != 0:
        if out.returncode in (-9, 137):
            return {"status": "oom", "reason": "killed (out of memory)"}
        return {"status": "error", "reason": (out.stderr.strip().splitlines() or ["?"])[-1][:300]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def _doc_section(module, name):
    """The text after ``name:`` in a benchmark module's docstring, up to the next blank line."""
    return module.__doc__.split(f"{name}:")[1].split("\n\n")[0].strip()


def _fmt(x, digits=2):
    return "—" if x is None else f"{x:.{digits}f}"


def report(results, roofline):
    """The markdown table; adds to each result its ratio to naive, whether it agrees with naive,
    its achieved TFLOP/s and GB/s and their shares of the device's measured ceilings."""
    lines = ["| op | case | provider | fwd ms | bwd ms | total ms | peak MB | × vs naive | TFLOP/s | % matmul "
             "| % of bound | GB/s | % copy BW | loss |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    naive = {(r["op"], r["case"]): r for r in results if r["provider"] == "naive" and r["status"] == "ok"}
    for r in results:
        if r["status"] != "ok":
            lines.append(f"| {r['op']} | {r['case']} | {r['provider']} | {r['status']}: {r.get('reason', '')} "
                         "| | | | | | | | | | |")
            continue
        annotate(r, naive.get((r["op"], r["case"])), roofline)
        share = lambda x: _fmt(100 * x, 0) if x is not None else "—"
        lines.append(" | ".join([
            f"| {r['op']}", r["case"], r["provider"], _fmt(r["forward"]["p50"]), _fmt(r["backward"]["p50"]),
            _fmt(r["total"]["p50"]), _fmt(r["peak_mb"], 0), _fmt(r["speedup_vs_naive"]),
            _fmt(r["tflops"], 1 if r["tflops"] >= 1 else 3), share(r["share_of_matmul"]), share(r["share_of_bound"]),
            _fmt(r["gbps"], 0 if r["gbps"] >= 10 else 2), share(r["share_of_copy"]),
            f"{r['loss']:.4f}{'' if r['agrees_with_naive'] is not False else ' (differs from naive!)'} |"]))
    return "\n".join(lines)


def annotate(r, base, roofline):
    total = r["total"]["p50"]
    r["speedup_vs_naive"] = base["total"]["p50"] / total if base else None
    # every provider computes the same loss and gradients from the same inputs: say so when
    # one does not
    close = lambda a, b: a is None or b is None or abs(a - b) <= 2e-2 * abs(b) + 1e-6
    r["agrees_with_naive"] = (abs(r["loss"] - base["loss"]) <= 2e-2 * abs(base["loss"]) + 1e-3
                              and close(r.get("grad_checksum"), base.get("grad_checksum"))
                              if base else None)
    r["tflops"] = r["flops"]["total"] / (total * 1e-3) / 1e12
    r["gbps"] = r["bytes"]["total"] / (total * 1e-3) / 1e9
    tensor_cores = getattr(OPS_BY_NAME.get(r["op"]), "TENSOR_CORES", True)
    r["share_of_matmul"] = r["tflops"] / roofline["matmul_tflops"] if tensor_cores else None
    r["share_of_copy"] = r["gbps"] / roofline["copy_gbps"]
    # bench/model.py: the time a kernel that does not overlap its exps with its MMAs cannot beat,
    # from the FLOPs, exps and bytes and the measured ceilings (a CPU has no such model here).
    r["bound_ms"] = r["share_of_bound"] = None
    if roofline.get("matmul_dtype") in ("bfloat16", "float16") and "exps" in r:
        limit = model.bound(r["flops"]["total"], r["exps"]["total"], r["bytes"]["total"],
                            model.H200.measured(roofline), tensor_cores)
        r["bound_ms"], r["share_of_bound"] = limit["bound_ms"], limit["bound_ms"] / total


CSV_COLUMNS = ("op", "case", "sweep", "x", "provider", "mode", "metric", "p50", "p20", "p80", "status", "device",
               "dtype", "torch", "triton", "git_commit", "timestamp", "shape")


def append_csv(path, results, meta):
    """One row per (result, mode, metric) appended to ``path`` (header written when new; a file
    with another header is set aside as results-<date>.csv): time in ms for forward/backward/total
    with p50/p20/p80, then (total, p50 only) peak MB, TFLOP/s, GB/s and the ratio to naive, and a
    status row for a provider that did not run (unavailable, oom, error) with its reason in
    ``metric``. ``sweep`` names the size a sweep case varies and ``x`` its value."""
    import csv

    if path.exists():
        with open(path, newline="") as f:
            header = next(csv.reader(f), None)
        if header != list(CSV_COLUMNS):
            path.rename(path.with_name(f"results-{datetime.datetime.now():%Y%m%d-%H%M%S}.csv"))

    common = {"device": meta["device"], "dtype": meta["dtype"], "torch": meta["versions"]["torch"],
              "triton": meta["versions"]["triton"] or "", "git_commit": meta["git_commit"] or "",
              "timestamp": meta["date_utc"]}
    rows = []
    for r in results:
        base = dict(common, op=r["op"], case=r["case"], sweep=r.get("sweep", ""), x=r.get("x") or "",
                    shape=r.get("describe", ""), provider=r["provider"], status=r["status"])
        if r["status"] != "ok":
            rows.append(dict(base, mode="total", metric=r.get("reason", "")))
            continue
        for mode in ("forward", "backward", "total"):
            rows.append(dict(base, mode=mode, metric="ms", **{q: f"{r[mode][q]:.4g}" for q in ("p50", "p20", "p80")}))
        rows.append(dict(base, mode="total", metric="peak_mb", p50=f"{r['peak_mb']:.4g}"))
        for metric in ("tflops", "gbps", "speedup_vs_naive"):
            if r.get(metric) is not None:
                rows.append(dict(base, mode="total", metric=metric, p50=f"{r[metric]:.4g}"))
    new = not path.exists()
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, CSV_COLUMNS)
        if new:
            writer.writeheader()
        writer.writerows(rows)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ops", nargs="+", default=list(OPS), choices=list(OPS))
    parser.add_argument("--quick", action="store_true", help="small sizes, few repeats")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=list(DTYPES), default=None,
                        help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--providers", nargs="+", default=None, help="only these providers")
    parser.add_argument("--cases", nargs="+", default=None, help="only these cases (by name)")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--no-sweeps", action="store_true", help="only the fixed cases, not the size sweeps")
    parser.add_argument("--no-plots", action="store_true", help="do not draw bench/plot.py's PNGs afterwards")
    parser.add_argument("--out", default=None,
                        help=f"output folder (default {RUNS.relative_to(ROOT)}/, which git ignores)")
    parser.add_argument("--publish", action="store_true",
                        help=f"write into {RESULTS.relative_to(ROOT)}/ (tracked) and regenerate docs/performance.md")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:  # one provider, in its own process (CPU peak RSS)
        job = json.loads(args.worker)
        op = OPS[job["op"]]
        case = op.Case(**job["case"])
        print(json.dumps(run_provider(op, case, job["provider"], job["device"], DTYPES[job["dtype"]],
                                      job["repeats"], job["warmup"], job["cache"])))
        return 0

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device")
    out_dir = output_dir(args, parser)
    dtype_name = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    if args.repeats:
        repeats = args.repeats
    elif args.quick:
        repeats = 2 if args.device == "cpu" else 5
    else:
        repeats = 3 if args.device == "cpu" else 20
    warmup = 1 if args.device == "cpu" else 3
    device_name = _device_name(args.device)
    roofline = device_roofline(args.device)
    cache = cache_bytes(args.device)
    started = datetime.datetime.now(datetime.timezone.utc)
    print(f"# pcd_kernels benchmark — {device_name}, {dtype_name}, {started:%Y-%m-%d %H:%M} UTC")
    print(f"# torch {torch.__version__}; measured now: {roofline['matmul_dtype']} matmul "
          f"{roofline['matmul_tflops']:.3g} TFLOP/s, copy {roofline['copy_gbps']:.0f} GB/s; inputs rotate "
          f"through sets of at least 2 x {cache / 2**20:.0f} MiB (last-level cache)"
          + ("" if args.device == "cuda" else "; no GPU: timings are CPU wall-clock"))
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{'-'.join(args.ops)}_{file_slug(device_name)}_{started:%Y%m%d-%H%M%S}{'_quick' if args.quick else ''}.json"
    meta = {"device": device_name, "dtype": dtype_name, "date_utc": started.isoformat(), "quick": args.quick,
            "versions": _versions(), "git_commit": _git_commit(), "roofline": roofline, "cache_bytes": cache,
            "flop_formulas": {OPS[name].OP: _doc_section(OPS[name], "FLOPs") for name in args.ops},
            "byte_formulas": {OPS[name].OP: _doc_section(OPS[name], "Bytes") for name in args.ops}}

    def save(results, table=None):  # after every provider: a run cut short still leaves its numbers
        path.write_text(json.dumps({"meta": meta, "results": results, "table": table}, indent=1))

    results = []
    for op_name in args.ops:
        op = OPS[op_name]
        sweeps = [] if args.no_sweeps else op.sweeps(args.device, args.quick)
        for case in op.cases(args.device, args.quick) + sweeps:
            if args.cases and case.name not in args.cases:
                continue
            print(f"## {getattr(case, 'op_name', op.OP)} {case.name}: {case.describe()}", flush=True)
            for provider in op.providers(case, args.device):
                if args.providers and provider not in args.providers:
                    continue
                if case.sweep and provider not in op.SWEEP_PROVIDERS:
                    continue
                if args.device == "cpu":
                    job = {"op": op_name, "case": case.__dict__, "provider": provider, "device": "cpu",
                           "dtype": dtype_name, "repeats": repeats, "warmup": warmup, "cache": cache}
                    r = _run_in_subprocess(job, timeout=900)
                    for key, value in (("op", getattr(case, "op_name", op.OP)), ("case", case.name),
                                       ("provider", provider), ("sweep", case.sweep), ("x", case.x),
                                       ("describe", case.describe())):
                        r.setdefault(key, value)
                else:
                    r = run_provider(op, case, provider, "cuda", DTYPES[dtype_name], repeats, warmup, cache)
                status = (f"{r['total']['p50']:.2f} ms, {r['peak_mb']:.0f} MB" if r["status"] == "ok"
                          else f"{r['status']}: {r.get('reason', '')}")
                print(f"   {provider:15s} {status}", flush=True)
                results.append(r)
                save(results)
    table = report(results, roofline)
    print()
    print(table)
    save(results, table)
    append_csv(out_dir / "results.csv", results, meta)
    written = [path, out_dir / "results.csv"]
    if not args.no_plots:
        try:
            import plot
        except ImportError as exc:  # matplotlib is an optional (test/train) extra
            print(f"no plots: {exc} (pip install matplotlib, then python bench/plot.py)")
        else:
            written += plot.plot_run(out_dir / "results.csv", meta["date_utc"], out_dir / "plots")
    for f in written:
        print(f"wrote {f.relative_to(ROOT) if f.is_relative_to(ROOT) else f}")
    if args.publish:
        import readme

        return readme.main([])
    return 0


def output_dir(args, parser):
    """Where a run writes: --out, else bench/results/ with --publish, else bench/runs/."""
    if args.publish and args.out is not None:
        parser.error("--publish writes into bench/results/; leave out --out")
    if args.publish and args.quick:
        parser.error("--publish records full runs only (docs/performance.md skips --quick runs)")
    if args.publish:
        return RESULTS
    return Path(args.out) if args.out is not None else RUNS


if __name__ == "__main__":
    sys.exit(main())
