"""PixelContrastiveLoss: the module form, its queue, state_dict and errors."""
import pytest
import torch
import torch.nn.functional as F

from pcd_kernels import PixelContrastiveLoss, pixel_contrastive_loss


def test_module_equals_functional():
    s, t = torch.randn(2, 12, 3, 5, requires_grad=True), torch.randn(2, 12, 3, 5)
    mask = torch.rand(2, 3, 5) > 0.2
    criterion = PixelContrastiveLoss(temperature=0.3, negatives="image", reduction="sum")
    expected = pixel_contrastive_loss(s, t, negatives="image", temperature=0.3, mask=mask, reduction="sum")
    torch.testing.assert_close(criterion(s, t, mask), expected)


def test_queue_is_used_as_negatives_in_the_student_precision():
    criterion = PixelContrastiveLoss(negatives="none", queue_size=16, dim=8)
    assert criterion.queue.shape == (16, 8) and criterion.queue.dtype == torch.float32
    torch.testing.assert_close(criterion.queue.norm(dim=1), torch.ones(16))
    s, t = torch.randn(2, 8, 3, 3), torch.randn(2, 8, 3, 3)
    torch.testing.assert_close(criterion(s, t), pixel_contrastive_loss(s, t, criterion.queue, negatives="none"))
    half = criterion(s.bfloat16(), t.bfloat16())
    expected = pixel_contrastive_loss(s.bfloat16(), t.bfloat16(), criterion.queue.bfloat16(), negatives="none")
    torch.testing.assert_close(half, expected)


def test_enqueue_replaces_the_oldest_keys_and_wraps_around():
    criterion = PixelContrastiveLoss(negatives="none", queue_size=5, dim=4, normalize=False)
    first = torch.randn(3, 4)
    criterion.enqueue(first)
    torch.testing.assert_close(criterion.queue[:3], first)
    second = torch.randn(4, 4)
    criterion.enqueue(second)  # slots 3, 4, 0, 1
    torch.testing.assert_close(criterion.queue[3:5], second[:2])
    torch.testing.assert_close(criterion.queue[0:2], second[2:])
    torch.testing.assert_close(criterion.queue[2], first[2])
    assert int(criterion.queue_ptr) == 2
    many = torch.randn(7, 4)  # more than the queue holds: the newest five stay
    criterion.enqueue(many)
    assert sorted(map(tuple, criterion.queue.tolist())) == sorted(map(tuple, many[2:].tolist()))


def test_enqueue_normalizes_when_the_loss_does():
    criterion = PixelContrastiveLoss(negatives="none", queue_size=4, dim=3)
    keys = torch.randn(4, 3) * 5
    criterion.enqueue(keys)
    torch.testing.assert_close(criterion.queue, F.normalize(keys, dim=1))


def test_state_dict_round_trip_restores_the_queue_position():
    criterion = PixelContrastiveLoss(negatives="none", queue_size=6, dim=4)
    criterion.enqueue(torch.randn(4, 4))
    state = criterion.state_dict()
    assert set(state) == {"queue", "queue_ptr"}
    restored = PixelContrastiveLoss(negatives="none", queue_size=6, dim=4)
    restored.load_state_dict(state)
    torch.testing.assert_close(restored.queue, criterion.queue)
    keys = torch.randn(1, 4)
    restored.enqueue(keys)
    torch.testing.assert_close(restored.queue[4], F.normalize(keys, dim=1)[0])


def test_module_without_queue_has_no_state():
    assert PixelContrastiveLoss().state_dict() == {}


@pytest.mark.parametrize("kwargs,error,message", [
    (dict(negatives="none"), ValueError, "needs a queue"),
    (dict(queue_size=8), ValueError, "dim"),
    (dict(queue_size=-1), ValueError, "queue_size"),
    (dict(temperature=0), ValueError, "temperature"),
    (dict(reduction="avg"), ValueError, "reduction"),
    (dict(backend="gpu"), ValueError, "backend"),
])
def test_bad_construction(kwargs, error, message):
    with pytest.raises(error, match=message):
        PixelContrastiveLoss(**kwargs)


def test_bad_enqueue():
    with pytest.raises(RuntimeError, match="queue_size > 0"):
        PixelContrastiveLoss().enqueue(torch.randn(2, 4))
    criterion = PixelContrastiveLoss(queue_size=4, dim=3)
    with pytest.raises(ValueError, match=r"pool it first"):
        criterion.enqueue(torch.randn(2, 3, 4, 4))
    with pytest.raises(ValueError, match=r"keys must be \(n, 3\)"):
        criterion.enqueue(torch.randn(2, 5))


def test_meta_module_gives_meta_loss_and_enqueues():
    """Frameworks build models on meta tensors."""
    criterion = PixelContrastiveLoss(negatives="none", queue_size=6, dim=8).to("meta")
    s = torch.randn(2, 8, 3, 5, device="meta", requires_grad=True)
    loss = criterion(s, torch.randn(2, 8, 3, 5, device="meta"))
    assert loss.device.type == "meta" and loss.shape == ()
    loss.backward()
    assert s.grad.device.type == "meta" and s.grad.shape == s.shape
    criterion.enqueue(torch.randn(3, 8, device="meta"))
    assert criterion._ptr == 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: the queue's move to it cannot run here")
@pytest.mark.parametrize("first", ["forward", "enqueue"])
def test_a_cpu_built_queue_follows_cuda_maps_and_keys(first):
    """A framework that never moves its criterion (torchdistill) hands it CUDA maps or keys."""
    criterion = PixelContrastiveLoss(negatives="none", queue_size=8, dim=4)
    s, t = torch.randn(2, 4, 3, 3, device="cuda", requires_grad=True), torch.randn(2, 4, 3, 3, device="cuda")
    if first == "enqueue":
        criterion.enqueue(t.mean((2, 3)))
    criterion(s, t).backward()
    criterion.enqueue(t.mean((2, 3)))
    assert criterion.queue.device == s.device and criterion.queue_ptr.device == s.device
    assert int(criterion.queue_ptr) == (4 if first == "enqueue" else 2)
