"""Atomic state files: a crash or a full disk never leaves a half-written one.

And private ones: logs and the request log can hold prompts and answers, so
they are the owner's alone (files 0600, the folders the hub makes 0700).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

PRIVATE_FILE = 0o600
PRIVATE_DIR = 0o700


def private_opener(path: str | os.PathLike[str], flags: int) -> int:
    """``open(..., opener=private_opener)``: a new file is created 0600, an existing one loses group/other access.

    Tightening an existing file covers logs an older hub wrote readable to all.
    """
    fd = os.open(path, flags, PRIVATE_FILE)
    try:
        if os.fstat(fd).st_mode & 0o077:
            os.fchmod(fd, PRIVATE_FILE)
    except PermissionError:
        pass  # someone else's file: left as it is
    return fd


def private_file(path: str | os.PathLike[str]) -> Path:
    """Make sure ``path`` exists, owner-only (for files another library opens, such as SQLite's)."""
    os.close(private_opener(path, os.O_RDWR | os.O_CREAT))
    return Path(path)


def private_dir(path: str | os.PathLike[str]) -> Path:
    """Create ``path`` (and its parents) as needed; the folder made for it is 0700.

    A folder that exists keeps its mode: it may be the user's own, shared on purpose.
    """
    folder = Path(path)
    folder.mkdir(mode=PRIVATE_DIR, parents=True, exist_ok=True)
    return folder


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to ``path`` through a synced temporary file and a rename.

    Readers see the old content or the new, never a mix; on any error the
    temporary file is removed and the old file is left as it was. A file that
    exists keeps its permissions (a rewritten hub.yaml stays as readable as it was).
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        try:
            os.chmod(tmp, target.stat().st_mode & 0o7777)
        except FileNotFoundError:
            pass
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_write_json(path: str | os.PathLike[str], data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def read_json(path: str | os.PathLike[str], default: Any = None) -> Any:
    """Read a state file; a missing or corrupt one yields ``default``, never an exception."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return default
