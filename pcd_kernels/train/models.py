"""The trainer's networks: a frozen teacher whose pooled-feature head is made spatial, and a
student backbone with PCD's plug-in attention, projector and predictor.

torchvision is optional: it provides the ResNet students and the MoCo v3 ResNet-50 teacher; the
built-in compact CNN and any ``package.module:factory`` need nothing beyond torch.
"""
import importlib
import os
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pcd_kernels.nn.adaptor import SpatialAdaptor
from pcd_kernels.nn.attention import MHSA2d
from pcd_kernels.train.errors import TrainError

STUDENTS = ("cnn", "resnet18", "resnet34")
TEACHERS = ("demo", "mocov3_resnet50")
DATA_TEACHERS = ("mocov3_resnet50",)  # the demo trains its teacher on its own digits
DEMO_TEACHER_WITH_DATA = ("--teacher demo is only for the embedded demo (without --data), which trains it on its "
                          "digits; with --data give 'mocov3_resnet50' (with --teacher-weights) or "
                          "'package.module:factory'")



class CompactCNN(nn.Sequential):
    """A small all-conv backbone: a stride-1 stem of ``widths[0]`` channels, then one stride-2
    stage of two 3x3 conv-BN-ReLU per further width. Output stride ``2 ** (len(widths) - 1)``."""

    def __init__(self, widths: Sequence[int] = (16, 32, 64), in_channels: int = 3):
        layers = _conv_bn_relu(in_channels, widths[0])
        for c_in, c_out in zip(widths[:-1], widths[1:]):
            layers += _conv_bn_relu(c_in, c_out, stride=2) + _conv_bn_relu(c_out, c_out)
        super().__init__(*layers)
        self.out_channels = widths[-1]


def _conv_bn_relu(c_in: int, c_out: int, stride: int = 1):
    return [nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


def mlp_head(c_in: int, hidden: int, c_out: int, last_bn: bool = True) -> nn.Sequential:
    """MoCo v3's head: Linear-BN-ReLU-Linear(-BN without affine), Linear layers without bias."""
    layers = [nn.Linear(c_in, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
              nn.Linear(hidden, c_out, bias=False)]
    if last_bn:
        layers.append(nn.BatchNorm1d(c_out, affine=False))
    return nn.Sequential(*layers)


def conv_mlp(c_in: int, hidden: int, c_out: int) -> nn.Sequential:
    """Per-pixel MLP (1x1 conv-BN-ReLU-1x1 conv): the student's projector and predictor."""
    return nn.Sequential(nn.Conv2d(c_in, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU(inplace=True),
                         nn.Conv2d(hidden, c_out, 1))


class Teacher(nn.Module):
    """A frozen dense teacher: ``adaptor(backbone(x))``, always in eval mode, without gradients.

    ``head`` is the teacher's pooled-feature MLP (Linear / BatchNorm1d / ReLU), converted with
    :meth:`SpatialAdaptor.from_mlp`, or any module already applied per pixel (or None)."""

    def __init__(self, backbone: nn.Module, head: Optional[nn.Module] = None):
        super().__init__()
        self.backbone = backbone
        if head is None:
            head = nn.Identity()
        elif isinstance(head, nn.Sequential) and any(isinstance(m, (nn.Linear, nn.BatchNorm1d)) for m in head):
            head = SpatialAdaptor.from_mlp(head)
        self.head = head
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "Teacher":
        return super().train(False)

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.backbone(x))


class Student(nn.Module):
    """``predictor(projector(attention(backbone(x))))``: PCD's student during distillation. After
    distillation only ``backbone`` is kept for downstream tasks. ``mhsa=False`` leaves the
    attention out."""

    def __init__(self, backbone: nn.Module, channels: int, dim: int, mlp_dim: int, num_heads: Optional[int] = None,
                 attention_backend: str = "auto", mhsa: bool = True):
        super().__init__()
        self.backbone = backbone
        if num_heads is None:  # heads of 16 channels or more, at most 8 (ResNet-18's 512: 8 x 64)
            num_heads = min(8, max(1, channels // 16))
        heads = next(h for h in range(min(num_heads, channels), 0, -1) if channels % h == 0)
        # mhsa=False: the ablation without PCD's plug-in attention (the backbone's map goes straight
        # to the projector).
        self.attention = MHSA2d(channels, num_heads=heads, backend=attention_backend) if mhsa else nn.Identity()
        self.projector = conv_mlp(channels, mlp_dim, dim)
        self.predictor = conv_mlp(dim, mlp_dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.predictor(self.projector(self.attention(self.backbone(x))))


def resize_to(student_map: Tensor, size: Tuple[int, int]) -> Tensor:
    """The student map at the teacher's resolution: area-pooled when larger, bilinear when smaller."""
    if tuple(student_map.shape[-2:]) == tuple(size):
        return student_map
    if student_map.shape[-2] >= size[0] and student_map.shape[-1] >= size[1]:
        return F.adaptive_avg_pool2d(student_map, size)
    return F.interpolate(student_map, size=size, mode="bilinear", align_corners=False)


def torchvision_problem() -> Optional[str]:
    """Why torchvision cannot be used, or None when it can. It tries the import: an installed
    torchvision can still fail to load, as the CUDA wheel beside a CPU torch does (RuntimeError:
    operator torchvision::nms does not exist)."""
    try:
        import torchvision  # noqa: F401
    except Exception as error:
        if isinstance(error, ModuleNotFoundError) and error.name == "torchvision":
            return "is not installed"
        message = str(error).splitlines()[0] if str(error) else ""
        return f"is installed but fails to import ({type(error).__name__}: {message})"
    return None


def require_torchvision(what: str):
    problem = torchvision_problem()
    if problem is not None:
        raise TrainError(f"{what} needs torchvision, which {problem}: pip install a torchvision built for this "
                         f"torch ({torch.__version__}); the built-in 'cnn' student and 'package.module:factory' "
                         "models need nothing more")
    return importlib.import_module("torchvision")


def resnet_backbone(name: str) -> Tuple[nn.Module, int]:
    """A randomly initialised torchvision ResNet without its pooling and classifier, and its width."""
    net = getattr(require_torchvision(f"--student {name}").models, name)(weights=None)
    return resnet_trunk(net), net.fc.in_features


def resnet_trunk(net: nn.Module) -> nn.Sequential:
    """The layers of a torchvision-style ResNet up to ``layer4`` (its output map)."""
    return nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3, net.layer4)


def load_mocov3_resnet50(path: str, encoder: str = "base",
                         resnet_factory: Optional[Callable[[], nn.Module]] = None) -> Teacher:
    """A MoCo v3 ResNet-50 teacher from the official checkpoint (``r-50-*ep.pth.tar``).

    The checkpoint holds ``state_dict`` with keys ``module.{base,momentum}_encoder.*``: a torchvision
    ResNet-50 whose ``fc`` is the projection MLP (Linear 2048-4096, BN, ReLU, Linear 4096-256, BN
    without affine). ``encoder`` picks which of the two encoders; the MLP becomes the
    SpatialAdaptor. ``resnet_factory`` replaces torchvision's ``resnet50`` (tests use it)."""
    if encoder not in ("base", "momentum"):
        raise TrainError(f"encoder must be 'base' or 'momentum', got {encoder!r}")
    net = resnet_factory() if resnet_factory is not None else \
        require_torchvision("--teacher mocov3_resnet50").models.resnet50(weights=None)
    state = encoder_state_dict(read_checkpoint(path, "--teacher-weights"), f"module.{encoder}_encoder.")
    hidden, width = state["fc.0.weight"].shape if "fc.0.weight" in state else (None, None)
    if hidden is None:
        raise TrainError(f"{path}: no 'module.{encoder}_encoder.fc.0.weight'; is it a MoCo v3 checkpoint?")
    dim = state["fc.3.weight"].shape[0]
    net.fc = mlp_head(width, hidden, dim)
    try:
        net.load_state_dict(state)
    except RuntimeError as error:
        raise TrainError(f"{path}: the weights do not fit a ResNet-50 with MoCo v3's head: {error}") from error
    return Teacher(resnet_trunk(net), net.fc)


def encoder_state_dict(checkpoint: Dict, prefix: str) -> Dict[str, Tensor]:
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        raise TrainError("the checkpoint holds no state_dict")
    picked = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return picked or {k: v for k, v in state.items() if not k.startswith("module.")}


def read_checkpoint(path: str, what: str):
    if not os.path.isfile(path):
        raise TrainError(f"{what}: {path!r} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a truncated zip, a pickle of foreign objects, not a torch file at all
        raise TrainError(f"{what}: cannot read {path!r} as a torch checkpoint ({type(error).__name__}: "
                         f"{str(error).splitlines()[0] if str(error) else ''})") from error


def import_factory(spec: str, what: str) -> Callable:
    """``package.module:callable`` -> the callable."""
    module_name, _, attr = spec.partition(":")
    try:
        target = importlib.import_module(module_name)
        for part in attr.split("."):
            target = getattr(target, part)
    except (ImportError, AttributeError) as error:
        raise TrainError(f"{what}: cannot import {spec!r}: {error}") from error
    if not callable(target):
        raise TrainError(f"{what}: {spec!r} is not callable")
    return target


def build_student_backbone(name: str) -> Tuple[nn.Module, int]:
    """(backbone, output channels) for a ``--student`` value."""
    if name == "cnn":
        backbone = CompactCNN()
        return backbone, backbone.out_channels
    if name in ("resnet18", "resnet34"):
        return resnet_backbone(name)
    if ":" in name:
        backbone = import_factory(name, "--student")()
        channels = getattr(backbone, "out_channels", None)
        if not isinstance(backbone, nn.Module) or not isinstance(channels, int):
            raise TrainError(f"--student {name}: the factory must return an nn.Module with an int "
                             "'out_channels' attribute (its output map's channels)")
        return backbone, channels
    raise TrainError(f"--student: unknown model {name!r}; choose one of {', '.join(STUDENTS)} "
                     "or give 'package.module:factory'")


def build_teacher(name: str, weights: Optional[str], encoder: str = "base") -> Teacher:
    """A teacher for ``--teacher`` (except 'demo', which the demo trains itself)."""
    if name == "demo":
        raise TrainError(DEMO_TEACHER_WITH_DATA)
    if name == "mocov3_resnet50":
        if not weights:
            raise TrainError("--teacher mocov3_resnet50 needs --teacher-weights PATH (the official "
                             "r-50-*ep.pth.tar checkpoint)")
        return load_mocov3_resnet50(weights, encoder)
    if ":" in name:
        made = import_factory(name, "--teacher")()
        if isinstance(made, tuple) and len(made) == 2:
            return Teacher(*made)
        if not isinstance(made, nn.Module):
            raise TrainError(f"--teacher {name}: the factory must return an nn.Module mapping images to "
                             "(B, C, h, w) maps, or a (backbone, pooled-feature MLP head) pair")
        return made if isinstance(made, Teacher) else Teacher(made)
    raise TrainError(f"--teacher: unknown model {name!r}; choose one of {', '.join(DATA_TEACHERS)} "
                     "or give 'package.module:factory'")
