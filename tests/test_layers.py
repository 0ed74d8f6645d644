"""The package's layers: no import cycle among perk_fast's modules, and every import points down.

Imports are read from the source with ``ast`` -- module level, inside functions and under
``TYPE_CHECKING`` alike -- so a cycle hidden in a function body fails here too.
"""
from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest

import perk_fast

PACKAGE = Path(perk_fast.__file__).resolve().parent

# bottom to top; a module may import only from tiers strictly below its own
TIERS = [
    ("kernels", {"kernels"}),
    ("foundations", {"config", "data", "io", "seeds", "schedule", "hf", "tokenizer", "metrics", "tasks",
                     "profiling", "refckpt"}),
    ("building blocks", {"lora", "loss", "inner", "generation", "readers", "distributed"}),
    ("engine", {"engine"}),
    ("memory", {"memory"}),
    ("model", {"model"}),
    ("api", {"encode", "train"}),
    ("evaluation", {"evaluate.scoring", "evaluate.plots"}),
    ("baselines and sweeps", {"evaluate.icr", "evaluate.sweeps"}),
    ("evaluation api", {"evaluate"}),
    ("applications", {"demo_train", "runs"}),
    ("demo", {"demo"}),
    ("entry points", {"", "cli"}),
    ("python -m perk_fast", {"__main__"}),  # runs the command line
]


def _modules() -> dict[str, Path]:
    """perk_fast module name (relative, '' for the package) -> source file."""
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
        if parts and parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> list[str]:
    """Absolute perk_fast-relative names an ``from ... import ...`` refers to."""
    if node.level:
        base = module.split(".") if module else []
        if not is_package:
            base = base[:-1]
        base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
        target = ".".join(base + ([node.module] if node.module else []))
    elif node.module and (node.module == "perk_fast" or node.module.startswith("perk_fast.")):
        target = node.module[len("perk_fast."):] if node.module != "perk_fast" else ""
    else:
        return []
    names = [f"{target}.{a.name}".lstrip(".") for a in node.names]
    # ``from . import hf`` loads the submodule hf (the package itself is already loaded)
    return names if node.module is None and node.level else [target] + names


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        targets: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                targets.update(_resolve(name, path.name == "__init__.py", node))
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name == "perk_fast" or alias.name.startswith("perk_fast."):
                        targets.add(alias.name[len("perk_fast."):] if alias.name != "perk_fast" else "")
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def _tier(module: str) -> int:
    if module == "kernels" or module.startswith("kernels."):
        return 0
    for i, (_, members) in enumerate(TIERS):
        if module in members:
            return i
    raise AssertionError(f"perk_fast.{module} has no tier in tests/test_layers.py: place it in the layering")


def test_every_module_has_a_tier():
    for module in _modules():
        _tier(module)


def test_no_import_cycles():
    graph = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(f"perk_fast.{m}" for m in cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_imports_point_down_the_layers():
    bad = []
    for module, targets in _graph().items():
        for target in targets:
            if module.startswith("kernels") and target.startswith("kernels"):
                continue  # inside the kernels package: checked by the cycle test
            if target == module.rsplit(".", 1)[0] and module.startswith("evaluate."):
                continue  # a submodule loading its package's siblings goes through the package
            if _tier(target) >= _tier(module):
                bad.append(f"perk_fast.{module} ({TIERS[_tier(module)][0]}) imports perk_fast.{target} "
                           f"({TIERS[_tier(target)][0]})")
    assert not bad, "imports that do not point down the layers:\n" + "\n".join(sorted(bad))


def test_the_checker_sees_function_level_and_type_checking_imports(tmp_path):
    """The walker must find imports in function bodies and under TYPE_CHECKING (or it proves nothing)."""
    source = ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .model import PerkModel\n"
              "def f():\n    from . import train\n    import perk_fast.encode\n")
    tree = ast.parse(source)
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            found.update(_resolve("memory", False, node))
        elif isinstance(node, ast.Import):
            found.update(a.name[len("perk_fast."):] for a in node.names)
    assert {"model", "train", "encode"} <= found
    assert os.path.exists(PACKAGE / "engine.py")
