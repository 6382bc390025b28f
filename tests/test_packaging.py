"""Packaging: a CPU-only install needs no Triton, and the library works without it."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

WITHOUT_TRITON = """
import sys
sys.modules["triton"] = None  # as if it were not installed: `import triton` raises ImportError
import torch
import pcd_kernels
from pcd_kernels import AfDCDLoss, MHSA2d, PixelContrastiveLoss, omni_contrastive_loss, pixel_attention, \\
    pixel_contrastive_loss, pixel_relation_loss
from pcd_kernels.integrations.cirkd import CriterionMiniBatchCrossImagePair

s = torch.randn(2, 16, 5, 6, requires_grad=True)
t = torch.randn(2, 16, 5, 6)
pixel_contrastive_loss(s, t).backward()
PixelContrastiveLoss(negatives="none", queue_size=64, dim=16)(s, t).backward()
pixel_relation_loss(s, t, torch.randn(7, 16)).backward()
CriterionMiniBatchCrossImagePair(0.5)(s, t).backward()
omni_contrastive_loss(torch.randn(1, 32, 8, 8, requires_grad=True), torch.randn(1, 32, 8, 8), groups=4,
                      pool_size=0).backward()
q = torch.randn(1, 16, 5, 6, requires_grad=True)
pixel_attention(q, q, q, num_heads=2).sum().backward()
MHSA2d(16, num_heads=2)(q).sum().backward()
sum(AfDCDLoss(16, 32)(torch.randn(1, 16, 16, 16), torch.randn(1, 32, 16, 16))).backward()
try:
    pixel_contrastive_loss(s, t, backend="triton")
except RuntimeError as error:
    assert "Triton is not installed" in str(error), error
else:
    raise AssertionError("backend='triton' ran without Triton")
assert sys.modules["triton"] is None  # nothing imported a real Triton behind our back
print("ok")
"""


def test_triton_is_an_extra_not_a_dependency():
    tomllib = pytest.importorskip("tomllib", reason="tomllib is Python 3.11+")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert not any(dep.startswith("triton") for dep in project["dependencies"])
    extras = project["optional-dependencies"]
    assert any(dep.startswith("triton") for dep in extras["triton"])
    # make test (make venv installs .[test]) runs the Triton kernels in the CPU interpreter.
    assert any(dep.startswith("triton") for dep in extras["test"])


def test_library_works_without_triton():
    out = subprocess.run([sys.executable, "-c", WITHOUT_TRITON], capture_output=True, text=True, timeout=300,
                         cwd=ROOT)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stdout + out.stderr[-3000:]
