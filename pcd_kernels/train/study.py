"""``python -m pcd_kernels.train.study``: the embedded demo over several seeds and PCD's ablations.

Every variant uses the same data, steps, student architecture (apart from what the variant removes)
and dense evaluation as ``make demo``; only the seed changes between repeats. Per seed: one teacher
(trained with that seed), then

- ``pcd``: the pixel loss against the teacher's SpatialAdaptor map, student with MHSA2d;
- ``pcd_no_mhsa``: the same without the student's plug-in MHSA2d;
- ``pcd_no_adaptor``: the same against the teacher backbone's own 128-channel map (no head at all:
  the trainer's teacher without a head is the identity), so the projector's output and the queue
  are 128 wide; the projector's hidden width stays 128 as in ``pcd``;
- ``pooled``: the same loss on globally pooled vectors (1x1 maps);
- ``random_init``: the student backbone as initialised with that seed;
- ``teacher``: the teacher's backbone.

Each is scored by the demo's dense probe (frozen backbone, 1x1 linear head, held-out canvases).
The runs, a table (mean and standard deviation per variant; the paired difference from ``pcd`` with
its 95 % t-interval over seeds) and a plot are written to ``--output-dir``; ``--publish`` also
writes ``docs/demo_study.json``, ``docs/demo_study.png`` and the table in ``docs/demo.md``.
Interrupted studies continue where they stopped: finished runs and their scores are reused.
"""
import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import sys
import time
from typing import Dict, List, Optional, Sequence

import torch

from pcd_kernels.train.demo import DemoData, TensorImages, augmentation, demo_teacher, dense_probe
from pcd_kernels.train.engine import TrainConfig, resolve_device, setup_distributed, train
from pcd_kernels.train.errors import TrainError
from pcd_kernels.train.files import prepare_output_dir, write_json, write_text
from pcd_kernels.train.models import Teacher, build_student_backbone
from pcd_kernels.train.progress import pyplot, save_figure

# The trained variants and how each differs from the demo's PCD run.
TRAINED = {"pcd": {}, "pcd_no_mhsa": {"mhsa": False}, "pcd_no_adaptor": {"adaptor": False},
           "pooled": {"loss": "pooled"}}
VARIANTS = ("pcd", "pcd_no_mhsa", "pcd_no_adaptor", "pooled", "random_init", "teacher")
METRICS = (("miou", "mIoU"), ("digit_miou", "digit_mIoU"), ("pixel_accuracy", "digit_pixel_accuracy"))
DOCS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "docs")
BEGIN, END = "<!-- demo-study:begin (python -m pcd_kernels.train.study --publish writes this part) -->", \
    "<!-- demo-study:end -->"


def run_study(seeds: Sequence[int], output_dir: str, steps: int = 300, teacher_steps: int = 300,
              probe_steps: int = 300, mlp_dim: int = 128, workers: int = 2, variants: Sequence[str] = VARIANTS,
              progress: bool = False, data: Optional[DemoData] = None) -> Dict:
    """Trains and scores every variant for every seed; returns the study (see :func:`summary`)."""
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or len(set(seeds)) != len(seeds) or not seeds:
        raise TrainError(f"variants must be among {', '.join(VARIANTS)} (got {', '.join(unknown) or 'them'}) and "
                         f"seeds distinct and at least one (got {list(seeds)})")
    device = resolve_device("cpu")
    distributed = setup_distributed(device)
    data = data or DemoData()
    images, views = TensorImages(data.images), augmentation()
    started, runs = time.perf_counter(), []
    for seed in seeds:
        base = TrainConfig(output_dir=os.path.join(output_dir, f"seed{seed}"), seed=seed, max_steps=steps,
                           teacher_steps=teacher_steps, mlp_dim=mlp_dim, workers=workers, device="cpu",
                           progress=progress, resume=True, baselines=False).resolved()
        teacher = None
        for variant in variants:
            folder = os.path.join(base.output_dir, variant)
            config = dataclasses.replace(base, output_dir=folder, **TRAINED.get(variant, {}))
            scores = _read_scores(folder, config, probe_steps, data)
            if scores is None:
                if teacher is None:
                    teacher = demo_teacher(base, data, device, distributed)
                clock = time.perf_counter()
                if variant == "teacher":
                    backbone = teacher.backbone
                elif variant == "random_init":
                    torch.manual_seed(seed)
                    backbone = build_student_backbone(config.student)[0]
                else:
                    # One teacher per seed (cached in the seed's folder); the ablation drops its head.
                    variant_teacher = teacher if config.adaptor else Teacher(teacher.backbone)
                    backbone = train(config, variant_teacher, images, views, device=device,
                                     distributed=distributed)["student"].backbone
                trained_s = time.perf_counter() - clock
                probe = dense_probe(backbone, data, device, steps=probe_steps, seed=seed)
                scores = {"fingerprint": _fingerprint(config, probe_steps, data), "train_s": round(trained_s, 1),
                          **{key: probe[name] for key, name in METRICS}}
                prepare_output_dir(folder)
                write_json(os.path.join(folder, "scores.json"), scores)
            runs.append({"variant": variant, "seed": seed, **{k: v for k, v in scores.items() if k != "fingerprint"}})
            print(f"study: seed {seed} {variant:15s} mIoU {scores['miou']:.2f}  digit mIoU "
                  f"{scores['digit_miou']:.2f}  pixel accuracy {scores['pixel_accuracy']:.2f}", flush=True)
    study = {"runs": runs, "summary": summary(runs),
             "settings": {"seeds": list(seeds), "steps": steps, "teacher_steps": teacher_steps,
                          "probe_steps": probe_steps, "mlp_dim": mlp_dim, "batch_size": base.batch_size,
                          "queue_size": base.queue_size, "lr": base.lr, "temperature": base.temperature},
             "machine": {"cpu": _cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__,
                         "python": platform.python_version()},
             "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
             "elapsed_s": round(time.perf_counter() - started, 1)}
    return study


def _fingerprint(config: TrainConfig, probe_steps: int, data: DemoData) -> Dict:
    sizes = {"images": len(data.images), "probe_images": len(data.probe_train[0]) + len(data.probe_test[0])}
    return {"probe_steps": probe_steps, **sizes, **{k: getattr(config, k) for k in (
        "seed", "max_steps", "teacher_steps", "mlp_dim", "mhsa", "adaptor", "loss", "batch_size", "queue_size", "lr",
        "temperature")}}


def _read_scores(folder: str, config: TrainConfig, probe_steps: int, data: DemoData) -> Optional[Dict]:
    path = os.path.join(folder, "scores.json")
    try:
        with open(path) as f:
            scores = json.load(f)
    except (OSError, ValueError):
        return None
    expected = json.loads(json.dumps(_fingerprint(config, probe_steps, data)))
    return scores if isinstance(scores, dict) and scores.get("fingerprint") == expected else None


def _t_quantile(n: int) -> float:
    """The 97.5 % quantile of Student's t with n - 1 degrees of freedom (scipy comes with scikit-learn,
    which the demo needs)."""
    from scipy.stats import t

    return float(t.ppf(0.975, n - 1))


def summary(runs: List[Dict]) -> Dict:
    """Per variant and metric: n, mean, std (n - 1); against ``pcd``: the paired difference (variant
    minus pcd, over the seeds both have), its std and 95 % t-interval."""
    out = {}
    for variant in dict.fromkeys(r["variant"] for r in runs):
        mine = {r["seed"]: r for r in runs if r["variant"] == variant}
        pcd = {r["seed"]: r for r in runs if r["variant"] == "pcd"}
        entry = {}
        for key, _ in METRICS:
            values = [mine[s][key] for s in sorted(mine)]
            entry[key] = _describe(values)
            paired = [mine[s][key] - pcd[s][key] for s in sorted(mine) if s in pcd]
            if variant != "pcd" and paired:
                entry[f"{key}_minus_pcd"] = _describe(paired)
        out[variant] = entry
    return out


def _describe(values: List[float]) -> Dict:
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else float("nan")
    half = _t_quantile(n) * std / math.sqrt(n) if n > 1 else float("nan")
    return {"n": n, "mean": mean, "std": std, "ci95": [mean - half, mean + half]}


def table(study: Dict) -> str:
    """The study as markdown: one row per variant."""
    s, settings = study["summary"], study["settings"]
    lines = ["| variant | mIoU (11 classes) | digit mIoU | accuracy on digit pixels | mIoU − pcd, paired "
             "(95 % interval) | digit mIoU − pcd, paired (95 % interval) |", "|---|---:|---:|---:|---:|---:|"]
    for variant, entry in s.items():
        cells = [f"{entry[k]['mean']:.1f} ± {entry[k]['std']:.1f}" for k, _ in METRICS]
        for key in ("miou_minus_pcd", "digit_miou_minus_pcd"):
            d = entry.get(key)
            cells.append("—" if d is None else f"{d['mean']:+.1f} ({d['ci95'][0]:+.1f} to {d['ci95'][1]:+.1f})")
        lines.append(f"| `{variant}` | " + " | ".join(cells) + " |")
    machine = study["machine"]
    lines += ["", f"Mean ± standard deviation over seeds {', '.join(map(str, settings['seeds']))} "
              f"({settings['steps']} distillation steps, teacher {settings['teacher_steps']} steps, batch "
              f"{settings['batch_size']}, queue {settings['queue_size']}); paired differences per seed with a "
              f"95 % t-interval. Measured on {machine['cpu']} ({machine['threads']} threads), torch "
              f"{machine['torch']}, {study['date']}, in {study['elapsed_s'] / 60:.0f} min."]
    return "\n".join(lines)


def plot(study: Dict, path: str) -> bool:
    """Each seed's mIoU per variant, with the mean and its 95 % interval. False without matplotlib."""
    plt = pyplot(path)
    if plt is None:
        return False
    variants = list(study["summary"])
    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=110)
    for x, variant in enumerate(variants):
        values = [r["miou"] for r in study["runs"] if r["variant"] == variant]
        ax.scatter([x] * len(values), values, s=14, color="0.55", zorder=2)
        stats = study["summary"][variant]["miou"]
        low, high = stats["ci95"]
        if math.isfinite(low):
            ax.errorbar([x + 0.18], [stats["mean"]], yerr=[[stats["mean"] - low], [high - stats["mean"]]],
                        fmt="o", color="C0", capsize=4, zorder=3)
    ax.set_xticks(range(len(variants)), variants, rotation=20)
    ax.set_ylabel("dense probe mIoU (11 classes)")
    ax.set_title(f"demo study: {len(study['settings']['seeds'])} seeds (grey), mean and 95 % interval (blue)",
                 fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    save_figure(plt, fig, path)
    return True


def write_outputs(study: Dict, folder: str) -> None:
    prepare_output_dir(folder)
    write_json(os.path.join(folder, "demo_study.json"), study)
    write_text(os.path.join(folder, "demo_study.md"), table(study) + "\n")
    plot(study, os.path.join(folder, "demo_study.png"))


def publish(study: Dict, docs: str = DOCS) -> None:
    """docs/demo_study.json, docs/demo_study.png and the generated part of docs/demo.md."""
    write_json(os.path.join(docs, "demo_study.json"), study)
    plot(study, os.path.join(docs, "demo_study.png"))
    page = os.path.join(docs, "demo.md")
    with open(page) as f:
        text = f.read()
    if BEGIN not in text or END not in text:
        raise TrainError(f"{page} lacks the markers between which the study's table goes")
    head, rest = text.split(BEGIN, 1)
    write_text(page, head + BEGIN + "\n" + table(study) + "\n" + END + rest.split(END, 1)[1])


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pcd_kernels.train.study", description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="(default: 0 1 2 3 4)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--steps", type=int, default=300, help="distillation steps per run (default: %(default)s)")
    p.add_argument("--teacher-steps", type=int, default=300, help="(default: %(default)s)")
    p.add_argument("--probe-steps", type=int, default=300, help="dense probe steps (default: %(default)s)")
    p.add_argument("--workers", type=int, default=2, help="data loader processes (default: %(default)s)")
    p.add_argument("--output-dir", default="runs/demo-study", help="(default: %(default)s)")
    p.add_argument("--publish", action="store_true", help="also write docs/demo_study.json, docs/demo_study.png "
                   "and the table in docs/demo.md")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=False)
    args = p.parse_args(argv)
    try:
        study = run_study(args.seeds, args.output_dir, args.steps, args.teacher_steps, args.probe_steps,
                          workers=args.workers, variants=args.variants, progress=args.progress)
        write_outputs(study, args.output_dir)
        if args.publish:
            publish(study)
    except TrainError as error:
        print(f"pcd_kernels.train.study: error: {error}", file=sys.stderr)
        return 2
    print(table(study), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
