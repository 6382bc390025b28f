"""``PixelContrastiveLoss``: the module form of ``pixel_contrastive_loss``, optionally owning a
MoCo-style queue of negative keys."""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pcd_kernels.ops._checks import (check_bool, check_choice, check_float, check_positive_finite,
                                     check_process_group, check_same_on_every_rank, check_tensor)
from pcd_kernels.backends import BACKENDS
from pcd_kernels.ops.pixel_contrastive import NEGATIVES, REDUCTIONS, pixel_contrastive_loss


class PixelContrastiveLoss(nn.Module):
    """Pixel-wise InfoNCE loss module (see :func:`pcd_kernels.pixel_contrastive_loss`).

    Args:
        temperature, negatives, normalize, reduction: as in the functional form.
        queue_size: when > 0 the module owns a ``queue`` buffer of ``queue_size`` keys of ``dim``
            channels (unit random vectors at first, as in MoCo), used as negatives by every
            forward and refreshed with :meth:`enqueue`.
        dim: channels of the queued keys; required when ``queue_size > 0``.
        process_group: used for ``negatives="batch"`` keys and for gathering enqueued keys; by
            default :meth:`enqueue` gathers over the default group when torch.distributed is
            initialised, and the loss uses this rank's pixels only.
        backend: as in the functional form.

    Example::

        >>> import torch
        >>> from pcd_kernels import PixelContrastiveLoss
        >>> criterion = PixelContrastiveLoss(negatives="none", queue_size=1024, dim=32)
        >>> s, t = torch.randn(2, 32, 7, 7, requires_grad=True), torch.randn(2, 32, 7, 7)
        >>> loss = criterion(s, t)
        >>> loss.backward()
        >>> criterion.enqueue(t.mean(dim=(2, 3)))  # pooled teacher vectors become negatives
    """

    queue: Optional[Tensor]

    def __init__(self, temperature: float = 0.2, negatives: str = "batch", normalize: bool = True,
                 reduction: str = "mean", queue_size: int = 0, dim: Optional[int] = None, *,
                 process_group=None, backend: str = "auto"):
        super().__init__()
        self.temperature = check_positive_finite("temperature", temperature)
        self.negatives = check_choice("negatives", negatives, NEGATIVES)
        self.normalize = check_bool("normalize", normalize)
        self.reduction = check_choice("reduction", reduction, REDUCTIONS)
        self.backend = check_choice("backend", backend, BACKENDS)
        self.process_group = process_group
        if isinstance(queue_size, bool) or not isinstance(queue_size, int) or queue_size < 0:
            raise ValueError(f"queue_size must be an int >= 0, got {queue_size!r}")
        self.queue_size = queue_size
        if queue_size > 0:
            if isinstance(dim, bool) or not isinstance(dim, int) or dim <= 0:
                raise ValueError(f"dim (channels of the queued keys) must be an int > 0 when "
                                 f"queue_size > 0, got {dim!r}")
            self.register_buffer("queue", F.normalize(torch.randn(queue_size, dim), dim=1))
            self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        else:
            if negatives == "none":
                raise ValueError("negatives='none' needs a queue: set queue_size > 0 and dim")
            self.queue = None
        self.dim = dim
        # Host-side copy of queue_ptr: enqueue never reads the device buffer (no host sync).
        self._ptr = 0

    def forward(self, student: Tensor, teacher: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        return self.loss(student, teacher, mask, self.queue_on(student))

    def queue_on(self, student: Tensor) -> Optional[Tensor]:
        """The queue, moved to ``student``'s device if it is elsewhere. Frameworks that keep their
        losses outside the model (torchdistill holds them in a plain dict) move the model to the
        run's device but never the loss, so a queue built on the CPU would meet CUDA maps. A meta
        ``student`` (a model traced without data) gets a meta copy and the buffer keeps its values.
        The queue keeps its own dtype: :meth:`loss` casts it to the maps' precision per call."""
        if self.queue is None or not isinstance(student, Tensor) or self.queue.device == student.device:
            return self.queue
        if student.device.type == "meta":
            return self.queue.to(student.device)
        self.queue = self.queue.to(student.device)  # a registered buffer stays one when reassigned
        self.queue_ptr = self.queue_ptr.to(student.device)
        return self.queue

    def loss(self, student: Tensor, teacher: Tensor, mask: Optional[Tensor], queue: Optional[Tensor]) -> Tensor:
        """The loss against ``queue`` (the buffer, or a snapshot of it when :meth:`enqueue` runs
        before the backward, which reads the queue)."""
        if queue is not None:
            # The queue joins the computation in the student's precision, not the buffer's.
            queue = queue.detach()
            if student.dtype in (torch.float16, torch.bfloat16):
                queue = queue.to(student.dtype)
        return pixel_contrastive_loss(student, teacher, queue, negatives=self.negatives,
                                      temperature=self.temperature, normalize=self.normalize,
                                      mask=mask, reduction=self.reduction,
                                      process_group=self.process_group, backend=self.backend)

    @torch.no_grad()
    def enqueue(self, keys: Tensor) -> None:
        """Push ``keys`` (n, dim) into the queue, replacing the oldest; all ranks' keys when distributed.

        Keys are L2-normalised first when ``normalize=True``. For maps, pool them first, e.g.
        ``keys = teacher_map.mean(dim=(2, 3))`` (PCD queues pooled teacher vectors). When
        distributed, every rank must enqueue as many keys, into a queue of the same dtype; every
        rank raises the same ValueError otherwise.
        """
        import torch.distributed as dist

        check_process_group(self.process_group)
        distributed = self.process_group is not None or (dist.is_available() and dist.is_initialized())
        try:
            if self.queue is None:
                raise RuntimeError("enqueue needs a queue: construct PixelContrastiveLoss with queue_size > 0")
            check_tensor("keys", keys)
            check_float("keys", keys)  # a complex key would lose its imaginary part in the queue
            if keys.dim() == 4:
                raise ValueError(f"keys must be (n, {self.queue.shape[1]}) vectors, got a map of shape "
                                 f"{tuple(keys.shape)}; pool it first, e.g. keys.mean(dim=(2, 3))")
            if keys.dim() != 2 or keys.shape[1] != self.queue.shape[1]:
                raise ValueError(f"keys must be (n, {self.queue.shape[1]}), got shape {tuple(keys.shape)}")
        except Exception:
            if distributed:  # the other ranks must not wait in the gather for this one
                check_same_on_every_rank("PixelContrastiveLoss.enqueue", self.process_group, None)
            raise
        if distributed:  # the all_gather below needs the same shape and dtype on every rank
            check_same_on_every_rank("PixelContrastiveLoss.enqueue", self.process_group, {
                "number of keys": keys.shape[0], "channels": keys.shape[1], "queue dtype": self.queue.dtype})
        self.queue_on(keys)  # keys from CUDA before any forward: the queue moves, as forward would move it
        keys = keys.detach().to(device=self.queue.device, dtype=self.queue.dtype)
        if self.normalize:
            keys = F.normalize(keys, dim=1)
        keys = self._gather(keys)
        n = keys.shape[0]
        if n > self.queue_size:
            keys, n = keys[-self.queue_size:], self.queue_size
        slots = (torch.arange(n, device=self.queue.device) + self._ptr) % self.queue_size
        self.queue.index_copy_(0, slots, keys)
        self._ptr = (self._ptr + n) % self.queue_size
        self.queue_ptr.fill_(self._ptr)

    def _gather(self, keys: Tensor) -> Tensor:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return keys
        world = dist.get_world_size(self.process_group)
        if world == 1:
            return keys
        gathered = [torch.empty_like(keys) for _ in range(world)]
        dist.all_gather(gathered, keys.contiguous(), group=self.process_group)
        return torch.cat(gathered)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if self.queue is not None and prefix + "queue_ptr" in state_dict:
            self._ptr = int(state_dict[prefix + "queue_ptr"])

    def extra_repr(self) -> str:
        queue = f", queue_size={self.queue_size}, dim={self.dim}" if self.queue_size else ""
        return (f"temperature={self.temperature}, negatives={self.negatives!r}, "
                f"normalize={self.normalize}, reduction={self.reduction!r}{queue}")
