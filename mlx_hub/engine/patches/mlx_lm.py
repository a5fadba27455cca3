"""mlx-lm: what the hub changes on its objects, one item per release line.

- ``stop_sequences`` (mlx-lm 0.32): the stop-sequence API upstream 1.8.1's batch scheduler was
  written against. mlx-lm 0.32 replaced ``SequenceStateMachine`` with ``StopSequences`` (an
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

- ``processors_follow_sequences`` (mlx-lm 0.31): each sequence in a batch keeps its own sampler
  and logits processors. mlx-lm 0.31.3's ``GenerationBatch.filter`` drops finished sequences from its
  ``samplers`` and ``logits_processors`` lists only ``if any(...)`` of them is
  set. A batch whose sequences all had none (every plain chat request) keeps
  its old entries when they finish; the next sequence ``extend`` adds lands
  after them, and ``_step`` reads entry ``e`` for the ``e``-th sequence: the
  stale, empty one. So on upstream's batched path (mlx-openai-server 1.8's
  default) a ``response_format: json_schema`` request that follows a plain
  request is generated without its constraint (``{ Paris Paris ...``), and a
  seeded or per-request sampler can be lost the same way. mlx-lm 0.32 filters
  both lists unconditionally; this applies only where ``filter`` still has the
  condition.

  Proof: tests/test_structured_answers.py::test_a_schema_after_a_plain_request_is_still_constrained
  (on mlx-lm 0.31.3).

- ``rank_steps`` (mlx-lm 0.32, in a sharded model's rank processes only): ``mlx_lm.server.run``
  serves with a ``ResponseGenerator`` that counts its loop's steps. In a distributed group every
  rank shares each request (or the absence of one) with an ``all_sum`` once per loop, idle or
  not, so a count that stops moving is a rank stuck in a collective (a dead or stopped peer, or
  the ring deadlock of mlx#4475). mlx-lm has no such signal; without it the hub cannot tell a
  stalled group from a busy one, and a request in flight would hang. The count and the rank's
  memory are printed on the rank's stdout (engine/sharded/rank.py), where the hub reads them.

  Proof: tests/test_sharded.py::test_a_stopped_rank_fails_the_group_with_its_name.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import inspect
import logging
import sys
from collections.abc import Sequence
from typing import Any

from mlx_hub.engine.patches.switch import enabled
from mlx_hub.engine.versions import package_version

log = logging.getLogger(__name__)

SCHEDULER = "app.core.batch_scheduler"
_LANES = ("samplers", "logits_processors")


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
            raise ValueError(
                f"mlx-lm {package_version('mlx-lm') or '?'} has stop sequences only; cannot build {transitions!r}"
            )
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


def processors_follow_sequences() -> None:
    """Patch ``GenerationBatch.filter`` once mlx-lm's generate module is imported, where it needs it."""
    batch = getattr(sys.modules.get("mlx_lm.generate"), "GenerationBatch", None)
    original = getattr(batch, "filter", None)
    if (
        not enabled("processors_follow_sequences")
        or original is None
        or getattr(original, "_mlx_hub_follows", False)
        or not _filters_lanes_conditionally(original)
    ):
        return

    def filter(self: Any, keep: list[int]) -> None:
        count = len(self.uids)
        kept = {
            lane: [getattr(self, lane)[i] for i in keep]
            for lane in _LANES
            if len(getattr(self, lane) or ()) == count
        }
        original(self, keep)
        for lane, values in kept.items():
            setattr(self, lane, values)

    filter._mlx_hub_follows = True  # type: ignore[attr-defined]
    batch.filter = filter


def _filters_lanes_conditionally(method: Any) -> bool:
    """Whether ``filter`` keeps the lanes as they are when none is set (mlx-lm 0.31's defect)."""
    try:
        source = inspect.getsource(method)
    except (OSError, TypeError):
        return False
    return "if any(self.logits_processors)" in source


def rank_steps(report: Any, step: Any) -> bool:
    """Make ``mlx_lm.server.run`` serve with a generator that calls ``step(got_request)`` once per loop.

    ``report(provider, generator)`` then runs on a thread of its own from the start of serving
    until the process ends. False (and nothing changed) where the patch is switched off.
    """
    if not enabled("rank_steps"):
        return False
    server = importlib.import_module("mlx_lm.server")

    class CountingGenerator(server.ResponseGenerator):  # type: ignore[misc, name-defined]
        def _next_request(self, timeout: float | None = None) -> Any:
            request = super()._next_request(timeout)
            step(request is not None)
            return request

    def run(host: str, port: int, provider: Any, **kwargs: Any) -> None:
        import threading

        import mlx.core as mx

        group = mx.distributed.init()
        generator = CountingGenerator(provider, server.LRUPromptCache(provider.cli_args.prompt_cache_size))
        threading.Thread(target=report, args=(provider, generator), daemon=True, name="rank-report").start()
        if group.rank() == 0:
            server._run_http_server(host, port, generator, **kwargs)
        else:
            generator.join()

    server.run = run
    return True
