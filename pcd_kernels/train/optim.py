"""Optimisers and the learning-rate schedule of the trainer.

Fixes two bugs of the official PCD code: the learning rate is scaled by the global batch in floating
point (the official integer division makes it 0 for per-GPU batches under 256), and a weight decay
of 0 is a valid setting, not a crash.
"""
import math
from typing import Dict, Iterable, List, Tuple

import torch
from torch import nn


def parameter_groups(modules: Iterable[Tuple[str, nn.Module]], weight_decay: float) -> List[Dict]:
    """Two groups: weights of convs and linears decay; biases, normalisation affine parameters and
    position embeddings do not (and LARS leaves their step unscaled), as in MoCo v3 and PCD.

    A parameter is exempt when it has at most one dimension (biases, BatchNorm/LayerNorm weights)
    or is a position embedding, whatever module holds it."""
    decay, exempt = [], []
    for prefix, module in modules:
        for name, p in module.named_parameters(prefix=prefix):
            if not p.requires_grad:
                continue
            (exempt if p.dim() <= 1 or name.endswith("pos_embed") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay, "lars_exempt": False},
            {"params": exempt, "weight_decay": 0.0, "lars_exempt": True}]


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise adaptive rate scaling (You et al. 2017), as MoCo v3 uses:
    each weight's update is scaled by ``trust_coefficient * ||w|| / ||grad + wd * w||``; groups
    marked ``lars_exempt`` (biases, norms) take plain SGD steps."""

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 trust_coefficient: float = 0.001):
        if lr < 0 or momentum < 0 or weight_decay < 0 or trust_coefficient <= 0:
            raise ValueError(f"LARS: lr, momentum and weight_decay must be >= 0 and trust_coefficient > 0, got "
                             f"lr={lr}, momentum={momentum}, weight_decay={weight_decay}, "
                             f"trust_coefficient={trust_coefficient}")
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                                      trust_coefficient=trust_coefficient, lars_exempt=False))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                update = p.grad.add(p, alpha=group["weight_decay"]) if group["weight_decay"] else p.grad.clone()
                if not group["lars_exempt"]:
                    w_norm, u_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(update)
                    ratio = torch.where((w_norm > 0) & (u_norm > 0),
                                        group["trust_coefficient"] * w_norm / u_norm, torch.ones_like(w_norm))
                    update.mul_(ratio)
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"].mul_(group["momentum"]).add_(update)
                p.add_(buf, alpha=-group["lr"])
        return loss


def build_optimizer(name: str, groups: List[Dict], lr: float, momentum: float) -> torch.optim.Optimizer:
    if name == "lars":
        return LARS(groups, lr=lr, momentum=momentum)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum)
    raise ValueError(f"optimizer must be 'sgd' or 'lars', got {name!r}")


def learning_rate(step: int, total_steps: int, peak_lr: float, warmup_steps: int, final_lr: float = 0.0) -> float:
    """The rate for optimiser step ``step`` (0-based): linear warm-up from ``peak_lr / warmup_steps``
    to ``peak_lr`` over ``warmup_steps``, then a half-cosine down to ``final_lr`` at ``total_steps``."""
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    span = max(total_steps - warmup_steps, 1)
    progress = min((step - warmup_steps) / span, 1.0)
    return final_lr + 0.5 * (peak_lr - final_lr) * (1.0 + math.cos(math.pi * progress))


def scaled_learning_rate(base_lr: float, global_batch: int) -> float:
    """MoCo's linear scaling rule, ``base_lr * global_batch / 256``, in floating point."""
    return base_lr * global_batch / 256.0
