"""The CUDA extension's contract with Python, checked without a GPU: the numbers both sides use
(negatives modes, dtype codes) and the launch-parameter structs the wrappers fill by field name.

The header tests read csrc/ as text and always run; the others need the built pcd_kernels._C (its
launchers check their arguments before any CUDA call, so they run on a machine without a GPU)."""
import math
import re
from pathlib import Path

import pytest
import torch

from pcd_kernels._conventions import NEGATIVES_MODES
from pcd_kernels.backends.cuda import _extension
from pcd_kernels.backends.cuda import pixel_attention as cuda_attention
from pcd_kernels.backends.cuda import pixel_contrastive as cuda_contrastive

INCLUDE = Path(__file__).resolve().parents[1] / "csrc" / "include" / "pcd_kernels"

needs_extension = pytest.mark.skipif(not _extension.is_built(),
                                     reason=f"pcd_kernels._C is not built: {_extension.unavailable_reason()}")


def _x_list(macro):
    """The entries of the X list ``macro`` (``#define macro(X) X(a, b) ...`` in a csrc header), as
    tuples of their arguments, with the lists it includes expanded in place."""
    for header in sorted(INCLUDE.glob("*.h")):
        match = re.search(rf"^#define {macro}\(X\)((?:.*\\\n)*.*)$", header.read_text(), re.M)
        if match:
            break
    else:
        raise AssertionError(f"no #define {macro}(X) in {INCLUDE}")
    body = re.sub(r"/\*.*?\*/", "", match.group(1).replace("\\\n", " "))
    entries = []
    for included, args in re.findall(r"(\w+)\(X\)|\bX\(([^()]*)\)", body):
        entries += _x_list(included) if included else [tuple(a.strip() for a in args.split(","))]
    return entries


def _numbers(macro):
    """{Python name: number} of an X(enumerator, Python name, number) list."""
    return {name: int(number) for _, name, number in _x_list(macro)}


def test_negatives_modes_in_the_header_are_pythons():
    assert _numbers("PCD_KERNELS_NEGATIVES") == NEGATIVES_MODES


def test_dtype_codes_in_the_header_are_pythons():
    assert _numbers("PCD_KERNELS_DTYPES") == _extension.DTYPE_CODES


@needs_extension
def test_extension_exports_the_same_numbers():
    ext = _extension.extension()
    assert {name: int(value) for name, value in ext.Negatives.__members__.items()} == NEGATIVES_MODES
    assert {name: int(value) for name, value in ext.DType.__members__.items()} == _extension.DTYPE_CODES


@needs_extension
@pytest.mark.parametrize("struct, macro", [("PixelContrastiveParams", "PCD_KERNELS_PIXEL_CONTRASTIVE_PARAMS"),
                                           ("PixelAttentionParams", "PCD_KERNELS_PIXEL_ATTENTION_PARAMS"),
                                           ("AttentionMap", "PCD_KERNELS_ATTENTION_MAP")])
def test_structs_bind_exactly_the_declared_fields(struct, macro):
    cls = getattr(_extension.extension(), struct)
    declared = [name for _, name in _x_list(macro)]
    assert len(set(declared)) == len(declared)
    assert {a for a in dir(cls) if not a.startswith("_")} == set(declared)
    with pytest.raises(AttributeError):
        _extension.struct(cls, no_such_field=1)


@needs_extension
def test_attention_limits_are_the_kernels():
    ext = _extension.extension()
    assert (ext.pixel_attention_max_head_dim, ext.pixel_attention_tile, ext.pixel_attention_max_blocks) == (
        cuda_attention.MAX_HEAD_DIM, cuda_attention.TILE, cuda_attention.MAX_BLOCKS)


@pytest.fixture
def cpu_launch(monkeypatch):
    """The wrappers' params filled from CPU tensors: a made-up stream and device 0."""
    monkeypatch.setattr(_extension, "stream_of", lambda tensor: 1234)
    monkeypatch.setattr(_extension, "device_index", lambda tensor: 0)


@needs_extension
@pytest.mark.parametrize("negatives", sorted(NEGATIVES_MODES))
def test_contrastive_wrapper_fills_every_input(cpu_launch, negatives):
    B, C, H, W, K = 2, 5, 3, 4, 7
    student, teacher = torch.randn(B, C, H, W), torch.randn(B, C, H, W)
    queue = torch.randn(C, K).t()  # strided rows
    extra, mask = torch.randn(6, C), torch.rand(B, H, W) > 0.3
    inp = cuda_contrastive._Inputs(student, teacher, queue, extra, mask, torch.ones(6, dtype=torch.bool),
                                   negatives, 0.2, True)
    loss = torch.empty(B * H * W)
    p = inp.params(loss=loss.data_ptr(), keys_are_teacher=True)
    assert (p.device, p.stream, int(p.dtype), int(p.negatives)) == (0, 1234, 0, NEGATIVES_MODES[negatives])
    assert (p.n_rows, p.hw, p.channels) == (B * H * W, H * W, C)
    for field in ("anchors", "teacher", "inv_anchors", "inv_teacher", "inv_queue", "valid"):
        assert getattr(p, field) == getattr(inp, field).data_ptr() != 0, field
    assert (p.queue, p.n_queue, p.queue_stride_row, p.queue_stride_col) == (queue.data_ptr(), K, 1, K)
    batch = negatives == "batch"
    assert (p.n_extra, p.extra_stride_row, p.extra_stride_col) == ((6, C, 1) if batch else (0, 0, 0))
    assert (p.extra != 0, p.inv_extra != 0, p.valid_extra != 0) == (batch, batch, batch)
    assert p.logit_scale == pytest.approx(1 / (0.2 * math.log(2)))
    assert p.inv_temperature == pytest.approx(5.0)
    assert (p.loss, p.keys_are_teacher, p.lse2, p.grad_keys) == (loss.data_ptr(), True, 0, 0)


@needs_extension
def test_attention_wrapper_fills_every_map(cpu_launch):
    q, v = torch.randn(2, 8, 5), torch.randn(2, 8, 7)
    k = torch.randn(2, 7, 8).transpose(1, 2)  # channels-last strides
    lse2, grad_k = torch.empty(4, 5), torch.empty_like(k)
    p = cuda_attention._params(q, k, v, 2, 0.5, lse2, grad_k=grad_k, grad_q=None)
    assert (p.batch, p.heads, p.head_dim, p.lq, p.lk, p.scale) == (2, 2, 4, 5, 7, 0.5)
    assert (p.lse2, p.delta, p.grad_q.data, p.out.data) == (lse2.data_ptr(), 0, 0, 0)
    for field, t in (("q", q), ("k", k), ("v", v), ("grad_k", grad_k)):
        m = getattr(p, field)
        assert (m.data, m.stride_b, m.stride_c, m.stride_l) == (t.data_ptr(), *t.stride()), field
    with pytest.raises(TypeError, match="one dtype and device"):
        cuda_attention._params(q, k.double(), v, 2, 0.5, lse2)


@needs_extension
def test_launchers_refuse_bad_arguments_before_any_cuda_call():
    ext = _extension.extension()
    contrastive = _extension.struct(ext.PixelContrastiveParams, n_rows=4, hw=4, channels=3)
    for field, value, message in (("negatives", 3, "negatives code must be 0"), ("dtype", 3, "dtype code must be 0")):
        with pytest.raises(ValueError, match=message):
            ext.pixel_contrastive_forward(_extension.struct(ext.PixelContrastiveParams, n_rows=4, hw=4, channels=3,
                                                            **{field: value}))
    contrastive.grad_teacher, contrastive.negatives = 1, NEGATIVES_MODES["image"]
    with pytest.raises(ValueError, match="teacher gradient in negatives='none' mode only"):
        ext.pixel_contrastive_backward_anchors(contrastive)
    contrastive.hw = 3
    with pytest.raises(ValueError, match="multiple of hw"):
        ext.pixel_contrastive_forward(contrastive)
    attention = _extension.struct(ext.PixelAttentionParams, batch=1, heads=2, head_dim=4, lq=3, lk=0)
    with pytest.raises(ValueError, match="at least one position"):
        ext.pixel_attention_forward(attention)
    attention.lk, attention.head_dim = 3, 129
    with pytest.raises(ValueError, match="head dims up to 128"):
        ext.pixel_attention_backward_q(attention)
