"""process_group: two gloo ranks on CPU against one process holding the concatenated batch."""
import contextlib
import datetime
import os
import re
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from _helpers import INTERPRETER
from pcd_kernels import PixelContrastiveLoss, pixel_contrastive_loss
from pcd_kernels.reference import naive_pixel_contrastive_loss

WORLD = 2


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _gloo_rank(rank, port, **options):
    """This process as ``rank`` of a WORLD-rank gloo group on this host, closed by a barrier
    (tearing gloo down while the peer is still mid-collective can abort)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, **options)
    try:
        yield
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _share(rank, batch):
    """This rank's part of a batch of ``batch`` images (WORLD equal parts)."""
    part = batch // WORLD
    return slice(rank * part, (rank + 1) * part)


def _worker(rank, port, inputs, backend, reduction, out_path):
    with _gloo_rank(rank, port):
        student, teacher, queue, mask = inputs
        mine = _share(rank, student.shape[0])
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
    for rank, result in enumerate(results):
        mine = _share(rank, B)
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


# Ranks whose arguments differ: every rank must raise a clear error, none may abort (gloo kills a
# process on mismatched collectives) or hang. Each case maps a rank to its call; after every case
# the ranks must still run the same collectives, so all cases share one process group.
def _maps(B=2, C=8, H=3, W=3, dtype=torch.float32):
    return torch.randn(B, C, H, W, dtype=dtype), torch.randn(B, C, H, W, dtype=dtype)


def _loss(*maps, **kwargs):
    return pixel_contrastive_loss(*maps, process_group=dist.group.WORLD, backend="torch", **kwargs)


def _enqueue(keys, dtype=torch.float32):
    PixelContrastiveLoss(queue_size=8, dim=8).to(dtype).enqueue(keys)


def _pcd_enqueue(keys):
    from pcd_kernels.integrations.pcd import PCD

    PCD(nn.Identity(), nn.Identity(), 8, 16, 0.2)._dequeue_and_enqueue(keys)


DISAGREE = "the ranks of the process group disagree on "
REJECTED = "rank 1 of the process group rejected its arguments"
MISMATCHES = {  # name: (the call of rank r, what every rank's error says, or {rank: what it says})
    "channels": (lambda r: _loss(*_maps(C=(8, 16)[r])), DISAGREE + r"channels \(8 on rank 0, 16 on rank 1\)"),
    "dtype": (lambda r: _loss(*_maps(dtype=(torch.float32, torch.float64)[r])),
              DISAGREE + r"dtype \(torch.float32 on rank 0, torch.float64 on rank 1\)"),
    "batch size": (lambda r: _loss(*_maps(B=2 + r)), DISAGREE + r"batch size \(2 on rank 0, 3 on rank 1\)"),
    "map size": (lambda r: _loss(*_maps(W=3 + r)),
                 DISAGREE + r"map size \(H, W\) \(\(3, 3\) on rank 0, \(3, 4\) on rank 1\)"),
    "negatives": (lambda r: _loss(*_maps(), negatives=("batch", "image")[r]),
                  DISAGREE + r"negatives \('batch' on rank 0, 'image' on rank 1\)"),
    "reduction": (lambda r: _loss(*_maps(), negatives="image", reduction=("mean", "sum")[r]),
                  DISAGREE + r"reduction \('mean' on rank 0, 'sum' on rank 1\)"),
    "rejected": (lambda r: _loss(*_maps(), temperature=(0.2, -1.0)[r]),
                 {0: REJECTED, 1: "temperature must be a finite"}),
    "enqueue size": (lambda r: _enqueue(torch.randn(3 + r, 8)),
                     DISAGREE + r"number of keys \(3 on rank 0, 4 on rank 1\)"),
    "enqueue dtype": (lambda r: _enqueue(torch.randn(3, 8), (torch.float32, torch.float64)[r]),
                      DISAGREE + r"queue dtype \(torch.float32 on rank 0, torch.float64 on rank 1\)"),
    "enqueue complex": (lambda r: _enqueue(torch.randn(3, 8, dtype=(torch.float32, torch.complex64)[r])),
                        {0: REJECTED, 1: "keys must be float16"}),
    "loss and enqueue": (lambda r: _loss(*_maps()) if r == 0 else _enqueue(torch.randn(3, 8)),
                         "called different operations: pixel_contrastive_loss on rank 0, "
                         "PixelContrastiveLoss.enqueue on rank 1"),
    "PCD drop-in enqueue size": (lambda r: _pcd_enqueue(torch.randn(2 + r, 8)),
                                 DISAGREE + r"number of keys \(2 on rank 0, 3 on rank 1\)"),
    "agreeing ranks": (lambda r: (_loss(*_maps()), _enqueue(torch.randn(3, 8)), _pcd_enqueue(torch.randn(2, 8))),
                       None),
}


def _mismatch_worker(rank, port, out_path):
    # A hang shows as a gloo timeout error after 20 s instead of the default 30 min.
    with _gloo_rank(rank, port, timeout=datetime.timedelta(seconds=20)):
        results = {}
        for name, (call, _) in MISMATCHES.items():
            start = time.monotonic()
            try:
                call(rank)
                error = None
            except Exception as e:  # (the test checks which)
                error = f"{type(e).__name__}: {e}"
            results[name] = (error, time.monotonic() - start)
            torch.save(results, f"{out_path}.{rank}")  # after every case: a crash shows where it happened


@pytest.fixture(scope="module")
def mismatch_results(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("mismatch") / "rank")
    context = mp.spawn(_mismatch_worker, args=(_free_port(), out), nprocs=WORLD, join=False)
    deadline = time.monotonic() + 120
    crash = None
    try:
        while not context.join(timeout=max(deadline - time.monotonic(), 0)):
            if time.monotonic() > deadline:
                for process in context.processes:
                    process.kill()
                pytest.fail("the ranks hung")
    except mp.ProcessExitedException as error:
        crash = error
    results = [torch.load(f"{out}.{r}") if os.path.exists(f"{out}.{r}") else {} for r in range(WORLD)]
    unfinished = {r: [name for name in MISMATCHES if name not in done] for r, done in enumerate(results)}
    if any(unfinished.values()):
        last = {r: list(done)[-1] if done else "none" for r, done in enumerate(results)}
        pytest.fail(f"the ranks did not finish every case ({crash or 'no crash'}); the last case each finished: "
                    f"{last}")
    # Every case ran on every rank: a crash now can only have been in the group's teardown after the
    # last barrier, not in this library's code. (Once, in a full CI run, a rank aborted with
    # "terminate called without an active exception" and left no clue where; results are saved
    # after every case since, so a crash inside a case fails above with the case's name.)
    return results


@pytest.mark.parametrize("case", list(MISMATCHES))
def test_ranks_that_disagree_all_raise_a_clear_error(mismatch_results, case):
    expected = MISMATCHES[case][1]
    for rank, results in enumerate(mismatch_results):
        error, seconds = results[case]
        match = expected.get(rank) if isinstance(expected, dict) else expected
        if match is None:
            assert error is None, f"rank {rank}: {error}"
        else:
            assert error is not None and re.search(match, error), f"rank {rank}: {error}"
            assert error.startswith("TypeError" if "keys must be" in match else "ValueError")
            assert seconds < 10, f"rank {rank} took {seconds:.1f} s to raise"


def test_process_group_must_be_a_usable_group():
    s = torch.randn(1, 4, 2, 2)
    with pytest.raises(TypeError, match="process_group must be a torch.distributed ProcessGroup"):
        pixel_contrastive_loss(s, s, process_group=object())
    with pytest.raises(TypeError, match="process_group must be a torch.distributed ProcessGroup"):
        PixelContrastiveLoss(queue_size=4, dim=4, process_group="world").enqueue(torch.randn(2, 4))
    unused = dist.ProcessGroup(0, 2)  # a group object, but torch.distributed is not initialised
    for negatives in ("batch", "image"):
        with pytest.raises(ValueError, match="process_group was given but torch.distributed is not initialised"):
            pixel_contrastive_loss(s, s, negatives=negatives, process_group=unused)
    with pytest.raises(ValueError, match="process_group was given but torch.distributed is not initialised"):
        PixelContrastiveLoss(queue_size=4, dim=4, process_group=unused).enqueue(torch.randn(2, 4))


def _cirkd_memory_worker(rank, port, inputs, out_path):
    from pcd_kernels.integrations.cirkd import StudentSegContrast

    with _gloo_rank(rank, port):
        s_feats, t_feats, labels, args = inputs
        mine = _share(rank, s_feats.shape[0])
        torch.manual_seed(0)
        # eval: the official head's SyncBatchNorm synchronises on GPUs only (a CPU process
        # group makes it raise in training mode); the memories are what this test is about
        module = StudentSegContrast(**args).eval()
        torch.manual_seed(5)  # the same draws on every rank, as DDP's seeding gives
        pixel, region = module(s_feats[mine], t_feats[mine], labels[mine])
        torch.save({"state": module.state_dict(), "pixel": pixel.detach()}, f"{out_path}.{rank}")


def test_cirkd_memory_enqueues_every_rank_batch(tmp_path):
    """StudentSegContrast under 2 gloo ranks: each rank's memories after a step equal those of one
    process enqueueing the concatenated batch (the official all_gather)."""
    import torch.nn.functional as F

    from pcd_kernels.integrations.cirkd import StudentSegContrast

    torch.manual_seed(0)
    args = dict(num_classes=4, pixel_memory_size=30, region_memory_size=5, region_contrast_size=3,
                pixel_contrast_size=10, contrast_kd_temperature=1.0, contrast_temperature=0.1, s_channels=6,
                t_channels=8, ignore_label=255)
    s_feats, t_feats = torch.randn(4, 6, 3, 5), torch.randn(4, 8, 3, 5)
    labels = torch.randint(0, 4, (4, 3, 5))
    labels[0, 0] = 255
    out = str(tmp_path / "rank")
    mp.spawn(_cirkd_memory_worker, args=(_free_port(), (s_feats, t_feats, labels, args), out), nprocs=WORLD)
    torch.manual_seed(0)
    single = StudentSegContrast(**args)
    torch.manual_seed(5)
    single._dequeue_and_enqueue(F.normalize(t_feats, dim=1), labels)
    for rank in range(WORLD):
        got = torch.load(f"{out}.{rank}", weights_only=True)
        for name, buffer in single.state_dict().items():
            if "queue" in name or "ptr" in name:
                torch.testing.assert_close(got["state"][name], buffer, rtol=1e-6, atol=1e-7, msg=name)
        assert torch.isfinite(got["pixel"])
