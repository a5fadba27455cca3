"""Stop sequences that end the generation, for Anthropic Messages and completions.

Upstream's chat route hands OpenAI ``stop`` to the handler, whose batched
path ends generation on the stop's tokens. The hub's two routes hand their
stop sequences over the same way (``translate`` puts them in the chat request),
and keep two safeguards of their own:

* the text is still scanned (:class:`~.translate.StopScanner`): upstream's
  single-request and multimodal paths ignore ``stop``, and a model may write a
  stop sequence with other tokens than the tokenizer's own spelling. On a match
  in the text the route stops reading, which closes upstream's generator and so
  cancels the generation there and then;
* when upstream ended the generation itself, it dropped the matched last token
  from the text, so the last generation step (``engine.generation_watch``) tells which
  sequence stopped it, rather than the reply ending as if the turn were over.

Either way usage counts the tokens generated up to the stop.
"""

from __future__ import annotations

from typing import Any

from mlx_hub.engine.generation_watch import GenerationWatch
from mlx_hub.web import translate as tr


def _tokenizer(handler: Any) -> Any:
    model = getattr(handler, "model", None)
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        processor = getattr(model, "processor", None)
        tokenizer = getattr(processor, "tokenizer", processor)
    return tokenizer


def _eos_ids(tokenizer: Any) -> set[int]:
    """The end-of-turn tokens upstream's batched state machine stops on, as it collects them."""
    ids = getattr(tokenizer, "eos_token_ids", None) or []
    if not ids and getattr(tokenizer, "eos_token_id", None) is not None:
        ids = [tokenizer.eos_token_id]
    return {int(i) for i in ids}


def _encode(tokenizer: Any, text: str) -> list[int]:
    try:
        return list(tokenizer.encode(text, add_special_tokens=False))
    except TypeError:
        return list(tokenizer.encode(text))


class StopEnding:
    """One generation's stop sequences: how it ended, and the usage to report for it."""

    def __init__(self, handler: Any, stops: list[str]):
        self.handler = handler
        self.stops = stops
        self.watch = GenerationWatch()

    def upstream_match(self, held: str) -> str | None:
        """The stop sequence upstream's generation ended on, if it ended on one.

        ``held`` is the text the scanner kept back as a possible start of a
        sequence: upstream sent all of the sequence but its last token.
        """
        watch = self.watch
        if not self.stops or watch.finish_reason != "stop" or watch.token is None:
            return None
        tokenizer = _tokenizer(self.handler)
        if tokenizer is None or watch.token in _eos_ids(tokenizer):
            return None
        fitting = [s for s in self.stops if s.startswith(held)]
        for stop in fitting:
            ids = _encode(tokenizer, stop)
            if ids and int(ids[-1]) == watch.token:
                return stop
        return fitting[0] if fitting else None

    def usage(self, reported: tr.Usage) -> tr.Usage:
        """What the generation cost: upstream's usage when it came, else the steps seen before the cut."""
        if reported.completion_tokens or not self.watch.steps:
            return reported
        watch = self.watch
        return tr.Usage(watch.prompt_tokens, watch.generation_tokens, watch.cached_tokens)

    def settle(self, scanner: tr.StopScanner, reported: tr.Usage) -> tr.Usage:
        """At the end of a generation: mark upstream's token-level stop on ``scanner``; the usage to report."""
        if scanner.matched is None:
            stop = self.upstream_match(scanner.held)
            if stop is not None:
                scanner.settle(stop)
        return self.usage(reported)
