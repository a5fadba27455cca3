"""The prompt store's files: token ids as bytes, atomic publication, and a folder safe to read back."""

from __future__ import annotations

import hashlib
import os
import stat
import sys
import uuid
from array import array
from pathlib import Path
from typing import Any

from mlx_hub.engine.base import PromptStoreError

INDEX = "index.json"  # an identity's entries (prompt_index.py)
IDENTITY = "identity.json"  # what the identity hashes, and the hub.yaml names that used it
PAYLOAD = ".safetensors"  # an entry's tensors, in mlx-lm's format
TOKENS = ".tokens"  # an entry's token ids


def new_entry_id() -> str:
    """A fresh entry id: unique across hubs sharing a store, so no lock is needed to pick one."""
    return uuid.uuid4().hex


def token_bytes(tokens: list[int]) -> bytes:
    data = array("I", tokens)
    if data.itemsize != 4:  # pragma: no cover - every platform MLX runs on has 4-byte unsigned ints
        data = array("L", tokens)
    if sys.byteorder == "big":  # pragma: no cover
        data.byteswap()
    return data.tobytes()


def parse_tokens(raw: bytes) -> list[int]:
    data = array("I")
    data.frombytes(raw)
    if sys.byteorder == "big":  # pragma: no cover
        data.byteswap()
    return data.tolist()


def digest_of(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()


def temp_path(final: Path) -> Path:
    """Where ``final`` (``<id>.<kind>``) is written before ``publish``: ``.<id>.tmp.<kind>``.

    One pattern for every entry file in progress, so a sweep knows whose it is
    (prompt_locks.py); the kind stays last because mlx-lm appends
    ``.safetensors`` to a payload name that does not end with it.
    """
    return final.with_name(f".{final.stem}.tmp{final.suffix}")


def names_in(description: Any) -> list[str]:
    """The hub.yaml names an ``identity.json`` records (none when it is missing or malformed)."""
    names = description.get("names") if isinstance(description, dict) else None
    return [n for n in names if isinstance(n, str)] if isinstance(names, list) else []


def publish(tmp: Path, final: Path) -> None:
    """Make a finished temporary file ``final`` (0600): fsync it, rename it, fsync the folder."""
    os.chmod(tmp, 0o600)
    with open(tmp, "rb+") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, final)
    fd = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_folder(path: Path) -> None:
    """Create ``path`` (0700) or make sure it is this user's and nobody else can write to it.

    Another user who can write there could plant a cache this hub would read
    back as a model's state, so such a folder is refused, not used.
    """
    if path.exists() and not path.is_dir():
        raise PromptStoreError(f"prompt_cache_path {path} is not a folder; set prompt_cache_path to a folder")
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = path.stat()
    except OSError as exc:
        raise PromptStoreError(
            f"prompt_cache_path {path}: cannot create or read it ({exc.strerror or exc}); "
            "fix its permissions or set prompt_cache_path in hub.yaml to a folder of your own"
        ) from None
    if info.st_uid != os.getuid():
        raise PromptStoreError(
            f"prompt_cache_path {path} belongs to another user (uid {info.st_uid}); "
            "set prompt_cache_path in hub.yaml to a folder of your own"
        )
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise PromptStoreError(
            f"prompt_cache_path {path} can be written by other users (mode {stat.S_IMODE(info.st_mode):o}); "
            f"run `chmod 700 {path}` or set prompt_cache_path in hub.yaml to a private folder"
        )
