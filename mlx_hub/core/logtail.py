"""Reading the hub's log files as ``tail -n`` and ``tail -F`` do, for ``/hub/logs``.

The files are the ones ``logs`` writes (hub.log and one per model), rotated
by size: a follower that finds the file replaced or shorter starts on the
new one from its first byte. Only whole lines are handed out.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path

BLOCK = 64 * 1024
MAX_READ = 1 << 20  # bytes read per poll, so one huge write cannot stall the loop


def tail(path: Path, lines: int) -> tuple[list[str], int]:
    """The last ``lines`` lines of ``path`` and the offset just past them (0 and none for a missing file)."""
    try:
        with open(path, "rb") as file:
            end = file.seek(0, os.SEEK_END)
            start, data = end, b""
            while start > 0 and data.count(b"\n") <= lines:
                start = max(0, start - BLOCK)
                file.seek(start)
                data = file.read(end - start)
    except FileNotFoundError:
        return [], 0
    text = data.decode("utf-8", "replace")
    complete, _, partial = text.rpartition("\n")
    found = complete.split("\n") if complete else []
    if start > 0 and found:
        found = found[1:]  # the first one may be cut
    return (found[-lines:] if lines else []), end - len(partial.encode("utf-8", "replace"))


async def follow(
    path: Path, offset: int, closed: Callable[[], bool], *, poll: float = 0.25
) -> AsyncIterator[list[str]]:
    """New whole lines of ``path`` from ``offset`` as they are written, until ``closed()``."""
    position, inode, partial = offset, _inode(path), b""
    while not closed():
        try:
            stat = path.stat()
        except FileNotFoundError:
            await asyncio.sleep(poll)
            continue
        if (
            stat.st_ino != inode or stat.st_size < position
        ):  # rotated or truncated: the new file from its start
            position, inode, partial = 0, stat.st_ino, b""
        if stat.st_size <= position:
            await asyncio.sleep(poll)
            continue
        with open(path, "rb") as file:
            file.seek(position)
            data = file.read(min(stat.st_size - position, MAX_READ))
        position += len(data)
        complete, _, partial = (partial + data).rpartition(b"\n")
        if complete or _:
            yield complete.decode("utf-8", "replace").split("\n")


def _inode(path: Path) -> int | None:
    try:
        return path.stat().st_ino
    except FileNotFoundError:
        return None
