"""What ``GET /hub/prompt-cache`` answers and ``mlx-openai-server-hub cache`` prints: one row per identity."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from mlx_hub.engine.prompt_files import IDENTITY, names_in
from mlx_hub.engine.prompt_store import PromptStore
from mlx_hub.fsutil import read_json


@dataclass
class IdentityInfo:
    """One folder: the names that used it, its entries, bytes and last use."""

    key: str
    names: list[str]
    model: str
    entries: int
    bytes: int
    last_use: float | None
    known: bool  # this hub's hub.yaml has it (every folder is, for a store that knows no hub.yaml)
    in_use: bool = False  # a live hub (this one or another on the folder) leases it


def listing(store: PromptStore) -> list[IdentityInfo]:
    """Every identity folder (one whose index cannot be read now shows no entries)."""
    rows = []
    with store.locked():
        for key in store.keys():
            entries = store.entries(key)
            info = read_json(store.folder(key) / IDENTITY, {})
            rows.append(
                IdentityInfo(
                    key=key,
                    names=names_in(info),
                    model=str(info.get("model", "?")) if isinstance(info, dict) else "?",
                    entries=len(entries),
                    bytes=sum(e.bytes for e in entries),
                    last_use=max((e.last_use for e in entries), default=None),
                    known=not store.known or key in store.known.values(),
                    in_use=store.in_use(key),
                )
            )
    return rows


def describe(store: PromptStore | None) -> dict[str, Any]:
    """The store's rows, bytes on disk and cap (``enabled`` false without one)."""
    if store is None:
        return {"enabled": False, "path": None, "disk_bytes": 0, "cap_bytes": 0, "identities": []}
    rows = [asdict(row) for row in listing(store)]
    return {
        "enabled": True,
        "path": str(store.root),
        "disk_bytes": sum(row["bytes"] for row in rows),
        "cap_bytes": store.cap,
        "identities": rows,
    }
