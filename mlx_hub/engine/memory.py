"""MLX's memory counters and the calls that give memory back.

Process-wide by nature: one MLX allocator per process, whatever number of hubs
it runs. Each function imports MLX when called, so importing this module is free.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import gc
import os
from typing import Any


def active_memory() -> int:
    """MLX's active (allocated, non-cache) memory in bytes, the figure unloads must return."""
    import mlx.core as mx

    return int(mx.get_active_memory())


def system_memory() -> int | None:
    """Physical memory of this machine in bytes (unified memory on Apple silicon)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def peak_memory() -> int:
    """MLX's highest active memory since the last ``reset_peak_memory`` (the hub resets it at start)."""
    import mlx.core as mx

    return int(mx.get_peak_memory())


def reset_peak_memory() -> None:
    import mlx.core as mx

    mx.reset_peak_memory()


#: ``max_memory: auto`` on Metal: the recommended working set less this fraction of it, and at least
#: ``AUTO_MARGIN_MIN`` (what the OS, the hub's Python and other apps need beside MLX's buffers).
AUTO_MARGIN_FRACTION = 0.10
AUTO_MARGIN_MIN = 1 << 30
#: ``max_memory: auto`` without Metal (Linux, CPU MLX): this fraction of physical memory.
AUTO_SYSTEM_FRACTION = 0.75


def recommended_working_set() -> int | None:
    """What Metal recommends MLX keep resident (``mx.device_info()``); None where MLX reports none (CPU)."""
    import mlx.core as mx

    try:
        info = mx.device_info()
    except Exception:
        return None
    value = info.get("max_recommended_working_set_size") if isinstance(info, dict) else None
    return int(value) if isinstance(value, int | float) and value > 0 else None


def working_set() -> int | None:
    """``max_memory: auto``: Metal's recommended working set less a margin, else 0.75 of physical memory."""
    recommended = recommended_working_set()
    if recommended is not None:
        return max(recommended - max(int(recommended * AUTO_MARGIN_FRACTION), AUTO_MARGIN_MIN), 0) or None
    total = system_memory()
    return None if total is None else int(total * AUTO_SYSTEM_FRACTION)


@functools.cache
def _mlx_default_limit() -> int:
    """MLX's own memory limit, read once, before any hub in this process sets one.

    The limit is a property of the process (one MLX per process), not of a
    hub: every hub restores this figure when its budget goes away.
    """
    import mlx.core as mx

    return int(mx.get_memory_limit())


def set_memory_limit(budget: int | None) -> None:
    """Tell MLX the budget (``mx.set_memory_limit``, and the wired limit on Metal); None restores MLX's own.

    The limit is MLX's guideline for when to free its buffer cache and wait for
    running work before allocating more; on CPU an allocation past it still
    succeeds. The hub's own admission is what keeps requests under the budget;
    this is the second line where the estimate was wrong.
    """
    import mlx.core as mx

    mx.set_memory_limit(budget or _mlx_default_limit())
    recommended = recommended_working_set()
    wired = getattr(mx, "set_wired_limit", None)
    if recommended is not None and wired is not None:
        with contextlib.suppress(Exception):
            wired(min(budget, recommended) if budget else 0)


def cache_memory() -> int:
    import mlx.core as mx

    return int(mx.get_cache_memory())


def free_memory() -> None:
    """Return dropped arrays to the system: collect cycles, empty MLX's buffer cache, trim the heap.

    On Linux (CPU MLX), glibc keeps freed multi-megabyte tensors in the
    arenas of the threads that allocated them, so RSS stays up by a whole
    model after its unload; ``malloc_trim`` hands those pages back. macOS has
    no such call, and MLX's Metal buffers are returned by ``clear_cache``.
    """
    import mlx.core as mx

    gc.collect()
    mx.clear_cache()
    _trim_heap()


@functools.cache
def _libc_trim() -> Any:
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def _trim_heap() -> None:
    trim = _libc_trim()
    if trim is not None:
        trim(0)


def materialize(model: Any) -> None:
    """Evaluate every array a model holds, parameters and private buffers alike, on this thread.

    An MLX array that is still a lazy graph remembers the stream of the thread
    that built it, and evaluating it on another thread fails ("There is no
    Stream(cpu, 2) in current thread"). A model built on the hub's load thread
    must therefore leave it fully computed. ``parameters()`` misses buffers kept
    under underscore names, such as whisper's sinusoidal position table.
    """
    import mlx.core as mx
    import mlx.nn as nn

    arrays: list[Any] = [model.parameters()]
    for module in model.modules() if isinstance(model, nn.Module) else ():
        # A Module is a dict: underscore keys live there too, but parameters() skips them.
        arrays.extend(v for v in (*module.values(), *vars(module).values()) if isinstance(v, mx.array))
    mx.eval(arrays)
