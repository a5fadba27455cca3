"""The Hugging Face cache as the hub sees it: which repos are MLX models, their size and format,
and the entry name each would get in hub.yaml (``scan``)."""

from __future__ import annotations

import json
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

from mlx_hub.config import HubConfig
from mlx_hub.core.ports import PortBook
from mlx_hub.engine.model_files import WEIGHT_SUFFIXES


@dataclass(frozen=True)
class CachedModel:
    """One repo in the Hugging Face cache, at its newest snapshot."""

    repo_id: str
    snapshot: Path
    size_on_disk: int
    architecture: str | None
    quantization_bits: int | None
    mlx_ready: bool
    entry: str | None = None  # the hub.yaml entry serving it, if any
    port: int | None = None


def _safetensors_format(path: Path) -> str | None:
    """The ``format`` in a safetensors file's header metadata (MLX writes ``mlx``)."""
    try:
        with path.open("rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            if length > 100_000_000:
                return None
            header = json.loads(handle.read(length))
    except (OSError, ValueError, struct.error):
        return None
    metadata = header.get("__metadata__") or {}
    return metadata.get("format") if isinstance(metadata, dict) else None


PRECONVERTED_ORGS_ENV = "MLX_PRECONVERTED_ORGS"
PRECONVERTED_HINTS_ENV = "MLX_PRECONVERTED_HINTS"
CONVERT_CMD_ENV = "MLX_CONVERT_CMD"
DEFAULT_PRECONVERTED_ORGS = ("mlx-community", "mlx", "ml-explore")
DEFAULT_PRECONVERTED_HINTS = ("mlx",)


def _env_list(name: str, default: tuple[str, ...]) -> tuple[str, ...]:
    value = os.environ.get(name)
    if value is None:
        return default
    return tuple(item.strip().lower() for item in value.split(",") if item.strip())


def preconverted_by_name(repo_id: str) -> bool:
    """mlxctl's rule: an org that publishes MLX conversions, or a hint word in the repo name.

    Orgs come from ``$MLX_PRECONVERTED_ORGS`` (default ``mlx-community,mlx,ml-explore``),
    hints from ``$MLX_PRECONVERTED_HINTS`` (default ``mlx``), both comma-separated.
    """
    owner, _, name = repo_id.lower().partition("/")
    orgs = _env_list(PRECONVERTED_ORGS_ENV, DEFAULT_PRECONVERTED_ORGS)
    hints = _env_list(PRECONVERTED_HINTS_ENV, DEFAULT_PRECONVERTED_HINTS)
    return owner in orgs or any(hint in name for hint in hints)


def describe(repo_id: str, snapshot: Path, preconverted: str = "auto") -> tuple[str | None, int | None, bool]:
    """Architecture, quantization bits, and whether mlx-lm can load the snapshot as it is.

    MLX-ready: a config.json with weights beside it, and any sign of MLX
    conversion: a ``quantization`` block, MLX safetensors metadata, or the repo
    name (``preconverted_by_name``). ``preconverted`` ``yes``/``no`` overrides
    the signs, as mlxctl's ``--preconverted`` does.
    """
    try:
        config = json.loads((snapshot / "config.json").read_text())
    except (OSError, ValueError):
        return None, None, False
    architectures = config.get("architectures") or []
    architecture = architectures[0] if architectures else config.get("model_type")
    quantization = config.get("quantization") or config.get("quantization_config") or {}
    bits = quantization.get("bits") if isinstance(quantization, dict) else None
    weights = [f for f in snapshot.iterdir() if f.suffix in WEIGHT_SUFFIXES]
    if not weights:
        return architecture, bits, False
    if preconverted != "auto":
        return architecture, bits, preconverted == "yes"
    signs = (
        "quantization" in config
        or preconverted_by_name(repo_id)
        or any(_safetensors_format(f) == "mlx" for f in weights if f.suffix == ".safetensors")
    )
    return architecture, bits, bool(signs)


def scan(cache_dir: str | Path | None = None, config: HubConfig | None = None) -> list[CachedModel]:
    """Every model repo in the cache, newest snapshot first per repo, marked with its hub.yaml entry."""
    from huggingface_hub import scan_cache_dir

    info = scan_cache_dir(cache_dir)
    served: dict[str, tuple[str, int | None]] = {}
    if config is not None:
        ports = PortBook.for_config(config).load()
        for entry in config.models:
            served[entry.model_path] = (entry.name, entry.fixed_port or ports.get(entry.name))
    found = []
    for repo in sorted(info.repos, key=lambda r: r.repo_id.lower()):
        if repo.repo_type != "model" or not repo.revisions:
            continue
        revision = max(repo.revisions, key=lambda r: r.last_modified)
        snapshot = Path(revision.snapshot_path)
        architecture, bits, ready = describe(repo.repo_id, snapshot)
        entry, port = served.get(repo.repo_id) or served.get(str(snapshot)) or (None, None)
        found.append(
            CachedModel(repo.repo_id, snapshot, repo.size_on_disk, architecture, bits, ready, entry, port)
        )
    return found


def entry_name(repo_id: str, taken: set[str]) -> str:
    """A slug for a new hub.yaml entry from a repo id, unique among ``taken``."""
    base = re.sub(r"[^A-Za-z0-9_-]+", "-", repo_id.rsplit("/", 1)[-1]).strip("-_").lower() or "model"
    name, n = base, 2
    while name in taken:
        name, n = f"{base}-{n}", n + 1
    return name
