"""The PCD trainer: schedule, optimisers, aligned views, resumable batches, the symmetric loss, the
command line (demo, --data, resume, torchrun), checkpoints and its error messages."""
import builtins
import csv
import dataclasses
import errno
import json
import math
import os
import re
import shutil
import struct
import subprocess
import sys
import zipfile

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pcd_kernels.reference import naive_pixel_contrastive_loss
from pcd_kernels.train import (LARS, Augmentation, CompactCNN, Teacher, TrainConfig, TrainError, ViewPairs,
                               learning_rate, load_mocov3_resnet50, parameter_groups, symmetric_loss)
from pcd_kernels.train import demo
from pcd_kernels.train.cli import main, parser
from pcd_kernels.train.data import StepBatches
from pcd_kernels.train.engine import load_run_checkpoint, resumable_checkpoint
from pcd_kernels.train.files import CHECKSUM, atomic_save, write_json
from pcd_kernels.train.models import mlp_head
from pcd_kernels.train.optim import scaled_learning_rate
from pcd_kernels.train.progress import MetricLog, plot_loss
from pcd_kernels import MHSA2d, PixelContrastiveLoss

TESTS = os.path.dirname(os.path.abspath(__file__))
# A tiny demo run: a few teacher and student steps, a small queue, no data-loader processes.
TINY = ["--teacher-steps", "2", "--batch-size", "16", "--queue-size", "96", "--workers", "0", "--no-progress",
        "--log-every", "1"]


def _run(*args, env=None, timeout=300):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([TESTS, os.environ.get("PYTHONPATH", "")]), **(env or {})}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=timeout)


# ---------------------------------------------------------------- schedule and optimisers

def test_learning_rate_warmup_then_cosine():
    peak, total, warmup = 0.3, 50, 10
    rates = [learning_rate(s, total, peak, warmup) for s in range(total)]
    assert rates[:warmup] == pytest.approx([peak * (s + 1) / warmup for s in range(warmup)])
    assert rates[warmup] == pytest.approx(peak)
    for s in range(warmup, total):
        assert rates[s] == pytest.approx(0.5 * peak * (1 + math.cos(math.pi * (s - warmup) / (total - warmup))))
    assert all(a >= b for a, b in zip(rates[warmup:], rates[warmup + 1:]))
    assert learning_rate(total, total, peak, warmup, final_lr=0.01) == pytest.approx(0.01)


def test_learning_rate_scales_in_floating_point():
    # The official code divides integers: a per-GPU batch under 256 gave a rate of 0.
    assert scaled_learning_rate(0.05, 64) == pytest.approx(0.0125)
    assert scaled_learning_rate(0.05, 1024) == pytest.approx(0.2)


def test_weight_decay_excludes_biases_norms_and_position_embeddings():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), MHSA2d(8, 2, pos_embed="learned"), nn.Linear(8, 4))
    decay, exempt = parameter_groups([("", model)], weight_decay=0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert sorted(names[id(p)] for p in decay["params"]) == ["0.weight", "2.proj.weight", "2.qkv.weight", "3.weight"]
    assert sorted(names[id(p)] for p in exempt["params"]) == sorted(
        ["0.bias", "1.weight", "1.bias", "2.pos_embed", "2.qkv.bias", "2.proj.bias", "3.bias"])
    assert decay["weight_decay"] == 0.1 and exempt["weight_decay"] == 0.0
    # A weight decay of 0 is a setting, not a crash (the official code crashed on None).
    assert parameter_groups([("", model)], weight_decay=0.0)[0]["weight_decay"] == 0.0


def test_lars_step_matches_its_formula():
    torch.manual_seed(0)
    w, b = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    gw, gb = torch.randn_like(w), torch.randn_like(b)
    pw, pb = nn.Parameter(w.clone()), nn.Parameter(b.clone())
    opt = LARS([{"params": [pw], "weight_decay": 0.01, "lars_exempt": False},
                {"params": [pb], "weight_decay": 0.0, "lars_exempt": True}], lr=0.5, momentum=0.9)
    for _ in range(2):
        pw.grad, pb.grad = gw.clone(), gb.clone()
        opt.step()
    expected_w, expected_b, buf_w, buf_b = w.clone(), b.clone(), torch.zeros_like(w), torch.zeros_like(b)
    for _ in range(2):
        update = gw + 0.01 * expected_w
        update = update * (0.001 * expected_w.norm() / update.norm())
        buf_w = 0.9 * buf_w + update
        expected_w = expected_w - 0.5 * buf_w
        buf_b = 0.9 * buf_b + gb
        expected_b = expected_b - 0.5 * buf_b
    torch.testing.assert_close(pw.detach(), expected_w)
    torch.testing.assert_close(pb.detach(), expected_b)


# ---------------------------------------------------------------- data

def _pattern(size=40):
    image = torch.rand(3, size, size + 7)
    image[:, 11, 23] = 5.0  # one pixel brighter than everything else
    return image


def test_views_share_geometry_and_differ_in_colour():
    images = [_pattern() for _ in range(3)]
    aug = Augmentation(size=24, crop_scale=(0.3, 1.0), noise=0.0, mean=None, std=None, blur=0.0, grayscale=0.0)
    pairs = ViewPairs(images, aug, seed=7)
    for index in range(3):
        for epoch in range(4):
            v1, v2 = pairs[(epoch, index)]
            assert v1.shape == v2.shape == (3, 24, 24)
            assert not torch.equal(v1, v2)  # independent brightness/contrast/saturation
            # Same crop and flip: the views' structure lines up pixel for pixel.
            c1, c2 = (v1 - v1.mean()).flatten(), (v2 - v2.mean()).flatten()
            assert F.cosine_similarity(c1, c2, dim=0) > 0.9
    plain = Augmentation(size=24, crop_scale=(0.3, 1.0), brightness=0, contrast=0, saturation=0, grayscale=0,
                         blur=0, mean=None, std=None)
    v1, v2 = ViewPairs(images, plain, seed=7)[(1, 2)]
    assert torch.equal(v1, v2)


def test_views_are_a_function_of_seed_epoch_and_index():
    images = [_pattern() for _ in range(2)]
    aug = Augmentation(size=16)
    a, b = ViewPairs(images, aug, seed=1), ViewPairs(images, aug, seed=1)
    assert all(torch.equal(x, y) for x, y in zip(a[(3, 1)], b[(3, 1)]))
    assert not torch.equal(a[(3, 1)][0], a[(4, 1)][0])
    assert not torch.equal(a[(3, 1)][0], ViewPairs(images, aug, seed=2)[(3, 1)][0])


@pytest.mark.parametrize("world", [1, 3])
def test_step_batches_resume_mid_epoch_and_split_ranks(world):
    n, batch, total = 53, 4, 11
    whole = {r: list(StepBatches(n, batch, 5, r, world, 0, total)) for r in range(world)}
    per_epoch = (n // world) // batch
    for r in range(world):
        assert len(whole[r]) == total and all(len(b) == batch for b in whole[r])
        for start in (1, per_epoch, per_epoch + 1, total - 1):
            assert list(StepBatches(n, batch, 5, r, world, start, total)) == whole[r][start:]
    for step in range(total):  # ranks never share an image within a step's epoch
        keys = [k for r in range(world) for k in whole[r][step]]
        assert len(set(keys)) == len(keys)
    epoch0 = [k for r in range(world) for b in whole[r][:per_epoch] for k in b]
    assert len(set(epoch0)) == len(epoch0) and {e for e, _ in epoch0} == {0}


def test_too_few_images_for_a_batch_is_a_clear_error():
    with pytest.raises(TrainError, match="fewer than one batch"):
        StepBatches(5, 4, 0, 0, 2, 0, 1)


# ---------------------------------------------------------------- loss

@pytest.mark.parametrize("kind", ["pixel", "pooled"])
def test_symmetric_loss_against_the_naive_formula(kind):
    torch.manual_seed(0)
    criterion = PixelContrastiveLoss(0.2, "none", queue_size=10, dim=6)
    maps = torch.randn(6, 6, 3, 5, dtype=torch.float64, requires_grad=True)
    keys = torch.randn(6, 6, 3, 5, dtype=torch.float64)
    loss = symmetric_loss(criterion, maps, keys, kind)
    m, k = (maps, keys) if kind == "pixel" else (maps.mean((2, 3), keepdim=True), keys.mean((2, 3), keepdim=True))
    queue = criterion.queue.double()
    expected = 0.5 * (naive_pixel_contrastive_loss(m[:3], k[3:], queue, negatives="none")
                      + naive_pixel_contrastive_loss(m[3:], k[:3], queue, negatives="none"))
    torch.testing.assert_close(loss, expected)
    grad, = torch.autograd.grad(loss, maps)
    expected_grad, = torch.autograd.grad(expected, maps)
    torch.testing.assert_close(grad, expected_grad)


# ---------------------------------------------------------------- models

class _FakeResNet(nn.Module):
    """torchvision's ResNet attribute names at a toy size (the loader needs nothing else)."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8)
        self.relu, self.maxpool = nn.ReLU(inplace=True), nn.MaxPool2d(2)
        self.layer1, self.layer2 = nn.Conv2d(8, 8, 3, 1, 1), nn.Conv2d(8, 12, 3, 2, 1)
        self.layer3, self.layer4 = nn.Identity(), nn.Conv2d(12, 16, 1)
        self.avgpool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(16, 1000)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(self.avgpool(self.layer4(self.layer3(self.layer2(self.layer1(x))))), 1))


def _mocov3_checkpoint(path):
    """An official-layout MoCo v3 checkpoint of the fake ResNet, with trained-looking statistics."""
    torch.manual_seed(1)
    encoders = {}
    for name in ("base", "momentum"):
        net = _FakeResNet()
        net.fc = mlp_head(16, 32, 8)
        for m in net.modules():
            if isinstance(m, nn.BatchNorm1d) or isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
        encoders[name] = net.eval()
    state = {f"module.{name}_encoder.{k}": v for name, net in encoders.items() for k, v in net.state_dict().items()}
    state.update({f"module.predictor.{k}": v for k, v in mlp_head(8, 32, 8, last_bn=False).state_dict().items()})
    torch.save({"epoch": 300, "arch": "resnet50", "state_dict": state, "optimizer": {}}, path)
    return encoders


@pytest.mark.parametrize("encoder", ["base", "momentum"])
def test_mocov3_loader_builds_the_teacher_from_the_official_layout(tmp_path, encoder):
    encoders = _mocov3_checkpoint(tmp_path / "r-50.pth.tar")
    teacher = load_mocov3_resnet50(str(tmp_path / "r-50.pth.tar"), encoder, resnet_factory=_FakeResNet)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    x = torch.randn(3, 3, 37, 29)
    dense = teacher(x)
    assert dense.dim() == 4 and dense.shape[1] == 8
    # The adaptor's map pools to exactly what the checkpoint's encoder gives for the image.
    torch.testing.assert_close(dense.mean((2, 3)), encoders[encoder](x), atol=1e-5, rtol=1e-4)


def test_mocov3_loader_errors(tmp_path):
    with pytest.raises(TrainError, match="does not exist"):
        load_mocov3_resnet50(str(tmp_path / "missing.pth"), resnet_factory=_FakeResNet)
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(TrainError, match="cannot read"):
        load_mocov3_resnet50(str(tmp_path / "garbage.pth"), resnet_factory=_FakeResNet)
    torch.save({"state_dict": {"module.other.weight": torch.zeros(1)}}, tmp_path / "other.pth")
    with pytest.raises(TrainError, match="MoCo v3"):
        load_mocov3_resnet50(str(tmp_path / "other.pth"), resnet_factory=_FakeResNet)


def test_mocov3_loader_with_torchvision(tmp_path):
    torchvision = pytest.importorskip("torchvision", reason="torchvision is not installed (optional): the "
                                      "loader's key mapping is tested above with a same-named toy ResNet")
    net = torchvision.models.resnet50(weights=None)
    net.fc = mlp_head(2048, 64, 16)
    torch.save({"state_dict": {f"module.base_encoder.{k}": v for k, v in net.state_dict().items()}},
               tmp_path / "r50.pth")
    teacher = load_mocov3_resnet50(str(tmp_path / "r50.pth"))
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(teacher(x).mean((2, 3)), net.eval()(x), atol=1e-4, rtol=1e-3)


def test_teacher_is_frozen_and_converts_an_mlp_head():
    backbone, head = CompactCNN((4, 8)), mlp_head(8, 16, 6)
    teacher = Teacher(backbone, head)
    teacher.train()
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    x = torch.randn(2, 3, 12, 10)
    torch.testing.assert_close(teacher(x).mean((2, 3)), head.eval()(backbone.eval()(x).mean((2, 3))),
                               atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------- the command line

def _checkpoint(folder):
    return torch.load(os.path.join(folder, "checkpoint.pt"), map_location="cpu", weights_only=False)


def test_demo_two_steps_writes_checkpoint_logs_and_plot(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["--max-steps", "2", "--output-dir", str(out), "--no-eval", "--no-baselines", *TINY]) == 0
    checkpoint = _checkpoint(out)
    assert checkpoint["step"] == 2 and "student" in checkpoint and "optimizer" in checkpoint
    assert int(checkpoint["criterion"]["queue_ptr"]) == 2 * 2 * 16 % 96  # two views of 16 images per step
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(math.isfinite(r["loss"]) for r in rows)
    assert (out / "log.csv").read_text().splitlines()[0] == "step,epoch,loss,lr,images_per_s"
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "teacher.pt").exists()
    assert not list(out.glob("*.tmp-*"))  # atomic writes leave no temporaries


def test_resume_continues_exactly(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    common = ["--max-steps", "8", "--no-eval", "--no-baselines", "--save-every", "3", *TINY]
    assert main([*common, "--output-dir", str(straight)]) == 0
    assert main([*common, "--output-dir", str(resumed), "--stop-after", "4"]) == 0
    assert _checkpoint(resumed)["step"] == 4
    assert main([*common, "--output-dir", str(resumed), "--resume"]) == 0
    a, b = _checkpoint(straight), _checkpoint(resumed)
    assert a["step"] == b["step"] == 8
    for name in ("student", "criterion"):
        assert a[name].keys() == b[name].keys()
        for key in a[name]:
            assert torch.equal(a[name][key], b[name][key]), f"{name}.{key} differs after resume"
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])
    logged = [json.loads(line)["step"] for line in (resumed / "log.jsonl").read_text().splitlines()]
    assert logged == list(range(1, 9))
    # A finished run resumed again does nothing more; other settings are refused.
    assert main([*common, "--output-dir", str(resumed), "--resume"]) == 0
    assert _checkpoint(resumed)["step"] == 8
    assert main([*common, "--output-dir", str(resumed), "--resume", "--lr", "0.1"]) == 2


def test_checkpoint_is_not_overwritten_without_resume(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["--max-steps", "1", "--output-dir", str(out), "--no-eval", "--no-baselines", *TINY]
    assert main(args) == 0
    capsys.readouterr()
    assert main(args) == 2
    assert "pass --resume" in capsys.readouterr().err


def test_demo_with_evaluation_prints_the_table(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["--max-steps", "2", "--output-dir", str(out), *TINY]) == 0
    printed = capsys.readouterr().out
    result = json.loads((out / "demo_results.json").read_text())
    models = [row["model"] for row in result["rows"]]
    assert len(models) == 4 and models[0].startswith("random init") and models[-1].startswith("teacher")
    for row in result["rows"]:
        assert 0 <= row["mIoU"] <= 100 and 0 <= row["digit_pixel_accuracy"] <= 100
        assert f"{row['mIoU']:.1f}" in printed
    assert (out / "baseline-pooled" / "checkpoint.pt").exists()


def _write_images(folder, count=10):
    from PIL import Image

    for i in range(count):
        sub = folder / f"class{i % 3}"
        sub.mkdir(parents=True, exist_ok=True)
        pixels = (torch.rand(30 + i, 41, 3) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(sub / f"{i}.{'png' if i % 2 else 'jpg'}")


def test_data_folder_with_a_teacher_factory(tmp_path):
    pytest.importorskip("PIL", reason="Pillow is not installed (the --data path reads images with it)")
    _write_images(tmp_path / "images")
    result = _run("-m", "pcd_kernels.train", "--data", str(tmp_path / "images"), "--teacher",
                  "_train_factories:teacher_pair", "--student", "cnn", "--image-size", "24", "--max-steps", "2",
                  "--batch-size", "4", "--queue-size", "32", "--workers", "1", "--output-dir", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    assert _checkpoint(tmp_path / "out")["step"] == 2
    # --no-adaptor leaves the pair's head out (its 16-channel backbone map is the target); a
    # teacher without a head has none to leave out.
    common = ["-m", "pcd_kernels.train", "--data", str(tmp_path / "images"), "--student", "cnn", "--image-size", "24",
              "--max-steps", "1", "--batch-size", "4", "--queue-size", "32", "--workers", "0", "--no-adaptor"]
    result = _run(*common, "--teacher", "_train_factories:teacher_pair", "--output-dir", str(tmp_path / "bare"))
    assert result.returncode == 0, result.stderr
    assert _checkpoint(tmp_path / "bare")["criterion"]["queue"].shape[-1] == 16
    result = _run(*common, "--teacher", "_train_factories:headless_teacher", "--output-dir", str(tmp_path / "x"))
    assert result.returncode == 2 and "--no-adaptor: the teacher '_train_factories:headless_teacher' has no head " \
        "to leave out" in result.stderr, result.stderr


def test_torchrun_two_gloo_processes(tmp_path):
    out = tmp_path / "ddp"
    result = _run("-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", "-m", "pcd_kernels.train",
                  "--device", "cpu", "--max-steps", "2", "--negatives", "batch", "--output-dir", str(out),
                  "--no-eval", "--no-baselines", *TINY, env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoint = _checkpoint(out)
    assert checkpoint["step"] == 2
    # Both ranks' pooled teacher vectors reached the (shared) queue: 2 steps x 2 ranks x 2 views x 16.
    assert int(checkpoint["criterion"]["queue_ptr"]) == 128 % 96
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]  # rank 0 alone writes the log
    assert rows[0]["images_per_s"] > 0


@pytest.mark.parametrize("args, message", [
    (["--data", "/no/such/folder", "--teacher", "_train_factories:teacher_pair"], "is not a directory"),
    (["--student", "resnet99"], "unknown model 'resnet99'"),
    (["--data", "{tmp}", "--teacher", "vit_giant"], "unknown model 'vit_giant'"),
    (["--data", "{tmp}", "--teacher", "no_such_module:factory"], "cannot import"),
    (["--data", "{tmp}", "--teacher", "mocov3_resnet50"], "needs --teacher-weights"),
    (["--batch-size", "0"], "--batch-size must be an int >= 1"),
    (["--queue-size", "0"], "needs --queue-size > 0"),
])
def test_user_errors_are_one_line_without_traceback(tmp_path, args, message):
    _write_images(tmp_path / "imgs", count=2) if "{tmp}" in args else None
    args = [a.replace("{tmp}", str(tmp_path / "imgs")) for a in args]
    result = _run("-m", "pcd_kernels.train", *TINY, *args, "--output-dir", str(tmp_path / "out"))
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr, result.stderr


@pytest.mark.parametrize("content", [b"", b"garbage" * 100, "truncated"])
def test_corrupted_checkpoint_is_a_clear_error(tmp_path, content):
    out = tmp_path / "run"
    args = ["--max-steps", "2", "--output-dir", str(out), "--no-eval", "--no-baselines", *TINY]
    if content == "truncated":
        assert main(args) == 0
        data = (out / "checkpoint.pt").read_bytes()
        (out / "checkpoint.pt").write_bytes(data[:len(data) // 2])
    else:
        out.mkdir()
        (out / "checkpoint.pt").write_bytes(content)
    result = _run("-m", "pcd_kernels.train", *args, "--resume")
    assert result.returncode == 2
    assert "cannot read checkpoint" in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_config_defaults_follow_the_data():
    demo = TrainConfig().resolved()
    assert (demo.teacher, demo.student, demo.image_size, demo.max_steps) == ("demo", "cnn", 32, 300)
    real = TrainConfig(data="x", teacher="mocov3_resnet50").resolved()
    try:
        import torchvision  # noqa: F401
        student = "resnet18"
    except ImportError:
        student = "cnn"  # the built-in CNN stands in for ResNet-18 without torchvision
    assert (real.student, real.image_size, real.queue_size, real.epochs) == (student, 224, 65536, 100)
    with pytest.raises(TrainError, match="--teacher is required"):
        TrainConfig(data="x").resolved()


def test_resnet_student_without_torchvision_says_what_to_install(tmp_path, capsys):
    try:
        import torchvision  # noqa: F401
        pytest.skip("torchvision is installed here, so the ResNet students build")
    except ImportError:
        pass
    assert main(["--student", "resnet18", "--max-steps", "1", "--output-dir", str(tmp_path / "out"), *TINY]) == 2
    assert "needs torchvision" in capsys.readouterr().err


# ---------------------------------------------------------------- faults: a full disk, the output folder, damaged files

# The smallest --data run (the demo builds its digit canvases first): 10 images, a factory teacher.
FOLDER_RUN = ["--teacher", "_train_factories:teacher_pair", "--student", "cnn", "--image-size", "24", "--batch-size",
              "4", "--queue-size", "32", "--workers", "0", "--no-progress", "--log-every", "1", "--save-every", "1",
              "--max-steps", "3"]


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
    """A --data run stopped after step 2 of 3 (checkpoint and log rows 1 and 2), and its arguments.
    Tests resume copies of it (:func:`_copy_run`)."""
    pytest.importorskip("PIL", reason="Pillow is not installed (the --data path reads images with it)")
    root = tmp_path_factory.mktemp("stopped")
    _write_images(root / "images")
    args = ["--data", str(root / "images"), *FOLDER_RUN]
    assert main([*args, "--output-dir", str(root / "run"), "--stop-after", "2"]) == 0
    return root / "run", args


def _copy_run(stopped_run, tmp_path):
    """A copy of the stopped run and the arguments that resume it."""
    folder, args = stopped_run
    shutil.copytree(folder, tmp_path / "run")
    return tmp_path / "run", [*args, "--output-dir", str(tmp_path / "run"), "--resume"]


def _error_line(capsys) -> str:
    """The one line a user error leaves on stderr."""
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("pcd_kernels.train: error: "), err
    return err


def _temporaries(folder):
    return sorted(p.name for p in folder.rglob("*.tmp-*"))


def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _save_then_fail(obj, target, *args, **kwargs):
    """``torch.save`` on a disk that fills up after the first bytes (``target``: a path or a file)."""
    if isinstance(target, (str, os.PathLike)):
        with open(target, "wb") as f:
            f.write(b"partial")
    else:
        target.write(b"partial")
    _no_space()


@pytest.mark.parametrize("writer", ["checkpoint", "json", "log", "plot"])
def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch, writer):
    path = tmp_path / {"checkpoint": "checkpoint.pt", "json": "demo_results.json", "log": "log.jsonl",
                       "plot": "loss.png"}[writer]
    path.write_bytes(b"old")
    write = {"checkpoint": lambda: atomic_save({"step": 1}, str(path)),
             "json": lambda: write_json(str(path), {"step": 1}),
             "log": lambda: MetricLog(str(tmp_path)),  # a fresh run rewrites the log
             "plot": lambda: plot_loss([{"step": 1, "loss": 1.0}], str(path))}[writer]
    if writer == "plot":
        pytest.importorskip("matplotlib")
    monkeypatch.setattr(os, "replace", _no_space)
    with pytest.raises(TrainError, match=f"cannot write {re.escape(str(path))}: No space left on device"):
        write()
    assert path.read_bytes() == b"old" and not _temporaries(tmp_path)


@pytest.mark.parametrize("writer", ["checkpoint", "log"])
def test_disk_full_during_a_run_is_one_line_and_keeps_the_last_checkpoint(stopped_run, tmp_path, monkeypatch, capsys,
                                                                       writer):
    out, args = _copy_run(stopped_run, tmp_path)
    saved = (out / "checkpoint.pt").read_bytes()
    if writer == "checkpoint":
        monkeypatch.setattr(torch, "save", _save_then_fail)
    else:
        real_open = open

        def full_log(path, mode="r", *args, **kwargs):
            if str(path).endswith("log.jsonl") and "a" in mode:
                _no_space()
            return real_open(path, mode, *args, **kwargs)

        monkeypatch.setattr(builtins, "open", full_log)
    capsys.readouterr()
    assert main(args) == 2
    assert "No space left on device" in _error_line(capsys)
    assert (out / "checkpoint.pt").read_bytes() == saved and not _temporaries(out)


@pytest.mark.parametrize("kind", ["a file", "below a file", "read-only"])
def test_an_unusable_output_dir_fails_at_once(tmp_path, monkeypatch, capsys, kind):
    (tmp_path / "file").write_text("")
    out = {"a file": tmp_path / "file", "below a file": tmp_path / "file" / "run", "read-only": tmp_path / "ro"}[kind]
    if kind == "read-only":
        out.mkdir()
        out.chmod(0o555)
        if hasattr(os, "geteuid") and os.geteuid() == 0:  # root writes there anyway: a read-only disk refuses it
            real_open = os.open

            def read_only(path, flags, *args, **kwargs):
                if str(path).startswith(str(out)) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
                    raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
                return real_open(path, flags, *args, **kwargs)

            monkeypatch.setattr(os, "open", read_only)

    def long_preparation(*args, **kwargs):
        raise AssertionError("the output folder is checked before the demo's data is built")

    monkeypatch.setattr(demo, "DemoData", long_preparation)
    assert main(["--max-steps", "1", "--output-dir", str(out), *TINY]) == 2
    assert f"--output-dir {out}: cannot write there" in _error_line(capsys)


def test_temporary_files_of_a_killed_writer_are_removed_at_the_next_start(stopped_run, tmp_path):
    out, args = _copy_run(stopped_run, tmp_path)
    killed = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                            text=True, check=True)
    dead = int(killed.stdout)  # a writer that is gone
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # one still writing
    try:
        stale = [f"checkpoint.pt.tmp-{dead}", f"log.jsonl.tmp-{dead}", f"demo_results.json.tmp-{dead}"]
        kept = ["notes.txt", "notes.tmp-draft", f"checkpoint.pt.tmp-{dead}.bak",  # not names the trainer gives
                f"loss.png.tmp-{live.pid}"]  # another process, still running, may be writing it
        for name in stale + kept:
            (out / name).write_bytes(b"partial")
        (out / "baseline-pooled").mkdir()
        (out / "baseline-pooled" / f"keep.tmp-{dead}").write_bytes(b"")  # another run's folder: it cleans its own
        assert main(args[:-1]) == 2  # without --resume: refused, and the run's files are left as they are
        assert all((out / name).exists() for name in stale + kept)
        assert main(args) == 0
    finally:
        live.kill()
        live.wait()
    assert not any((out / name).exists() for name in stale)
    assert all((out / name).exists() for name in kept) and (out / "baseline-pooled" / f"keep.tmp-{dead}").exists()


def _flip_a_tensor_byte(path):
    """Flips one byte in the middle of the largest tensor's data, which ``torch.load`` reads unchecked."""
    with zipfile.ZipFile(path) as archive:
        info = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    data = bytearray(path.read_bytes())
    name_length, extra_length = struct.unpack("<HH", data[info.header_offset + 26:info.header_offset + 30])
    data[info.header_offset + 30 + name_length + extra_length + info.file_size // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_flipped_byte_in_a_checkpoint_is_detected(stopped_run, tmp_path, capsys):
    out, args = _copy_run(stopped_run, tmp_path)
    _flip_a_tensor_byte(out / "checkpoint.pt")
    capsys.readouterr()
    assert main(args) == 2
    assert "checkpoint.pt is corrupted: its contents do not match the sha256" in _error_line(capsys)


def test_a_checkpoint_without_a_checksum_still_loads(stopped_run, tmp_path):
    checkpoint = torch.load(stopped_run[0] / "checkpoint.pt", map_location="cpu", weights_only=False)
    del checkpoint["sha256"]  # as the trainer wrote them before they had one
    torch.save(checkpoint, tmp_path / "checkpoint.pt")
    assert load_run_checkpoint(str(tmp_path / "checkpoint.pt"))["step"] == 2


@pytest.mark.parametrize("field, value, message", [
    ("config", "oops", "config is str, expected dict"),
    ("step", "2", "step is str, expected int"),
    ("student", [], "student is list, expected dict"),
    ("rng", {}, "does not fit this run (KeyError"),
    ("optimizer", {"state": {}}, "does not fit this run"),
])
def test_a_checkpoint_with_wrong_typed_fields_is_a_clear_error(stopped_run, tmp_path, capsys, field, value, message):
    out, args = _copy_run(stopped_run, tmp_path)
    checkpoint = load_run_checkpoint(str(out / "checkpoint.pt"))
    atomic_save({**checkpoint, field: value}, str(out / "checkpoint.pt"))  # with a checksum that matches
    capsys.readouterr()
    assert main(args) == 2
    assert message in _error_line(capsys)


def test_resume_drops_a_torn_last_log_line(stopped_run, tmp_path):
    out, args = _copy_run(stopped_run, tmp_path)
    with open(out / "log.jsonl", "a") as f:
        f.write('{"step": 3, "epoch": 1, "lo')  # killed mid-write
    with open(out / "log.csv", "a") as f:
        f.write("3,1,0.5")
    assert main(args) == 0
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    with open(out / "log.csv", newline="") as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == [1, 2, 3]


def test_a_damaged_log_line_before_the_last_is_a_clear_error(tmp_path):
    (tmp_path / "log.jsonl").write_text('{"step": 1, "loss": 2.0}\nnot json\n{"step": 2, "loss": 1.0}\n')
    with pytest.raises(TrainError, match="log.jsonl: line 2 is not a log row"):
        MetricLog(str(tmp_path), keep_until=2)


def _config(args):
    return TrainConfig(**vars(parser().parse_args(args))).resolved()


def test_resume_refuses_another_demo_teacher(stopped_run, tmp_path, capsys):
    out, folder_args = _copy_run(stopped_run, tmp_path)
    assert resumable_checkpoint(_config([*folder_args, "--teacher-steps", "5"]))  # no demo teacher to retrain
    demo_args = ["--max-steps", "2", "--output-dir", str(out), *TINY]  # TINY trains the teacher for 2 steps
    checkpoint = load_run_checkpoint(str(out / "checkpoint.pt"))
    atomic_save({**checkpoint, "config": dataclasses.asdict(_config(demo_args))}, str(out / "checkpoint.pt"))
    assert resumable_checkpoint(_config([*demo_args, "--resume"]))
    capsys.readouterr()
    assert main([*demo_args, "--resume", "--teacher-steps", "3"]) == 2
    assert "teacher_steps: 2 -> 3" in _error_line(capsys)


@pytest.fixture
def broken_torchvision(tmp_path, monkeypatch):
    """A folder to put first on the path, holding a torchvision that fails to import as the CUDA
    wheel beside a CPU torch does; this process imports it too."""
    (tmp_path / "broken" / "torchvision").mkdir(parents=True)
    (tmp_path / "broken" / "torchvision" / "__init__.py").write_text(
        'raise RuntimeError("operator torchvision::nms does not exist")\n')
    monkeypatch.syspath_prepend(str(tmp_path / "broken"))
    monkeypatch.delitem(sys.modules, "torchvision", raising=False)
    return tmp_path / "broken"


def test_a_broken_torchvision_is_one_line_for_a_resnet_and_the_default_student_falls_back(broken_torchvision, tmp_path):
    assert TrainConfig(data="x", teacher="mocov3_resnet50").resolved().student == "cnn"  # as without torchvision
    result = _run("-m", "pcd_kernels.train", "--student", "resnet18", "--output-dir", str(tmp_path / "out"), *TINY,
                  env={"PYTHONPATH": os.pathsep.join([str(broken_torchvision), TESTS])})
    assert result.returncode == 2 and len(result.stderr.splitlines()) == 1, result.stderr
    assert ("--student resnet18 needs torchvision, which is installed but fails to import (RuntimeError: operator "
            "torchvision::nms does not exist)") in result.stderr


def test_the_demo_teacher_with_data_says_it_is_only_for_the_demo(tmp_path, capsys):
    assert main(["--data", str(tmp_path), "--teacher", "demo", "--output-dir", str(tmp_path / "out"), *TINY]) == 2
    assert "--teacher demo is only for the embedded demo (without --data)" in _error_line(capsys)
    assert main(["--data", str(tmp_path), "--teacher", "vit", "--output-dir", str(tmp_path / "out"), *TINY]) == 2
    assert "unknown model 'vit'; choose one of mocov3_resnet50 or" in _error_line(capsys)
    assert not (tmp_path / "out").exists()  # refused before anything is prepared


# ---------------------------------------------------------------- the demo study and its ablations

def test_ablation_flags_remove_the_attention_and_the_adaptor(tmp_path):
    common = ["--max-steps", "1", "--no-eval", "--no-baselines", *TINY]
    assert main([*common, "--output-dir", str(tmp_path / "plain")]) == 0
    assert main([*common, "--output-dir", str(tmp_path / "ablated"), "--no-mhsa", "--no-adaptor"]) == 0
    plain, ablated = _checkpoint(tmp_path / "plain"), _checkpoint(tmp_path / "ablated")
    assert any(k.startswith("attention.") for k in plain["student"])
    assert not any(k.startswith("attention.") for k in ablated["student"])
    # The adaptor's 64-wide output against the teacher backbone's own 128 channels.
    assert plain["criterion"]["queue"].shape[-1] == 64 and ablated["criterion"]["queue"].shape[-1] == 128
    # Resuming with the ablation switched is refused; a checkpoint from before the flags existed
    # (no such keys in its config) resumes as the default it had then.
    assert main([*common, "--output-dir", str(tmp_path / "ablated"), "--resume", "--no-mhsa"]) == 2
    for key in ("mhsa", "adaptor"):
        del plain["config"][key]
    del plain[CHECKSUM]
    atomic_save(plain, str(tmp_path / "plain" / "checkpoint.pt"))
    assert main([*common, "--output-dir", str(tmp_path / "plain"), "--resume"]) == 0
    assert main([*common, "--output-dir", str(tmp_path / "x"), "--no-mhsa", "--num-heads", "2"]) == 2


def test_demo_study_every_variant_its_statistics_and_publishing(tmp_path, monkeypatch):
    import statistics

    from scipy.stats import t

    from pcd_kernels.train import study

    data = demo.DemoData(distill_count=200, probe_count=60)
    tiny = dict(steps=2, teacher_steps=2, probe_steps=3, workers=0, data=data)
    result = study.run_study([0, 1], str(tmp_path / "study"), **tiny)
    assert [(r["seed"], r["variant"]) for r in result["runs"]] == [(s, v) for s in (0, 1) for v in study.VARIANTS]
    for run in result["runs"]:
        assert all(0 <= run[key] <= 100 for key in ("miou", "digit_miou", "pixel_accuracy"))
    by = {(r["variant"], r["seed"]): r for r in result["runs"]}
    for variant in study.VARIANTS:
        values = [by[variant, s]["miou"] for s in (0, 1)]
        stats = result["summary"][variant]["miou"]
        assert stats["mean"] == pytest.approx(statistics.mean(values))
        assert stats["std"] == pytest.approx(statistics.stdev(values))
        if variant != "pcd":
            paired = [by[variant, s]["miou"] - by["pcd", s]["miou"] for s in (0, 1)]
            d = result["summary"][variant]["miou_minus_pcd"]
            half = t.ppf(0.975, 1) * statistics.stdev(paired) / math.sqrt(2)
            assert d["ci95"] == pytest.approx([statistics.mean(paired) - half, statistics.mean(paired) + half])
    # Each seed trained its own teacher; the ablations drop what they name.
    for seed in (0, 1):
        assert (tmp_path / "study" / f"seed{seed}" / "teacher.pt").exists()
    assert not any(k.startswith("attention.") for k in _checkpoint(tmp_path / "study/seed0/pcd_no_mhsa")["student"])
    assert _checkpoint(tmp_path / "study/seed0/pcd_no_adaptor")["criterion"]["queue"].shape[-1] == 128
    assert _checkpoint(tmp_path / "study/seed0/pooled")["config"]["loss"] == "pooled"

    # A second study reuses every finished run; the same seed elsewhere, with data-loader
    # processes, gives the same scores.
    monkeypatch.setattr(study, "train", lambda *a, **k: pytest.fail("a finished run was trained again"))
    assert study.run_study([0, 1], str(tmp_path / "study"), **tiny)["runs"] == result["runs"]
    monkeypatch.undo()
    again = study.run_study([1], str(tmp_path / "again"), variants=["pcd"], **{**tiny, "workers": 2})
    strip = lambda run: {k: v for k, v in run.items() if k != "train_s"}  # noqa: E731
    assert strip(again["runs"][0]) == strip(by["pcd", 1])

    study.write_outputs(result, str(tmp_path / "out"))
    assert json.loads((tmp_path / "out" / "demo_study.json").read_text())["runs"] == result["runs"]
    assert (tmp_path / "out" / "demo_study.png").read_bytes()[:4] == b"\x89PNG"
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "demo.md").write_text(f"# Demo\n\nbefore\n{study.BEGIN}\nold table\n{study.END}\nafter\n")
    study.publish(result, str(docs))
    page = (docs / "demo.md").read_text()
    assert "old table" not in page and page.startswith("# Demo\n\nbefore\n") and page.endswith("after\n")
    mean = result["summary"]["pooled"]["miou"]["mean"]
    assert f"| `pooled` | {mean:.1f} ± " in page
    assert (docs / "demo_study.json").exists() and (docs / "demo_study.png").exists()
