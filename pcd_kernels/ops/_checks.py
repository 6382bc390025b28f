"""Argument checks shared by every op: each failure names the argument and what was expected."""
import math
import numbers
from typing import Optional, Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(name: str, x, ndim: Optional[int] = None, layout: str = "") -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.layout != torch.strided:  # sparse, nested or mkldnn: the ops read strided memory
        raise TypeError(f"{name} must be a dense (strided) tensor, got {x.layout}; call {name}.to_dense() first")
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{name} must be a {ndim}-D {layout}tensor, got shape {tuple(x.shape)}")
    return x


def check_float(name: str, x: torch.Tensor) -> None:
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}")


def check_choice(name: str, value, choices: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(repr(c) for c in choices)}; got {value!r}")
    return value


def check_positive_finite(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        hint = " (pass a Python number, e.g. float(t))" if isinstance(value, torch.Tensor) else ""
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}{hint}")
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return value


def check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {type(value).__name__}")
    return value


def check_same_device(reference_name: str, reference: torch.Tensor, **others) -> None:
    for name, x in others.items():
        if x is not None and x.device != reference.device:
            raise ValueError(f"{name} is on {x.device} but {reference_name} is on {reference.device}; "
                             "all tensors must be on the same device")


def check_maps(student, teacher) -> None:
    """The (B, C, H, W) student and teacher maps the losses take."""
    check_tensor("student", student, 4, "(B, C, H, W) ")
    check_tensor("teacher", teacher, 4, "(B, C, H, W) ")
    check_float("student", student)
    check_float("teacher", teacher)
    if student.shape != teacher.shape:
        raise ValueError(f"student and teacher must have the same shape, got {tuple(student.shape)} "
                         f"and {tuple(teacher.shape)}")
    if student.shape[1] == 0:
        raise ValueError("student and teacher have 0 channels; need C >= 1")
    check_same_device("student", student, teacher=teacher)
