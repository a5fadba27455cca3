"""A model's files on disk: its folder, its config.json, its trained context. No MLX here.

The registry, the memory estimate and the model cards all read these facts;
reading them must not cost an MLX or transformers import.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mlx_hub.config import ModelConfig

#: Weight files MLX itself reads; a folder's loadable weights are these and nothing else.
WEIGHT_SUFFIXES = (".safetensors", ".npz", ".gguf")


def hf_cache_repo(repo_id: str) -> Path:
    """The Hugging Face cache's folder for a model repo (``models--org--name``)."""
    from huggingface_hub.constants import HF_HUB_CACHE

    return Path(HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}"


def model_folder(model_path: str) -> Path | None:
    """The folder holding a model's files: the path itself, or its Hugging Face cache snapshot."""
    path = Path(model_path).expanduser()
    if path.is_dir():
        return path
    if path.is_absolute() or model_path.count("/") != 1:
        return None
    try:
        snapshots = hf_cache_repo(model_path) / "snapshots"
    except ImportError:
        return None
    candidates = (
        sorted(snapshots.glob("*"), key=lambda p: p.stat().st_mtime, reverse=True)
        if snapshots.is_dir()
        else []
    )
    return candidates[0] if candidates else None


#: config.json keys that hold a model's trained context, in the order architectures use them.
CONTEXT_KEYS = ("max_position_embeddings", "max_sequence_length", "seq_length", "n_positions", "n_ctx")


def config_json(model_path: str) -> dict[str, Any] | None:
    """The model's config.json as a mapping; None where there is no readable one."""
    folder = model_folder(model_path)
    if folder is None:
        return None
    try:
        data = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def native_context_length(model_path: str) -> int | None:
    """The context the model was built for, from its config.json (a VLM's text_config too); None if unknown.

    This is what upstream uses when ``context_length`` is unset, so it is what a
    gateway should be told the model takes.
    """
    data = config_json(model_path)
    if data is None:
        return None
    for section in (data, data.get("text_config") or {}):
        for key in CONTEXT_KEYS:
            value = section.get(key) if isinstance(section, dict) else None
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


def token_limits(entry: ModelConfig) -> dict[str, int]:
    """``max_input_tokens`` (the model's real context) and ``max_output_tokens`` (hub.yaml's, else the context).

    Model cards and the LiteLLM export both tell a client these, so they come from one place.
    """
    context = entry.context_length or native_context_length(entry.model_path)
    limits = {}
    if context is not None:
        limits["max_input_tokens"] = context
    output = entry.max_output_tokens or context
    if output is not None:
        limits["max_output_tokens"] = output
    return limits


def weight_files_bytes(folder: Path) -> int:
    """Bytes of the weight files MLX would read from ``folder`` (following the cache's symlinks to blobs)."""
    total = 0
    for file in folder.rglob("*"):
        if file.suffix in WEIGHT_SUFFIXES:
            try:
                total += file.stat().st_size
            except OSError:
                continue
    return total
