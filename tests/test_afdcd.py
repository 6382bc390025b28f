"""AfDCDLoss: the official OmniContrastiveFeatureLoss semantics, its two terms, its checkpoints."""
import pytest
import torch
import torch.nn.functional as F

from _helpers import backend_cases
from pcd_kernels import AfDCDLoss
from pcd_kernels.nn.afdcd import EnhancedProjector
from pcd_kernels.reference import official_omni_contrastive_loss


def official_terms(criterion, feat_S, feat_T, crop=None):
    """The official forward with rand_mask=False, written out with the module's own layers."""
    feat_S = criterion.align(feat_S)
    B, _, H, W = feat_T.shape
    mask = torch.ones(B, 1, H, W, dtype=feat_S.dtype)
    mask[:, :, H // 3:2 * H // 3, W // 3:2 * W // 3] = 0
    generated = criterion.generator(feat_S * mask)
    fd = F.mse_loss(generated, feat_T, reduction="sum") / B
    ctr = official_omni_contrastive_loss(generated, feat_T, criterion.M_ocd, criterion.patch_size,
                                         criterion.pool_size, criterion.tau_ocd, crop=crop)
    return fd, ctr


@pytest.mark.parametrize("enhance", [False, True], ids=["conv-generator", "enhanced-projector"])
@pytest.mark.parametrize("channels", [(8, 32), (32, 32)], ids=["align-conv", "equal-channels"])
def test_terms_match_the_official_formula(channels, enhance):
    student_channels, teacher_channels = channels
    criterion = AfDCDLoss(student_channels, teacher_channels, M_ocd=8, pool_size=2, patch_size=(2, 2),
                          rand_mask=False, enhance_projector=enhance).double()
    assert isinstance(criterion.align, torch.nn.Identity) == (student_channels == teacher_channels)
    assert isinstance(criterion.generator, EnhancedProjector) == enhance
    feat_S = torch.randn(2, student_channels, 12, 12, dtype=torch.float64)
    feat_T = torch.randn(2, teacher_channels, 12, 12, dtype=torch.float64)
    fd, ctr = criterion(feat_S, feat_T)
    fd_ref, ctr_ref = official_terms(criterion, feat_S, feat_T)
    torch.testing.assert_close(fd, fd_ref)
    torch.testing.assert_close(ctr, ctr_ref)
    params = [p for p in criterion.parameters()]
    grads = torch.autograd.grad(fd + ctr, params)
    grads_ref = torch.autograd.grad(fd_ref + ctr_ref, params)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref)


@pytest.mark.parametrize("backend,device,dtype", backend_cases("omni_contrastive_loss", dtypes=(torch.float32,)))
def test_module_in_float32_on_each_backend(backend, device, dtype):
    torch.manual_seed(0)
    reference = AfDCDLoss(8, 16, M_ocd=4, pool_size=2, patch_size=(2, 2), rand_mask=False).double()
    criterion = AfDCDLoss(8, 16, M_ocd=4, pool_size=2, patch_size=(2, 2), rand_mask=False, backend=backend)
    criterion.load_state_dict(reference.state_dict())
    criterion = criterion.to(device, dtype)
    feat_S, feat_T = torch.randn(2, 8, 8, 8, dtype=torch.float64), torch.randn(2, 16, 8, 8, dtype=torch.float64)
    expected = official_terms(reference, feat_S, feat_T)
    got = criterion(feat_S.to(device, dtype), feat_T.to(device, dtype))
    for value, ref in zip(got, expected):
        assert value.dtype == torch.float32
        torch.testing.assert_close(value.double().cpu(), ref, rtol=1e-4, atol=1e-4)
    grads = torch.autograd.grad(sum(got), list(criterion.parameters()))
    grads_ref = torch.autograd.grad(sum(expected), list(reference.parameters()))
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g.double().cpu(), g_ref, rtol=2e-3, atol=1e-3)


def test_random_mask_draws_from_the_cpu_generator_like_the_official_code():
    criterion = AfDCDLoss(4, 4, M_ocd=2, mask_ratio=0.6)
    torch.manual_seed(7)
    mask = criterion.pixel_mask(2, 8, 8, "cpu")
    torch.manual_seed(7)
    official = torch.where(torch.rand((2, 1, 8, 8)) > 1 - 0.6, 0, 1)
    assert torch.equal(mask, official.float())


def test_camvid_crops_to_44_without_pooling():
    criterion = AfDCDLoss(16, 16, M_ocd=4, patch_size=(4, 4), rand_mask=False, dataset="camvid").double()
    feat_S = torch.randn(1, 16, 48, 50, dtype=torch.float64)
    feat_T = torch.randn(1, 16, 48, 50, dtype=torch.float64)
    _, ctr = criterion(feat_S, feat_T)
    _, ctr_ref = official_terms(criterion, feat_S, feat_T, crop=44)
    torch.testing.assert_close(ctr, ctr_ref)


def test_random_mask_zeroes_the_given_share_of_pixels():
    criterion = AfDCDLoss(4, 4, M_ocd=2, mask_ratio=0.75)
    mask = criterion.pixel_mask(8, 64, 64, "cpu")
    assert mask.shape == (8, 1, 64, 64) and set(mask.unique().tolist()) <= {0.0, 1.0}
    assert abs((mask == 0).float().mean().item() - 0.75) < 0.02
    assert (criterion.pixel_mask(2, 16, 16, "cpu") != mask[:2, :, :16, :16]).any()  # fresh each call


class OfficialOmniContrastiveFeatureLoss(torch.nn.Module):
    """The parameters of the official ``OmniContrastiveFeatureLoss`` (losses/ocmgd.py) as released:
    ``align`` when the channels differ, ``projetor`` (sic), the enhanced projector's ``block_*``
    and ``adpator_*`` (sic)."""

    def __init__(self, student_channels, teacher_channels, enhance_projector):
        super().__init__()
        conv = lambda k: torch.nn.Conv2d(teacher_channels, teacher_channels, kernel_size=k, padding=k // 2)
        if student_channels != teacher_channels:
            self.align = torch.nn.Conv2d(student_channels, teacher_channels, kernel_size=1, stride=1, padding=0)
        self.generator = None
        if enhance_projector:
            self.projetor = torch.nn.Module()
            self.projetor.block_1 = torch.nn.Sequential(conv(3), torch.nn.ReLU(inplace=True))
            self.projetor.block_2 = torch.nn.Sequential(conv(3), torch.nn.ReLU(inplace=True))
            self.projetor.adpator_1, self.projetor.adpator_2 = conv(3), conv(3)
        else:
            self.projetor = torch.nn.Sequential(conv(3), torch.nn.ReLU(inplace=True), conv(3))


@pytest.mark.parametrize("enhance", [False, True], ids=["conv-generator", "enhanced-projector"])
@pytest.mark.parametrize("channels", [(8, 16), (16, 16)], ids=["align-conv", "equal-channels"])
def test_state_dict_loads_into_the_official_module_and_back(channels, enhance):
    ours = AfDCDLoss(*channels, M_ocd=4, enhance_projector=enhance)
    official = OfficialOmniContrastiveFeatureLoss(*channels, enhance)
    assert list(ours.state_dict()) == list(official.state_dict())
    official.load_state_dict(ours.state_dict())  # strict, both ways
    for value in official.state_dict().values():
        value.normal_()
    ours.load_state_dict(official.state_dict())
    for key, value in official.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), key
    assert ours.generator is ours.projetor


def test_state_dicts_saved_under_earlier_names_load():
    outer = torch.nn.Module()  # nested under a name that holds "adaptor_" itself
    outer.adaptor_loss = AfDCDLoss(8, 16, M_ocd=4, enhance_projector=True)
    earlier = {k.replace("projetor.", "generator.").replace(".adpator_", ".adaptor_"): torch.randn_like(v)
               for k, v in outer.state_dict().items()}
    outer.load_state_dict(earlier)
    criterion = outer.adaptor_loss
    torch.testing.assert_close(criterion.projetor.adpator_1.weight, earlier["adaptor_loss.generator.adaptor_1.weight"])
    torch.testing.assert_close(criterion.align.weight, earlier["adaptor_loss.align.weight"])


@pytest.mark.parametrize("kwargs,message", [
    (dict(teacher_channels=30), "teacher_channels = 30 must be divisible by M_ocd = 16"),
    (dict(tau_ocd=0), "tau_ocd"),
    (dict(mask_ratio=1.5), "mask_ratio"),
    (dict(patch_size=(0, 4)), "patch_size"),
    (dict(pool_size=-2), "pool_size"),
    (dict(backend="gpu"), "backend"),
])
def test_bad_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AfDCDLoss(**{"student_channels": 8, "teacher_channels": 32, **kwargs})


def test_mismatched_maps_are_named():
    criterion = AfDCDLoss(8, 16, M_ocd=4)
    with pytest.raises(ValueError, match="aligned student features"):
        criterion(torch.randn(1, 8, 8, 8), torch.randn(1, 16, 8, 4))
