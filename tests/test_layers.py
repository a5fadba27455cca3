"""The package's layers, enforced on its real import graph.

Every ``import`` of an mlx_hub module counts, wherever it sits: at top level,
inside a function, or under ``TYPE_CHECKING``. An arrow may point down the
layer table or stay inside a layer, and the graph has no cycle. Four rules
narrow that: the core reaches the engine only through ``engine.base``;
``engine.base`` imports no other engine module (it is the seam, not a door
into the engine); the core imports no HTTP library; and no product module
imports ``mlx_hub.testing``. A failure lists the offending arrows, and
``test_the_checks_can_fail`` plants one of each to show every detector
catches it. ``test_light_modules_stay_light``
checks what a fresh interpreter loads, so the CLI's client, the engine's seam
and the core stay free of MLX and the web stack.
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

#: Libraries that speak HTTP; the core knows none of them (the web layer hands it servers and apps).
HTTP_LIBRARIES = ("starlette", "fastapi", "uvicorn", "httpx", "h11")


def libraries_of(module: str) -> set[str]:
    """The top-level names of everything ``module`` imports absolutely (``starlette`` for ``starlette.types``)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(MODULES[module].read_text())):
        if isinstance(node, ast.ImportFrom) and not node.level and node.module:
            found.add(node.module.partition(".")[0])
        elif isinstance(node, ast.Import):
            found.update(alias.name.partition(".")[0] for alias in node.names)
    return found


LIBRARIES = {m: libraries_of(m) for m in MODULES}


def test_every_module_sits_in_a_layer() -> None:
    """Every module of the package belongs to a row of ``LAYERS``."""
    for module in MODULES:
        layer_of(module)


def within(module: str, package: str) -> bool:
    """Whether ``module`` is ``package`` or one of its submodules."""
    return module == package or module.startswith(package + ".")


def upward_arrows(graph: dict[str, set[str]]) -> list[str]:
    """The imports that point from a lower layer to a higher one."""
    return [
        f"{m} (layer {layer_of(m)}) -> {t} (layer {layer_of(t)})"
        for m, targets in graph.items()
        for t in sorted(targets)
        if layer_of(t) > layer_of(m)
    ]


def engine_past_its_seam(graph: dict[str, set[str]]) -> list[str]:
    """Core imports of an engine module other than ``engine.base``, and ``engine.base``'s own imports
    of the engine: the core knows the engine only as that seam, and the seam leads nowhere further."""
    core = [
        f"{m} -> {t}"
        for m, targets in graph.items()
        if within(m, "mlx_hub.core")
        for t in sorted(targets)
        if within(t, "mlx_hub.engine") and t != "mlx_hub.engine.base"
    ]
    seam = [
        f"mlx_hub.engine.base -> {t}"
        for t in sorted(graph.get("mlx_hub.engine.base", ()))
        if within(t, "mlx_hub.engine")
    ]
    return core + seam


def product_importing_testing(graph: dict[str, set[str]]) -> list[str]:
    """Imports of ``mlx_hub.testing`` from any module outside it: what tests need is no part of the product."""
    return [
        f"{m} -> {t}"
        for m, targets in graph.items()
        if not within(m, "mlx_hub.testing")
        for t in sorted(targets)
        if within(t, "mlx_hub.testing")
    ]


def http_in_core(libraries: dict[str, set[str]]) -> list[str]:
    """Core modules that import an HTTP library."""
    return [
        f"{m} -> {lib}"
        for m, libs in libraries.items()
        if within(m, "mlx_hub.core")
        for lib in sorted(libs)
        if lib in HTTP_LIBRARIES
    ]


def test_no_arrow_points_up() -> None:
    """No module imports one from a higher layer."""
    upward = upward_arrows(GRAPH)
    assert not upward, "imports from a lower layer to a higher one:\n" + "\n".join(upward)


def test_the_core_knows_the_engine_only_through_its_seam() -> None:
    """The core imports ``engine.base`` and no other engine module; ``engine.base`` imports none."""
    arrows = engine_past_its_seam(GRAPH)
    assert not arrows, "the engine reached past engine.base:\n" + "\n".join(arrows)


def test_the_core_knows_no_http() -> None:
    """No core module imports starlette, FastAPI, uvicorn or an HTTP client: ports and apps are given to it."""
    arrows = http_in_core(LIBRARIES)
    assert not arrows, "the core imports HTTP:\n" + "\n".join(arrows)


def test_no_product_module_imports_testing() -> None:
    """Only ``mlx_hub.testing`` itself imports ``mlx_hub.testing``."""
    arrows = product_importing_testing(GRAPH)
    assert not arrows, "product code imports mlx_hub.testing:\n" + "\n".join(arrows)


#: The longest class the core may hold: a bigger one mixes jobs (issue 35: ModelSlot, Hub).
CORE_CLASS_LINES = 250


def big_classes(sources: dict[str, str], limit: int = CORE_CLASS_LINES) -> list[str]:
    """Classes of core modules (module name -> source) longer than ``limit`` lines."""
    found = []
    for module, source in sorted(sources.items()):
        if not within(module, "mlx_hub.core"):
            continue
        for node in ast.parse(source).body:
            if isinstance(node, ast.ClassDef) and (n := node.end_lineno - node.lineno + 1) > limit:
                found.append(f"{module}.{node.name}: {n} lines")
    return found


SOURCES = {m: p.read_text() for m, p in MODULES.items()}


def test_no_core_class_holds_several_jobs() -> None:
    """No class in core/ is longer than 250 lines."""
    found = big_classes(SOURCES)
    assert not found, f"core classes over {CORE_CLASS_LINES} lines (split them by job):\n" + "\n".join(found)


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
    """The import graph has no cycle."""
    cycle = find_cycle(GRAPH)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_checks_can_fail() -> None:
    """The detectors themselves: a planted cycle, upward arrow, core import past ``engine.base``, import
    from ``engine.base`` into the engine, product import of ``testing``, HTTP import in the core and
    an oversized core class are each caught, and the real graph is one they read (it holds arrows each detector looks at)."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    planted = {m: set(t) for m, t in GRAPH.items()}
    planted["mlx_hub.core.hub"].add("mlx_hub.web.controller")
    planted["mlx_hub.core.slot"].add("mlx_hub.engine.weights")
    planted["mlx_hub.engine.base"].add("mlx_hub.engine.prompt_store")
    planted["mlx_hub.cli.demo"].add("mlx_hub.testing.tinymodel")
    assert upward_arrows(planted) == [
        f"mlx_hub.core.hub (layer {layer_of('mlx_hub.core.hub')}) -> mlx_hub.web.controller "
        f"(layer {layer_of('mlx_hub.web.controller')})"
    ]
    assert engine_past_its_seam(planted) == [
        "mlx_hub.core.slot -> mlx_hub.engine.weights",
        "mlx_hub.engine.base -> mlx_hub.engine.prompt_store",
    ]
    assert product_importing_testing(planted) == ["mlx_hub.cli.demo -> mlx_hub.testing.tinymodel"]
    assert http_in_core({**LIBRARIES, "mlx_hub.core.activity": {"starlette"}}) == [
        "mlx_hub.core.activity -> starlette"
    ]
    long_class = "class Big:\n" + "    x = 1\n" * CORE_CLASS_LINES
    assert big_classes({"mlx_hub.core.big": long_class, "mlx_hub.web.big": long_class}) == [
        f"mlx_hub.core.big.Big: {CORE_CLASS_LINES + 1} lines"
    ]
    assert big_classes(SOURCES, limit=100)  # the real core has classes the check measures
    # The real graph has the arrows the detectors read: each would see a change to them.
    assert "mlx_hub.core.hub" in GRAPH["mlx_hub.service.api"]
    assert "mlx_hub.engine.base" in GRAPH["mlx_hub.core.hub"]
    assert "mlx_hub.engine.tinymodel" in GRAPH["mlx_hub.testing.tinymodel"]
    assert "starlette" in LIBRARIES["mlx_hub.web.model_app"]


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
    """A fresh interpreter that imports ``module`` has loaded none of ``heavy``."""
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
