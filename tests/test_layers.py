"""Layers point one way: config -> policy/ports -> engine -> slot -> hub -> web -> daemon -> cli.

Checked on the source (an import inside a function counts too) and on what a
fresh interpreter loads, so the CLI's client stays light and the core never
reaches up into the web layer.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "mlx_hub"
CORE = [
    "config",
    "policy",
    "ports",
    "engine",
    "slot",
    "hub",
    "status",
    "server",
    "runtime",
    "metrics",
    "logs",
]


def imported_modules(path: Path) -> set[str]:
    """Every mlx_hub module a file imports, at top level or inside functions, relative or absolute."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:  # from .x import y / from ..x import y
                base = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts[: -node.level])
                module = f"{base}.{node.module}" if node.module else base
                found.add(module)
                found.update(f"{module}.{alias.name}" for alias in node.names)
            elif node.module and node.module.startswith("mlx_hub"):
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("mlx_hub"))
    return found


@pytest.mark.parametrize("module", CORE)
def test_core_modules_import_nothing_from_web(module: str) -> None:
    web = {m for m in imported_modules(PACKAGE / f"{module}.py") if m.startswith("mlx_hub.web")}
    assert not web, f"mlx_hub.{module} imports {sorted(web)}"


def test_the_cli_client_loads_neither_fastapi_nor_the_hub() -> None:
    probe = "import sys, mlx_hub.client, mlx_hub.runtime; print(sorted(m for m in ('fastapi', 'uvicorn', 'mlx_hub.hub', 'mlx_hub.daemon', 'mlx.core') if m in sys.modules))"
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip() == "[]", out.stdout
