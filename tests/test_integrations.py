"""Drop-in integrations: the official PCD wrapper, mmrazor's registry, torchdistill's registry, and
lazy imports."""
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pcd_kernels import pixel_contrastive_loss
from pcd_kernels.integrations.pcd import PCD


class OfficialPCD(nn.Module):
    """The official ``pcd/pcd.py`` wrapper as released, for one process: its ``.cuda()`` labels
    follow the logits' device and ``concat_all_gather`` is the identity. Everything else is the
    official code, bugs included."""

    def __init__(self, student, teacher, output_dim, queue_size, temperature):
        super().__init__()
        self.student = student
        self.teacher = teacher
        self.queue_size = queue_size
        for p in self.teacher.parameters():
            p.requires_grad = False
        self.register_buffer("queue", torch.randn(output_dim, queue_size))
        self.queue = nn.functional.normalize(self.queue, dim=0)
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))
        self.register_buffer("temperature", torch.tensor(temperature, dtype=torch.float))

    def _pixelwise_contrastive_loss(self, student_output, teacher_output):
        N, C, H, W = student_output.shape
        student_output = F.normalize(student_output.view(N, C, -1), dim=1, p=2)
        teacher_output = F.normalize(teacher_output.detach().view(N, C, -1), dim=1, p=2)
        pos = (student_output * teacher_output).sum(dim=1).view(-1, 1)
        neg = torch.matmul(student_output.transpose(1, 2), self.queue.clone().detach()).view(-1, self.queue_size)
        logit = torch.cat((pos, neg), dim=1).div(self.temperature)
        return F.cross_entropy(logit, torch.zeros(logit.size(0), dtype=torch.long, device=logit.device))

    def forward(self, image1, image2):
        student_output1 = self.student(image1)
        student_output2 = self.student(image2)
        with torch.no_grad():
            teacher_output1 = self.teacher(image1)
            teacher_output2 = self.teacher(image2)
            key_for_update = F.adaptive_avg_pool2d(teacher_output1, 1).view(teacher_output1.size(0), -1)
            key_for_update = F.normalize(key_for_update, dim=1, p=2)
        loss = self._pixelwise_contrastive_loss(student_output1, teacher_output2) + \
            self._pixelwise_contrastive_loss(student_output2, teacher_output1)
        loss /= 2.
        self._dequeue_and_enqueue(key_for_update)
        return {"loss": loss}

    @torch.no_grad()
    def _dequeue_and_enqueue(self, keys):
        batch_size = keys.shape[0]
        ptr = int(self.queue_ptr)
        assert self.queue_size % batch_size == 0
        self.queue[:, ptr: ptr + batch_size] = keys.T
        ptr = (ptr + batch_size) % self.queue_size
        self.queue_ptr[0] = ptr


def _pair(dim=12):
    torch.manual_seed(0)
    student = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU(), nn.Conv2d(8, dim, 1)).double()
    teacher = nn.Sequential(nn.Conv2d(3, dim, 3, 2, 1)).double()
    return student, teacher


def test_pcd_drop_in_matches_the_official_wrapper():
    student, teacher = _pair()
    official = OfficialPCD(student, teacher, 12, 20, 0.2).double()
    ours = PCD(student, teacher, 12, 20, 0.2).double()
    assert list(ours.state_dict()) == list(official.state_dict())
    ours.load_state_dict(official.state_dict())  # strict: official checkpoints load as they are
    for step in range(3):  # the queue and its pointer evolve identically (batch 4 divides 20)
        x1, x2 = torch.randn(4, 3, 9, 11, dtype=torch.float64), torch.randn(4, 3, 9, 11, dtype=torch.float64)
        expected = official(x1, x2)["loss"]
        grads_expected = torch.autograd.grad(expected, list(student.parameters()))
        got = ours(x1, x2)
        grads = torch.autograd.grad(got["loss"], list(student.parameters()))
        torch.testing.assert_close(got["loss"], expected)
        for g, e in zip(grads, grads_expected):
            torch.testing.assert_close(g, e)
        torch.testing.assert_close(ours.queue, official.queue)
        assert torch.equal(ours.queue_ptr, official.queue_ptr)


def test_pcd_drop_in_loads_a_saved_official_checkpoint(tmp_path):
    student, teacher = _pair()
    official = OfficialPCD(student, teacher, 12, 16, 0.07).double()
    official(torch.randn(4, 3, 8, 8, dtype=torch.float64), torch.randn(4, 3, 8, 8, dtype=torch.float64))
    torch.save({"state_dict": official.state_dict()}, tmp_path / "pcd.pth")
    student2, teacher2 = _pair()
    ours = PCD(student2, teacher2, 12, 16, 0.2).double()
    ours.load_state_dict(torch.load(tmp_path / "pcd.pth", weights_only=True)["state_dict"])
    assert ours._temperature == pytest.approx(0.07) and ours._ptr == 4
    x = torch.randn(2, 12, 4, 4, dtype=torch.float64)
    y = torch.randn(2, 12, 4, 4, dtype=torch.float64)
    torch.testing.assert_close(ours._pixelwise_contrastive_loss(x, y), official._pixelwise_contrastive_loss(x, y))


def test_pcd_drop_in_fixes_the_official_bugs():
    student, teacher = _pair()
    ours = PCD(student, teacher, 12, 10, 0.2).double()
    for _ in range(3):  # 4 does not divide 10: the official assert fired here; keys now wrap around
        x1, x2 = torch.randn(4, 3, 8, 8, dtype=torch.float64), torch.randn(4, 3, 8, 8, dtype=torch.float64)
        ours(x1, x2)
    assert int(ours.queue_ptr) == 12 % 10
    keys = F.normalize(teacher(x1).mean((2, 3)), dim=1)
    torch.testing.assert_close(ours.queue[:, [8, 9, 0, 1]], keys.t())
    # top1/top5: each pooled student vector against its own image's key and the queue. Fresh
    # images, so the queue holds no copy of a positive key: the ranking has no exact ties, which
    # float32 (the monitor) and float64 (here) could break differently.
    x1, x2 = torch.randn(4, 3, 8, 8, dtype=torch.float64), torch.randn(4, 3, 8, 8, dtype=torch.float64)
    keys = F.normalize(teacher(x1).mean((2, 3)), dim=1)
    pooled = student(x1).mean((2, 3))
    queue_before = ours.queue.clone()
    out = ours(x1, x2)
    logits = torch.cat([(pooled * keys).sum(1, keepdim=True), pooled @ queue_before], dim=1)
    gaps = (logits[:, 1:] - logits[:, :1]).abs()
    assert gaps.min() > 1e-4, "a near-tie: the float32 monitor may rank it either way"
    rank = (logits > logits[:, :1]).sum(1)
    assert out["top1"].item() == pytest.approx(100 * (rank < 1).double().mean().item())
    assert out["top5"].item() == pytest.approx(100 * (rank < 5).double().mean().item())
    assert out["top1"].shape == (1,)


def test_pcd_drop_in_loss_is_the_functional_op():
    student, teacher = _pair()
    ours = PCD(student, teacher, 12, 16, 0.3).double()
    s, t = torch.randn(3, 12, 5, 7, dtype=torch.float64), torch.randn(3, 12, 5, 7, dtype=torch.float64)
    expected = pixel_contrastive_loss(s, t, ours.queue.t(), negatives="none", temperature=0.3)
    torch.testing.assert_close(ours._pixelwise_contrastive_loss(s, t), expected)


def test_import_pcd_kernels_imports_no_framework():
    code = ("import sys, pcd_kernels, pcd_kernels.integrations, pcd_kernels.train; "
            "bad = [m for m in ('mmrazor', 'mmengine', 'torchdistill', 'torchvision') if m in sys.modules]; "
            "sys.exit(f'imported {bad}' if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


# ---------------------------------------------------------------- mmrazor

def test_mmrazor_shim_imports_beside_the_real_mmrazor_without_its_models():
    """mmrazor 1.0.0's models do not import on torch 2.x (mmrazor#615, #632): the shim must import
    and register anyway, so it must not touch ``mmrazor.models``."""
    pytest.importorskip("mmrazor", reason="mmrazor is not installed (make venv installs it for these tests)")
    code = ("import sys, pcd_kernels.integrations.mmrazor as shim\n"
            "from mmrazor.registry import MODELS\n"
            "names = ('PixelContrastiveLoss', 'OmniContrastiveLoss', 'AfDCDLoss', 'SpatialAdaptorConnector')\n"
            "assert all(MODELS.module_dict[n] is getattr(shim, n) for n in names)\n"
            "shim.register()  # idempotent\n"
            "assert 'mmrazor.models' not in sys.modules\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.fixture
def mmrazor_models():
    """mmrazor's real MODELS registry, with the shim imported. Its ``build`` first imports every
    mmrazor model, which fails on torch 2.x (mmrazor#632, not ours): the registry's own flag marks
    that import done for the test, as it is in a torch version mmrazor supports or a patched
    mmrazor."""
    pytest.importorskip("mmrazor", reason="mmrazor is not installed (make venv installs it for these tests)")
    from mmrazor.registry import MODELS

    import pcd_kernels.integrations.mmrazor  # noqa: F401  (registers on import)
    imported = MODELS._imported
    MODELS._imported = True
    yield MODELS
    MODELS._imported = imported


def test_mmrazor_losses_build_from_config_dicts(mmrazor_models):
    torch.manual_seed(0)
    s, t = torch.randn(2, 16, 6, 5, requires_grad=True), torch.randn(2, 16, 6, 5)
    pcd = mmrazor_models.build(dict(type="PixelContrastiveLoss", temperature=0.2, negatives="none",
                                    queue_size=8, dim=16, loss_weight=0.5))
    queue = pcd.queue.clone()
    loss = pcd(preds_S=s, preds_T=t)
    torch.testing.assert_close(loss, 0.5 * pixel_contrastive_loss(s, t, queue, negatives="none"))
    loss.backward()  # the queue was refreshed in forward; the backward used the snapshot
    torch.testing.assert_close(pcd.queue[:2], F.normalize(t.mean((2, 3)), dim=1))
    import inspect
    assert list(inspect.signature(pcd.forward).parameters) == ["preds_S", "preds_T"]

    from pcd_kernels import omni_contrastive_loss

    omni = mmrazor_models.build(dict(type="OmniContrastiveLoss", groups=4, pool_size=1, loss_weight=2.0))
    s2, t2 = torch.randn(2, 8, 8, 8), torch.randn(2, 8, 8, 8)
    torch.testing.assert_close(omni(s2, t2), 2.0 * omni_contrastive_loss(s2, t2, groups=4, pool_size=1))

    afdcd = mmrazor_models.build(dict(type="AfDCDLoss", student_channels=8, teacher_channels=8, M_ocd=4,
                                      pool_size=1, rand_mask=False))
    from pcd_kernels import AfDCDLoss

    plain = AfDCDLoss(8, 8, M_ocd=4, pool_size=1, rand_mask=False)
    plain.load_state_dict(afdcd.state_dict())
    torch.testing.assert_close(afdcd(s2, t2), sum(plain(s2, t2)))


def test_mmrazor_connector_is_the_teachers_head_per_pixel(mmrazor_models, tmp_path):
    from pcd_kernels.train.models import mlp_head

    head = mlp_head(16, 32, 8).eval()
    torch.save({"state_dict": {f"module.base_encoder.fc.{k}": v for k, v in head.state_dict().items()}},
               tmp_path / "moco.pth")
    connector = mmrazor_models.build(dict(type="SpatialAdaptorConnector", in_channels=16, hidden_channels=32,
                                          out_channels=8, checkpoint=str(tmp_path / "moco.pth"),
                                          prefix="module.base_encoder.fc."))
    connector.train()
    x = torch.randn(3, 16, 5, 7)
    out = connector(x)
    assert out.shape == (3, 8, 5, 7) and not any(p.requires_grad for p in connector.parameters())
    torch.testing.assert_close(out.mean((2, 3)), head(x.mean((2, 3))), atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------- torchdistill

TORCHDISTILL_YAML = """
criterion:
  key: 'WeightedSumLoss'
  kwargs:
    sub_terms:
      pcd:
        criterion:
          key: 'PixelContrastiveLoss'
          kwargs:
            student_module_path: 'predictor'
            student_module_io: 'output'
            teacher_module_path: 'adaptor'
            teacher_module_io: 'output'
            temperature: 0.2
            negatives: 'none'
            queue_size: 32
            dim: 12
        weight: 1.0
      omni:
        criterion:
          key: 'OmniContrastiveLoss'
          kwargs:
            student_module_path: 'predictor'
            teacher_module_path: 'adaptor'
            groups: 4
            pool_size: 1
        weight: 0.5
"""


def _torchdistill_criterion():
    pytest.importorskip("torchdistill", reason="torchdistill is not installed (make venv installs it for these tests)")
    yaml = pytest.importorskip("yaml", reason="PyYAML is not installed")
    import pcd_kernels.integrations.torchdistill  # noqa: F401  (registers on import)
    from torchdistill.losses.registry import get_high_level_loss

    return get_high_level_loss(yaml.safe_load(TORCHDISTILL_YAML)["criterion"])


def test_torchdistill_losses_build_from_its_yaml_and_registry():
    from pcd_kernels import omni_contrastive_loss

    criterion = _torchdistill_criterion()
    torch.manual_seed(0)
    s, t = torch.randn(2, 12, 4, 8, requires_grad=True), torch.randn(2, 12, 4, 8)
    pcd_term = criterion.term_dict["pcd"][0]
    queue = pcd_term.queue.clone()
    io = {"student": {"predictor": {"output": s}}, "teacher": {"adaptor": {"output": t}}}
    loss = criterion(io, {}, None)
    expected = (pixel_contrastive_loss(s, t, queue, negatives="none", temperature=0.2)
                + 0.5 * omni_contrastive_loss(s, t, groups=4, pool_size=1))
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert s.grad is not None and int(pcd_term.queue_ptr) == 2


def test_torchdistill_queue_round_trips_beside_its_checkpoint(tmp_path):
    from pcd_kernels.integrations.torchdistill import load_loss_state_dict, loss_state_dict

    criterion = _torchdistill_criterion()
    for _ in range(3):
        s, t = torch.randn(2, 12, 4, 8, requires_grad=True), torch.randn(2, 12, 4, 8)
        criterion({"student": {"predictor": {"output": s}}, "teacher": {"adaptor": {"output": t}}}, {}, None)
    torch.save({"pcd_kernels_losses": loss_state_dict(criterion)}, tmp_path / "losses.pt")
    restored = _torchdistill_criterion()
    load_loss_state_dict(restored, torch.load(tmp_path / "losses.pt", weights_only=True)["pcd_kernels_losses"])
    term, restored_term = criterion.term_dict["pcd"][0], restored.term_dict["pcd"][0]
    assert torch.equal(restored_term.queue, term.queue) and int(restored_term.queue_ptr) == 6
    # the next push lands where the saved run's would have
    t = torch.randn(2, 12, 4, 8)
    for c in (criterion, restored):
        c({"student": {"predictor": {"output": torch.randn(2, 12, 4, 8)}}, "teacher": {"adaptor": {"output": t}}},
          {}, None)
    assert torch.equal(restored_term.queue, term.queue)
    with pytest.raises(ValueError, match=r"loss terms \['other'\]"):
        load_loss_state_dict(restored, {"other": {}})
    with pytest.raises(TypeError, match="term_dict"):
        loss_state_dict(torch.nn.MSELoss())


def test_torchdistill_queue_on_meta_maps_leaves_the_buffer():
    """torchdistill never moves a criterion: a loss follows its maps' device. A meta map (a model
    traced without data) gets a meta result and leaves the queue's values where they are."""
    criterion = _torchdistill_criterion()
    term = criterion.term_dict["pcd"][0]
    queue = term.queue.clone()
    s = torch.randn(2, 12, 4, 8, device="meta", requires_grad=True)
    loss = term({"predictor": {"output": s}}, {"adaptor": {"output": torch.randn(2, 12, 4, 8, device="meta")}})
    assert loss.device.type == "meta" and loss.shape == ()
    assert term.queue.device.type == "cpu" and torch.equal(term.queue, queue) and int(term.queue_ptr) == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: the queue's move to it cannot run here")
def test_torchdistill_queue_follows_the_maps_to_cuda():
    criterion = _torchdistill_criterion()  # built on the CPU, never moved, as torchdistill does
    s = torch.randn(2, 12, 4, 8, device="cuda", requires_grad=True)
    t = torch.randn(2, 12, 4, 8, device="cuda")
    loss = criterion({"student": {"predictor": {"output": s}}, "teacher": {"adaptor": {"output": t}}}, {}, None)
    loss.backward()
    term = criterion.term_dict["pcd"][0]
    assert term.queue.device == s.device and term.queue_ptr.device == s.device and s.grad is not None
    assert "queue" in dict(term.named_buffers())


# ---------------------------------------------------------------- lazy imports

@pytest.mark.parametrize("module, framework", [("mmrazor", "mmrazor"), ("torchdistill", "torchdistill")])
def test_integration_without_its_framework_says_what_to_install(module, framework):
    code = (f"import sys; sys.modules[{framework!r}] = None\n"  # as if not installed
            f"try:\n    import pcd_kernels.integrations.{module}\n"
            f"except ImportError as e:\n    print(e)\n    sys.exit(3)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 3, result.stderr
    assert f"needs {framework}" in result.stdout and "pip install" in result.stdout
