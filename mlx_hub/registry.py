"""Models on this machine and where they are published: the Hugging Face cache and LiteLLM.

``scan`` finds MLX-ready models in the Hugging Face cache (through
``huggingface_hub.scan_cache_dir``, the cache's own reader); ``add_to_config``
appends the missing ones to hub.yaml, the one place the hub edits that file,
keeping its comments and order; ``litellm_model_list`` publishes a hub (or
several running ones) as a LiteLLM ``model_list``.
"""

from __future__ import annotations

import json
import re
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import HubConfig, load_config
from .engine import WEIGHT_SUFFIXES, hf_cache_repo, native_context_length
from .fsutil import atomic_write_text
from .ports import PortBook, connect_host


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


def describe(repo_id: str, snapshot: Path) -> tuple[str | None, int | None, bool]:
    """Architecture, quantization bits, and whether mlx-lm can load the snapshot as it is.

    MLX-ready: a config.json with weights beside it, and any sign of MLX
    conversion (a ``quantization`` block, MLX safetensors metadata, or an
    ``mlx-community``/``mlx`` repo name). Hugging Face checkpoints need
    ``mlx_lm.convert`` first.
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
    owner, _, name = repo_id.partition("/")
    signs = (
        "quantization" in config
        or owner.lower() == "mlx-community"
        or "mlx" in name.lower()
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


def add_to_config(path: Path, repo_ids: list[str]) -> list[str]:
    """Append entries for ``repo_ids`` to hub.yaml, keeping its comments and order.

    The one place the hub writes hub.yaml: the original is copied to
    ``hub.yaml.bak`` first, the new text is checked by loading it, and it
    replaces the file atomically. Returns the names added.
    """
    from ruamel.yaml import YAML
    from ruamel.yaml.comments import CommentedMap

    yaml = YAML(typ="rt")
    yaml.preserve_quotes = True
    original = path.read_text(encoding="utf-8")
    # Keep the file's own list style: "models:\n  - name:" (indented dashes) or "- name:" flush.
    dash = re.search(r"^( *)- ", original, re.MULTILINE)
    offset = len(dash.group(1)) if dash else 2
    yaml.indent(mapping=2, sequence=offset + 2, offset=offset)
    document = yaml.load(original)
    models = document.setdefault("models", [])
    taken = {m.get("name") for m in models if isinstance(m, dict)}
    present = {m.get("model_path") for m in models if isinstance(m, dict)}
    added = []
    for repo_id in repo_ids:
        if repo_id in present:
            continue
        name = entry_name(repo_id, taken)
        taken.add(name)
        entry = CommentedMap()
        entry["name"] = name
        entry["model_path"] = repo_id
        entry["default"] = True
        entry["jit_enabled"] = True
        entry["auto_unload_minutes"] = 30
        models.append(entry)
        added.append(name)
    if not added:
        return []
    from io import StringIO

    out = StringIO()
    yaml.dump(document, out)
    text = out.getvalue()
    backup = path.with_name(path.name + ".bak")
    shutil.copy2(path, backup)
    staged = path.with_name(f".{path.name}.check")
    try:
        staged.write_text(text, encoding="utf-8")
        load_config(staged)  # never write a hub.yaml the hub would refuse
    finally:
        staged.unlink(missing_ok=True)
    atomic_write_text(path, text)
    return added


# --------------------------------------------------------------------------- ensure / offload

SOURCE_FILE = "hub_source.json"  # written beside converted weights: where they came from


def converted_root() -> Path:
    """Where ``ensure`` keeps conversions: a folder inside the Hugging Face cache."""
    from huggingface_hub.constants import HF_HUB_CACHE

    return Path(HF_HUB_CACHE) / "mlx-hub-converted"


def converted_dir(repo_id: str, bits: int | None) -> Path:
    """One conversion's folder, by repo and bits."""
    suffix = f"-{bits}bit" if bits else ""
    return converted_root() / f"{repo_id.replace('/', '--')}{suffix}"


@dataclass(frozen=True)
class Ensured:
    repo_id: str
    model_path: str  # what hub.yaml should serve: the repo id, or the converted folder
    converted: bool
    source: Path | None = None  # the base weights a conversion was made from


def ensure(repo_id: str, *, convert: str = "auto", quantize: int | None = None) -> Ensured:
    """Make ``repo_id`` servable: download it (or use the cache), convert it to MLX if needed.

    ``convert``: ``auto`` converts only checkpoints that are not MLX-ready,
    ``force`` always converts, ``skip`` never does (and fails for a checkpoint
    that needs it). Downloads go through huggingface_hub, so
    ``HF_HUB_OFFLINE=1`` serves from the cache alone.
    """
    from huggingface_hub import snapshot_download

    if convert not in ("auto", "force", "skip"):
        raise ValueError("convert must be auto, force or skip")
    snapshot = Path(snapshot_download(repo_id))
    _, _, ready = describe(repo_id, snapshot)
    if convert == "skip" or (convert == "auto" and ready and not quantize):
        if not ready:
            raise ValueError(f"{repo_id} is not MLX-ready; run ensure with --convert auto to convert it")
        return Ensured(repo_id, repo_id, converted=False)
    target = converted_dir(repo_id, quantize)
    if not (target / SOURCE_FILE).exists():
        from mlx_lm import convert as mlx_convert

        if target.exists():
            shutil.rmtree(target)  # a conversion that did not finish
        target.parent.mkdir(parents=True, exist_ok=True)
        mlx_convert(str(snapshot), mlx_path=str(target), quantize=bool(quantize), q_bits=quantize)
        record = {"source_repo": repo_id, "source_snapshot": str(snapshot), "quantize_bits": quantize}
        atomic_write_text(target / SOURCE_FILE, json.dumps(record, indent=2) + "\n")
    return Ensured(repo_id, str(target), converted=True, source=snapshot)


def conversion_sources() -> dict[str, list[Path]]:
    """Base repos that conversions were made from, with the converted folders that record them."""
    root = converted_root()
    sources: dict[str, list[Path]] = {}
    for record in sorted(root.glob(f"*/{SOURCE_FILE}")) if root.is_dir() else []:
        try:
            data = json.loads(record.read_text())
        except (OSError, ValueError):
            continue
        sources.setdefault(data.get("source_repo", ""), []).append(record.parent)
    return sources


def offload(repo_or_path: str, to: Path, config: HubConfig) -> Path:
    """Move base weights that no configured model serves from to backroom storage ``to``.

    Only the recorded source of a conversion qualifies, and only while no
    hub.yaml entry points at it (by repo id or into its folder).
    """
    sources = conversion_sources()
    path = Path(repo_or_path).expanduser()
    if path.exists():
        folder = path.resolve()
        repo_id = next((r for r in sources if hf_cache_repo(r).resolve() == folder), None)
    else:
        repo_id = repo_or_path
        folder = hf_cache_repo(repo_or_path).resolve()
    if repo_id is None or repo_id not in sources:
        raise ValueError(
            f"{repo_or_path} is not the recorded source of a converted model; only those are offloaded"
        )
    users = [
        m.name
        for m in config.models
        if m.model_path == repo_id or Path(m.model_path).expanduser().resolve().is_relative_to(folder)
    ]
    if users:
        raise ValueError(f"refusing to move {repo_id}: model(s) {', '.join(users)} serve from it")
    if not folder.is_dir():
        raise ValueError(f"{folder} does not exist (already offloaded?)")
    to.mkdir(parents=True, exist_ok=True)
    destination = to / folder.name
    if destination.exists():
        raise ValueError(f"{destination} already exists; choose another --to")
    shutil.move(str(folder), str(destination))
    return destination


# --------------------------------------------------------------------------- LiteLLM


def litellm_model_list(
    config: HubConfig, *, via: str = "controller", host: str | None = None
) -> list[dict[str, Any]]:
    """One LiteLLM entry per configured model, pointing at the controller's /v1 or the model's port."""
    ports = PortBook.for_config(config).load()
    keys = sorted(config.api_keys)
    out = []
    for entry in config.models:
        server = host or connect_host(config.host_of(entry))
        port = config.port if via == "controller" else (entry.fixed_port or ports.get(entry.name))
        if port is None:
            raise ValueError(
                f"model '{entry.name}' has no port yet; start the hub once or use --via controller"
            )
        params: dict[str, Any] = {"model": f"openai/{entry.name}", "api_base": f"http://{server}:{port}/v1"}
        params["api_key"] = keys[0] if keys else "none"
        info: dict[str, Any] = {"mode": _mode(entry.model_type)}
        context = entry.context_length or native_context_length(entry.model_path)
        if context is not None:
            info["max_input_tokens"] = context
        out.append({"model_name": entry.name, "litellm_params": params, "model_info": info})
    return out


def litellm_from_hubs(urls: list[str], api_key: str | None = None) -> list[dict[str, Any]]:
    """Entries for every model of several running hubs (their /v1/models), one per hub and model.

    Entries that share a ``model_name`` across hubs are what LiteLLM balances
    between: many Macs behind one gateway.
    """
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    out = []
    for url in urls:
        base = url.rstrip("/")
        listing = httpx.get(f"{base}/v1/models", headers=headers, timeout=10)
        listing.raise_for_status()
        for model in listing.json()["data"]:
            out.append(
                {
                    "model_name": model["id"],
                    "litellm_params": {
                        "model": f"openai/{model['id']}",
                        "api_base": f"{base}/v1",
                        "api_key": api_key or "none",
                    },
                    "model_info": {"mode": _mode(model.get("model_type", "lm"))},
                }
            )
    return out


def _mode(model_type: str) -> str:
    return {"embeddings": "embedding", "whisper": "audio_transcription"}.get(model_type, "chat")
