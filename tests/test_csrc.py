"""The CUDA extension's contract with Python, checked without a GPU: the numbers both sides use
(negatives modes, dtype codes) and the launch-parameter structs the wrappers fill by field name.

The header tests read csrc/ as text and always run; the others need the built pcd_kernels._C (its
launchers check their arguments before any CUDA call, so they run on a machine without a GPU)."""
import math
import re
from pathlib import Path

import pytest
import torch

from pcd_kernels._conventions import NEGATIVES_MODES, NORM_EPS, pixel_rows
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
                                           ("AttentionMap", "PCD_KERNELS_ATTENTION_MAP"),
                                           ("AttentionRows", "PCD_KERNELS_ATTENTION_ROWS")])
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
    student, teacher = torch.randn(B, C, H, W, dtype=torch.float16), torch.randn(B, C, H, W, dtype=torch.float16)
    queue = torch.randn(C, K, dtype=torch.float16).t()  # strided rows
    extra, mask = torch.randn(6, C, dtype=torch.float16), torch.rand(B, H, W) > 0.3
    inp = cuda_contrastive._Inputs(student, teacher, queue, extra, mask, torch.ones(6, dtype=torch.bool),
                                   negatives, 0.2, True)
    loss = torch.empty(B * H * W)
    p = inp.params(loss=loss.data_ptr(), keys_are_teacher=True)
    assert (p.device, p.stream, int(p.dtype), int(p.negatives)) == (0, 1234, 1, NEGATIVES_MODES[negatives])
    assert (p.n_rows, p.hw, p.channels, p.row_stride) == (B * H * W, H * W, C, 8)
    for field in ("anchors", "teacher", "queue", "inv_anchors", "inv_teacher", "inv_queue", "valid"):
        assert getattr(p, field) == getattr(inp, field).data_ptr() != 0, field
    for field in ("anchors", "teacher", "queue"):  # the operands the kernels copy: (rows, row_stride) contiguous
        operand = getattr(inp, field)
        assert operand.shape[1] == 8 and operand.is_contiguous() and operand.dtype == torch.float16, field
    assert p.n_queue == K
    batch = negatives == "batch"
    assert p.n_extra == (6 if batch else 0)
    assert (p.extra != 0, p.valid_extra != 0) == (batch, batch)
    if batch:
        assert p.extra == inp.extra.data_ptr() and inp.extra.shape == (6, 8)
    assert p.logit_scale == pytest.approx(1 / (0.2 * math.log(2)))
    assert p.inv_temperature == pytest.approx(5.0)
    assert (p.loss, p.keys_are_teacher, p.lse2, p.grad_keys) == (loss.data_ptr(), True, 0, 0)


def _expected_operand(rows, dtype, normalize, valid=None):
    """The operand the kernels read, in float64: x (rounded to dtype) times 1 / max(||x||, eps) when
    normalising, rounded to dtype; rows where ``valid`` is False 0; padded with zeros to a multiple
    of 8 channels. And inv, proj (float64, per row)."""
    x = rows.to(dtype).double()
    norms = torch.linalg.vector_norm(x, dim=1)
    inv = 1 / norms.clamp_min(NORM_EPS)
    proj = torch.where(norms >= NORM_EPS, inv, torch.zeros_like(inv))
    y = (x * inv[:, None]).to(dtype).double() if normalize else x
    if valid is not None:
        y = torch.where(valid[:, None], y, torch.zeros_like(y))
    return torch.nn.functional.pad(y, (0, -rows.shape[1] % 8)), inv, proj


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("channels", [5, 13, 16])
@pytest.mark.parametrize("normalize", [True, False])
def test_contrastive_operands_are_prepared_for_the_kernels(dtype, channels, normalize):
    """What _Inputs hands the kernels (csrc/include/pcd_kernels/pixel_contrastive.h): every operand a
    contiguous (rows, row_stride) matrix in dtype, x * inv rounded once when normalising, masked rows
    0 (NaN there included), channels past C 0; inv and proj per row (proj = inv where ||x|| >= eps,
    else 0: a zero row has both cases' inv, 1 / eps, and proj 0). CPU tensors: nothing launches."""
    B, C, H, W, K, E = 2, channels, 3, 4, 6, 5
    g = torch.Generator().manual_seed(channels)
    student = torch.randn(B, C, H, W, generator=g).to(dtype)
    teacher = torch.randn(B, C, H, W, generator=g).to(dtype)
    queue = (torch.randn(C, K, generator=g) * 3).to(dtype).t()  # strided rows
    extra = torch.randn(E, C, generator=g).to(dtype)
    mask = torch.rand(B, H, W, generator=g) > 0.3
    mask[0, 0, 0], mask[0, 0, 1] = True, False
    extra_mask = torch.tensor([True, False, True, True, False])
    student[0, :, 0, 0] = 0  # a zero row among the valid pixels
    teacher[0, :, 0, 0] = 0
    student[0, :, 0, 1] = float("nan")  # masked out
    teacher[0, :, 0, 1] = float("nan")
    queue[2] = 0
    extra[0] = 0
    extra[1] = float("nan")  # masked out
    inp = cuda_contrastive._Inputs(student, teacher, queue, extra, mask, extra_mask, "batch", 0.1, normalize)
    assert inp.row_stride == -(-C // 8) * 8
    valid = mask.reshape(-1)
    for name, rows, rows_valid in (("anchors", pixel_rows(student), valid), ("teacher", pixel_rows(teacher), valid),
                                   ("queue", queue, None), ("extra", extra, extra_mask)):
        got = getattr(inp, name)
        assert got.dtype == dtype and got.shape == (rows.shape[0], inp.row_stride) and got.is_contiguous(), name
        want, inv, proj = _expected_operand(rows, dtype, normalize, rows_valid)
        # float32 arithmetic, rounded once: within one rounding of the float64 result
        torch.testing.assert_close(got.double(), want, rtol=torch.finfo(dtype).eps, atol=0, msg=name)
        assert not got[:, C:].any(), f"{name}: padding must be 0"
        if rows_valid is not None:
            assert not got[~rows_valid].any(), f"{name}: masked rows must be 0"
        if name == "extra":  # keys only: no gradient, no inv
            continue
        got_inv, got_proj = getattr(inp, f"inv_{name}"), getattr(inp, f"proj_{name}")
        if not normalize:
            assert got_inv is None and got_proj is None, name
            continue
        assert got_inv.dtype == got_proj.dtype == torch.float32, name
        live = rows_valid if rows_valid is not None else torch.ones(rows.shape[0], dtype=torch.bool)
        torch.testing.assert_close(got_inv.double()[live], inv[live], rtol=1e-6, atol=0, msg=name)
        torch.testing.assert_close(got_proj.double()[live], proj[live], rtol=1e-6, atol=0, msg=name)
    assert inp.inv_anchors is None or inp.proj_anchors[0] == 0 < inp.inv_anchors[0]  # the zero row
    assert inp.proj_queue is None or inp.proj_queue[2] == 0


def test_contrastive_operands_that_need_nothing_are_not_copied():
    student = torch.randn(2, 16, 3, 4, dtype=torch.bfloat16).to(memory_format=torch.channels_last)
    queue = torch.randn(7, 16, dtype=torch.bfloat16)
    inp = cuda_contrastive._Inputs(student, student, queue, None, None, None, "none", 0.2, False)
    assert inp.anchors.data_ptr() == inp.teacher.data_ptr() == student.data_ptr()
    assert inp.queue is queue and inp.row_stride == 16
    masked = cuda_contrastive._Inputs(student, student, queue, None, torch.ones(2, 3, 4, dtype=torch.bool), None,
                                      "none", 0.2, False)
    assert masked.anchors.data_ptr() != student.data_ptr() and masked.queue is queue
    # a view starting 8 bytes into its storage is copied: the kernels' copies move 16-byte pieces
    shifted = torch.randn(7 * 16 + 4, dtype=torch.bfloat16)[4:].view(7, 16)
    inp = cuda_contrastive._Inputs(student, student, shifted, None, None, None, "none", 0.2, False)
    assert shifted.data_ptr() % 16 == 8 and inp.queue.data_ptr() % 16 == 0 and torch.equal(inp.queue, shifted)


@needs_extension
def test_attention_wrapper_fills_every_map(cpu_launch):
    q, v = torch.randn(2, 8, 5, dtype=torch.float16), torch.randn(2, 8, 7, dtype=torch.float16)
    k = torch.randn(2, 7, 8, dtype=torch.float16).transpose(1, 2)  # channels-last strides
    lse2, grad_k = torch.empty(4, 5), torch.empty_like(k)
    launch = cuda_attention._Launch(q, k, v, 2, 0.5, lse2, grad_k=grad_k, grad_q=None)
    p = launch.params
    assert (p.device, p.stream, int(p.dtype)) == (0, 1234, _extension.DTYPE_CODES["float16"])
    assert (p.batch, p.heads, p.head_dim, p.lq, p.lk, p.scale) == (2, 2, 4, 5, 7, 0.5)
    assert (p.lse2, p.delta, p.grad_q.data, p.out.data, p.grad_out.data) == (lse2.data_ptr(), 0, 0, 0, 0)
    m = p.grad_k
    assert (m.data, m.stride_b, m.stride_c, m.stride_l) == (grad_k.data_ptr(), *grad_k.stride())
    # head dim 4: every operand copied to (B, heads, L, 8) rows, kept alive by the launch
    for field, t in (("q", q), ("k", k), ("v", v)):
        r = getattr(p, field)
        rows = next(x for x in launch.tensors if x.data_ptr() == r.data)
        L = t.shape[2]
        assert rows.shape == (2, 2, L, 8) and rows.is_contiguous(), field
        assert (r.stride_b, r.stride_h, r.stride_l) == (2 * L * 8, L * 8, 8), field
    with pytest.raises(TypeError, match="one dtype and device"):
        cuda_attention._Launch(q, k.double(), v, 2, 0.5, lse2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("heads, head_dim", [(3, 8), (2, 20), (1, 5), (2, 128)])
def test_attention_operands_are_rows_for_the_kernels(dtype, heads, head_dim):
    """What the kernels read (pixel_attention.h: AttentionRows): row (b, h, l) at b * s_b + h * s_h +
    l * s_l holds the head's channels, 16-byte aligned, zeros up to a multiple of 8; channel-major
    maps are copied, channels-last ones with d a multiple of 8 read in place. CPU tensors."""
    B, L = 2, 11
    C = heads * head_dim
    g = torch.Generator().manual_seed(head_dim)
    channel_major = torch.randn(B, C, L, generator=g).to(dtype)
    channels_last = torch.randn(B, L, C, generator=g).to(dtype).transpose(1, 2)
    sliced = torch.randn(B, 3 * C, L, generator=g).to(dtype)[:, C:2 * C]  # a channel slice of a fused map
    for name, x in (("channel-major", channel_major), ("channels-last", channels_last), ("slice", sliced)):
        rows, (stride_b, stride_h, stride_l) = cuda_attention._rows(x, heads)
        in_place = name == "channels-last" and head_dim % 8 == 0
        assert (rows.data_ptr() == x.data_ptr()) == in_place, name
        assert rows.data_ptr() % 16 == 0 and stride_b % 8 == stride_h % 8 == stride_l % 8 == 0, name
        ld = -(-head_dim // 8) * 8
        flat = rows.reshape(-1) if not in_place else None
        for b in range(B):
            for h in range(heads):
                for pos in range(L):
                    at = b * stride_b + h * stride_h + pos * stride_l
                    want = x[b, h * head_dim:(h + 1) * head_dim, pos]
                    if in_place:
                        got = torch.as_strided(x, (head_dim,), (1,), x.storage_offset() + at)
                    else:
                        got = flat[at:at + ld]
                        assert not got[head_dim:].any(), f"{name}: padding must be 0"
                        got = got[:head_dim]
                    assert torch.equal(got, want), (name, b, h, pos)


@needs_extension
def test_launchers_refuse_bad_arguments_before_any_cuda_call():
    ext = _extension.extension()
    ok = dict(n_rows=4, hw=4, channels=3, row_stride=8, dtype=_extension.DTYPE_CODES["float16"])
    contrastive = _extension.struct(ext.PixelContrastiveParams, **ok)
    for field, value, message in (
            ("negatives", 3, "negatives code must be 0"),
            ("dtype", 0, r"take dtype code 1 \(float16\) or 2 \(bfloat16\), got 0"),
            ("dtype", 3, r"take dtype code 1 \(float16\) or 2 \(bfloat16\), got 3"),
            ("row_stride", 0, "read operand rows of row_stride >= C elements, a multiple of 8"),
            ("row_stride", 12, "read operand rows of row_stride >= C elements, a multiple of 8"),
            ("row_stride", 3, "read operand rows of row_stride >= C elements, a multiple of 8"),
            ("queue", 1032, "read operands that start 16-byte aligned, got address 1032"),
            ("anchors", 1025, "read operands that start 16-byte aligned")):
        for launch in (ext.pixel_contrastive_forward, ext.pixel_contrastive_backward_anchors,
                       ext.pixel_contrastive_backward_keys):
            with pytest.raises(ValueError, match=message):
                launch(_extension.struct(ext.PixelContrastiveParams, **{**ok, field: value}))
    with pytest.MonkeyPatch.context() as env:  # the extension reads it at each launch
        env.setenv("PCD_KERNELS_CUDA_TMA", "off")
        for launch in (ext.pixel_contrastive_forward, ext.pixel_contrastive_backward_anchors,
                       ext.pixel_contrastive_backward_keys):
            with pytest.raises(ValueError, match="PCD_KERNELS_CUDA_TMA must be 0 .*, 1 .* or unset .*, got 'off'"):
                launch(contrastive)
    contrastive.grad_teacher, contrastive.negatives = 1, NEGATIVES_MODES["image"]
    with pytest.raises(ValueError, match="teacher gradient in negatives='none' mode only"):
        ext.pixel_contrastive_backward_anchors(contrastive)
    contrastive.hw = 3
    with pytest.raises(ValueError, match="multiple of hw"):
        ext.pixel_contrastive_forward(contrastive)
    attention = _extension.struct(ext.PixelAttentionParams, batch=1, heads=2, head_dim=4, lq=3, lk=0,
                                  dtype=_extension.DTYPE_CODES["float16"])
    with pytest.raises(ValueError, match="at least one position"):
        ext.pixel_attention_forward(attention)
    attention.lk, attention.head_dim = 3, 129
    with pytest.raises(ValueError, match="head dims up to 128"):
        ext.pixel_attention_backward_q(attention)
    attention.head_dim = 4
    for dtype in (0, 3):  # float32 and no dtype: the kernels take 16-bit types only
        attention.dtype = dtype
        for launch in (ext.pixel_attention_forward, ext.pixel_attention_backward_delta,
                       ext.pixel_attention_backward_kv, ext.pixel_attention_backward_q):
            with pytest.raises(ValueError, match=rf"take dtype code 1 \(float16\) or 2 \(bfloat16\), got {dtype}"):
                launch(attention)
    attention.dtype = _extension.DTYPE_CODES["bfloat16"]
    rows = dict(data=1024, stride_b=64, stride_h=16, stride_l=8)
    for name in ("q", "k", "v", "grad_out"):
        setattr(attention, name, _extension.struct(ext.AttentionRows, **rows))
    for field, value in (("data", 0), ("data", 1032), ("stride_b", 4), ("stride_h", 12), ("stride_l", 1)):
        for name, launch in (("k", ext.pixel_attention_forward), ("grad_out", ext.pixel_attention_backward_delta),
                             ("q", ext.pixel_attention_backward_kv), ("v", ext.pixel_attention_backward_q)):
            setattr(attention, name, _extension.struct(ext.AttentionRows, **{**rows, field: value}))
            with pytest.raises(ValueError, match=f"read {name} as rows at a 16-byte aligned address"):
                launch(attention)
            setattr(attention, name, _extension.struct(ext.AttentionRows, **rows))
