"""Patch (mlx-openai-server 1.8.1): let a route see the raw generation steps behind a handler's stream.

Upstream's ``generate_text_stream`` yields parsed text and, last, a usage
chunk; it does not say *why* generation ended, and a consumer that stops
reading early (a stop sequence the hub found in the text) never gets the usage.
The hub needs both for Anthropic's ``stop_sequences``:

* upstream's batched path ends generation on a stop sequence's tokens (what
  OpenAI ``stop`` does on the chat route) and drops the matched last token from
  the text, so only the final step's ``token`` and ``finish_reason`` tell a
  stop sequence from the end of the turn;
* when the hub itself ends the generation (upstream's single-request and
  multimodal paths ignore ``stop``, and a model may spell a stop sequence with
  other tokens than its tokenizer's), the steps read so far carry the real
  counts: ``generation_tokens`` and ``prompt_tokens``.

So the two places upstream hands generation steps to a handler,
``BatchScheduler.submit_stream`` and ``InferenceWorker.submit_stream``, are
wrapped: while a route has opened a :class:`GenerationWatch` (a context
variable, so only that request's steps are seen), each step is noted there and
passed on unchanged; closing the wrapper closes upstream's generator, which
cancels the generation as before. Without a watch the original generator is
returned untouched. ``tests/test_stops.py`` fails without this patch (the
Messages usage after a stop is then zero, and a token-level stop reads as
``end_turn``).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import AsyncGenerator, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any


@dataclass
class GenerationWatch:
    """The last generation step one request's handler stream produced (None before the first)."""

    steps: int = 0
    token: int | None = None
    finish_reason: str | None = None
    generation_tokens: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0

    def note(self, step: Any) -> None:
        self.steps += 1
        token = getattr(step, "token", None)
        self.token = int(token) if isinstance(token, int) or hasattr(token, "__int__") else None
        self.finish_reason = getattr(step, "finish_reason", None)
        self.generation_tokens = int(getattr(step, "generation_tokens", 0) or self.steps)
        self.prompt_tokens = int(getattr(step, "prompt_tokens", 0) or self.prompt_tokens)
        self.cached_tokens = int(getattr(step, "cached_prompt_tokens", 0) or self.cached_tokens)


_WATCH: ContextVar[GenerationWatch | None] = ContextVar("hub_generation_watch", default=None)


@contextlib.contextmanager
def watching(watch: GenerationWatch) -> Iterator[GenerationWatch]:
    """Note the generation steps started in this context (the route's first read starts them)."""
    token = _WATCH.set(watch)
    try:
        yield watch
    finally:
        _WATCH.reset(token)


async def _watched(source: AsyncGenerator[Any, None], watch: GenerationWatch) -> AsyncGenerator[Any, None]:
    try:
        async for step in source:
            if step is not None:
                watch.note(step)
            yield step
    finally:
        await source.aclose()  # upstream's own cleanup: cancels the generation


def _wrap(cls: type, name: str) -> None:
    original = getattr(cls, name)
    if getattr(original, "_mlx_hub_watched", False):
        return

    def submit_stream(self: Any, *args: Any, **kwargs: Any) -> Any:
        source = original(self, *args, **kwargs)
        watch = _WATCH.get()
        return source if watch is None else _watched(source, watch)

    submit_stream._mlx_hub_watched = True  # type: ignore[attr-defined]
    submit_stream.__doc__ = original.__doc__
    setattr(cls, name, submit_stream)


def watch_generation_steps() -> None:
    """Install the wrappers on whichever of upstream's generation modules are imported (idempotent)."""
    for module_name, class_name in (
        ("app.core.batch_scheduler", "BatchScheduler"),
        ("app.core.inference_worker", "InferenceWorker"),
    ):
        cls = getattr(sys.modules.get(module_name), class_name, None)
        if cls is not None:
            _wrap(cls, "submit_stream")
