"""``python -m pcd_kernels.train``: the command line of the PCD trainer."""
import argparse
import sys
from typing import List, Optional

import torch.distributed as dist
from torch import nn

from pcd_kernels.train.data import Augmentation, ImageFolder
from pcd_kernels.train.engine import TrainConfig, resumable_checkpoint, resolve_device, setup_distributed, train
from pcd_kernels.train.errors import TrainError
from pcd_kernels.train.files import prepare_output_dir
from pcd_kernels.train.models import STUDENTS, TEACHERS, Teacher, build_teacher

EPILOG = """\
examples:
  python -m pcd_kernels.train                      # the embedded demo: digits, CPU, a few minutes
  python -m pcd_kernels.train --data ~/imagenet/train --teacher mocov3_resnet50 \\
      --teacher-weights r-50-1000ep.pth.tar --student resnet18 --epochs 100 --output-dir runs/r18
  torchrun --nproc_per_node=8 -m pcd_kernels.train --data ... --batch-size 64   # 64 per process
  python -m pcd_kernels.train ... --resume         # continue runs/r18/checkpoint.pt exactly
"""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pcd_kernels.train", epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                description="Pixel-wise contrastive distillation (PCD) of a frozen teacher into a "
                                            "student with pcd_kernels' fused loss. Without --data it runs the "
                                            "embedded demo and its dense evaluation.")
    d = TrainConfig()
    data = p.add_argument_group("data and models")
    data.add_argument("--data", metavar="DIR", help="a folder of images (searched recursively; labels unused); "
                      "omit for the embedded scikit-learn digits demo")
    data.add_argument("--teacher", help=f"{' | '.join(TEACHERS)} | package.module:factory (returns an nn.Module "
                      "giving (B, C, h, w) maps, or a (backbone, MLP head) pair whose head becomes a "
                      "SpatialAdaptor); default: demo (the demo's own teacher, only without --data), required "
                      "with --data")
    data.add_argument("--teacher-weights", metavar="PATH", help="the MoCo v3 checkpoint for mocov3_resnet50")
    data.add_argument("--teacher-encoder", default=d.teacher_encoder, choices=("base", "momentum"),
                      help="which MoCo v3 encoder is the teacher (default: %(default)s)")
    data.add_argument("--teacher-steps", type=int, default=d.teacher_steps,
                      help="demo only: steps to train its teacher (default: %(default)s)")
    data.add_argument("--adaptor", action=argparse.BooleanOptionalAction, default=d.adaptor,
                      help="the teacher's pooled-feature MLP head applied per pixel (SpatialAdaptor); "
                      "--no-adaptor distils the teacher backbone's map itself, the ablation (default: on)")
    data.add_argument("--student", help=f"{' | '.join(STUDENTS)} | package.module:factory (an nn.Module with "
                      "an int out_channels); default: resnet18 with --data when torchvision imports, cnn "
                      "otherwise (torchvision missing or broken)")
    data.add_argument("--mlp-dim", type=int, help="hidden width of the projector and predictor (default: 4096 "
                      "for ResNets, twice the teacher's dim otherwise)")
    data.add_argument("--mhsa", action=argparse.BooleanOptionalAction, default=d.mhsa,
                      help="PCD's plug-in MHSA2d between the student's backbone and projector; --no-mhsa "
                      "leaves it out, the ablation (default: on)")
    data.add_argument("--num-heads", type=int, help="heads of the plug-in MHSA2d, reduced to a divisor of the "
                      "backbone's width (default: width / 16, at most 8)")
    data.add_argument("--image-size", type=int, help="view size in pixels (default: 32 demo, 224 otherwise)")
    data.add_argument("--workers", type=int, default=d.workers, help="data loader processes per rank "
                      "(default: %(default)s)")

    opt = p.add_argument_group("optimisation")
    opt.add_argument("--epochs", type=int, help="epochs (default: 100 with --data); --max-steps wins")
    opt.add_argument("--max-steps", type=int, help="optimiser steps in all (default: 300 for the demo)")
    opt.add_argument("--batch-size", type=int, help="images per process and step (default: 128 demo, 64)")
    opt.add_argument("--optimizer", default=d.optimizer, choices=("sgd", "lars"), help="(default: %(default)s)")
    opt.add_argument("--lr", type=float, help="base rate per 256 images: the peak is lr * global batch / 256 "
                     "(default: 0.4 demo, 0.05)")
    opt.add_argument("--momentum", type=float, default=d.momentum, help="(default: %(default)s)")
    opt.add_argument("--weight-decay", type=float, default=d.weight_decay, help="on conv/linear weights only; "
                     "biases, norms and position embeddings never decay (default: %(default)s)")
    opt.add_argument("--warmup-steps", type=int, help="linear warm-up before the cosine decay (default: 10%% of "
                     "the steps)")
    opt.add_argument("--clip-grad-norm", type=float, help="clip the gradient's global norm to this (default: off)")
    opt.add_argument("--amp", default=d.amp, choices=("auto", "bf16", "fp16", "none"),
                     help="mixed precision; auto = bf16 (else fp16 with loss scaling) on CUDA, none on CPU")

    loss = p.add_argument_group("loss")
    loss.add_argument("--queue-size", type=int, help="pooled teacher vectors kept as negatives (default: 65536; "
                      "1024 demo)")
    loss.add_argument("--temperature", type=float, default=d.temperature, help="(default: %(default)s)")
    loss.add_argument("--negatives", default=d.negatives, choices=("none", "image", "batch"),
                      help="negatives besides the queue: none (PCD), the image's or the batch's other teacher "
                           "pixels (default: %(default)s)")
    loss.add_argument("--loss", default=d.loss, choices=("pixel", "pooled"), help="pixel: PCD; pooled: the "
                      "same loss on globally pooled vectors (a baseline) (default: %(default)s)")
    loss.add_argument("--backend", default=d.backend, choices=("auto", "torch", "triton", "cuda"),
                      help="pcd_kernels backend of the loss and attention (default: %(default)s)")

    run = p.add_argument_group("run")
    run.add_argument("--output-dir", default=d.output_dir, metavar="DIR", help="checkpoint.pt, log.jsonl, log.csv, "
                     "loss.png (default: %(default)s)")
    run.add_argument("--resume", action="store_true", help="continue the run saved in --output-dir exactly")
    run.add_argument("--save-every", type=int, default=d.save_every, help="checkpoint every N steps and at the "
                     "end (default: %(default)s)")
    run.add_argument("--log-every", type=int, default=d.log_every, help="(default: %(default)s)")
    run.add_argument("--stop-after", type=int, metavar="N", help="stop (with a checkpoint) after N steps of this "
                     "invocation, e.g. to fit a job's time limit; --resume continues")
    run.add_argument("--seed", type=int, default=d.seed, help="(default: %(default)s)")
    run.add_argument("--device", default=d.device, choices=("auto", "cpu", "cuda"), help="(default: %(default)s)")
    run.add_argument("--eval", action=argparse.BooleanOptionalAction, default=d.eval,
                     help="demo: run the dense evaluation at the end (default: on)")
    run.add_argument("--baselines", action=argparse.BooleanOptionalAction, default=d.baselines,
                     help="demo: also train the pooled-distillation baseline (default: on)")
    run.add_argument("--progress", action=argparse.BooleanOptionalAction, default=d.progress,
                     help="show the progress line (default: on)")
    return p


def run_on_folder(config: TrainConfig):
    config = config.resolved()
    device = resolve_device(config.device)
    distributed = setup_distributed(device)
    teacher = build_teacher(config.teacher, config.teacher_weights, config.teacher_encoder)
    if not config.adaptor:
        if isinstance(teacher.head, nn.Identity):
            raise TrainError(f"--no-adaptor: the teacher {config.teacher!r} has no head to leave out")
        teacher = Teacher(teacher.backbone)
    images = ImageFolder(config.data, load_size=2 * config.image_size)
    views = Augmentation(size=config.image_size)  # ImageNet normalisation, as the teachers expect
    return train(config, teacher, images, views, device=device, distributed=distributed)


def main(argv: Optional[List[str]] = None) -> int:
    args = parser().parse_args(argv)
    config = TrainConfig(**vars(args))
    try:
        config.check_model_names()
        resolved = config.resolved()
        prepare_output_dir(resolved.output_dir)
        resumable_checkpoint(resolved)
        if config.data is None:
            from pcd_kernels.train.demo import run_demo

            run_demo(config)
        else:
            run_on_folder(config)
    except TrainError as error:
        print(f"pcd_kernels.train: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\npcd_kernels.train: interrupted; the last checkpoint in {config.output_dir} continues with --resume",
              file=sys.stderr)
        return 130
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0
