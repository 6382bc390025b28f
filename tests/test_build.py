"""Packaging: the package imports without the extension or Triton, the extension builds where
nvcc is, and every backend that cannot run says why."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from _helpers import CUDA
from pcd_kernels import _cuda

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
            "from pcd_kernels import _cuda\n"
            "print(_cuda.is_built()); print(_cuda.unavailable_reason())\n"
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
    assert _cuda.is_built(), _cuda.unavailable_reason()
    ext = _cuda.extension()
    assert ext.cuda_runtime_version() >= 12000
    archs = os.environ.get("PCD_KERNELS_CUDA_ARCHS", "80;90a").replace(";", ",")
    assert ext.cuda_architectures == archs


@pytest.mark.skipif(not _cuda.is_built(), reason="extension not built")
def test_probe_runs_on_the_gpu_or_says_why():
    if CUDA:
        assert _cuda.probe() == 42
    else:
        with pytest.raises(RuntimeError, match="no CUDA device"):
            _cuda.probe()
        with pytest.raises(RuntimeError, match="cudaGetDeviceCount failed"):
            _cuda.extension().device_count()


def test_setup_without_cuda_says_so():
    out = subprocess.run([sys.executable, "setup.py", "--name"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120, env={**os.environ, "PCD_KERNELS_NO_CUDA": "1"})
    assert out.returncode == 0, out.stderr
    assert "without the CUDA extension: PCD_KERNELS_NO_CUDA=1" in out.stderr


def test_public_api():
    import pcd_kernels

    assert sorted(pcd_kernels.__all__) == ["AfDCDLoss", "MHSA2d", "PixelContrastiveLoss", "SpatialAdaptor",
                                           "SpatialReLU", "__version__", "omni_contrastive_loss",
                                           "pixel_attention", "pixel_contrastive_loss"]
    assert pcd_kernels.pixel_contrastive_loss.__doc__ and ">>>" in pcd_kernels.pixel_contrastive_loss.__doc__
    assert isinstance(torch.ops.pcd_kernels.pixel_contrastive_forward.default, torch._ops.OpOverload)
