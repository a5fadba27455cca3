"""mlx-openai-server 1.8.1's batched multimodal path (``app.core.vlm_batch_scheduler``) on mlx-vlm 0.7.

Upstream's ``VLMBatchScheduler`` serves concurrent image requests from one
mlx-vlm ``BatchGenerator``; it runs on mlx-vlm releases whose
``BatchGenerator.insert`` takes ``prompt_kwargs`` (0.7.10 here; on 0.4
``vlm_batching_capability`` switches it off). Two things go wrong as upstream
wrote it; each item is named as ``MLX_HUB_DISABLE_PATCHES`` takes it.

- ``vlm_batch_per_request_sampling``: the scheduler builds its one
  ``BatchGenerator`` with the sampler of the first request it ever sees, and
  mlx-vlm 0.7's generator samples every row with that one sampler (its
  ``insert`` has no per-sequence ``samplers``, unlike mlx-lm's). So the first
  request's temperature and top_p decide every later request's until the model
  unloads: after a hot first request, ``temperature: 0`` answers are random;
  after a greedy one, every request is greedy. The generator is made greedy,
  and each request's own sampler runs as the last of that request's logits
  processors (mlx-vlm applies those per row): it draws the request's token and
  leaves only that token possible, which the greedy pick then takes. Requests
  at temperature 0 have no processor and decode as before. Proof:
  tests/test_vlm_batching.py::test_each_request_samples_as_it_asked.
- ``vlm_batch_failure_frees_its_sequences``: when a batch step raises (MLX
  failing to allocate, say), ``_fail_all_active`` fails the step's requests
  but leaves their sequences, with their KV caches, in the generator, which
  decodes them for nobody beside the next request until their ``max_tokens``.
  They are removed first, as upstream removes cancelled ones; where removing
  fails, the generator is replaced by a fresh one. The lm twin is
  ``batch_failure_frees_its_sequences``. Proof:
  tests/test_vlm_batching.py::test_a_failed_batch_step_frees_its_sequences.

Seeds stay as upstream has them: ignored while batching (as for lm), and
honoured with ``disable_batching``.
"""

from __future__ import annotations

import functools
import inspect
import logging
import sys
from collections.abc import Callable
from typing import Any

from mlx_hub.engine.patches.mlx_openai_server import VLM_SCHEDULER, free_before_failing, vlm_generator_batches
from mlx_hub.engine.patches.switch import enabled

log = logging.getLogger(__name__)


def apply() -> None:
    """Patch upstream's VLM scheduler where it runs on an mlx-vlm that needs it (idempotent)."""
    scheduler = _batching_scheduler()
    if scheduler is None:
        return
    if enabled("vlm_batch_per_request_sampling"):
        per_request_sampling(scheduler)
    if enabled("vlm_batch_failure_frees_its_sequences"):
        free_before_failing(scheduler, _drop_sequences)


def _batching_scheduler() -> type | None:
    """``VLMBatchScheduler`` when its ``BatchGenerator`` is one it can drive, else None."""
    if not vlm_generator_batches():
        return None  # mlx-vlm 0.4: vlm_batching_capability sends requests one at a time
    return getattr(sys.modules[VLM_SCHEDULER], "VLMBatchScheduler", None)


def per_request_sampling(scheduler: type) -> None:
    """Greedy generator, and each request's sampler as its own last logits processor."""
    generator = sys.modules[VLM_SCHEDULER].BatchGenerator
    if "samplers" in inspect.signature(generator.insert).parameters:
        return  # an mlx-vlm that samples each sequence with its own sampler
    if getattr(scheduler, "_mlx_hub_per_request_sampling", False):
        return
    create, submit = scheduler._create_batch_generator, scheduler.submit_stream

    @functools.wraps(create)
    def create_batch_generator(self: Any, sampler: Any) -> Any:
        return create(self, None)

    @functools.wraps(submit)  # keeps other patches' markers (watch_generation_steps)
    def submit_stream(
        self: Any, raw_inputs: dict[str, Any], *args: Any, sampler: Any = None, **kwargs: Any
    ) -> Any:
        processors = kwargs.pop("logits_processors", None)
        if sampler is not None:
            processors = [*(processors or []), sampled_token_only(sampler)]
        return submit(self, raw_inputs, *args, sampler=None, logits_processors=processors, **kwargs)

    scheduler._create_batch_generator = create_batch_generator  # type: ignore[attr-defined]
    scheduler.submit_stream = submit_stream  # type: ignore[attr-defined]
    scheduler._mlx_hub_per_request_sampling = True  # type: ignore[attr-defined]


def sampled_token_only(sampler: Callable[[Any], Any]) -> Callable[[Any, Any], Any]:
    """A logits processor that draws a token with ``sampler`` and leaves only it possible.

    mlx-vlm calls a sequence's processors on its own row of logits (shape
    ``(1, vocab)``); the batch's greedy pick then takes the drawn token.
    """
    import mlx.core as mx

    def sample_this_row(tokens: Any, logits: Any) -> Any:
        token = sampler(logits - mx.logsumexp(logits, axis=-1, keepdims=True))
        drawn = mx.arange(logits.shape[-1]) == token.reshape(-1, 1)
        return mx.where(drawn, mx.zeros_like(logits), mx.full(logits.shape, -mx.inf, logits.dtype))

    return sample_this_row


def _drop_sequences(scheduler: Any, generator: Any, uids: list[int]) -> None:
    """mlx-vlm's ``remove`` takes one uid at a time; a generator that cannot remove them is replaced whole."""
    try:
        for uid in uids:
            generator.remove(uid)
        return
    except Exception:
        log.exception("could not drop the failed batch's sequences; starting a fresh batch generator")
    greedy = getattr(generator, "greedy_sampling", True)
    try:
        scheduler._batch_generator = scheduler._create_batch_generator(None if greedy else generator.sampler)
    except Exception:  # the next request makes one, as for the first
        log.exception("could not start a fresh batch generator")
        scheduler._batch_generator = None
    generator.close()
