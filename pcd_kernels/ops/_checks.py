"""Argument checks shared by every op: each failure names the argument and what was expected."""
import hashlib
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


def check_maps(student, teacher, same_channels: bool = True) -> None:
    """The (B, C, H, W) student and teacher maps the losses take (with ``same_channels=False``,
    the same B, H, W and any C)."""
    check_tensor("student", student, 4, "(B, C, H, W) ")
    check_tensor("teacher", teacher, 4, "(B, C, H, W) ")
    check_float("student", student)
    check_float("teacher", teacher)
    if same_channels and student.shape != teacher.shape:
        raise ValueError(f"student and teacher must have the same shape, got {tuple(student.shape)} "
                         f"and {tuple(teacher.shape)}")
    if not same_channels and (student.shape[0], *student.shape[2:]) != (teacher.shape[0], *teacher.shape[2:]):
        raise ValueError(f"student and teacher must have the same batch and map size (B, _, H, W), got "
                         f"{tuple(student.shape)} and {tuple(teacher.shape)}")
    if student.shape[1] == 0 or teacher.shape[1] == 0:
        raise ValueError("student and teacher have 0 channels; need C >= 1")
    check_same_device("student", student, teacher=teacher)


def check_key_rows(name: str, rows, student, hint: str = "") -> None:
    """Optional (K, C) key rows (a queue, a memory) with the student's channel count C."""
    if rows is None:
        return
    check_tensor(name, rows, 2, "(K, C) ")
    check_float(name, rows)
    if rows.shape[1] != student.shape[1]:
        raise ValueError(f"{name} must be (K, C) with C = {student.shape[1]} channels like student, got shape "
                         f"{tuple(rows.shape)}{hint}")


def check_mask(mask, student) -> None:
    """An optional (B, H, W) bool mask of the student map's pixels (True = valid)."""
    if mask is None:
        return
    check_tensor("mask", mask)
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor (True = valid pixel), got {mask.dtype}")
    B, _, H, W = student.shape
    if tuple(mask.shape) != (B, H, W):
        raise ValueError(f"mask must have shape (B, H, W) = {(B, H, W)}, got {tuple(mask.shape)}")


def check_process_group(group) -> None:
    """None, or a process group of an initialised torch.distributed."""
    if group is None:
        return
    import torch.distributed as dist

    if not (dist.is_available() and isinstance(group, dist.ProcessGroup)):
        raise TypeError("process_group must be a torch.distributed ProcessGroup (e.g. "
                        f"torch.distributed.group.WORLD) or None, got {type(group).__name__}")
    if not dist.is_initialized():
        raise ValueError("process_group was given but torch.distributed is not initialised; call "
                         "torch.distributed.init_process_group() first, or pass process_group=None")


def check_same_on_every_rank(op: str, group, fields: Optional[dict]) -> None:
    """Raise the same ValueError on every rank of ``group`` (None: the default group) when the
    ranks' ``fields`` differ, before any data collective: gloo aborts the process and NCCL hangs
    on collectives whose shapes, dtypes or sequence differ between ranks.

    Every rank must call this once per call of ``op``, whatever its arguments: a rank whose
    arguments were rejected passes ``fields=None`` and re-raises its own error afterwards, so the
    other ranks raise instead of waiting for it. One all_gather of two int64 per rank when the
    ranks agree; only when they do not, a second one of the readable fields for the message.
    The first runs on the CPU when the group's backend has a CPU side (gloo, or a mixed
    ``"cpu:gloo,cuda:nccl"`` group as the trainer makes); on NCCL alone it is a CUDA tensor, and
    reading the answer waits for the GPU's queued work.
    """
    import torch.distributed as dist

    world = dist.get_world_size(group)
    if world == 1:
        return
    # The group's backend decides where its tensors live, not this rank's (maybe rejected) inputs.
    backend = str(dist.get_backend(group))
    device = (torch.device("cuda", torch.cuda.current_device())
              if "gloo" not in backend and "mpi" not in backend and torch.cuda.is_available() else torch.device("cpu"))
    # A digest, not hash(): Python salts str hashes per process.
    code = 0 if fields is None else int.from_bytes(
        hashlib.blake2b(repr((op, fields)).encode(), digest_size=8).digest(), "little", signed=True)
    mine = torch.tensor([fields is None, code], dtype=torch.int64, device=device)
    gathered = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(gathered, mine, group=group)
    if bool(torch.stack(gathered).eq(mine).all()):
        return
    everyone = [None] * world
    dist.all_gather_object(everyone, None if fields is None else (op, fields), group=group)
    if fields is None:
        return  # this rank raises its own error
    raise ValueError(_disagreement(op, everyone))


def _disagreement(op: str, everyone: list) -> str:
    def ranks(values):
        by_value = {}
        for rank, value in enumerate(values):
            by_value.setdefault(value, []).append(rank)
        return ", ".join(f"{value} on rank{'s' if len(r) > 1 else ''} {', '.join(map(str, r))}"
                         for value, r in by_value.items())

    rejected = [rank for rank, entry in enumerate(everyone) if entry is None]
    if rejected:
        many = len(rejected) > 1
        return (f"{op}: rank{'s' if many else ''} {', '.join(map(str, rejected))} of the process group "
                f"rejected {'their' if many else 'its'} arguments (see the error raised there); every "
                "rank must pass valid arguments")
    ops = [entry[0] for entry in everyone]
    if len(set(ops)) > 1:
        return f"{op}: the ranks of the process group called different operations: {ranks(ops)}"
    names = [name for name in everyone[0][1] if all(name in entry[1] for entry in everyone)]
    values = {name: [repr(entry[1][name]) for entry in everyone] for name in names}
    details = "; ".join(f"{name} ({ranks(v)})" for name, v in values.items() if len(set(v)) > 1)
    return (f"{op}: the ranks of the process group disagree on {details or 'their arguments'}; every "
            "rank must pass the same")
