"""Every Triton kernel compiles for sm_90 (H100/H200) and sm_80 (A100) with Triton's own ptxas,
no GPU needed, and the configurations tried first fit the chip's shared memory.

This does not show the kernels are right or fast on a GPU (that needs `make gpu-check`); it
catches what the CPU interpreter cannot: code that does not compile, or does not fit."""
import json
import os
import subprocess
import sys

import pytest

from _helpers import CUDA

_SCRIPT = r"""
import json, sys, torch
from pcd_kernels.triton import pixel_contrastive as pc
from pcd_kernels.triton._aot import compile_launch

def calls(dtype, C, negatives, masked):
    B, H, W, K = 4, 16, 16, 4096
    s = torch.empty(B, C, H, W, dtype=dtype); t = torch.empty_like(s); q = torch.empty(K, C, dtype=dtype)
    mask = torch.ones(B, H, W, dtype=torch.bool) if masked else None
    inp = pc._Inputs(s, t, q, None, mask, None, negatives, 0.2, True)
    loss = torch.empty(B, H, W); lse = torch.empty_like(loss); g = loss.reshape(-1)
    rows = torch.empty(B * H * W, C, dtype=dtype); q_rows = torch.empty(K, C, dtype=dtype)
    out = [pc.forward_call(inp, loss, lse),
           pc.anchor_backward_call(inp, loss, lse, g, rows, rows if negatives == "none" else None),
           pc.key_backward_call(inp, lse, g, torch.ones(1), q_rows, False)]
    if negatives != "none":
        out.append(pc.key_backward_call(inp, lse, g, torch.ones(1), rows, True))
    return out

arch, dtype, C, negatives, masked, tf32 = sys.argv[1:]
torch.backends.cuda.matmul.allow_tf32 = tf32 == "1"
results = []
for call in calls(getattr(torch, dtype), int(C), negatives, masked == "1"):
    bm, bn, warps, stages = pc.gpu_configs(call.kind, call.flags["PRECISION"])[0]
    usage = compile_launch(pc._KERNELS[call.kind], call.args, dict(call.flags, BLOCK_M=bm, BLOCK_N=bn),
                           int(arch), warps, stages, sass=True)
    results.append(dict(usage, kernel=call.kind, pixels=call.flags.get("KEYS_ARE_PIXELS")))
print(json.dumps(results))
"""

SHARED_LIMIT = {90: 227 * 1024, 80: 163 * 1024}
CASES = [  # (arch, dtype, C, negatives, masked, allow_tf32): flags and tilings kernels are built with
    (90, "bfloat16", 256, "batch", 1, 0),
    (90, "float16", 384, "none", 0, 0),    # C > 256: chunked channels
    (90, "float32", 40, "image", 1, 0),    # C not a multiple of 16, IEEE float32 dot
    (90, "float32", 256, "batch", 0, 1),   # float32 rows wider than one tile, TF32 dot
    (80, "bfloat16", 128, "image", 0, 0),
]


_OMNI_SCRIPT = r"""
import json, math, sys, torch
from pcd_kernels.triton import omni_contrastive as oc
from pcd_kernels.triton._aot import compile_launch

arch, dtype, dims, samples, groups = sys.argv[1:]
dims, samples, groups = int(dims), int(samples), int(groups)
dtype = getattr(torch, dtype)
packed = torch.empty(8, dims, samples, dtype=dtype)
per_sample = torch.empty(8, samples)
block = oc.tile(samples)
blocks = dict(SAMPLES_BLOCK=oc.samples_block(samples))
scales = (dims, samples, groups, 1.0 / (0.07 * math.log(2.0)))
launches = [
    (oc._forward_kernel, (packed, packed, per_sample, per_sample, *scales), dict(blocks, BLOCK_A=block)),
    (oc._anchor_backward_kernel, (packed, packed, per_sample, per_sample, packed, *scales, 1 / 0.07),
     dict(blocks, BLOCK_A=block)),
    (oc._key_backward_kernel, (packed, packed, per_sample, per_sample, packed, *scales, 1 / 0.07),
     dict(blocks, BLOCK_K=block)),
]
options = oc._launch_options()
print(json.dumps([dict(compile_launch(fn, args, constexprs, int(arch), options["num_warps"], options["num_stages"]),
                       kernel=fn.__name__) for fn, args, constexprs in launches]))
"""
OMNI_CASES = [  # (arch, dtype, dims per group, samples per patch, groups)
    (90, "bfloat16", 128, 256, 16),  # Cityscapes: C = 2048, 16 groups, 4x4 patches
    (90, "float32", 12, 96, 8),      # samples not a power of two
    (80, "float16", 32, 256, 16),
]


def _compile(script, case):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", script, *map(str, case)], capture_output=True, text=True,
                         timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(CUDA, reason="a GPU is here: the test suite runs the kernels on it instead")
@pytest.mark.parametrize("case", OMNI_CASES, ids=lambda c: "-".join(map(str, c)))
def test_omni_kernels_compile_for_gpu(case):
    results = _compile(_OMNI_SCRIPT, case)
    assert len(results) == 3
    for r in results:
        assert r["shared_bytes"] <= SHARED_LIMIT[case[0]], r
        assert r["registers"] <= 255, r


@pytest.mark.skipif(CUDA, reason="a GPU is here: the test suite runs the kernels on it instead")
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_kernels_compile_for_gpu(case):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", _SCRIPT, *map(str, case)], capture_output=True, text=True,
                         timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-4000:]
    results = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(results) == (3 if case[3] == "none" else 4)
    sixteen_bit = case[1] in ("bfloat16", "float16")
    for r in results:
        assert r["shared_bytes"] <= SHARED_LIMIT[case[0]], r
        assert r["registers"] <= 255, r
        if case[0] == 90 and (sixteen_bit or case[5]):  # tensor-core dtypes use Hopper's warpgroup MMA
            assert r["instructions"]["kernel"]["HGMMA"] > 0, f"no HGMMA on sm_90a: {r}"
        if sixteen_bit and r["kernel"] == "forward":
            # The forward spills nothing. The backward kernels still spill in their epilogues
            # (bench/kernels.py reports how much): a known defect, not yet fixed.
            assert r["stack_bytes"] == 0 and r["instructions"]["kernel"]["LDL"] == 0, f"registers spill: {r}"


_ATTENTION_SCRIPT = r"""
import json, sys, torch
from pcd_kernels.triton import pixel_attention as pa
from pcd_kernels.triton._aot import compile_launch

arch, dtype, head_dim, heads, tf32, which = sys.argv[1:]
torch.backends.cuda.matmul.allow_tf32 = tf32 == "1"
dtype, D, heads = getattr(torch, dtype), int(head_dim), int(heads)
# q, k, v as channel slices of one fused projection (what MHSA2d passes), 64 x 64 maps
q = torch.empty(2, 3 * heads * D, 4096, dtype=dtype)[:, :heads * D]
out = torch.empty(2, heads * D, 4096, dtype=dtype)
lse = torch.empty(2 * heads, 4096)
calls = [pa.forward_call(q, q, q, out, lse, heads, D ** -0.5)]
calls += pa.backward_calls(out, q, q, q, lse, lse, out, out, out, heads, D ** -0.5)
results = []
for call in calls:
    configs = call.configs()
    for bm, bn, warps, stages in (configs if which == "all" else configs[:1]):
        usage = compile_launch(pa._KERNELS[call.kind], call.args, dict(call.flags, BLOCK_M=bm, BLOCK_N=bn),
                               int(arch), warps, stages)
        results.append(dict(usage, kernel=call.kind, config=[bm, bn, warps, stages]))
print(json.dumps(results))
"""
ATTENTION_CASES = [  # (arch, dtype, head dim, heads, allow_tf32, configurations, spills allowed)
    (90, "bfloat16", 32, 8, 0, "all", False),   # the benchmark's shape: every autotune candidate
    (90, "bfloat16", 64, 8, 0, "first", False),
    (90, "float16", 128, 2, 0, "first", False),
    (90, "bfloat16", 256, 1, 0, "first", False),
    (90, "float32", 64, 2, 1, "first", False),  # TF32
    (90, "float32", 40, 2, 0, "first", True),   # IEEE float32 on CUDA cores: a correctness path
    (80, "bfloat16", 64, 4, 0, "first", True),
    (80, "float32", 256, 1, 1, "all", True),     # the widest tiles: must fit the A100's shared memory
]


@pytest.mark.skipif(CUDA, reason="a GPU is here: the test suite runs the kernels on it instead")
@pytest.mark.parametrize("case", ATTENTION_CASES, ids=lambda c: "-".join(map(str, c[:6])))
def test_attention_kernels_compile_for_gpu(case):
    arch, spills_allowed = case[0], case[6]
    results = _compile(_ATTENTION_SCRIPT, case[:6])
    assert {r["kernel"] for r in results} == {"forward", "key_value", "query"}
    for r in results:
        assert r["shared_bytes"] <= SHARED_LIMIT[arch], r
        if not spills_allowed:
            assert r["stack_bytes"] == 0, f"registers spill: {r}"
