"""Sizes in hub.yaml (``max_memory: 48GB``, ``0.75``, ``auto``), read one way everywhere."""

from __future__ import annotations

import re

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


#: ``max_memory`` words: ``auto`` (the engine's safe working set) and ``none`` (no budget).
BUDGET_WORDS = ("auto", "none")


def is_budget_word(value: object) -> bool:
    """``max_memory: auto`` or ``max_memory: none`` (any case)."""
    return isinstance(value, str) and value.strip().lower() in BUDGET_WORDS


def memory_bytes(value: int | float | str, total: int | None) -> int:
    """``max_memory`` in bytes: an integer of bytes, a size like ``"48GB"``, or a fraction of ``total``.

    Units are binary whatever their spelling (``48GB`` is 48 GiB), as macOS
    and every memory gauge count memory. A fraction (``0.75`` or ``"0.75"``)
    needs the machine's physical memory, ``total``.
    """
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError("max_memory must be a size like '48GB', a fraction like 0.75, or bytes")
    if isinstance(value, str):
        text = value.strip()
        try:
            value = float(text) if "." in text else int(text)
        except ValueError:
            match = _SIZE.match(text)
            if not match:
                raise ValueError(
                    f"{value!r} is not a size like '48GB', a fraction like 0.75, or bytes"
                ) from None
            unit = (match.group(2) or "").lower().rstrip("b").rstrip("i")
            return int(float(match.group(1)) * _UNITS[unit])
    if isinstance(value, float):
        if not 0 < value <= 1:
            raise ValueError(f"a fraction of physical memory must be between 0 and 1, not {value}")
        if total is None:
            raise ValueError("a fractional max_memory needs the machine's memory size, which is unknown here")
        return int(value * total)
    if value <= 0:
        raise ValueError(f"max_memory must be positive, not {value}")
    return int(value)


def disk_bytes(value: int | str) -> int:
    """``prompt_cache_disk_size`` in bytes: bytes, or a size like ``"20GB"`` (binary units); 0 is off."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError("prompt_cache_disk_size must be a size like '20GB', bytes, or 0 to turn it off")
    match = _SIZE.match(value) if isinstance(value, str) else None
    if isinstance(value, str) and not match:
        raise ValueError(f"{value!r} is not a size like '20GB' (or 0 to keep no prompt caches on disk)")
    if match:
        unit = (match.group(2) or "").lower().rstrip("b").rstrip("i")
        value = int(float(match.group(1)) * _UNITS[unit])
    if value < 0:
        raise ValueError(f"prompt_cache_disk_size must be 0 or more, not {value}")
    return int(value)
