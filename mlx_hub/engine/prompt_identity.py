"""What a model's prompt caches depend on, hashed to the folder name they live under.

Anything that changes what the KV cache holds for a given token sequence (the
weights, the model's config.json, the model code ``trust_remote_code`` runs, KV
quantization, a rotating cache's size, a draft model, the library that wrote the
tensors) changes the identity, so a stale cache is never read; entries that
agree on all of it (profiles of one model) share one folder.

The tokenizer and chat template are left out on purpose: an entry is keyed by
token ids, and the KV of a given token sequence does not depend on how text
became those tokens. A new template or tokenizer makes prompts into other
sequences, which miss (or share a true prefix); it cannot make a stored one wrong.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
from pathlib import Path
from typing import Any

from mlx_hub.config import ModelConfig
from mlx_hub.engine.base import Identity
from mlx_hub.engine.model_files import WEIGHT_SUFFIXES, model_folder
from mlx_hub.engine.versions import package_version

#: Bumped when what a folder holds changes shape; part of every identity, so old folders are never read.
FORMAT = 1


def _weight_files(folder: Path | None) -> list[list[Any]]:
    if folder is None or not folder.is_dir():
        return []
    files = []
    for path in sorted(folder.rglob("*")):
        if path.suffix in WEIGHT_SUFFIXES:
            with contextlib.suppress(OSError):
                info = path.stat()  # follows the Hugging Face cache's symlinks to the blobs
                files.append([str(path.relative_to(folder)), info.st_size, info.st_mtime_ns])
    return files


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _config_digest(folder: Path | None) -> str | None:
    """config.json's content, hashed: rope_theta, rope_scaling, sliding_window and the rest shape the KV.

    Parsed and written back canonically, so re-indenting the file changes
    nothing; a file that does not parse is hashed as it is. None: no config.json.
    """
    if folder is None:
        return None
    try:
        raw = (folder / "config.json").read_bytes()
    except OSError:
        return None
    try:
        raw = json.dumps(json.loads(raw), sort_keys=True, separators=(",", ":")).encode()
    except ValueError:
        pass
    return _sha256(raw)


def _code_digests(folder: Path | None, trusted: bool) -> dict[str, str] | None:
    """Each Python file in the model's folder, hashed, where ``trust_remote_code`` lets it run.

    mlx-lm builds the architecture from a config's ``model_file`` (and
    transformers imports the folder's tokenizer code) only when trusted; the
    files it may import are any of the folder's, so all of them count.
    """
    if not trusted or folder is None or not folder.is_dir():
        return None
    code = {}
    for path in sorted(folder.rglob("*.py")):
        with contextlib.suppress(OSError):
            code[str(path.relative_to(folder))] = _sha256(path.read_bytes())
    return code


def _folder_facts(folder: Path | None, trusted: bool) -> dict[str, Any]:
    """What a model folder gives the KV: its weight files, its config.json and (trusted) its code."""
    return {
        "weights": _weight_files(folder),
        "config": _config_digest(folder),
        "code": _code_digests(folder, trusted),
    }


def model_identity(
    model_path: str,
    folder: Path | None,
    *,
    kv_bits: int | None = None,
    kv_group_size: int = 64,
    quantized_kv_start: int = 0,
    context_length: int | None = None,
    draft_path: str | None = None,
    draft_folder: Path | None = None,
    library: str = "",
    trust_remote_code: bool = False,
) -> Identity:
    """The identity of a model's prompt caches; ``folder`` is where ``model_path`` resolved (None: unknown).

    ``library`` names the versions that wrote the tensors (mlx-lm's cache
    classes), so an upgrade that changed them starts new folders.
    ``trust_remote_code`` puts the folders' Python files in it: code that may run.
    """
    weights = str(folder.resolve()) if folder is not None else model_path
    description: dict[str, Any] = {
        "format": FORMAT,
        "model": weights,
        **_folder_facts(folder, trust_remote_code),
        "kv_bits": kv_bits,
        "kv_group_size": kv_group_size if kv_bits else None,
        "quantized_kv_start": quantized_kv_start if kv_bits else None,
        "context_length": context_length,
        "draft": None,
        "library": library,
    }
    if draft_path:
        description["draft"] = {
            "model": str(draft_folder.resolve()) if draft_folder else draft_path,
            **_folder_facts(draft_folder, trust_remote_code),
        }
    digest = hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:20]
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(weights).name or "model").strip("-.")[:40] or "model"
    return Identity(f"{slug}-{digest}", description)


def entry_identity(entry: ModelConfig) -> Identity:
    """A hub.yaml entry's identity: its model folder (weights, config, trusted code), its KV options,
    its draft model, mlx-lm's version."""
    draft = entry.draft_model_path
    return model_identity(
        entry.model_path,
        model_folder(entry.model_path),
        kv_bits=entry.kv_bits,
        kv_group_size=entry.kv_group_size,
        quantized_kv_start=entry.quantized_kv_start,
        context_length=None if draft else entry.context_length,  # upstream drops it beside a draft model
        draft_path=draft,
        draft_folder=model_folder(draft) if draft else None,
        library=f"mlx-lm {package_version('mlx-lm')}",
        trust_remote_code=entry.trust_remote_code,
    )
