"""SpatialReLU and SpatialAdaptor.from_mlp: pooling the adaptor's map equals the MLP on the pooled
input (eval mode), with the MLP's weights and running statistics."""
import pytest
import torch
from torch import nn

from pcd_kernels import SpatialAdaptor, SpatialReLU


def test_spatial_relu_pools_to_relu_of_pooled():
    x = torch.randn(3, 17, 5, 7, dtype=torch.float64)
    out = SpatialReLU()(x)
    torch.testing.assert_close(out.mean((2, 3)), torch.relu(x.mean((2, 3))))
    kept = x.mean((2, 3)) > 0
    assert torch.equal(out[kept], x[kept]) and (out[~kept] == 0).all()


def test_spatial_relu_gradient_and_nan():
    x = torch.randn(2, 4, 3, 3, requires_grad=True)
    SpatialReLU()(x).sum().backward()
    keep = (x.detach().mean((2, 3)) > 0).float()[:, :, None, None].expand_as(x)
    torch.testing.assert_close(x.grad, keep)
    y = torch.randn(1, 2, 3, 3)
    y[0, 1, 2, 2] = float("nan")
    out = SpatialReLU()(y)
    assert out[0, 1, 2, 2].isnan() and out.mean((2, 3))[0, 1].isnan()


def _heads():
    def trained_bn(n, affine=True):
        bn = nn.BatchNorm1d(n, affine=affine)
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        if affine:
            nn.init.normal_(bn.weight)
            nn.init.normal_(bn.bias)
        return bn

    return {
        "mocov3-style": nn.Sequential(nn.Linear(24, 40), trained_bn(40), nn.ReLU(inplace=True),
                                      nn.Linear(40, 40), trained_bn(40), nn.ReLU(), nn.Linear(40, 12, bias=False),
                                      trained_bn(12, affine=False)),
        "nested": nn.Sequential(nn.Sequential(nn.Linear(24, 16), nn.ReLU()), nn.Identity(), nn.Linear(16, 8)),
        "single-linear": nn.Linear(24, 6),
    }


@pytest.mark.parametrize("name", list(_heads()))
@pytest.mark.parametrize("size", [(7, 7), (5, 11)], ids=["7x7", "5x11"])
def test_pooled_adaptor_equals_mlp_on_pooled_input(name, size):
    mlp = _heads()[name].double().eval()
    adaptor = SpatialAdaptor.from_mlp(mlp)
    assert not adaptor.training
    x = torch.randn(4, 24, *size, dtype=torch.float64)
    out = adaptor(x)
    assert out.dtype == torch.float64 and out.shape[2:] == size
    torch.testing.assert_close(out.mean((2, 3)), mlp(x.mean((2, 3))))


def test_weights_and_running_statistics_are_copied_not_shared():
    mlp = _heads()["mocov3-style"].eval()
    adaptor = SpatialAdaptor.from_mlp(mlp)
    kinds = [type(m).__name__ for m in adaptor]
    assert kinds == ["Conv2d", "BatchNorm2d", "SpatialReLU", "Conv2d", "BatchNorm2d", "SpatialReLU", "Conv2d",
                     "BatchNorm2d"]
    torch.testing.assert_close(adaptor[0].weight[:, :, 0, 0], mlp[0].weight)
    torch.testing.assert_close(adaptor[1].running_var, mlp[1].running_var)
    assert adaptor[7].weight is None and adaptor[6].bias is None
    with torch.no_grad():
        adaptor[0].weight.zero_()
    assert mlp[0].weight.abs().sum() > 0


def test_sync_batchnorm_heads_convert():
    mlp = nn.SyncBatchNorm.convert_sync_batchnorm(_heads()["mocov3-style"]).eval()
    x = torch.randn(2, 24, 3, 4)
    assert any(isinstance(m, nn.SyncBatchNorm) for m in mlp.modules())
    torch.testing.assert_close(SpatialAdaptor.from_mlp(mlp)(x).mean((2, 3)),
                               _eval_mlp_copy(mlp)(x.mean((2, 3))), rtol=1e-5, atol=1e-5)


def _eval_mlp_copy(mlp):
    """The same head with BatchNorm1d (SyncBatchNorm cannot run on CPU outside a process group)."""
    layers = [nn.BatchNorm1d(m.num_features, affine=m.affine) if isinstance(m, nn.SyncBatchNorm) else m
              for m in mlp]
    for new, old in zip(layers, mlp):
        if new is not old:
            new.load_state_dict(old.state_dict())
    return nn.Sequential(*layers).eval()


def test_train_mode_is_carried_over():
    mlp = _heads()["mocov3-style"].train()
    assert SpatialAdaptor.from_mlp(mlp).training


@pytest.mark.parametrize("layer", [nn.GELU(), nn.LayerNorm(24), nn.Dropout(0.1), nn.Conv1d(24, 24, 1)],
                         ids=lambda m: type(m).__name__)
def test_unsupported_layers_are_named(layer):
    mlp = nn.Sequential(nn.Linear(24, 24), layer)
    with pytest.raises(TypeError, match=f"layer 1 \\({type(layer).__name__}\\) is not supported"):
        SpatialAdaptor.from_mlp(mlp)
    with pytest.raises(TypeError, match="mlp must be an nn.Module"):
        SpatialAdaptor.from_mlp("head")


@pytest.mark.parametrize("norm", [nn.BatchNorm1d, nn.SyncBatchNorm], ids=lambda c: c.__name__)
def test_batch_norm_without_running_statistics_is_refused(norm):
    """Such a layer normalises with the statistics of the batch of pooled vectors, in eval mode too;
    a BatchNorm2d would use those of every pixel and break the pooling identity."""
    mlp = nn.Sequential(nn.Linear(24, 8), norm(8, track_running_stats=False)).eval()
    with pytest.raises(ValueError, match=r"layer 1 \(\w+\) has track_running_stats=False"):
        SpatialAdaptor.from_mlp(mlp)


def test_spatial_relu_names_bad_input():
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        SpatialReLU()([1.0, 2.0])
    with pytest.raises(ValueError, match=r"x must be a \(B, C, \*spatial\) tensor, got shape \(2, 3\)"):
        SpatialReLU()(torch.randn(2, 3))
