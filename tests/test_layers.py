"""The package's layers, enforced on its real import graph.

Every ``import`` of an mlx_hub module counts, wherever it sits: at top level,
inside a function, or under ``TYPE_CHECKING``. An arrow may point down the
layer table or stay inside a layer, and the graph has no cycle. A failure lists
the offending arrows. The last test checks what a fresh interpreter loads, so
the CLI's client stays light.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "mlx_hub"

#: Bottom to top. A module may import its own layer and those before it.
LAYERS: list[tuple[str, ...]] = [
    ("mlx_hub.version", "mlx_hub.fsutil"),
    ("mlx_hub.config",),
    ("mlx_hub.engine", "mlx_hub.testing"),
    ("mlx_hub.core",),
    ("mlx_hub.web",),
    ("mlx_hub.service",),
    ("mlx_hub.registry",),
    ("mlx_hub.cli",),
    ("mlx_hub",),  # the package facade: lazy names for library users
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def layer_of(module: str) -> int:
    """The layer of the longest prefix that names ``module``."""
    best = -1, -1
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best[1]:
                best = index, len(prefix)
    assert best[0] >= 0, f"{module} is in no layer; add it to LAYERS"
    return best[0]


def resolve(name: str) -> str | None:
    """The module an imported name lives in: itself if a module, else its parent (``from m import f``)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(module: str) -> set[str]:
    """The mlx_hub modules ``module`` imports (from ``m import x`` counts ``m.x`` when that is a module)."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            if not base.startswith("mlx_hub"):
                continue
            for alias in node.names:
                target = resolve(f"{base}.{alias.name}")
                if target is not None:
                    found.add(target)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("mlx_hub"):
                    target = resolve(alias.name)
                    if target is not None:
                        found.add(target)
    found.discard(module)
    return found


GRAPH = {m: imports_of(m) for m in MODULES}


def test_every_module_sits_in_a_layer() -> None:
    for module in MODULES:
        layer_of(module)


def test_no_arrow_points_up() -> None:
    upward = [
        f"{m} (layer {layer_of(m)}) -> {t} (layer {layer_of(t)})"
        for m, targets in GRAPH.items()
        for t in sorted(targets)
        if layer_of(t) > layer_of(m)
    ]
    assert not upward, "imports from a lower layer to a higher one:\n" + "\n".join(upward)


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a list of modules (first repeated at the end), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_the_import_graph_has_no_cycle() -> None:
    cycle = find_cycle(GRAPH)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_checks_can_fail() -> None:
    """The detectors themselves: a planted cycle and a planted upward arrow are both caught."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    assert layer_of("mlx_hub.core.hub") > layer_of("mlx_hub.engine.base")
    assert layer_of("mlx_hub.web.controller") > layer_of("mlx_hub.core.hub")
    assert "mlx_hub.core.hub" in GRAPH["mlx_hub.service.api"]  # the graph sees real arrows


@pytest.mark.parametrize(
    ("module", "heavy"),
    [
        (
            "mlx_hub.cli.client",
            ("fastapi", "uvicorn", "mlx_hub.core.hub", "mlx_hub.service.daemon", "mlx.core"),
        ),
        ("mlx_hub.engine.base", ("mlx.core", "app", "transformers")),
        ("mlx_hub.engine.model_files", ("mlx.core", "app", "transformers")),
        ("mlx_hub.core.hub", ("mlx.core", "app", "fastapi", "uvicorn", "mlx_hub.web.model_app")),
    ],
)
def test_light_modules_stay_light(module: str, heavy: tuple[str, ...]) -> None:
    probe = f"import sys, {module}; print(sorted(m for m in {heavy!r} if m in sys.modules))"
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip() == "[]", out.stdout


def test_every_patch_names_a_proof_that_exists() -> None:
    """Each ``enabled("name")`` switch in engine/patches has a proof test, and that test exists."""
    from mlx_hub.engine.patches import PROOFS

    root = PACKAGE.parent
    used = set()
    for path in (PACKAGE / "engine" / "patches").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "enabled":
                used.update(a.value for a in node.args if isinstance(a, ast.Constant))
            if isinstance(node, ast.Tuple) and len(node.elts) == 2 and isinstance(node.elts[0], ast.Constant):
                if isinstance(node.elts[1], ast.Name) and node.elts[1].id == node.elts[0].value:
                    used.add(node.elts[0].value)  # apply()'s (name, function) table
    assert used == set(PROOFS), (
        f"patches without a proof: {used - set(PROOFS)}; stale proofs: {set(PROOFS) - used}"
    )
    for test in PROOFS.values():
        file, _, name = test.partition("::")
        assert f"def {name.split('[')[0]}(" in (root / file).read_text(), test
