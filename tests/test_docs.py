"""The README's and docs/ pages' examples and the docstring examples run as written; the pages'
tables render and their links resolve."""
import doctest
import importlib
import re
from pathlib import Path

import pytest

import pcd_kernels.nn.adaptor
import pcd_kernels.nn.afdcd
import pcd_kernels.nn.attention
import pcd_kernels.nn.pixel_contrastive
from pcd_kernels.backends import OPS

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README] + sorted((ROOT / "docs").glob("*.md"))
# Pages whose python blocks are snippets for other code bases (configs, the official PCD repository).
SNIPPET_PAGES = {"integrations.md"}
# A python block right after this line is a snippet, not run (e.g. it needs torchvision or a file).
NOT_RUN = "<!-- not run -->"
README_MAX_WORDS = 2500


def python_blocks(path):
    """(index, code, runnable) for every ```python block of a page."""
    text = path.read_text()
    blocks = []
    for i, match in enumerate(re.finditer(r"(^|\n)([^\n]*)\n```python\n(.*?)```", text, re.S)):
        before, code = match.group(2), match.group(3)
        runnable = path.name not in SNIPPET_PAGES and before.strip() != NOT_RUN and "self." not in code
        blocks.append((i, code, runnable))
    return blocks


RUNNABLE = [(path, i, code) for path in PAGES for i, code, runnable in python_blocks(path) if runnable]


@pytest.mark.parametrize("path, index, code", RUNNABLE,
                         ids=[f"{path.relative_to(ROOT)}#{i}" for path, i, _ in RUNNABLE])
def test_page_python_block_runs(path, index, code):
    exec(compile(code, f"{path.relative_to(ROOT)} (python block {index})", "exec"), {})


def test_readme_has_runnable_examples_and_stays_short():
    readme_blocks = [b for b in python_blocks(README) if b[2]]
    assert len(readme_blocks) >= 5, "README lost its runnable examples"
    first = readme_blocks[0][1]
    assert "pixel_contrastive_loss" in first and len(first.strip().splitlines()) <= 12
    words = len(README.read_text().split())
    assert words <= README_MAX_WORDS, f"README.md has {words} words; move detail into docs/"
    assert any(runnable for _, _, runnable in python_blocks(ROOT / "docs" / "training.md"))


def _tables(text):
    """Runs of consecutive lines that start with '|'."""
    tables, current = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            current.append(line)
        elif current:
            tables.append(current)
            current = []
    return tables


@pytest.mark.parametrize("path", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_tables_render(path):
    """Every table has a header and a separator row: a blank line inside a table starts a 'table'
    without them, which renders as plain text."""
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    for table in _tables(text):
        assert len(table) >= 2 and re.fullmatch(r"\|(\s*:?-+:?\s*\|)+", table[1]), \
            f"{path.name}: table without a header/separator row starting {table[0][:80]!r}"
        width = table[0].count("|")
        for row in table:
            assert row.replace("\\|", "").count("|") >= width, f"{path.name}: short row {row[:80]!r}"


def _anchors(text):
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
            for h in re.findall(r"^#+ (.*)$", re.sub(r"```.*?```", "", text, flags=re.S), re.M)}


@pytest.mark.parametrize("path", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_relative_links_resolve(path):
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+://", target):
            continue
        file, _, anchor = target.partition("#")
        linked = (path.parent / file).resolve() if file else path
        assert linked.exists(), f"{path.name}: broken link {target}"
        if anchor and linked.suffix == ".md":
            assert anchor in _anchors(linked.read_text()), f"{path.name}: no heading for {target}"


# Every op of the registry (its ops/<op module>.py), and the modules built on them.
DOCUMENTED = [f"pcd_kernels.ops.{op.module}" for op in OPS.values()] + [
    module.__name__ for module in (pcd_kernels.nn.pixel_contrastive, pcd_kernels.nn.afdcd, pcd_kernels.nn.attention,
                                   pcd_kernels.nn.adaptor)]


@pytest.mark.parametrize("name", DOCUMENTED)
def test_docstring_examples_run(name):
    failures, tried = doctest.testmod(importlib.import_module(name), raise_on_error=False)
    assert tried > 0 and failures == 0, name
