"""The embedded demo: PCD on real images that ship with scikit-learn, start to finish on a CPU.

1. Data: the 1,797 handwritten digits of ``sklearn.datasets.load_digits`` (8x8 scans by 43 writers),
   split by digit image into a distillation part and two held-out parts. Each image is a 32x32 canvas
   with three digits, upscaled to 12x12 at random places, and a per-pixel label: the class of the digit
   drawn there, or background.
2. Teacher: a compact CNN with a MoCo-style MLP head, trained in-process on the pooled features
   only. The head is multi-label: which digits are in the image. The teacher never sees a pixel
   label. It is cached in the output folder.
3. PCD distils it into a smaller student (:func:`pcd_kernels.train.engine.train`). A baseline run
   distils only the globally pooled vectors (same loss, queue, steps and seed).
4. Dense evaluation: each backbone is frozen and a 1x1 linear head is trained on its map to
   segment the first held-out part. It is scored on the second: mIoU over the 10 digits and the
   background, and the accuracy on digit pixels. Rows: random init, pooled distillation, PCD, teacher.
"""
import dataclasses
import os
import time
from typing import Dict, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from pcd_kernels.train.data import Augmentation
from pcd_kernels.train.engine import Distributed, TrainConfig, resolve_device, setup_distributed, train
from pcd_kernels.train.errors import TrainError
from pcd_kernels.train.files import atomic_save, prepare_output_dir, verify_checksum, write_json, write_text
from pcd_kernels.train.models import CompactCNN, Teacher, build_student_backbone, mlp_head

CANVAS, DIGIT, DIGITS_PER_IMAGE, BACKGROUND = 32, 12, 3, 10
DATA_SEED = 2023  # the demo's images and splits are the same whatever --seed is
TEACHER_WIDTHS, TEACHER_DIM = (32, 64, 128), 64


def digits():
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:
        raise TrainError("the embedded demo (no --data) uses scikit-learn's digits: pip install scikit-learn "
                         "(or pip install 'pcd_kernels[demo]')") from error
    data = load_digits()
    return torch.tensor(data.images, dtype=torch.float32) / 16.0, torch.tensor(data.target)


def composites(images: Tensor, labels: Tensor, count: int, g: torch.Generator) -> Tuple[Tensor, Tensor, Tensor]:
    """``count`` canvases of three digits drawn from ``images``: (count, 3, 32, 32) images in [0, 1],
    (count, 32, 32) pixel labels (digit class, or 10 for background) and (count, 10) presence."""
    scaled = F.interpolate(images[:, None], size=(DIGIT, DIGIT), mode="bilinear", align_corners=False)[:, 0].clamp(0, 1)
    canvas = torch.zeros(count, CANVAS, CANVAS)
    segmentation = torch.full((count, CANVAS, CANVAS), BACKGROUND, dtype=torch.long)
    present = torch.zeros(count, 10)
    picks = torch.randint(len(images), (count, DIGITS_PER_IMAGE), generator=g)
    places = torch.randint(0, CANVAS - DIGIT + 1, (count, DIGITS_PER_IMAGE, 2), generator=g)
    inks = 0.6 + 0.4 * torch.rand(count, DIGITS_PER_IMAGE, generator=g)
    for i in range(count):
        for j in range(DIGITS_PER_IMAGE):
            (y, x), k = places[i, j].tolist(), int(picks[i, j])
            digit = scaled[k] * inks[i, j]
            region = canvas[i, y:y + DIGIT, x:x + DIGIT]
            # A pixel belongs to the digit drawn last over it wherever that digit's ink dominates.
            drawn = (digit > 0.3) & (digit >= region)
            segmentation[i, y:y + DIGIT, x:x + DIGIT][drawn] = labels[k]
            canvas[i, y:y + DIGIT, x:x + DIGIT] = torch.maximum(region, digit)
            present[i, labels[k]] = 1
    return canvas[:, None].expand(-1, 3, -1, -1).contiguous(), segmentation, present


class DemoData:
    """Distillation images (from 1,200 digit scans) and two held-out probe sets (from the other 597)."""

    def __init__(self, distill_count: int = 6000, probe_count: int = 1500, with_probe: bool = True):
        images, labels = digits()
        g = torch.Generator().manual_seed(DATA_SEED)
        order = torch.randperm(len(images), generator=g)
        split = [order[:1200], order[1200:1500], order[1500:]]
        self.images, _, self.present = composites(images[split[0]], labels[split[0]], distill_count, g)
        if with_probe:
            self.probe_train = composites(images[split[1]], labels[split[1]], probe_count, g)[:2]
            self.probe_test = composites(images[split[2]], labels[split[2]], probe_count, g)[:2]


class TensorImages(Dataset):
    def __init__(self, images: Tensor):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> Tensor:
        return self.images[index]


def augmentation(size: int = CANVAS) -> Augmentation:
    # Whole canvases (the teacher learnt to name every digit of a canvas, and a crop can cut one off),
    # no flips (a mirrored 2 is no digit), and no colour changes (the canvases are grey).
    return Augmentation(size=size, crop_scale=(1.0, 1.0), hflip=False, brightness=0.3, contrast=0.3,
                        saturation=0.0, grayscale=0.0, blur=0.0, noise=0.05, mean=None, std=None)


def demo_teacher(config: TrainConfig, data: DemoData, device: torch.device, distributed: Distributed) -> Teacher:
    """The demo's teacher, trained on pooled features with a multi-label head; cached as teacher.pt."""
    path = os.path.join(config.output_dir, "teacher.pt")
    fingerprint = {"widths": list(TEACHER_WIDTHS), "dim": TEACHER_DIM, "steps": config.teacher_steps,
                   "seed": config.seed,
                   "data_seed": DATA_SEED, "images": len(data.images)}
    torch.manual_seed(config.seed)
    backbone, head = CompactCNN(TEACHER_WIDTHS), mlp_head(TEACHER_WIDTHS[-1], 256, TEACHER_DIM)
    cached = _read_teacher(path, fingerprint)
    if cached is None and distributed.main:
        prepare_output_dir(config.output_dir)
        started = time.perf_counter()
        _fit_teacher(backbone, head, data, config, device)
        atomic_save({"fingerprint": fingerprint, "backbone": backbone.state_dict(), "head": head.state_dict()}, path)
        print(f"demo teacher: trained for {config.teacher_steps} steps in {time.perf_counter() - started:.0f} s, "
              f"saved to {path}", flush=True)
    distributed.barrier()
    cached = cached or _read_teacher(path, fingerprint)
    backbone.load_state_dict(cached["backbone"])
    head.load_state_dict(cached["head"])
    # Without the adaptor the target is the backbone's own 128-channel map (the ablation).
    return Teacher(backbone.eval(), head.eval() if config.adaptor else None)


def _read_teacher(path: str, fingerprint: Dict):
    if not os.path.exists(path):
        return None
    try:
        cached = verify_checksum(torch.load(path, map_location="cpu", weights_only=True), path)
    except Exception:  # an unreadable or corrupted cache is rebuilt, not an error
        return None
    return cached if isinstance(cached, dict) and cached.get("fingerprint") == fingerprint else None


def _fit_teacher(backbone: nn.Module, head: nn.Module, data: DemoData, config: TrainConfig,
                 device: torch.device) -> None:
    classifier = nn.Linear(TEACHER_DIM, 10)
    modules = nn.ModuleList([backbone, head, classifier]).to(device).train()
    optimizer = torch.optim.AdamW(modules.parameters(), lr=2e-3, weight_decay=1e-4)
    g = torch.Generator().manual_seed(config.seed)
    colour = augmentation()
    for _ in range(config.teacher_steps):
        pick = torch.randint(len(data.images), (128,), generator=g)
        images = torch.stack([colour.photometric(image, g) for image in data.images[pick]]).to(device)
        logits = classifier(head(backbone(images).mean(dim=(2, 3))))
        loss = F.binary_cross_entropy_with_logits(logits, data.present[pick].to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


@torch.no_grad()
def _features(backbone: nn.Module, images: Tensor, device: torch.device) -> Tensor:
    return torch.cat([backbone(images[i:i + 500].to(device)).float().cpu() for i in range(0, len(images), 500)])


def dense_probe(backbone: nn.Module, data: DemoData, device: torch.device, steps: int = 300,
                seed: int = 0) -> Dict[str, float]:
    """Segments the held-out canvases with a 1x1 linear head on the frozen backbone's map
    (BatchNorm without affine first, as linear probes do, so every backbone's scale is comparable)."""
    backbone = backbone.to(device).eval()
    train_maps = _features(backbone, data.probe_train[0], device)
    test_maps = _features(backbone, data.probe_test[0], device)
    train_labels, test_labels = data.probe_train[1], data.probe_test[1]
    torch.manual_seed(seed)
    head = nn.Sequential(nn.BatchNorm2d(train_maps.shape[1], affine=False), nn.Conv2d(train_maps.shape[1], 11, 1))
    optimizer = torch.optim.Adam(head.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        pick = torch.randint(len(train_maps), (128,), generator=g)
        logits = F.interpolate(head(train_maps[pick]), size=(CANVAS, CANVAS), mode="bilinear", align_corners=False)
        loss = F.cross_entropy(logits, train_labels[pick])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        predicted = F.interpolate(head.eval()(test_maps), size=(CANVAS, CANVAS), mode="bilinear",
                                  align_corners=False).argmax(1)
    classes = torch.arange(11)[:, None, None, None]
    hits, truth = predicted[None] == classes, test_labels[None] == classes
    iou = (hits & truth).sum((1, 2, 3)).double() / (hits | truth).sum((1, 2, 3)).double()
    ink = test_labels != BACKGROUND
    return {"mIoU": 100 * float(iou.mean()), "digit_mIoU": 100 * float(iou[:10].mean()),
            "digit_pixel_accuracy": 100 * float((predicted[ink] == test_labels[ink]).double().mean())}


def run_demo(config: TrainConfig) -> Dict:
    """Teacher, PCD student, pooled baseline, dense evaluation; returns and prints the table."""
    config = config.resolved()
    if config.teacher != "demo":
        raise TrainError("without --data the demo trains its own teacher: drop --teacher, or give --data DIR")
    device = resolve_device(config.device)
    distributed = setup_distributed(device)
    evaluate = config.eval and distributed.main
    data = DemoData(with_probe=evaluate)
    teacher = demo_teacher(config, data, device, distributed)
    images, views = TensorImages(data.images), augmentation(config.image_size)
    started = time.perf_counter()
    pcd = train(config, teacher, images, views, device=device, distributed=distributed)
    timings = {"pcd_s": time.perf_counter() - started}
    runs = {"PCD (pixel_contrastive_loss, this run)": pcd}
    if config.baselines:
        baseline_dir = os.path.join(config.output_dir, "baseline-pooled")
        started = time.perf_counter()
        runs["pooled-vector distillation (same loss on 1x1 maps)"] = train(
            dataclasses.replace(config, loss="pooled", output_dir=baseline_dir), teacher, images, views,
            device=device, distributed=distributed)
        timings["pooled_s"] = time.perf_counter() - started
    if not (evaluate and pcd["finished"]):
        return {"runs": runs}
    started = time.perf_counter()
    torch.manual_seed(config.seed)
    random_backbone, _ = build_student_backbone(config.student)
    rows = [("random init (same architecture)", dense_probe(random_backbone, data, device, seed=config.seed))]
    rows += [(name, dense_probe(run["student"].backbone, data, device, seed=config.seed)) for name, run in runs.items()
             if run["finished"]]
    rows.append((f"teacher (larger, CNN {'-'.join(map(str, TEACHER_WIDTHS))}; upper reference)",
                 dense_probe(teacher.backbone, data, device, seed=config.seed)))
    timings["probe_s"] = time.perf_counter() - started
    table = results_table(rows, config)
    print(table, flush=True)
    result = {"rows": [{"model": name, **metrics} for name, metrics in rows], "steps": config.max_steps,
              "config": {k: getattr(config, k) for k in ("seed", "batch_size", "queue_size", "lr", "teacher_steps")},
              "timings": timings}
    write_json(os.path.join(config.output_dir, "demo_results.json"), result)
    write_text(os.path.join(config.output_dir, "demo_results.md"), table + "\n")
    return {"runs": runs, **result}


def results_table(rows, config: TrainConfig) -> str:
    lines = [f"Dense probe on held-out digit canvases (frozen backbone + 1x1 linear head; "
             f"{config.max_steps} distillation steps, batch {config.batch_size}, seed {config.seed})", "",
             "| student backbone | mIoU (11 classes) | digit mIoU | accuracy on digit pixels |",
             "|---|---:|---:|---:|"]
    lines += [f"| {name} | {m['mIoU']:.1f} | {m['digit_mIoU']:.1f} | {m['digit_pixel_accuracy']:.1f} |"
              for name, m in rows]
    lines += ["", "One seed: rows a point or two apart are within the spread between seeds. `make demo-study` "
              "(python -m pcd_kernels.train.study) runs 5 seeds with PCD's ablations; docs/demo.md has its results."]
    return "\n".join(lines)
