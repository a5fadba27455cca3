"""Turning one patch off, to see what the library does without it.

``MLX_HUB_DISABLE_PATCHES=share_weights,thread_local_stream`` (names as in each
patch module's docstring) skips those patches in this process. For a user who
suspects the hub's change, and for the proof that each patch is needed: its
named test fails with the patch switched off.
"""

from __future__ import annotations

import os

DISABLE_ENV = "MLX_HUB_DISABLE_PATCHES"


def enabled(name: str) -> bool:
    """Whether patch ``name`` applies (read each time: tests switch it per process)."""
    return name not in {n.strip() for n in os.environ.get(DISABLE_ENV, "").split(",")}
