"""The layout's rules (docs/layout.md, docs/contributing.md), read from the source: what imports
what, and every registered op's backend modules keep the contract."""
import ast
import importlib
from pathlib import Path

import pytest

from pcd_kernels.backends import BACKENDS, OPS

PACKAGE = Path(__file__).resolve().parents[1] / "pcd_kernels"


def imported_modules(path: Path):
    """Every pcd_kernels module a source file imports (``from pcd_kernels.x import y`` counts as
    pcd_kernels.x and, where y is a module, pcd_kernels.x.y)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names
                         if is_module(f"{node.module}.{alias.name}"))
    return {name for name in found if name.startswith("pcd_kernels")}


def is_module(name: str) -> bool:
    if not name.startswith("pcd_kernels."):
        return False
    path = PACKAGE.joinpath(*name.split(".")[1:])
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def sources(folder: str):
    return sorted((PACKAGE / folder).rglob("*.py"))


def test_reference_imports_no_backend_and_no_backend_imports_it():
    assert not {m for m in imported_modules(PACKAGE / "reference.py") if m.startswith("pcd_kernels.backends")}
    for path in sources("backends"):
        assert "pcd_kernels.reference" not in imported_modules(path), path


def test_backends_import_neither_ops_nor_each_others_op_modules():
    op_modules = {op.module for op in OPS.values()}
    for path in sources("backends"):
        imports = imported_modules(path)
        assert not {m for m in imports if m.startswith("pcd_kernels.ops")}, path
        others = {m for m in imports if m.rsplit(".", 1)[-1] in op_modules and m.rsplit(".", 1)[-1] != path.stem}
        assert not others, f"{path} imports another op's backend module: {others} (shared code goes in _common.py)"


def test_ops_reach_backends_only_through_the_registry():
    for path in sources("ops"):
        imports = imported_modules(path)
        direct = {m for m in imports if m.startswith("pcd_kernels.backends.")}
        assert not direct, f"{path} imports {direct}; ops call backends.implementation(op, backend)"


@pytest.mark.parametrize("op", list(OPS.values()), ids=lambda op: op.name)
def test_every_registered_backend_module_keeps_the_contract(op):
    assert set(op.backends) <= set(BACKENDS[1:]) and "torch" in op.backends
    for backend in op.backends:
        name = f"pcd_kernels.backends.{backend}.{op.module}"
        path = PACKAGE / "backends" / backend / f"{op.module}.py"
        assert path.exists(), f"{op.name} lists backend {backend!r} but {path} is missing"
        tree = ast.parse(path.read_text())
        functions = {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}
        functions |= {target.id for node in tree.body if isinstance(node, ast.Assign)  # forward, backward = ...
                      for tuple_ in node.targets for target in getattr(tuple_, "elts", [tuple_])
                      if isinstance(target, ast.Name)}
        assert "limits" in functions, f"{name} has no limits()"
        assert {"forward", "backward"} <= functions or op.module == "pixel_attention" and backend == "torch", (
            f"{name} needs forward() and backward()")
    # the backend packages themselves import without Triton or the extension
    for backend in BACKENDS[1:]:
        package = importlib.import_module(f"pcd_kernels.backends.{backend}")
        assert callable(package.unavailable_reason) and hasattr(package, "DTYPES")


def test_every_op_module_is_registered():
    modules = {path.stem for path in sources("ops") if not path.stem.startswith("_")}
    assert modules == {op.module for op in OPS.values()}
