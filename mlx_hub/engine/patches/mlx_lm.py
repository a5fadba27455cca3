"""mlx-lm 0.32: the stop-sequence API upstream 1.8.1's batch scheduler was written against (``stop_sequences``).

mlx-lm 0.32 replaced ``SequenceStateMachine`` with ``StopSequences`` (an
Aho-Corasick automaton over token sequences), and ``BatchGenerator.insert`` /
``insert_segments`` take ``stop_sequences=`` where 0.31 took ``state_machines=``.
Upstream's ``app/core/batch_scheduler.py`` imports ``SequenceStateMachine`` at
import time; on 0.32 that import fails, upstream sets ``BATCHING_AVAILABLE =
False``, and every ``lm`` request silently falls back to one at a time.

Upstream builds only machines of the form ``{"normal": [(tokens, None), ...]}``
(stop on EOS or on a stop word's tokens), which is exactly a set of stop
sequences. The adapter, installed in ``mlx_lm.generate`` before upstream's
scheduler module is first imported, is a ``SequenceStateMachine`` that builds
the equivalent ``StopSequences``, and the keyword renamed on the two insert
methods. A machine with a transition to another state (which upstream never
builds) is refused rather than approximated.

Proof: tests/test_engine.py::test_lm_models_batch_on_the_installed_mlx_lm.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import logging
import sys
from collections.abc import Sequence
from typing import Any

from mlx_hub.engine.patches.switch import enabled

log = logging.getLogger(__name__)

SCHEDULER = "app.core.batch_scheduler"


def stop_sequences() -> None:
    """Give mlx-lm 0.32's ``mlx_lm.generate`` the 0.31 names upstream's scheduler imports (idempotent)."""
    if not enabled("stop_sequences"):
        return
    # importlib: ``import mlx_lm.generate as m`` binds mlx_lm's ``generate`` function, not the module.
    generate = importlib.import_module("mlx_lm.generate")
    if hasattr(generate, "SequenceStateMachine") or not hasattr(generate, "StopSequences"):
        return
    stop_type = generate.StopSequences

    def state_machine(
        transitions: dict[str, Sequence[tuple[Sequence[int], Any]]], initial: str = "normal"
    ) -> Any:
        moves = transitions.get(initial, [])
        if any(target is not None for _, target in moves) or set(transitions) - {initial}:
            raise ValueError(f"mlx-lm {_version()} has stop sequences only; cannot build {transitions!r}")
        return stop_type([list(tokens) for tokens, _ in moves] or None)

    generate.SequenceStateMachine = state_machine
    for method in ("insert", "insert_segments"):
        original = getattr(generate.BatchGenerator, method)

        def renamed(self: Any, *args: Any, _original: Any = original, **kwargs: Any) -> Any:
            if "state_machines" in kwargs:
                kwargs["stop_sequences"] = kwargs.pop("state_machines")
            return _original(self, *args, **kwargs)

        renamed.__doc__ = original.__doc__
        setattr(generate.BatchGenerator, method, renamed)


class _BeforeScheduler(importlib.abc.MetaPathFinder):
    """Runs the adapter just before upstream's scheduler module is first imported, then steps aside."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> None:
        if name == SCHEDULER:
            sys.meta_path.remove(self)
            if importlib.util.find_spec("mlx_lm") is not None:
                stop_sequences()
        return None


def install_import_hook() -> None:
    """Arrange for ``stop_sequences`` to run before upstream's scheduler is imported (idempotent)."""
    if SCHEDULER in sys.modules:
        if not getattr(sys.modules[SCHEDULER], "BATCHING_AVAILABLE", True):
            log.warning("%s was imported before the hub's mlx-lm adapter; lm batching is off", SCHEDULER)
        return
    if not any(isinstance(finder, _BeforeScheduler) for finder in sys.meta_path):
        sys.meta_path.insert(0, _BeforeScheduler())


def _version() -> str:
    from mlx_hub.engine.versions import package_version

    return package_version("mlx-lm") or "?"
