"""One identity's ``index.json``: its entries, each checked field by field when read.

Two failures are kept apart. A file that could not be read (``EMFILE``,
``EIO``, a permission) says nothing about what it holds, so it raises
``IndexUnreadable`` and the caller keeps every file and skips only what it was
doing. A file that was read and is not an index is malformed: that file alone
may go. An entry with a bad field (``"last_use": null``, ``"bytes": "12"``)
is dropped by itself, so one bad entry never fails every insert's eviction
sort or the listing, and never costs the other entries.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Any

from mlx_hub.engine.prompt_identity import FORMAT

ENTRY_ID = re.compile(r"[0-9a-f]{32}")
DIGEST = re.compile(r"[0-9a-f]{64}")


class IndexUnreadable(Exception):
    """An index that exists but could not be read now: nothing may be concluded from it, nor deleted."""

    def __init__(self, path: Path, error: OSError):
        super().__init__(f"prompt cache index {path} cannot be read ({error.strerror or error})")
        self.path = path


@dataclass
class Entry:
    """One prompt cache on disk: its files are ``<id>.safetensors`` and ``<id>.tokens``."""

    id: str
    tokens: int  # how many token ids the key has
    digest: str  # sha256 of the token file's bytes
    bytes: int  # both files' size on disk
    nbytes: int  # the tensors' bytes in memory (upstream's accounting)
    last_use: float
    cache_type: str = "assistant"
    trimmable: bool = True
    source: str = "nonbatch"

    @classmethod
    def parse(cls, value: Any) -> Entry | None:
        """The entry ``value`` describes, or None when any field is missing, unknown or of the wrong type."""
        names = {f.name for f in fields(cls)}
        required = {f.name for f in fields(cls) if f.default is MISSING}
        if not isinstance(value, dict) or not required <= value.keys() <= names:
            return None
        entry = cls(**value)
        checks = (
            isinstance(entry.id, str) and ENTRY_ID.fullmatch(entry.id) is not None,
            isinstance(entry.digest, str) and DIGEST.fullmatch(entry.digest) is not None,
            all(_count(v) for v in (entry.tokens, entry.bytes, entry.nbytes)),
            _number(entry.last_use),
            isinstance(entry.cache_type, str) and isinstance(entry.source, str),
            isinstance(entry.trimmable, bool),
        )
        return entry if all(checks) else None


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def read_index(path: Path) -> tuple[dict[str, Entry], list[str]] | None:
    """The index's valid entries and the ids of those dropped; None when the file is malformed.

    A missing file is an empty index. Raises ``IndexUnreadable`` when the file
    exists but reading it failed.
    """
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return {}, []
    except OSError as exc:
        raise IndexUnreadable(path, exc) from None
    try:
        data = json.loads(raw)
    except ValueError:
        return None
    listed = data.get("entries") if isinstance(data, dict) and data.get("format") == FORMAT else None
    if not isinstance(listed, dict):
        return None
    entries, dropped = {}, []
    for entry_id, value in listed.items():
        entry = Entry.parse(value)
        if entry is None or entry.id != entry_id:
            dropped.append(str(entry_id))
        else:
            entries[entry_id] = entry
    return entries, dropped
