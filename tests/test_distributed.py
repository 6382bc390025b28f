"""process_group: two gloo ranks on CPU against one process holding the concatenated batch."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from _helpers import INTERPRETER
from pcd_kernels import PixelContrastiveLoss, pixel_contrastive_loss
from pcd_kernels.reference import naive_pixel_contrastive_loss

WORLD = 2


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, port, inputs, backend, reduction, out_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        student, teacher, queue, mask = inputs
        half = student.shape[0] // WORLD
        mine = slice(rank * half, (rank + 1) * half)
        s = student[mine].clone().requires_grad_()
        t = teacher[mine].clone().requires_grad_()
        loss = pixel_contrastive_loss(s, t, queue, negatives="batch", mask=mask[mine], reduction=reduction,
                                      process_group=dist.group.WORLD, backend=backend)
        loss.backward()
        criterion = PixelContrastiveLoss(negatives="batch", queue_size=2 * WORLD * 3, dim=student.shape[1])
        keys = torch.zeros(3, student.shape[1])
        keys[:, rank] = rank + 1.0  # rank r enqueues three copies of e_r (times r + 1)
        criterion.enqueue(keys)
        torch.save({"loss": loss.detach(), "ds": s.grad, "dt": t.grad, "queue": criterion.queue}, f"{out_path}.{rank}")
        dist.barrier()  # tearing gloo down while the peer is still mid-collective can abort
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    not INTERPRETER, reason="on a GPU machine the CPU ranks cannot run Triton (interpreter off)"))])
def test_process_group_matches_the_concatenated_batch(tmp_path, backend, reduction):
    torch.manual_seed(0 if reduction == "mean" else 1)
    B, C, H, W = 4, 20, 3, 5
    student = torch.randn(B, C, H, W, dtype=torch.float64).float()
    teacher = (student + torch.randn(B, C, H, W)).float()
    queue = torch.randn(11, C)
    mask = torch.rand(B, H, W) > 0.3
    mask[0, :2] = False  # the ranks hold different numbers of valid anchors
    out = str(tmp_path / "rank")
    mp.spawn(_worker, args=(_free_port(), (student, teacher, queue, mask), backend, reduction, out),
             nprocs=WORLD, join=True)
    results = [torch.load(f"{out}.{r}") for r in range(WORLD)]

    s64 = student.double().requires_grad_()
    t64 = teacher.double().requires_grad_()
    per_anchor = naive_pixel_contrastive_loss(s64, t64, queue.double(), negatives="batch", mask=mask,
                                              reduction="none")
    half = B // WORLD
    for rank, result in enumerate(results):
        mine = slice(rank * half, (rank + 1) * half)
        rank_loss = per_anchor[mine].sum()
        if reduction == "mean":  # divided by the average number of valid anchors per rank
            rank_loss = rank_loss / (mask.sum() / WORLD)
        ds, dt = torch.autograd.grad(rank_loss, (s64, t64), retain_graph=True)
        torch.testing.assert_close(result["loss"].double(), rank_loss.detach(), rtol=2e-5, atol=1e-6)
        torch.testing.assert_close(result["ds"].double(), ds[mine], rtol=1e-4, atol=1e-6)
        # keys gathered from the other rank carry no gradient back: only this rank's anchors count
        torch.testing.assert_close(result["dt"].double(), dt[mine], rtol=1e-4, atol=1e-6)
    # The mean of the ranks' losses (DDP averages) is the single-process loss.
    single = naive_pixel_contrastive_loss(student.double(), teacher.double(), queue.double(),
                                          negatives="batch", mask=mask, reduction=reduction)
    combined = sum(r["loss"].double() for r in results)
    combined = combined / WORLD if reduction == "mean" else combined
    torch.testing.assert_close(combined, single, rtol=2e-5, atol=1e-6)
    # enqueue gathered both ranks' keys, in rank order, normalised, on every rank
    expected = torch.eye(C)[[0, 0, 0, 1, 1, 1]]
    for result in results:
        torch.testing.assert_close(result["queue"][:6], expected)
