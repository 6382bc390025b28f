"""The PCD distillation loop: two aligned views, a frozen teacher, the symmetric pixel-wise InfoNCE
against a queue of pooled teacher vectors, DDP, atomic checkpoints and exact resume."""
import contextlib
import dataclasses
import os
import random
import time
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset

from pcd_kernels.nn.pixel_contrastive import PixelContrastiveLoss
from pcd_kernels.backends import BACKENDS
from pcd_kernels.ops.pixel_contrastive import NEGATIVES
from pcd_kernels.train.data import Augmentation, StepBatches, ViewPairs, steps_per_epoch
from pcd_kernels.train.errors import TrainError
from pcd_kernels.train.files import atomic_save, prepare_output_dir, remove_stale_temporaries, verify_checksum
from pcd_kernels.train.models import (DATA_TEACHERS, DEMO_TEACHER_WITH_DATA, STUDENTS, TEACHERS, Student, Teacher,
                                      build_student_backbone, require_torchvision, resize_to, torchvision_problem)
from pcd_kernels.train.optim import build_optimizer, learning_rate, parameter_groups, scaled_learning_rate
from pcd_kernels.train.progress import MetricLog, Progress, plot_loss

CHECKPOINT = "checkpoint.pt"
# Settings that change what a run computes: resuming with other values would not continue the same
# run, so --resume refuses them.
RESULT_SETTINGS = ("data", "teacher", "teacher_weights", "teacher_encoder", "adaptor", "student", "mlp_dim",
                   "mhsa", "num_heads", "image_size", "epochs", "max_steps", "batch_size", "optimizer", "lr", "momentum",
                   "weight_decay", "warmup_steps", "clip_grad_norm", "amp", "queue_size", "temperature",
                   "negatives", "loss", "seed")
# The demo trains its own teacher for --teacher-steps: another count is another teacher.
DEMO_TEACHER_SETTINGS = ("teacher_steps",)
# The keys of a checkpoint that resuming reads, and what train() saves under each.
CHECKPOINT_FIELDS = {"student": dict, "step": int, "optimizer": dict, "criterion": dict, "rng": dict, "config": dict}


@dataclass
class TrainConfig:
    """Every setting of a run; ``python -m pcd_kernels.train --help`` documents each flag. ``None``
    means "the default for this data": see :meth:`resolved`."""
    data: Optional[str] = None
    teacher: Optional[str] = None
    teacher_weights: Optional[str] = None
    teacher_encoder: str = "base"
    teacher_steps: int = 300
    adaptor: bool = True
    student: Optional[str] = None
    mlp_dim: Optional[int] = None
    mhsa: bool = True
    num_heads: Optional[int] = None
    image_size: Optional[int] = None
    epochs: Optional[int] = None
    max_steps: Optional[int] = None
    batch_size: Optional[int] = None
    optimizer: str = "sgd"
    lr: Optional[float] = None
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_steps: Optional[int] = None
    clip_grad_norm: Optional[float] = None
    amp: str = "auto"
    queue_size: Optional[int] = None
    temperature: float = 0.2
    negatives: str = "none"
    loss: str = "pixel"
    backend: str = "auto"
    workers: int = 2
    output_dir: str = "runs/pcd"
    resume: bool = False
    save_every: int = 500
    log_every: int = 10
    stop_after: Optional[int] = None
    seed: int = 0
    device: str = "auto"
    eval: bool = True
    baselines: bool = True
    progress: bool = True

    def resolved(self) -> "TrainConfig":
        """Defaults filled in: the embedded demo (no ``data``) trains a compact student on 32x32
        digit composites; real data gets PCD's ResNet-18 student at 224 pixels."""
        demo = self.data is None
        # PCD's student is ResNet-18; without a torchvision that imports, the built-in CNN stands in.
        # (Only asked when it decides: importing torchvision takes seconds.)
        resnet = not demo and self.student is None and torchvision_problem() is None
        defaults = dict(teacher="demo" if demo else None, student="resnet18" if resnet else "cnn",
                        image_size=32 if demo else 224, batch_size=128 if demo else 64,
                        lr=0.4 if demo else 0.05, queue_size=1024 if demo else 65536)
        if not demo and self.teacher is None:
            raise TrainError("--teacher is required with --data: 'mocov3_resnet50' (with --teacher-weights) "
                             "or 'package.module:factory'")
        if self.epochs is None and self.max_steps is None:
            defaults["max_steps"] = 300 if demo else None
            if not demo:
                defaults["epochs"] = 100
        config = dataclasses.replace(self, **{k: v for k, v in defaults.items() if getattr(self, k) is None})
        config.validate()
        return config

    def check_model_names(self) -> None:
        """Unknown ``--student`` / ``--teacher`` names fail here, before any data is prepared. (The
        Python API takes modules, so :func:`train` never reads these names but the student's.)"""
        if self.teacher == "demo" and self.data is not None:
            raise TrainError(DEMO_TEACHER_WITH_DATA)
        teachers = TEACHERS if self.data is None else DATA_TEACHERS
        for flag, name, known in (("--student", self.student, STUDENTS), ("--teacher", self.teacher, teachers)):
            if name is not None and name not in known and ":" not in name:
                raise TrainError(f"{flag}: unknown model {name!r}; choose one of {', '.join(known)} "
                                 "or give 'package.module:factory'")
        if self.student in ("resnet18", "resnet34"):
            require_torchvision(f"--student {self.student}")

    def validate(self) -> None:
        def positive(name, allow_none=False, minimum=1):
            value = getattr(self, name)
            if value is None and allow_none:
                return
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise TrainError(f"--{name.replace('_', '-')} must be an int >= {minimum}, got {value!r}")

        for name in ("batch_size", "image_size", "save_every", "log_every", "teacher_steps"):
            positive(name)
        for name in ("epochs", "max_steps", "stop_after", "mlp_dim", "num_heads", "warmup_steps"):
            positive(name, allow_none=True, minimum=0 if name == "warmup_steps" else 1)
        positive("queue_size", minimum=0)
        positive("workers", minimum=0)
        for name, low in (("lr", 0.0), ("momentum", 0.0), ("weight_decay", 0.0)):
            if not (getattr(self, name) >= low):
                raise TrainError(f"--{name.replace('_', '-')} must be >= {low}, got {getattr(self, name)!r}")
        if not self.temperature > 0:
            raise TrainError(f"--temperature must be > 0, got {self.temperature!r}")
        if self.clip_grad_norm is not None and not self.clip_grad_norm > 0:
            raise TrainError(f"--clip-grad-norm must be > 0, got {self.clip_grad_norm!r}")
        for name, choices in (("optimizer", ("sgd", "lars")), ("amp", ("auto", "bf16", "fp16", "none")),
                              ("negatives", NEGATIVES), ("loss", ("pixel", "pooled")), ("backend", BACKENDS),
                              ("device", ("auto", "cpu", "cuda")), ("teacher_encoder", ("base", "momentum"))):
            if getattr(self, name) not in choices:
                raise TrainError(f"--{name.replace('_', '-')} must be one of {', '.join(choices)}, "
                                 f"got {getattr(self, name)!r}")
        if not self.mhsa and self.num_heads is not None:
            raise TrainError("--num-heads sets the plug-in MHSA2d's heads, which --no-mhsa leaves out: drop one")
        if self.negatives == "none" and self.queue_size == 0:
            raise TrainError("--negatives none (PCD's loss: the positive against the queue) needs --queue-size > 0")


@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            value = value.clone()
            dist.all_reduce(value)
            value /= self.world_size
        return value


def setup_distributed(device: torch.device) -> Distributed:
    """Joins the process group ``torchrun`` describes (NCCL with gloo for CPU tensors on CUDA, gloo on
    CPU); a no-op alone."""
    if dist.is_available() and dist.is_initialized():
        return Distributed(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Distributed()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
    # gloo beside NCCL: the loss's small per-call agreement of the ranks' arguments then runs on
    # the CPU instead of waiting for the GPU (pcd_kernels.ops._checks.check_same_on_every_rank).
    dist.init_process_group("cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo")
    return Distributed(dist.get_rank(), dist.get_world_size(), local_rank, owns_group=True)


def resolve_device(name: str) -> torch.device:
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise TrainError("--device cuda: no CUDA device is available to this torch "
                             f"({torch.__version__}); use --device cpu")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def autocast_settings(amp: str, device: torch.device) -> Tuple[Optional[torch.dtype], bool]:
    """(autocast dtype or None, whether a GradScaler is needed)."""
    if amp == "none" or (amp == "auto" and device.type != "cuda"):
        return None, False
    if amp == "auto":
        amp = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if amp == "fp16" and device.type != "cuda":
        raise TrainError("--amp fp16 needs CUDA; on CPU use --amp bf16 or none")
    return (torch.bfloat16, False) if amp == "bf16" else (torch.float16, True)


def rng_state() -> Dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_run_checkpoint(path: str) -> Dict:
    """The checkpoint :func:`train` wrote, its checksum verified. Checkpoints written before they
    had one still load, unverified."""
    try:
        # Our own checkpoints hold RNG states and the config (plain Python and numpy objects).
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # truncated, corrupted, or not a torch file
        raise TrainError(f"cannot read checkpoint {path!r} ({type(error).__name__}); it may be truncated or "
                         "corrupted: delete it to start again, or choose another --output-dir") from error
    checkpoint = verify_checksum(checkpoint, path)
    missing = [k for k in CHECKPOINT_FIELDS if not isinstance(checkpoint, dict) or k not in checkpoint]
    if missing:
        raise TrainError(f"checkpoint {path!r} is not a pcd_kernels.train checkpoint (missing {', '.join(missing)})")
    wrong = [f"{k} is {type(checkpoint[k]).__name__}, expected {kind.__name__}" for k, kind in CHECKPOINT_FIELDS.items()
             if not isinstance(checkpoint[k], kind) or isinstance(checkpoint[k], bool)]
    if wrong:
        raise TrainError(f"checkpoint {path!r} is not a pcd_kernels.train checkpoint ({'; '.join(wrong)}): delete it "
                         "to start again, or choose another --output-dir")
    return checkpoint


def resumable_checkpoint(config: TrainConfig) -> Optional[Dict]:
    """The checkpoint ``--resume`` continues, None when there is none; a clear error when the output
    folder holds one without ``--resume``, or one that is unreadable or from other settings. The
    command line calls it before any long preparation, so a mistake costs no time."""
    path = os.path.join(config.output_dir, CHECKPOINT)
    if not os.path.exists(path):
        return None
    if not config.resume:
        raise TrainError(f"{path} exists: pass --resume to continue that run, or choose another --output-dir")
    checkpoint = load_run_checkpoint(path)
    settings = RESULT_SETTINGS + (DEMO_TEACHER_SETTINGS if config.teacher == "demo" else ())
    # A setting added after the checkpoint was written had its default then.
    saved = {k: checkpoint["config"].get(k, getattr(TrainConfig, k)) for k in settings}
    changed = [f"{k}: {saved[k]!r} -> {getattr(config, k)!r}" for k in settings if saved[k] != getattr(config, k)]
    if changed:
        raise TrainError(f"--resume: these settings differ from the checkpoint's run ({'; '.join(changed)}); "
                         "resume with the same settings, or start a new --output-dir")
    return checkpoint


def total_steps(config: TrainConfig, num_images: int, world_size: int) -> int:
    if config.max_steps is not None:
        return config.max_steps
    return config.epochs * steps_per_epoch(num_images, config.batch_size, world_size)


def train(config: TrainConfig, teacher: Teacher, images: Dataset, augmentation: Augmentation,
          student: Optional[Student] = None, device: Optional[torch.device] = None,
          distributed: Optional[Distributed] = None) -> Dict:
    """Distils ``teacher`` into ``student`` (built from ``config.student`` when None) on ``images``.

    Returns a summary: ``student`` (the module, unwrapped), ``step``, ``loss`` (last logged),
    ``checkpoint`` (its path). Writes ``checkpoint.pt``, ``log.jsonl``, ``log.csv`` and ``loss.png``
    under ``config.output_dir`` (rank 0)."""
    config = config.resolved()
    device = device or resolve_device(config.device)
    distributed = distributed or setup_distributed(device)
    prepare_output_dir(config.output_dir)
    checkpoint_path = os.path.join(config.output_dir, CHECKPOINT)
    # First the checks that refuse a folder holding another run, so that a mistaken start never
    # touches that run's files.
    checkpoint = resumable_checkpoint(config)
    if distributed.main:
        remove_stale_temporaries(config.output_dir)
    if checkpoint is None and config.resume and distributed.main:
        print(f"--resume: no {CHECKPOINT} in {config.output_dir} yet; starting at step 0", flush=True)

    torch.manual_seed(config.seed)
    teacher = teacher.to(device)
    with torch.no_grad():
        probe = teacher(torch.zeros(1, 3, config.image_size, config.image_size, device=device))
    if probe.dim() != 4:
        raise TrainError(f"the teacher must map (B, 3, H, W) images to (B, C, h, w) maps, got {tuple(probe.shape)}")
    dim = probe.shape[1]
    if student is None:
        backbone, channels = build_student_backbone(config.student)
        mlp_dim = config.mlp_dim or (4096 if config.student.startswith("resnet") else 2 * dim)
        student = Student(backbone, channels, dim, mlp_dim, config.num_heads, attention_backend=config.backend,
                          mhsa=config.mhsa)
    student = student.to(device)
    if distributed.world_size > 1 and device.type == "cuda":
        # torch's SyncBatchNorm has CUDA kernels only; on CPU (gloo) each rank keeps its own statistics.
        student = nn.SyncBatchNorm.convert_sync_batchnorm(student)
    criterion = PixelContrastiveLoss(config.temperature, config.negatives, queue_size=config.queue_size,
                                     dim=dim if config.queue_size else None, backend=config.backend,
                                     process_group=dist.group.WORLD if distributed.world_size > 1
                                     and config.negatives == "batch" else None).to(device)

    steps = total_steps(config, len(images), distributed.world_size)
    global_batch = config.batch_size * distributed.world_size
    peak_lr = scaled_learning_rate(config.lr, global_batch)
    warmup = config.warmup_steps if config.warmup_steps is not None else steps // 10
    optimizer = build_optimizer(config.optimizer, parameter_groups([("", student)], config.weight_decay),
                                peak_lr, config.momentum)
    amp_dtype, use_scaler = autocast_settings(config.amp, device)
    scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)

    start_step = 0
    if checkpoint is not None:
        try:
            student.load_state_dict(checkpoint["student"])
            criterion.load_state_dict(checkpoint["criterion"])
            optimizer.load_state_dict(checkpoint["optimizer"])
            if checkpoint.get("scaler"):
                scaler.load_state_dict(checkpoint["scaler"])
            set_rng_state(checkpoint["rng"])
        except torch.cuda.OutOfMemoryError:  # (a RuntimeError) the checkpoint is fine: say nothing against it
            raise
        except (KeyError, RuntimeError, TypeError, ValueError) as error:  # the right keys, the wrong contents
            raise TrainError(f"checkpoint {checkpoint_path!r} does not fit this run ({type(error).__name__}: "
                             f"{' '.join(str(error).split())[:300]}); delete it to start again, or choose another "
                             "--output-dir") from error
        start_step = checkpoint["step"]
    resumed = checkpoint is not None
    del checkpoint  # the modules now hold (or share) its tensors: keep no second copy through training

    model: nn.Module = student
    if distributed.world_size > 1:
        model = nn.parallel.DistributedDataParallel(student,
                                                    device_ids=[device.index] if device.type == "cuda" else None)

    if distributed.main:
        print(f"pcd_kernels.train: {config.loss} distillation into {config.output_dir}: steps {start_step}->{steps}, "
              f"{global_batch} images/step ({distributed.world_size} process(es) x {config.batch_size}), peak lr "
              f"{peak_lr:.4g}, queue {config.queue_size}, teacher map {dim}x{probe.shape[2]}x{probe.shape[3]}, "
              f"{len(images)} images, {device}", flush=True)
    pairs = ViewPairs(images, augmentation, config.seed)
    stop = steps if config.stop_after is None else min(steps, start_step + config.stop_after)
    batches = StepBatches(len(images), config.batch_size, config.seed, distributed.rank, distributed.world_size,
                          start_step, stop)
    loader = DataLoader(pairs, batch_sampler=batches, num_workers=config.workers, pin_memory=device.type == "cuda",
                        persistent_workers=False)
    log = MetricLog(config.output_dir, enabled=distributed.main, keep_until=start_step)
    progress = Progress(steps, start_step, enabled=distributed.main and config.progress, every=config.log_every)

    def save(step: int) -> None:
        if distributed.main:
            atomic_save({"student": student.state_dict(), "criterion": criterion.state_dict(),
                         "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict() if use_scaler else None,
                         "step": step, "epoch": step // batches.steps_per_epoch, "rng": rng_state(),
                         "config": dataclasses.asdict(config)}, checkpoint_path)
        distributed.barrier()

    model.train()
    step, window_loss, window_steps, window_start = start_step, torch.zeros((), device=device), 0, time.perf_counter()
    last_loss = None
    for v1, v2 in loader:
        lr = learning_rate(step, steps, peak_lr, warmup)
        for group in optimizer.param_groups:
            group["lr"] = lr
        views = torch.cat([v1, v2]).to(device, non_blocking=True)
        with (torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()):
            keys = teacher(views)
            # One forward of both views: DDP expects one forward per backward.
            maps = resize_to(model(views), keys.shape[-2:])
            loss = symmetric_loss(criterion, maps, keys, config.loss)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if config.clip_grad_norm:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(student.parameters(), config.clip_grad_norm)
        scaler.step(optimizer)
        scaler.update()
        if criterion.queue is not None:
            criterion.enqueue(keys.float().mean(dim=(2, 3)))
        step += 1
        window_loss += loss.detach().float()
        window_steps += 1
        if step % config.log_every == 0 or step == batches.total_steps:
            mean_loss = float(distributed.mean(window_loss) / window_steps)
            if not np.isfinite(mean_loss):
                raise TrainError(f"the loss became {mean_loss} by step {step}: lower --lr, set --clip-grad-norm, "
                                 "or check the inputs for NaN")
            elapsed = time.perf_counter() - window_start
            row = {"step": step, "epoch": step // batches.steps_per_epoch, "loss": mean_loss, "lr": lr,
                   "images_per_s": window_steps * global_batch / elapsed}
            log.append(row)
            progress.update(row)
            last_loss = mean_loss
            window_loss.zero_()
            window_steps, window_start = 0, time.perf_counter()
        if step % config.save_every == 0 and step < batches.total_steps:
            save(step)
    progress.close()
    if step > start_step or not resumed:
        save(step)
    if distributed.main and step >= steps:
        plot_loss(log.rows, os.path.join(config.output_dir, "loss.png"))
    return {"student": student, "step": step, "total_steps": steps, "loss": last_loss, "checkpoint": checkpoint_path,
            "finished": step >= steps}


def symmetric_loss(criterion: PixelContrastiveLoss, maps: torch.Tensor, keys: torch.Tensor, kind: str) -> torch.Tensor:
    """``½[L(s(v1), t(v2)) + L(s(v2), t(v1))]`` for ``maps = s(cat(v1, v2))``, ``keys = t(cat(v1, v2))``.

    ``kind="pooled"`` is the baseline that distils globally pooled vectors only (the same loss on
    1x1 maps)."""
    if kind == "pooled":
        maps, keys = maps.mean(dim=(2, 3), keepdim=True), keys.mean(dim=(2, 3), keepdim=True)
    s1, s2 = maps.chunk(2)
    t1, t2 = keys.chunk(2)
    return 0.5 * (criterion(s1, t2) + criterion(s2, t1))


__all__ = ["TrainConfig", "train", "symmetric_loss", "Distributed", "setup_distributed", "resolve_device",
           "load_run_checkpoint"]
