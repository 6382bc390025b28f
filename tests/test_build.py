"""Packaging: the package imports without the extension or Triton, the extension builds where
nvcc is, and every backend that cannot run says why."""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from _helpers import CUDA
from pcd_kernels.backends import OPS
from pcd_kernels.backends.cuda import _extension

ROOT = Path(__file__).resolve().parents[1]


def _python(code, **env):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **env})


def test_import_does_not_import_triton_or_the_extension():
    out = _python("import sys, pcd_kernels; print('triton' in sys.modules, 'pcd_kernels._C' in sys.modules)")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "False"]


def test_missing_extension_is_explained():
    code = ("import sys; sys.modules['pcd_kernels._C'] = None\n"
            "import torch, pcd_kernels\n"
            "from pcd_kernels.backends.cuda import _extension\n"
            "print(_extension.is_built()); print(_extension.unavailable_reason())\n"
            "try:\n"
            "    pcd_kernels.pixel_contrastive_loss(torch.randn(1, 4, 2, 2), torch.randn(1, 4, 2, 2), backend='cuda')\n"
            "except RuntimeError as e:\n"
            "    print('RuntimeError:', e)\n")
    out = _python(code)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "False"
    assert "not built" in lines[1] and "pip install -e ." in lines[1]
    assert lines[2].startswith("RuntimeError: pixel_contrastive_loss: backend='cuda' cannot run: the CUDA extension")


nvcc_present = shutil.which("nvcc") is not None or Path("/usr/local/cuda/bin/nvcc").exists()


@pytest.mark.skipif(not nvcc_present or os.environ.get("PCD_KERNELS_NO_CUDA") == "1",
                    reason="no nvcc here (or PCD_KERNELS_NO_CUDA=1): the pure-Python install is expected")
def test_extension_was_built_with_nvcc():
    assert _extension.is_built(), _extension.unavailable_reason()
    ext = _extension.extension()
    assert ext.cuda_runtime_version() >= 12000
    archs = os.environ.get("PCD_KERNELS_CUDA_ARCHS", "80;90a").replace(";", ",")
    assert ext.cuda_architectures == archs


def _cuobjdump():
    """cuobjdump from CUDA_HOME, PATH, /usr/local/cuda or the nvidia-cuda-cuobjdump wheel."""
    import importlib.util

    candidates = [Path(os.environ[v]) / "bin" / "cuobjdump" for v in ("CUDA_HOME", "CUDA_PATH") if v in os.environ]
    found = shutil.which("cuobjdump")
    candidates += [Path(found)] if found else []
    candidates.append(Path("/usr/local/cuda/bin/cuobjdump"))
    spec = importlib.util.find_spec("nvidia")
    for root in (spec.submodule_search_locations or []) if spec else []:
        candidates += sorted(Path(root).glob("cu*/bin/cuobjdump"))
    return next((str(c) for c in candidates if c.is_file()), None)


@pytest.mark.skipif(not _extension.is_built(), reason="extension not built (no nvcc, or PCD_KERNELS_NO_CUDA=1)")
def test_extension_kernels_use_tensor_cores_on_every_architecture():
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("no cuobjdump: install the test extra (nvidia-cuda-cuobjdump) or the CUDA toolkit's")
    library = _extension.extension().__file__
    # (cuobjdump runs nvdisasm, which the wheels put beside it)
    env = {**os.environ, "PATH": f"{Path(tool).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    sass = subprocess.run([tool, "--dump-sass", library], capture_output=True, text=True, timeout=300, env=env)
    assert sass.returncode == 0, sass.stderr
    # One section per (kernel, architecture): "code for sm_XX" then "Function : <mangled name>".
    kernels = {}
    arch = None
    for line in sass.stdout.splitlines():
        if "code for sm_" in line:
            arch = line.split("code for ")[1].split()[0]
        elif "Function :" in line:
            name = line.split("Function :")[1].strip()
            current = kernels.setdefault((arch, name), [])
        elif arch is not None and kernels:
            current.append(line)
    archs = os.environ.get("PCD_KERNELS_CUDA_ARCHS", "80;90a").replace(",", ";").split(";")
    expected = {f"sm_{a}" for a in archs}
    assert {a for a, _ in kernels} == expected, sorted(kernels)
    for op in (op.module for op in OPS.values() if "cuda" in op.backends):
        for a in expected:
            ops_kernels = [body for (arch_, name), body in kernels.items() if arch_ == a and op in name]
            assert ops_kernels, f"no {op} kernels for {a}"
            with_mma = [body for body in ops_kernels if any("HMMA" in line or "HGMMA" in line for line in body)]
            # every kernel of the op multiplies on tensor cores except its small elementwise passes
            assert len(with_mma) >= 2, f"{op} on {a}: {len(with_mma)} of {len(ops_kernels)} kernels use HMMA"
    problems = [line for op in PIPELINE_KERNELS for line in _pipeline_problems(kernels, expected, op)]
    assert not problems, "\n".join(problems)


# The kernels of each op built on CuTe: tiles copied asynchronously into shared memory (cp.async:
# LDGSTS, or TMA: UTMALDG), read by ldmatrix (LDSM) into mma.sync (HMMA), and nothing in local
# memory. The pixel_contrastive kernels (csrc/pixel_contrastive.cu) read shared memory on sm_90a
# through warpgroup MMAs (HGMMA) instead; the pixel_attention ones (csrc/pixel_attention.cu) run the
# sm_80-class pipeline on every architecture (their elementwise delta_kernel is no part of it).
# {op: (kernel names, warpgroup MMAs on sm_90)}
PIPELINE_KERNELS = {
    "pixel_contrastive": (("forward_kernel", "anchor_backward_kernel", "key_backward_kernel"), True),
    "pixel_attention": (("forward_kernel", "backward_kernel"), False),
}
# Kernels whose code exists for sm_90a alone (elsewhere a trap the host never launches), held there
# to TMA (UTMALDG), warpgroup MMAs, no spill, and exps that overlap an MMA: MUFU.EX2 after a wait
# that leaves one wgmma batch running (WARPGROUP.DEPBAR.LE gsb0, 0x1) and before the next HGMMA
# issue or full wait (csrc/pixel_contrastive.cu forward_tma_kernel, and stream_tiles_tma's backward),
# in a main loop that never waits for every batch (no WARPGROUP.DEPBAR.LE gsb0, 0x0 there: ptxas
# serialising the wgmmas shows as one).
HOPPER_KERNELS = {"pixel_contrastive": ("forward_tma_kernel", "anchor_backward_tma_kernel", "key_backward_tma_kernel")}
_SASS_OP = re.compile(r"\b(LDGSTS|UTMALDG|HMMA|HGMMA|LDSM|STL|LDL)\b")


def _exps_under_mma(body):
    """How many MUFU.EX2 run while a wgmma batch is in flight (see HOPPER_KERNELS)."""
    overlapped, in_flight = 0, False
    for line in body:
        if "WARPGROUP.DEPBAR" in line:
            in_flight = not re.search(r"gsb0\s*,\s*0x0\b", line)
        elif "HGMMA" in line:
            in_flight = False
        elif "MUFU.EX2" in line and in_flight:
            overlapped += 1
    return overlapped


def _full_waits_in_main_loop(body):
    """How many full wgmma waits (WARPGROUP.DEPBAR.LE gsb0, 0x0) lie in the kernel's main loop:
    the range of the backward branch that spans the most HGMMA (None: no loop holds two)."""
    at = [(int(m.group(1), 16), m.group(2)) for m in (re.search(r"/\*([0-9a-f]+)\*/\s+(.*)", line) for line in body)
          if m]
    best = None
    for address, instruction in at:
        target = re.search(r"\bBRA\b.*?0x([0-9a-f]+)", instruction)
        if target and int(target.group(1), 16) < address:
            inside = [i for a, i in at if int(target.group(1), 16) <= a <= address]
            mmas = sum("HGMMA" in i for i in inside)
            if mmas >= 2 and (best is None or mmas > best[0]):
                best = (mmas, sum(bool(re.search(r"DEPBAR.*gsb0\s*,\s*0x0\b", i)) for i in inside))
    return None if best is None else best[1]


def _pipeline_problems(kernels, archs, op):
    """What each instantiation of each of ``op``'s PIPELINE_KERNELS (and HOPPER_KERNELS on sm_90*)
    on each of ``archs`` lacks or has too much of in its SASS (``kernels``: {(arch, mangled name):
    SASS lines}), one line each."""
    names, wgmma = PIPELINE_KERNELS[op]
    problems = []
    for arch in sorted(archs):
        hopper = HOPPER_KERNELS.get(op, ()) if arch.startswith("sm_90") else ()
        found = {kernel: [] for kernel in names + hopper}
        for (arch_, name), body in kernels.items():
            match = re.search(op + r".*?\d+(" + "|".join(found) + r")I(.*)", name)
            if arch_ == arch and match:
                # "<kernel><half_t, 256>" from the mangled template arguments (element type, then
                # integers and booleans: channel chunk or head dim, pass)
                args = re.findall(r"(half_t|bfloat16_t|__half|__nv_bfloat16|Li(\d+)E|Lb([01])E)", match.group(2))
                label = match.group(1) + "<" + ", ".join(
                    a[1] or {"0": "false", "1": "true"}.get(a[2]) or a[0] for a in args[:3]) + ">"
                found[match.group(1)].append((match.group(1) in hopper, label, body))
        for kernel, instances in found.items():
            if not instances:
                problems.append(f"{arch}: no {op} {kernel} in the library")
        for is_hopper, label, body in (i for instances in found.values() for i in instances):
            counts = {}
            for line in body:
                for sass_op in _SASS_OP.findall(line):
                    counts[sass_op] = counts.get(sass_op, 0) + 1
            missing = []
            if is_hopper:
                if not counts.get("UTMALDG"):
                    missing.append("TMA (no UTMALDG)")
                if not counts.get("HGMMA"):
                    missing.append("warpgroup MMAs (no HGMMA)")
                elif not _exps_under_mma(body):
                    missing.append("exps overlapping an MMA (no MUFU.EX2 while a wgmma batch runs)")
                waits = _full_waits_in_main_loop(body)
                if waits is None:
                    missing.append("a main loop (no backward branch over two HGMMA)")
                elif waits:
                    missing.append(f"a main loop that never waits for every wgmma (full waits there: {waits})")
            else:
                if not (counts.get("LDGSTS") or counts.get("UTMALDG")):
                    missing.append("asynchronous copies (no LDGSTS or UTMALDG)")
                if wgmma and arch.startswith("sm_90"):
                    if not counts.get("HGMMA"):
                        missing.append("warpgroup MMAs (no HGMMA)")
                elif not (counts.get("HMMA") and counts.get("LDSM")):
                    missing.append(f"tensor-core MMAs fed by ldmatrix ({counts.get('HMMA', 0)} HMMA, "
                                   f"{counts.get('LDSM', 0)} LDSM)")
            if counts.get("STL") or counts.get("LDL"):
                missing.append(f"spills: {counts.get('STL', 0)} STL and {counts.get('LDL', 0)} LDL (local memory)")
            if missing:
                problems.append(f"{arch} {op} {label}: " + "; ".join(missing))
    return problems


def test_cuda_backend_on_cpu_tensors_says_why():
    import pcd_kernels

    x = torch.randn(1, 8, 3, 3)
    for call in (lambda: pcd_kernels.pixel_contrastive_loss(x, x, backend="cuda"),
                 lambda: pcd_kernels.pixel_attention(x, x, x, num_heads=2, backend="cuda")):
        with pytest.raises(RuntimeError, match="backend='cuda'"):
            call()


@pytest.mark.skipif(not _extension.is_built(), reason="extension not built")
def test_probe_runs_on_the_gpu_or_says_why():
    if CUDA:
        assert _extension.probe() == 42
    else:
        with pytest.raises(RuntimeError, match="no CUDA device"):
            _extension.probe()
        with pytest.raises(RuntimeError, match="cudaGetDeviceCount failed"):
            _extension.extension().device_count()


def test_setup_without_cuda_says_so():
    out = subprocess.run([sys.executable, "setup.py", "--name"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120, env={**os.environ, "PCD_KERNELS_NO_CUDA": "1"})
    assert out.returncode == 0, out.stderr
    assert "without the CUDA extension: PCD_KERNELS_NO_CUDA=1" in out.stderr


def test_public_api():
    import pcd_kernels

    assert sorted(pcd_kernels.__all__) == ["AfDCDLoss", "MHSA2d", "PixelContrastiveLoss", "SpatialAdaptor",
                                           "SpatialReLU", "__version__", "omni_contrastive_loss",
                                           "pixel_attention", "pixel_contrastive_loss", "pixel_relation_loss"]
    for op in OPS.values():  # every registered op: exported, with a runnable example, and its custom ops
        assert op.name in pcd_kernels.__all__, op.name
        assert ">>>" in (getattr(pcd_kernels, op.name).__doc__ or ""), op.name
        for custom_op in op.custom_ops:
            assert isinstance(getattr(torch.ops.pcd_kernels, custom_op).default, torch._ops.OpOverload), custom_op


def test_sass_check_names_what_each_kernel_lacks():
    """_pipeline_problems on made-up SASS: one line per missing piece, per kernel."""
    def name(kernel, dtype="N7cutlass6half_tE", chunk=64, op="pixel_contrastive", extra=""):
        return f"_ZN11pcd_kernels53_GLOBAL__N__4e86075b_20_{op}_cu_081bb693{len(kernel)}{kernel}I{dtype}" \
               f"Li{chunk}E{extra}EEEvNS0_6ParamsIT_EEPfS7_"

    good = ["/*0100*/ LDGSTS.E.BYPASS.128 [R1], desc[UR4][R2.64] ;", "/*0110*/ LDSM.16.M88.4 R4, [R5] ;",
            "/*0120*/ HMMA.16816.F32 R8, R4, R6, R8 ;"]
    kernels = {("sm_80", name("forward_kernel")): good,
               ("sm_80", name("anchor_backward_kernel", "N7cutlass10bfloat16_tE", 256)): good[:1] + good[2:] + [
                   "/*0200*/ STL [R1+0x10], R61 ;", "/*0210*/ @P0 LDL.64 R2, [R1+0x8] ;"],
               ("sm_90a", name("forward_kernel")): ["/*0100*/ UTMALDG.2D [UR4], [UR6] ;",
                                                    "/*0110*/ HGMMA.64x64x16.F32 R24, gdesc[UR8], R24 ;"],
               ("sm_90a", name("key_backward_kernel")): ["/*0100*/ LDG.E.128 R4, desc[UR4][R2.64] ;"]}
    kernels[("sm_90a", name("anchor_backward_kernel"))] = good  # mma.sync where sm_90a needs wgmma
    # the TMA forward: exps while a batch runs (passes); exps only after the full wait; cp.async
    tma = ["/*0100*/ UTMALDG.2D [UR4], [UR6] ;", "/*0110*/ HGMMA.64x64x16.F32 R24, gdesc[UR8], R24, gsb0 ;",
           "/*0120*/ WARPGROUP.DEPBAR.LE gsb0, 0x1 ;", "/*0130*/ MUFU.EX2 R3, R3 ;",
           "/*0140*/ HGMMA.64x64x16.F32 R56, gdesc[UR8], R56, gsb0 ;", "/*0150*/ @P0 BRA 0x110 ;",
           "/*0160*/ WARPGROUP.DEPBAR.LE gsb0, 0x0 ;"]
    kernels[("sm_90a", name("forward_tma_kernel", chunk=128))] = tma
    kernels[("sm_90a", name("forward_tma_kernel", chunk=256))] = tma[:3] + tma[4:] + tma[3:4]
    kernels[("sm_90a", name("forward_tma_kernel", "N7cutlass10bfloat16_tE"))] = good + tma[1:]
    kernels[("sm_80", name("forward_tma_kernel"))] = ["/*0100*/ BPT.TRAP 0x1 ;"]  # a stub there: not held to it
    kernels[("sm_90a", name("anchor_backward_tma_kernel"))] = tma
    kernels[("sm_90a", name("key_backward_tma_kernel", chunk=256))] = tma + ["/*0200*/ STL [R1+0x10], R61 ;"]
    # serialised: a full wait after each wgmma of the loop; no loop at all
    kernels[("sm_90a", name("key_backward_tma_kernel", chunk=128))] = tma[:5] + [
        "/*0148*/ WARPGROUP.DEPBAR.LE gsb0, 0x0 ;"] + tma[5:]
    kernels[("sm_90a", name("anchor_backward_tma_kernel", chunk=128))] = tma[:5] + tma[6:]
    assert _pipeline_problems(kernels, {"sm_80", "sm_90a"}, "pixel_contrastive") == [
        "sm_80: no pixel_contrastive key_backward_kernel in the library",
        "sm_80 pixel_contrastive anchor_backward_kernel<bfloat16_t, 256>: tensor-core MMAs fed by ldmatrix (1 HMMA, "
        "0 LDSM); spills: 1 STL and 1 LDL (local memory)",
        "sm_90a pixel_contrastive anchor_backward_kernel<half_t, 64>: warpgroup MMAs (no HGMMA)",
        "sm_90a pixel_contrastive key_backward_kernel<half_t, 64>: asynchronous copies (no LDGSTS or UTMALDG); "
        "warpgroup MMAs (no HGMMA)",
        "sm_90a pixel_contrastive forward_tma_kernel<half_t, 256>: exps overlapping an MMA (no MUFU.EX2 while a "
        "wgmma batch runs)",
        "sm_90a pixel_contrastive forward_tma_kernel<bfloat16_t, 64>: TMA (no UTMALDG)",
        "sm_90a pixel_contrastive anchor_backward_tma_kernel<half_t, 128>: a main loop (no backward branch over two "
        "HGMMA)",
        "sm_90a pixel_contrastive key_backward_tma_kernel<half_t, 256>: spills: 1 STL and 0 LDL (local memory)",
        "sm_90a pixel_contrastive key_backward_tma_kernel<half_t, 128>: a main loop that never waits for every wgmma "
        "(full waits there: 1)"]
    assert _pipeline_problems({k: v for k, v in kernels.items() if "tma" not in k[1]}, {"sm_90a"},
                              "pixel_contrastive")[0] == "sm_90a: no pixel_contrastive forward_tma_kernel in the library"
    # pixel_attention: the sm_80-class pipeline on sm_90a too; its delta_kernel is not held to it
    attention = {("sm_80", name("forward_kernel", chunk=128, op="pixel_attention")): good,
                 ("sm_80", name("backward_kernel", chunk=32, op="pixel_attention", extra="Lb1E")): good,
                 ("sm_80", name("backward_kernel", chunk=32, op="pixel_attention", extra="Lb0E")): good[:2],
                 ("sm_80", name("delta_kernel", op="pixel_attention")): [],
                 ("sm_90a", name("forward_kernel", "N7cutlass10bfloat16_tE", 64, "pixel_attention")): good + [
                     "/*0200*/ STL [R1+0x10], R61 ;"],
                 ("sm_90a", name("backward_kernel", op="pixel_attention", extra="Lb1E")): [
                     "/*0100*/ LDGSTS.E.BYPASS.128 [R1], desc[UR4][R2.64] ;",
                     "/*0110*/ HGMMA.64x64x16.F32 R24, gdesc[UR8], R24 ;"]}
    assert _pipeline_problems({**kernels, **attention}, {"sm_80", "sm_90a"}, "pixel_attention") == [
        "sm_80 pixel_attention backward_kernel<half_t, 32, false>: tensor-core MMAs fed by ldmatrix (0 HMMA, 1 LDSM)",
        "sm_90a pixel_attention forward_kernel<bfloat16_t, 64>: spills: 1 STL and 0 LDL (local memory)",
        "sm_90a pixel_attention backward_kernel<half_t, 64, true>: tensor-core MMAs fed by ldmatrix (0 HMMA, 0 LDSM)"]
    assert _pipeline_problems({("sm_80", name("delta_kernel", op="pixel_attention")): good}, {"sm_80"},
                              "pixel_attention") == ["sm_80: no pixel_attention forward_kernel in the library",
                                                     "sm_80: no pixel_attention backward_kernel in the library"]
