"""Tensors of the wrong kind (sparse layouts, complex or integer dtypes) get a TypeError naming the
argument at every entry point, instead of an error from deep inside torch or a silent cast."""
import pytest
import torch

from pcd_kernels import (MHSA2d, AfDCDLoss, PixelContrastiveLoss, SpatialReLU, omni_contrastive_loss,
                         pixel_attention, pixel_contrastive_loss, pixel_relation_loss)


def _calls():
    """(entry point, argument, call taking that argument's replacement) for every tensor argument."""
    s, q, mask = torch.randn(2, 8, 4, 4), torch.randn(5, 8), torch.rand(2, 4, 4) > 0.5

    def loss(student=s, teacher=s, queue=q, mask=mask):
        return pixel_contrastive_loss(student, teacher, queue, mask=mask)

    def module(student=s, teacher=s, mask=mask):
        return PixelContrastiveLoss(negatives="image")(student, teacher, mask)

    def omni(student=s, teacher=s):
        return omni_contrastive_loss(student, teacher, groups=2, patch_size=(2, 2), pool_size=0)

    def relation(student=s, teacher=s, keys=q, mask=mask):
        return pixel_relation_loss(student, teacher, keys, mask=mask)

    def attention(q=s, k=s, v=s):
        return pixel_attention(q, k, v, num_heads=2)

    def afdcd(feat_S=s, feat_T=s):
        return AfDCDLoss(8, 8, M_ocd=2, pool_size=0, patch_size=(2, 2))(feat_S, feat_T)

    return [
        *(("pixel_contrastive_loss", name, lambda x, n=name: loss(**{n: x})) for name in ("student", "teacher", "queue")),
        *(("PixelContrastiveLoss", name, lambda x, n=name: module(**{n: x})) for name in ("student", "teacher")),
        ("PixelContrastiveLoss.enqueue", "keys", PixelContrastiveLoss(queue_size=4, dim=8).enqueue),
        *(("omni_contrastive_loss", name, lambda x, n=name: omni(**{n: x})) for name in ("student", "teacher")),
        *(("pixel_relation_loss", name, lambda x, n=name: relation(**{n: x})) for name in ("student", "teacher", "keys")),
        *(("pixel_attention", name, lambda x, n=name: attention(**{n: x})) for name in ("q", "k", "v")),
        ("SpatialReLU", "x", SpatialReLU()),
        ("MHSA2d", "x", MHSA2d(8, num_heads=2)),
        *(("AfDCDLoss", name, lambda x, n=name: afdcd(**{n: x})) for name in ("feat_S", "feat_T")),
    ], {"student": s, "teacher": s, "queue": q, "keys": q[:3], "q": s, "k": s, "v": s, "x": s, "feat_S": s,
        "feat_T": s}


CALLS, VALUES = _calls()
IDS = [f"{entry}-{name}" for entry, name, _ in CALLS]


@pytest.mark.parametrize("entry,name,call", CALLS, ids=IDS)
def test_sparse_tensors_are_named(entry, name, call):
    with pytest.raises(TypeError, match=f"^{name} must be a dense \\(strided\\) tensor, got torch.sparse_coo; "
                                        f"call {name}.to_dense\\(\\) first"):
        call(VALUES[name].to_sparse())


@pytest.mark.parametrize("entry,name,call", CALLS, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.complex64, torch.int64, torch.bool], ids=str)
def test_non_real_float_tensors_are_named(entry, name, call, dtype):
    x = VALUES[name]
    x = x.to(dtype) if dtype != torch.complex64 else torch.complex(x, torch.ones_like(x))
    with pytest.raises(TypeError, match=f"^{name} must be float16, bfloat16, float32 or float64, got {dtype}"):
        call(x)


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
@pytest.mark.parametrize("make", [torch.Tensor.to_sparse, torch.Tensor.to_sparse_csr], ids=["coo", "csr"])
def test_sparse_mask_and_two_dimensional_layouts(make):
    s = torch.randn(2, 8, 4, 4)
    mask = torch.rand(2, 4, 4) > 0.5
    with pytest.raises(TypeError, match="^mask must be a dense \\(strided\\) tensor"):
        pixel_contrastive_loss(s, s, mask=mask.to_sparse())
    with pytest.raises(TypeError, match="^queue must be a dense \\(strided\\) tensor"):
        pixel_contrastive_loss(s, s, make(torch.randn(5, 8)))
    with pytest.raises(TypeError, match="^keys must be a dense \\(strided\\) tensor"):
        PixelContrastiveLoss(queue_size=4, dim=8).enqueue(make(torch.randn(3, 8)))
