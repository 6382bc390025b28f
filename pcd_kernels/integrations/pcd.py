"""A drop-in for the official PCD wrapper (``pcd/pcd.py`` of the PCD code release).

Same constructor ``PCD(student, teacher, output_dim, queue_size, temperature)``, same
``forward(image1, image2) -> {"loss", "top1", "top5"}``, and the same buffers (``queue`` (C, K),
``queue_ptr`` (1,), ``temperature``), so official checkpoints load with ``load_state_dict`` as they
are. The loss is ``pixel_contrastive_loss(..., negatives="none")``: equal to the official
``_pixelwise_contrastive_loss`` without its (N·H·W × (1 + K)) logit matrix.

Fixed from the official code:

- The cross-entropy labels were created with ``.cuda()``, so the loss failed on CPU. There are no
  labels now.
- ``_dequeue_and_enqueue`` asserted ``queue_size % batch == 0`` and called ``all_gather``
  unconditionally, so it crashed outside ``torch.distributed``. Keys now wrap around the queue,
  and they are gathered only when a process group exists.
- The monitoring ``top1``/``top5`` multiplied the pooled (N, C) student vectors by
  ``queue.t()``, a (K, C) matrix, so it raised a shape error unless C == K (the released settings,
  256 channels and a 65,536-key queue, never ran); they are now scored against the (C, K) queue.
- The same monitor scored each pooled student vector against *every* image's key, with column 0
  as the label, so only image 0 had its true positive in that column. Each row now has its own
  image's key as its positive.
- Not fixable here: the official data pipeline pairs two *independent* crops by grid index.
  Feed views that share their geometry (e.g. ``pcd_kernels.train.data.ViewPairs``) so that
  positives show the same place.
"""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pcd_kernels.ops._checks import check_same_on_every_rank
from pcd_kernels.ops.pixel_contrastive import pixel_contrastive_loss


class PCD(nn.Module):
    def __init__(self, student: nn.Module, teacher: nn.Module, output_dim: int, queue_size: int,
                 temperature: float, *, backend: str = "auto"):
        super().__init__()
        self.student, self.teacher, self.queue_size = student, teacher, queue_size
        self.teacher.requires_grad_(False)
        self.register_buffer("queue", F.normalize(torch.randn(output_dim, queue_size), dim=0))  # (C, K)
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))
        self.register_buffer("temperature", torch.tensor(temperature, dtype=torch.float))
        self.backend = backend
        # Host copies: the loss and the enqueue never read a device buffer (no host sync per step).
        self._temperature, self._ptr = float(temperature), 0

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if prefix + "temperature" in state_dict:
            self._temperature = float(state_dict[prefix + "temperature"])
        if prefix + "queue_ptr" in state_dict:
            self._ptr = int(state_dict[prefix + "queue_ptr"].reshape(-1)[0])

    def _pixelwise_contrastive_loss(self, student_output: Tensor, teacher_output: Tensor,
                                    queue: Optional[Tensor] = None) -> Tensor:
        """The official loss: each student pixel against the teacher pixel at its place and the queue.

        ``queue`` is a snapshot of the (C, K) buffer. The backward reads the queue and
        :meth:`forward` updates the buffer before the backward runs, so the official code clones
        it too."""
        queue = self.queue.detach().clone() if queue is None else queue
        return pixel_contrastive_loss(student_output, teacher_output.detach(), queue.t(), negatives="none",
                                      temperature=self._temperature, backend=self.backend)

    def forward(self, image1: Tensor, image2: Tensor):
        student_output1 = self.student(image1)
        student_output2 = self.student(image2)
        with torch.no_grad():
            teacher_output1 = self.teacher(image1)
            teacher_output2 = self.teacher(image2)
            key_for_update = F.normalize(teacher_output1.mean(dim=(2, 3)), dim=1)

        queue = self.queue.detach().clone()  # one snapshot serves both terms
        loss = (self._pixelwise_contrastive_loss(student_output1, teacher_output2, queue)
                + self._pixelwise_contrastive_loss(student_output2, teacher_output1, queue)) / 2.0

        with torch.no_grad():  # pooled linear-probe accuracy, for monitoring only
            pooled = student_output1.detach().float().mean(dim=(2, 3))
            positive = (pooled * key_for_update.float()).sum(dim=1, keepdim=True)
            logits = torch.cat([positive, pooled @ queue.float()], dim=1)
            top1, top5 = _topk_accuracy(logits, (1, 5))

        self._dequeue_and_enqueue(key_for_update)
        return {"loss": loss, "top1": top1, "top5": top5}

    @torch.no_grad()
    def _dequeue_and_enqueue(self, keys: Tensor) -> None:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            # all_gather needs the same shape and dtype on every rank: agreed first, or gloo aborts
            check_same_on_every_rank("PCD._dequeue_and_enqueue", None, {
                "number of keys": keys.shape[0], "channels": keys.shape[1], "dtype": keys.dtype})
            gathered = [torch.empty_like(keys) for _ in range(dist.get_world_size())]
            dist.all_gather(gathered, keys.contiguous())
            keys = torch.cat(gathered)
        keys = keys[-self.queue_size:].to(self.queue.dtype)
        slots = (torch.arange(keys.shape[0], device=self.queue.device) + self._ptr) % self.queue_size
        self.queue.index_copy_(1, slots, keys.t())
        self._ptr = (self._ptr + keys.shape[0]) % self.queue_size
        self.queue_ptr.fill_(self._ptr)


def _topk_accuracy(logits: Tensor, ks) -> list:
    """Percent of rows whose column 0 is among the top k (MoCo's ``accuracy``, shape (1,) each)."""
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
    hit = top == 0
    return [hit[:, :k].any(dim=1).float().sum(0, keepdim=True) * (100.0 / logits.shape[0]) for k in ks]
