"""Which patches apply in this process: those the installed libraries need, less those switched off.

``MLX_HUB_DISABLE_PATCHES=share_weights,thread_local_stream`` (names as in each
patch module's docstring) skips those patches in this process. For a user who
suspects the hub's change, and for the proof that each patch is needed: its
named test fails with the patch switched off.

Some patches answer a defect or an API of one release line of a library
(``ONLY_FOR``). The hub runs on the newest stack by default and on upstream's
pins for users who keep them, so such a patch stays, and applies only where
the installed release is one it was written for; elsewhere its test shows the
library doing the right thing by itself.
"""

from __future__ import annotations

import functools
import os

from mlx_hub.engine.versions import package_version, release_in

DISABLE_ENV = "MLX_HUB_DISABLE_PATCHES"

#: patch name -> (package, the releases that need it, as a PEP 440 specifier).
ONLY_FOR: dict[str, tuple[str, str]] = {
    "thread_local_stream": ("mlx-vlm", "<0.5"),
    "vlm_batching_capability": ("mlx-vlm", "<0.5"),
    "stop_sequences": ("mlx-lm", ">=0.32"),
    "processors_follow_sequences": ("mlx-lm", "<0.32"),
    "vlm_batch_per_request_sampling": ("mlx-vlm", ">=0.5"),
    "vlm_batch_failure_frees_its_sequences": ("mlx-vlm", ">=0.5"),
    "vlm_last_step_usage": ("mlx-openai-server", "<=1.8.1"),
}


@functools.cache
def needed_here(name: str) -> bool:
    """Whether the installed release of the library ``name`` patches is one it was written for."""
    if name not in ONLY_FOR:
        return True
    package, releases = ONLY_FOR[name]
    return release_in(package_version(package), releases)


def switched_off(name: str) -> bool:
    """Whether the user (or a proof run) switched patch ``name`` off; read each time."""
    return name in {n.strip() for n in os.environ.get(DISABLE_ENV, "").split(",")}


def enabled(name: str) -> bool:
    """Whether patch ``name`` applies in this process."""
    return needed_here(name) and not switched_off(name)
