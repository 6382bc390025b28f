"""The README's usage example and the docstring examples run as written."""
import doctest
import re
from pathlib import Path

import pcd_kernels
import pcd_kernels.nn.adaptor
import pcd_kernels.nn.afdcd
import pcd_kernels.nn.attention
import pcd_kernels.nn.pixel_contrastive
import pcd_kernels.ops.omni_contrastive
import pcd_kernels.ops.pixel_attention
import pcd_kernels.ops.pixel_contrastive

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_usage_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    usage = [b for b in blocks if "self." not in b]  # the rest are snippets for other codebases
    assert usage, "README has no runnable python example"
    for block in usage:
        exec(compile(block, str(README), "exec"), {})


def test_docstring_examples_run():
    for module in (pcd_kernels.ops.pixel_contrastive, pcd_kernels.nn.pixel_contrastive,
                   pcd_kernels.ops.omni_contrastive, pcd_kernels.nn.afdcd,
                   pcd_kernels.ops.pixel_attention, pcd_kernels.nn.attention, pcd_kernels.nn.adaptor):
        failures, tried = doctest.testmod(module, raise_on_error=False)
        assert tried > 0 and failures == 0, module.__name__
