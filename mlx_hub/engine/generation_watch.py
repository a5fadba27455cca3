"""The raw generation steps behind one request's handler stream, for the route that reads it.

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

A route opens a :class:`GenerationWatch` (a context variable, so only that
request's steps are seen) around its first read; the patch
``engine.patches.mlx_openai_server.watch_generation_steps`` hands each
generation stream upstream starts to :func:`watched`.
"""

from __future__ import annotations

import contextlib
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
        self.token = None if token is None else int(token)
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


def watched(source: AsyncGenerator[Any, None]) -> AsyncGenerator[Any, None]:
    """``source`` with its steps noted in the watch this context opened; untouched without one."""
    watch = _WATCH.get()
    return source if watch is None else _noting(source, watch)


async def _noting(source: AsyncGenerator[Any, None], watch: GenerationWatch) -> AsyncGenerator[Any, None]:
    try:
        async for step in source:
            if step is not None:
                watch.note(step)
            yield step
    finally:
        await source.aclose()  # upstream's own cleanup: cancels the generation
