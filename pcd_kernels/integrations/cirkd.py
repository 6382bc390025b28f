"""Drop-ins for CIRKD's two relational losses (github.com/winycg/CIRKD, ``losses/cirkd_mini_batch.py``
and ``losses/cirkd_memory.py``; Af-DCD's code base uses the same files).

Same constructors, ``forward`` signatures, return values, attribute names, buffers and state_dict
keys as the official modules, so official checkpoints load as they are and a training script
changes one import line. The losses are :func:`pcd_kernels.pixel_relation_loss`: the official
(H·W × H·W) similarity matrices per image pair and (pixels × memory) logit matrices are never built.
Both consume the global RNG as the official modules do (``torch.randn`` at construction,
``torch.randperm`` when the memory enqueues and samples), so the same seed gives the same values.

Fixed from the official code:

- ``.cuda()`` was hard-coded (the loss's accumulator and the sampled memory): both follow their
  inputs' device now, so the losses also run on CPU.
- ``StudentSegContrast`` returned ``0. * (s_feats ** 2).mean()`` of an empty selection, NaN, when
  every pixel had the ignore label; it returns zeros now (with zero gradients).
- Its enqueue gathered across ranks unconditionally (``all_gather``), so it crashed outside
  ``torch.distributed``; it gathers only when a process group of more than one rank exists.
- Its pixel memory enqueued ``this_feat[:, perm[:K]]``: K random pixels among the *first*
  ``num_pixel`` pixels of the image, whatever their class, where the class's own pixels
  (``idxs[perm[:K]]``) were meant. ``class_pixels=True`` (the default) enqueues the class's pixels;
  ``class_pixels=False`` keeps the official indexing, for exact reproduction.
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pcd_kernels.ops._checks import check_same_on_every_rank
from pcd_kernels.ops.pixel_relation import pixel_relation_loss

__all__ = ["CriterionMiniBatchCrossImagePair", "StudentSegContrast"]


class CriterionMiniBatchCrossImagePair(nn.Module):
    """CIRKD's mini-batch cross-image relation loss: for every pair of images (i, j) of the batch,
    the row-wise KL between the teacher's and the student's (H·W × H·W) pixel-similarity softmaxes,
    averaged over pixels and pairs. ``pooling=True`` first average-pools both maps 2×2 (ceil mode),
    as the official option does."""

    def __init__(self, temperature, pooling=False, *, backend: str = "auto"):
        super().__init__()
        self.temperature = temperature
        self.pooling = pooling
        self.backend = backend

    def forward(self, feat_S: Tensor, feat_T: Tensor) -> Tensor:
        if self.pooling:
            feat_S = F.avg_pool2d(feat_S, kernel_size=2, stride=2, ceil_mode=True)
            feat_T = F.avg_pool2d(feat_T, kernel_size=2, stride=2, ceil_mode=True)
        # The official loop normalises both maps (F.normalize over channels) and detaches nothing:
        # the teacher map is a frozen network's output there; here its distribution is a constant
        # target in any case.
        return pixel_relation_loss(feat_S, feat_T, temperature=self.temperature, backend=self.backend)


class StudentSegContrast(nn.Module):
    """CIRKD's memory-based pixel-to-pixel and pixel-to-region distillation: a projection head on
    the student map, class-wise memories of teacher pixels and of teacher region means (filled
    from each batch), and for every non-ignored pixel the KL between the teacher's and the
    student's softmaxes over a sample of each memory. ``forward(s_feats, t_feats, labels,
    predict=None) -> (pixel_sim_dis, region_sim_dis)``; ``predict`` is unused, as in the official
    module. Like the official head, ``project_head`` holds a ``SyncBatchNorm``, which
    synchronises on GPUs only: in training mode under a CPU (gloo) process group it raises."""

    def __init__(self, num_classes, pixel_memory_size, region_memory_size, region_contrast_size,
                 pixel_contrast_size, contrast_kd_temperature, contrast_temperature, s_channels, t_channels,
                 ignore_label, *, class_pixels: bool = True, backend: str = "auto"):
        super().__init__()
        # The official attributes (base_temperature and n_view are constants there, unused by the loss).
        self.base_temperature, self.n_view = 0.1, 32
        self.contrast_kd_temperature, self.contrast_temperature = contrast_kd_temperature, contrast_temperature
        self.dim, self.ignore_label = t_channels, ignore_label
        # Built in the official order: its parameter initialisation, then the two memories, draw
        # from the global RNG in this sequence.
        self.project_head = nn.Sequential(
            nn.Conv2d(s_channels, t_channels, 1, bias=False),
            nn.SyncBatchNorm(t_channels),
            nn.ReLU(True),
            nn.Conv2d(t_channels, t_channels, 1, bias=False),
        )
        self.num_classes, self.pixel_update_freq = num_classes, 16
        self.pixel_memory_size, self.pixel_contrast_size = pixel_memory_size, pixel_contrast_size
        self.region_memory_size, self.region_contrast_size = region_memory_size, region_contrast_size
        self.class_pixels = class_pixels
        self.backend = backend
        self.register_buffer("teacher_segment_queue",
                             F.normalize(torch.randn(num_classes, region_memory_size, self.dim), p=2, dim=2))
        self.register_buffer("segment_queue_ptr", torch.zeros(num_classes, dtype=torch.long))
        self.register_buffer("teacher_pixel_queue",
                             F.normalize(torch.randn(num_classes, pixel_memory_size, self.dim), p=2, dim=2))
        self.register_buffer("pixel_queue_ptr", torch.zeros(num_classes, dtype=torch.long))

    @torch.no_grad()
    def concat_all_gather(self, tensor: Tensor) -> Tensor:
        """Every rank's ``tensor`` concatenated along dim 0 (no gradient), as the official method,
        or ``tensor`` itself outside a process group of more than one rank."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return tensor
        # all_gather needs the same shape and dtype on every rank: agreed first, or gloo aborts
        check_same_on_every_rank("StudentSegContrast.concat_all_gather", None,
                                 {"shape": tuple(tensor.shape), "dtype": tensor.dtype})
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts, dim=0)

    def _sample_negative(self, Q: Tensor, index: Tensor) -> Tuple[Tensor, Tensor]:
        """Slots ``index`` of every class's memory, class-major, and their class labels (float, as
        the official method returns them), on the memory's device."""
        class_num, _, feat_size = Q.shape
        X_ = Q[:, index.to(Q.device), :].reshape(-1, feat_size).float()
        y_ = torch.arange(class_num, device=Q.device).repeat_interleave(index.numel()).float()[:, None]
        return X_, y_

    def contrast_sim_kd(self, s_logits: Tensor, t_logits: Tensor) -> Tensor:
        """The official dense formula, for scripts that call it: KL(batchmean) of the two
        (pixels x memory) logit matrices at ``contrast_kd_temperature``, times its square.
        ``forward`` computes the same without those matrices."""
        p_s = F.log_softmax(s_logits / self.contrast_kd_temperature, dim=1)
        p_t = F.softmax(t_logits / self.contrast_kd_temperature, dim=1)
        return F.kl_div(p_s, p_t, reduction="batchmean") * self.contrast_kd_temperature ** 2

    @torch.no_grad()
    def _dequeue_and_enqueue(self, keys: Tensor, labels: Tensor) -> None:
        segment_queue, pixel_queue = self.teacher_segment_queue, self.teacher_pixel_queue
        keys, labels = self.concat_all_gather(keys), self.concat_all_gather(labels)
        batch_size, feat_dim, H, W = keys.shape
        # Pointers and labels read once on the host: the official code reads them class by class.
        segment_ptr = self.segment_queue_ptr.tolist()
        pixel_ptr = self.pixel_queue_ptr.tolist()
        all_labels = labels.reshape(batch_size, -1)
        for bs in range(batch_size):
            this_feat = keys[bs].reshape(feat_dim, -1)
            this_label = all_labels[bs]
            for lb in torch.unique(this_label).tolist():
                if lb == self.ignore_label:
                    continue
                idxs = (this_label == lb).nonzero().squeeze(1)
                # segment enqueue: the region's mean teacher feature
                feat = this_feat[:, idxs].mean(dim=1)
                segment_queue[lb, segment_ptr[lb], :] = F.normalize(feat, p=2, dim=0).to(segment_queue.dtype)
                segment_ptr[lb] = (segment_ptr[lb] + 1) % self.region_memory_size
                # pixel enqueue: K of the region's pixels at random (the official draw, on the CPU RNG)
                num_pixel = idxs.numel()
                perm = torch.randperm(num_pixel)
                K = min(num_pixel, self.pixel_update_freq)
                chosen = idxs[perm[:K].to(idxs.device)] if self.class_pixels else perm[:K].to(this_feat.device)
                feat = F.normalize(this_feat[:, chosen].t(), p=2, dim=1).to(pixel_queue.dtype)
                ptr = pixel_ptr[lb]
                if ptr + K >= self.pixel_memory_size:
                    pixel_queue[lb, -K:, :] = feat
                    pixel_ptr[lb] = 0
                else:
                    pixel_queue[lb, ptr:ptr + K, :] = feat
                    pixel_ptr[lb] = (ptr + K) % self.pixel_memory_size
        self.segment_queue_ptr.copy_(torch.tensor(segment_ptr))
        self.pixel_queue_ptr.copy_(torch.tensor(pixel_ptr))

    def _sample(self, queue: Tensor, contrast_size: int) -> Tensor:
        """contrast_size random slots of every class's memory, drawn as the official forward does."""
        return self._sample_negative(queue, torch.randperm(queue.shape[1])[:contrast_size])[0]

    def forward(self, s_feats: Tensor, t_feats: Tensor, labels: Optional[Tensor] = None,
                predict: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        if labels is None:
            raise ValueError("StudentSegContrast needs labels (B, H, W): the classes of the memories")
        t_feats = F.normalize(t_feats, p=2, dim=1)
        s_feats = F.normalize(self.project_head(s_feats), p=2, dim=1)
        labels = F.interpolate(labels.unsqueeze(1).float(), (s_feats.shape[2], s_feats.shape[3]), mode="nearest")
        labels = labels.squeeze(1).long()
        self._dequeue_and_enqueue(t_feats.detach().clone(), labels.detach().clone())
        valid = labels != self.ignore_label
        if not bool(valid.any()):  # the official code returns NaN here (a mean over no pixel)
            zero = 0.0 * s_feats.sum()
            return zero, zero.clone()
        tau_kd = self.contrast_kd_temperature
        losses = []
        for queue, size in ((self.teacher_pixel_queue, self.pixel_contrast_size),
                            (self.teacher_segment_queue, self.region_contrast_size)):
            memory = self._sample(queue, size).to(s_feats.dtype)
            kl = pixel_relation_loss(s_feats, t_feats.detach(), memory, temperature=self.contrast_temperature * tau_kd,
                                     normalize=False, mask=valid, backend=self.backend)
            losses.append(kl * tau_kd ** 2)
        return losses[0], losses[1]
