"""pcd_kernels.integrations.cirkd against the official CIRKD modules (copied below with their origin):
the same values, gradients, buffers and state_dict keys given the same RNG state, and the official
defects fixed."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from pcd_kernels.integrations import cirkd

# ---- The official CIRKD code (github.com/winycg/CIRKD, losses/cirkd_memory.py at commit 05a27537),
# copied with only `.cuda()` removed and the all_gather (single process here) made the identity. ----


class OfficialStudentSegContrast(nn.Module):
    def __init__(self, num_classes, pixel_memory_size, region_memory_size, region_contrast_size, pixel_contrast_size,
                 contrast_kd_temperature, contrast_temperature, s_channels, t_channels, ignore_label):
        super(OfficialStudentSegContrast, self).__init__()
        self.base_temperature = 0.1
        self.contrast_kd_temperature = contrast_kd_temperature
        self.contrast_temperature = contrast_temperature
        self.dim = t_channels
        self.ignore_label = ignore_label
        self.n_view = 32

        self.project_head = nn.Sequential(
            nn.Conv2d(s_channels, t_channels, 1, bias=False),
            nn.SyncBatchNorm(t_channels),
            nn.ReLU(True),
            nn.Conv2d(t_channels, t_channels, 1, bias=False)
        )

        self.num_classes = num_classes
        self.region_memory_size = region_memory_size
        self.pixel_memory_size = pixel_memory_size
        self.pixel_update_freq = 16
        self.pixel_contrast_size = pixel_contrast_size
        self.region_contrast_size = region_contrast_size

        self.register_buffer("teacher_segment_queue", torch.randn(self.num_classes, self.region_memory_size, self.dim))
        self.teacher_segment_queue = nn.functional.normalize(self.teacher_segment_queue, p=2, dim=2)
        self.register_buffer("segment_queue_ptr", torch.zeros(self.num_classes, dtype=torch.long))
        self.register_buffer("teacher_pixel_queue", torch.randn(self.num_classes, self.pixel_memory_size, self.dim))
        self.teacher_pixel_queue = nn.functional.normalize(self.teacher_pixel_queue, p=2, dim=2)
        self.register_buffer("pixel_queue_ptr", torch.zeros(self.num_classes, dtype=torch.long))

    def _sample_negative(self, Q, index):
        class_num, cache_size, feat_size = Q.shape
        contrast_size = index.size(0)
        X_ = torch.zeros((class_num * contrast_size, feat_size)).float()
        y_ = torch.zeros((class_num * contrast_size, 1)).float()
        sample_ptr = 0

        for ii in range(class_num):
            this_q = Q[ii, index, :]
            X_[sample_ptr:sample_ptr + contrast_size, ...] = this_q
            y_[sample_ptr:sample_ptr + contrast_size, ...] = ii
            sample_ptr += contrast_size

        return X_, y_

    @torch.no_grad()
    def concat_all_gather(self, tensor):
        return tensor

    def _dequeue_and_enqueue(self, keys, labels):
        segment_queue = self.teacher_segment_queue
        pixel_queue = self.teacher_pixel_queue

        keys = self.concat_all_gather(keys)
        labels = self.concat_all_gather(labels)

        batch_size, feat_dim, H, W = keys.size()

        for bs in range(batch_size):
            this_feat = keys[bs].contiguous().view(feat_dim, -1)
            this_label = labels[bs].contiguous().view(-1)
            this_label_ids = torch.unique(this_label)
            this_label_ids = [x for x in this_label_ids if x != self.ignore_label]

            for lb in this_label_ids:
                idxs = (this_label == lb).nonzero()

                # segment enqueue and dequeue
                feat = torch.mean(this_feat[:, idxs], dim=1).squeeze(1)
                ptr = int(self.segment_queue_ptr[lb])
                segment_queue[lb, ptr, :] = nn.functional.normalize(feat.view(-1), p=2, dim=0)
                self.segment_queue_ptr[lb] = (self.segment_queue_ptr[lb] + 1) % self.region_memory_size

                # pixel enqueue and dequeue
                num_pixel = idxs.shape[0]
                perm = torch.randperm(num_pixel)
                K = min(num_pixel, self.pixel_update_freq)
                feat = this_feat[:, perm[:K]]
                feat = torch.transpose(feat, 0, 1)
                ptr = int(self.pixel_queue_ptr[lb])

                if ptr + K >= self.pixel_memory_size:
                    pixel_queue[lb, -K:, :] = nn.functional.normalize(feat, p=2, dim=1)
                    self.pixel_queue_ptr[lb] = 0
                else:
                    pixel_queue[lb, ptr:ptr + K, :] = nn.functional.normalize(feat, p=2, dim=1)
                    self.pixel_queue_ptr[lb] = (self.pixel_queue_ptr[lb] + K) % self.pixel_memory_size

    def contrast_sim_kd(self, s_logits, t_logits):
        p_s = F.log_softmax(s_logits/self.contrast_kd_temperature, dim=1)
        p_t = F.softmax(t_logits/self.contrast_kd_temperature, dim=1)
        sim_dis = F.kl_div(p_s, p_t, reduction='batchmean') * self.contrast_kd_temperature**2
        return sim_dis

    def forward(self, s_feats, t_feats, labels=None, predict=None):
        t_feats = F.normalize(t_feats, p=2, dim=1)
        s_feats = self.project_head(s_feats)
        s_feats = F.normalize(s_feats, p=2, dim=1)

        labels = labels.unsqueeze(1).float().clone()
        labels = torch.nn.functional.interpolate(labels,
                                                 (s_feats.shape[2], s_feats.shape[3]), mode='nearest')
        labels = labels.squeeze(1).long()
        assert labels.shape[-1] == s_feats.shape[-1], '{} {}'.format(labels.shape, s_feats.shape)

        ori_s_fea = s_feats
        ori_t_fea = t_feats
        ori_labels = labels

        batch_size = s_feats.shape[0]

        labels = labels.contiguous().view(-1)
        predict = predict.contiguous().view(batch_size, -1)

        idxs = (labels != self.ignore_label)
        s_feats = s_feats.permute(0, 2, 3, 1)
        s_feats = s_feats.contiguous().view(-1, s_feats.shape[-1])
        s_feats = s_feats[idxs, :]

        t_feats = t_feats.permute(0, 2, 3, 1)
        t_feats = t_feats.contiguous().view(-1, t_feats.shape[-1])
        t_feats = t_feats[idxs, :]

        self._dequeue_and_enqueue(ori_t_fea.detach().clone(), ori_labels.detach().clone())

        if idxs.sum() == 0:  # just a trick to skip all ignored anchor embeddings
            return 0. * (s_feats**2).mean(), 0. * (s_feats**2).mean()

        class_num, pixel_queue_size, feat_size = self.teacher_pixel_queue.shape
        perm = torch.randperm(pixel_queue_size)
        pixel_index = perm[:self.pixel_contrast_size]
        t_X_pixel_contrast, t_y_pixel_contrast = self._sample_negative(self.teacher_pixel_queue, pixel_index)

        t_pixel_logits = torch.div(torch.mm(t_feats, t_X_pixel_contrast.T), self.contrast_temperature)
        s_pixel_logits = torch.div(torch.mm(s_feats, t_X_pixel_contrast.T), self.contrast_temperature)

        class_num, region_queue_size, feat_size = self.teacher_segment_queue.shape
        perm = torch.randperm(region_queue_size)
        region_index = perm[:self.region_contrast_size]
        t_X_region_contrast, _ = self._sample_negative(self.teacher_segment_queue, region_index)

        t_region_logits = torch.div(torch.mm(t_feats, t_X_region_contrast.T), self.contrast_temperature)
        s_region_logits = torch.div(torch.mm(s_feats, t_X_region_contrast.T), self.contrast_temperature)

        pixel_sim_dis = self.contrast_sim_kd(s_pixel_logits, t_pixel_logits.detach())
        region_sim_dis = self.contrast_sim_kd(s_region_logits, t_region_logits.detach())

        return pixel_sim_dis, region_sim_dis


# ---- end of the official code ----

ARGS = dict(num_classes=5, pixel_memory_size=40, region_memory_size=6, region_contrast_size=4, pixel_contrast_size=24,
            contrast_kd_temperature=1.5, contrast_temperature=0.1, s_channels=12, t_channels=20, ignore_label=255)


def _batch(b=3, h=6, w=10, ignore_all=False):
    s_feats, t_feats = torch.randn(b, 12, h, w), torch.randn(b, 20, h, w)
    labels = torch.randint(0, 5, (b, 2 * h, 2 * w))  # at image resolution, interpolated to the maps
    labels[torch.rand(labels.shape) < 0.2] = 255
    if ignore_all:
        labels[:] = 255
    return s_feats, t_feats, labels, torch.randn(b, 5, h, w)


def _pair(seed=0, **kwargs):
    torch.manual_seed(seed)
    official = OfficialStudentSegContrast(**ARGS)
    torch.manual_seed(seed)
    ours = cirkd.StudentSegContrast(**ARGS, class_pixels=False, **kwargs)
    return official, ours


def test_memory_module_matches_the_official_one_step_after_step():
    """class_pixels=False: the official indexing. Three training steps from the same seed give the
    same losses, gradients (student map and projection head), memories and pointers."""
    official, ours = _pair()
    assert list(ours.state_dict()) == list(official.state_dict())
    for a, b in zip(ours.state_dict().values(), official.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for step in range(3):
        s_feats, t_feats, labels, predict = _batch()
        results = []
        for module in (official, ours):
            torch.manual_seed(100 + step)
            s = s_feats.clone().requires_grad_()
            pixel, region = module(s, t_feats, labels, predict)
            grads = torch.autograd.grad(pixel + 0.7 * region, [s, *module.project_head.parameters()])
            results.append((pixel, region, grads))
        (p1, r1, g1), (p2, r2, g2) = results
        torch.testing.assert_close(p2, p1, rtol=2e-5, atol=1e-7)
        torch.testing.assert_close(r2, r1, rtol=2e-5, atol=1e-7)
        for a, b in zip(g2, g1):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
        for name, buffer in official.state_dict().items():
            torch.testing.assert_close(ours.state_dict()[name], buffer, rtol=1e-6, atol=1e-7, msg=name)


def test_memory_module_consumes_the_rng_like_the_official_one():
    official, ours = _pair(seed=3)
    s_feats, t_feats, labels, predict = _batch()
    draws = []
    for module in (official, ours):
        torch.manual_seed(7)
        module(s_feats, t_feats, labels, predict)
        draws.append(torch.rand(4))
    torch.testing.assert_close(draws[0], draws[1], rtol=0, atol=0)


def test_class_pixels_enqueues_the_class_own_pixels():
    """The default fixes the official indexing: every pixel-memory row written for class c is a
    normalised teacher pixel labelled c."""
    torch.manual_seed(0)
    module = cirkd.StudentSegContrast(**ARGS)
    before = module.teacher_pixel_queue.clone()
    s_feats, t_feats, labels, _ = _batch(b=1)
    module(s_feats, t_feats, labels)
    t_hat = F.normalize(t_feats, dim=1)[0].reshape(20, -1).t()
    small = F.interpolate(labels[:, None].float(), t_feats.shape[2:], mode="nearest")[0, 0].long().reshape(-1)
    written = 0
    for c in range(ARGS["num_classes"]):
        changed = (module.teacher_pixel_queue[c] != before[c]).any(1)
        for row in module.teacher_pixel_queue[c][changed]:
            match = (t_hat - row).abs().amax(1) < 1e-6
            assert match.any() and (small[match] == c).all()
            written += 1
    assert written > 0


def test_memory_module_all_ignored_gives_zeros_not_nan():
    official, ours = _pair()
    s_feats, t_feats, labels, predict = _batch(ignore_all=True)
    torch.manual_seed(1)
    assert torch.isnan(official(s_feats, t_feats, labels, predict)[0])  # the official defect
    s = s_feats.clone().requires_grad_()
    pixel, region = ours(s, t_feats, labels)
    (grad,) = torch.autograd.grad(pixel + region, s)
    assert pixel.item() == 0.0 and region.item() == 0.0 and not grad.any()


def test_mini_batch_module_matches_the_official_formula_with_pooling():
    from test_pixel_relation import CriterionMiniBatchCrossImagePair as Official

    s_feats, t_feats = torch.randn(3, 16, 7, 9, dtype=torch.float64), torch.randn(3, 16, 7, 9, dtype=torch.float64)
    for pooling in (False, True):
        s1, s2 = s_feats.clone().requires_grad_(), s_feats.clone().requires_grad_()
        expected = Official(0.8, pooling)(s1, t_feats)
        got = cirkd.CriterionMiniBatchCrossImagePair(0.8, pooling)(s2, t_feats)
        torch.testing.assert_close(got, expected.double(), rtol=1e-6, atol=1e-9)
        (g1,), (g2,) = torch.autograd.grad(expected, s1), torch.autograd.grad(got, s2)
        torch.testing.assert_close(g2, g1, rtol=1e-5, atol=1e-9)


def test_official_helper_methods_are_there_and_agree():
    """Scripts may call the official module's helpers: _sample_negative, contrast_sim_kd,
    concat_all_gather (the identity outside a process group)."""
    official, ours = _pair()
    index = torch.randperm(ARGS["pixel_memory_size"])[:7]
    for a, b in zip(ours._sample_negative(ours.teacher_pixel_queue, index),
                    official._sample_negative(official.teacher_pixel_queue, index)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    s_logits, t_logits = torch.randn(9, 14), torch.randn(9, 14)
    torch.testing.assert_close(ours.contrast_sim_kd(s_logits, t_logits), official.contrast_sim_kd(s_logits, t_logits))
    x = torch.randn(3, 4)
    assert ours.concat_all_gather(x) is x
