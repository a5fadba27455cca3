"""The /hub/ dashboard's files, served from the package (they ship inside the wheel).

The top-level ``static/`` folder is installed as ``mlx_hub/static`` (see
pyproject.toml); a source checkout without an install falls back to the
folder itself. Only the named assets are served, so no path can escape.
"""

from __future__ import annotations

from functools import cache
from importlib import resources
from pathlib import Path

ASSETS = {
    "index.html": "text/html; charset=utf-8",
    "hub.css": "text/css; charset=utf-8",
    "hub.js": "text/javascript; charset=utf-8",
    # The live parts: events, requests and logs; the playground; the memory chart.
    "activity.css": "text/css; charset=utf-8",
    "live.js": "text/javascript; charset=utf-8",
    "playground.js": "text/javascript; charset=utf-8",
    "chart.js": "text/javascript; charset=utf-8",
}


@cache
def asset(name: str) -> bytes:
    """The bytes of one dashboard file; ``KeyError`` for anything not in ``ASSETS``."""
    if name not in ASSETS:
        raise KeyError(name)
    try:
        return resources.files("mlx_hub.static").joinpath(name).read_bytes()
    except (ModuleNotFoundError, FileNotFoundError):
        return (Path(__file__).resolve().parents[2] / "static" / name).read_bytes()
