"""pcd_kernels' losses as torchdistill mid-level losses.

Importing this module registers, with ``register_mid_level_loss``:

- ``PixelContrastiveLoss``: PCD's pixel-wise InfoNCE (optionally with its own MoCo queue, refreshed
  with the pooled teacher map on each call);
- ``OmniContrastiveLoss``: Af-DCD's omni-contrastive term.

Each reads its two maps from the io dicts the way torchdistill's own losses do: ``student_module_path``
/ ``student_module_io`` and ``teacher_module_path`` / ``teacher_module_io`` (e.g. ``'layer4'`` and
``'output'``, recorded by the ``forward_hook`` of the student/teacher config). torchdistill optimises
model parameters only, so heads (projector, predictor, ``SpatialAdaptor``) belong in the models, as
auxiliary modules; the losses hold none. ``docs/integrations.md`` has a YAML example.

torchdistill keeps its loss terms in a plain dict: it neither moves them to the run's device nor
saves them with the model. A queue therefore follows the device of the maps it is given, and
:func:`loss_state_dict` / :func:`load_loss_state_dict` save and restore the queues of a built
criterion beside torchdistill's own checkpoint.
"""
try:
    from torchdistill.losses.registry import register_mid_level_loss
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError("pcd_kernels.integrations.torchdistill needs torchdistill (pip install torchdistill)") from error

from typing import Dict

from torch import nn

from pcd_kernels.integrations import _losses


class _IOMaps:
    """Reads the two maps from the io dicts, then calls the loss it is mixed into."""

    def __init__(self, student_module_path, teacher_module_path, student_module_io="output",
                 teacher_module_io="output", **kwargs):
        super().__init__(**kwargs)
        self.student_module_path, self.student_module_io = student_module_path, student_module_io
        self.teacher_module_path, self.teacher_module_io = teacher_module_path, teacher_module_io

    def forward(self, student_io_dict, teacher_io_dict, *args, **kwargs):
        return super().forward(student_io_dict[self.student_module_path][self.student_module_io],
                               teacher_io_dict[self.teacher_module_path][self.teacher_module_io])


@register_mid_level_loss
class PixelContrastiveLoss(_IOMaps, _losses.SelfQueueingPixelContrastiveLoss):
    """PCD's pixel-wise InfoNCE between two recorded maps (kwargs as ``pcd_kernels.PixelContrastiveLoss``,
    plus ``auto_enqueue`` and ``loss_weight``)."""


@register_mid_level_loss
class OmniContrastiveLoss(_IOMaps, _losses.WeightedOmniContrastiveLoss):
    """Af-DCD's omni-contrastive term between two recorded maps (kwargs as ``omni_contrastive_loss``)."""


def _terms(criterion) -> Dict[str, nn.Module]:
    """The pcd_kernels loss terms of a torchdistill criterion, by term name."""
    term_dict = getattr(criterion, "term_dict", None)
    if not isinstance(term_dict, dict):
        raise TypeError(f"criterion must be a torchdistill high-level loss (one with a term_dict, e.g. "
                        f"WeightedSumLoss), got {type(criterion).__name__}")
    return {name: term for name, (term, _) in term_dict.items()
            if isinstance(term, _losses.SelfQueueingPixelContrastiveLoss)}


def loss_state_dict(criterion) -> Dict[str, Dict]:
    """The state (queue and pointer) of every pcd_kernels loss term of ``criterion``, by term name:
    save it beside torchdistill's checkpoint, whose model state does not hold the criterion."""
    return {name: term.state_dict() for name, term in _terms(criterion).items()}


def load_loss_state_dict(criterion, state: Dict[str, Dict]) -> None:
    """Restores what :func:`loss_state_dict` saved into a criterion built from the same config."""
    terms = _terms(criterion)
    if set(state) != set(terms):
        raise ValueError(f"state holds the loss terms {sorted(state)} but criterion has {sorted(terms)}; "
                         "build the criterion from the config the state was saved with")
    for name, term in terms.items():
        term.load_state_dict(state[name])
