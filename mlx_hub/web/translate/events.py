"""Responses: the handler's stream as typed pieces, and the state machine to Anthropic's events (pure)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

# --- the handler's stream as typed pieces ----------------------------------------------------


@dataclass(frozen=True)
class Text:
    text: str


@dataclass(frozen=True)
class Thinking:
    text: str


@dataclass(frozen=True)
class ToolStart:
    """A new tool call; ``arguments`` may already hold all or part of its JSON."""

    name: str
    arguments: str = ""
    id: str | None = None


@dataclass(frozen=True)
class ToolArguments:
    arguments: str


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0


Piece = Text | Thinking | ToolStart | ToolArguments | Usage


def _usage(value: Any) -> Usage:
    get = value.get if isinstance(value, dict) else lambda k, d=None: getattr(value, k, d)
    details = get("prompt_tokens_details")
    cached = (
        (details.get("cached_tokens") if isinstance(details, dict) else getattr(details, "cached_tokens", 0))
        if details
        else 0
    )
    return Usage(int(get("prompt_tokens") or 0), int(get("completion_tokens") or 0), int(cached or 0))


def _arguments(value: Any) -> str:
    if value is None:
        return ""
    return value if isinstance(value, str) else json.dumps(value)


def pieces(chunk: Any) -> list[Piece]:
    """One chunk of upstream's ``generate_text_stream`` / ``generate_multimodal_stream``, typed.

    The handler yields text as ``str``, ``{"reasoning_content": ..., "content": ...}``
    for reasoning, ``{"name": ..., "arguments": ...}`` to start a tool call,
    ``{"arguments": ...}`` to continue one, and ``{"__usage__": UsageInfo}`` last,
    the same chunks upstream's chat route turns into chat deltas.
    """
    if isinstance(chunk, str):
        return [Text(chunk)] if chunk else []
    if not isinstance(chunk, dict):
        return []
    if "__usage__" in chunk:
        return [_usage(chunk["__usage__"])]
    out: list[Piece] = []
    if chunk.get("reasoning_content"):
        out.append(Thinking(str(chunk["reasoning_content"])))
    if chunk.get("name"):
        out.append(ToolStart(str(chunk["name"]), _arguments(chunk.get("arguments")), chunk.get("id")))
    elif chunk.get("arguments"):
        out.append(ToolArguments(_arguments(chunk["arguments"])))
    if isinstance(chunk.get("content"), str) and chunk["content"]:
        out.append(Text(chunk["content"]))
    return out


# --- stop sequences ---------------------------------------------------------------------------


class StopScanner:
    """Cuts text at the first stop sequence, holding back only what could begin one."""

    def __init__(self, stops: Iterable[str]):
        self.stops = [s for s in stops if s]
        self.matched: str | None = None
        self._held = ""

    def feed(self, text: str) -> str:
        """The text that is safe to send now ('' once a stop sequence matched)."""
        if self.matched is not None:
            return ""
        if not self.stops:
            return text
        buffer = self._held + text
        hits = [(buffer.find(s), s) for s in self.stops if s in buffer]
        if hits:
            at, stop = min(hits)
            self.matched, self._held = stop, ""
            return buffer[:at]
        keep = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(buffer)), 0, -1):
                if buffer.endswith(stop[:n]):
                    keep = max(keep, n)
                    break
        self._held = buffer[len(buffer) - keep :] if keep else ""
        return buffer[: len(buffer) - keep]

    def flush(self) -> str:
        """What was held back, once the text has ended without a match."""
        held, self._held = self._held, ""
        return "" if self.matched is not None else held

    @property
    def held(self) -> str:
        """The text kept back because it could begin a stop sequence."""
        return self._held

    def settle(self, stop: str) -> None:
        """The generation ended on ``stop`` where the text does not show it whole: drop what was held."""
        self.matched, self._held = stop, ""


# --- events: pieces -> Anthropic's stream -----------------------------------------------------

StopReason = Literal["end_turn", "max_tokens", "stop_sequence", "tool_use"]
Event = tuple[str, dict[str, Any]]


def message_id() -> str:
    return f"msg_{uuid.uuid4().hex[:24]}"


def tool_use_id() -> str:
    return f"toolu_{uuid.uuid4().hex[:24]}"


@dataclass
class MessageStream:
    """Pieces in, Anthropic's events out: one open content block at a time.

    ``message_start`` cannot know the prompt's token count yet (the handler
    reports usage last), so it carries 0 and ``message_delta`` carries the
    real ``input_tokens`` (and ``cache_read_input_tokens``) beside ``output_tokens``.
    """

    model: str
    max_tokens: int | None
    stops: list[str] = field(default_factory=list)
    id: str = field(default_factory=message_id)
    _index: int = -1
    _open: str | None = None
    _tools: int = 0
    _usage: Usage = field(default_factory=lambda: Usage(0, 0))
    _scanner: StopScanner = field(init=False)

    def __post_init__(self) -> None:
        self._scanner = StopScanner(self.stops)

    @property
    def stopped(self) -> bool:
        """A stop sequence matched: nothing more is sent, and the route ends the generation."""
        return self._scanner.matched is not None

    @property
    def scanner(self) -> StopScanner:
        return self._scanner

    @property
    def usage(self) -> Usage:
        """The usage the handler reported so far (none before its last chunk)."""
        return self._usage

    def start(self) -> list[Event]:
        message = {
            "id": self.id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": 0, "output_tokens": 0},
        }
        return [("message_start", {"type": "message_start", "message": message}), ("ping", {"type": "ping"})]

    def _close(self) -> list[Event]:
        if self._open is None:
            return []
        self._open = None
        return [("content_block_stop", {"type": "content_block_stop", "index": self._index})]

    def _begin(self, kind: str, block: dict[str, Any]) -> list[Event]:
        events = self._close()
        self._index += 1
        self._open = kind
        start = {"type": "content_block_start", "index": self._index, "content_block": block}
        return [*events, ("content_block_start", start)]

    def _delta(self, delta: dict[str, Any]) -> Event:
        return ("content_block_delta", {"type": "content_block_delta", "index": self._index, "delta": delta})

    def _text(self, text: str) -> list[Event]:
        if not text:
            return []
        events = [] if self._open == "text" else self._begin("text", {"type": "text", "text": ""})
        return [*events, self._delta({"type": "text_delta", "text": text})]

    def feed(self, piece: Piece) -> list[Event]:
        if isinstance(piece, Usage):  # recorded even after a stop sequence: usage stays real
            self._usage = piece
            return []
        if self.stopped:
            return []
        if isinstance(piece, Text):
            return self._text(self._scanner.feed(piece.text))
        events = self._text(self._scanner.flush())
        if isinstance(piece, Thinking):
            if self._open != "thinking":
                events += self._begin("thinking", {"type": "thinking", "thinking": "", "signature": ""})
            return [*events, self._delta({"type": "thinking_delta", "thinking": piece.text})]
        if isinstance(piece, ToolStart):
            self._tools += 1
            block = {"type": "tool_use", "id": piece.id or tool_use_id(), "name": piece.name, "input": {}}
            events += self._begin("tool_use", block)
            piece = ToolArguments(piece.arguments)
        if isinstance(piece, ToolArguments) and piece.arguments and self._open == "tool_use":
            events.append(self._delta({"type": "input_json_delta", "partial_json": piece.arguments}))
        return events

    def stop_reason(self) -> StopReason:
        if self._tools:
            return "tool_use"
        if self.stopped:
            return "stop_sequence"
        if self.max_tokens is not None and self._usage.completion_tokens >= self.max_tokens:
            return "max_tokens"
        return "end_turn"

    def finish(self) -> list[Event]:
        events = [] if self.stopped else self._text(self._scanner.flush())
        events += self._close()
        usage = anthropic_usage(self._usage)
        delta = {"stop_reason": self.stop_reason(), "stop_sequence": self._scanner.matched}
        return [
            *events,
            ("message_delta", {"type": "message_delta", "delta": delta, "usage": usage}),
            ("message_stop", {"type": "message_stop"}),
        ]


def anthropic_usage(usage: Usage) -> dict[str, int]:
    """OpenAI's counts in Anthropic's terms: ``input_tokens`` leaves out what the prompt cache served.

    Upstream 1.8's ``prompt_tokens`` is the whole prompt, cached part included
    (as in OpenAI's API); Anthropic reports the cached part apart, in
    ``cache_read_input_tokens``, so the two add up to the prompt.
    """
    out = {
        "input_tokens": max(usage.prompt_tokens - usage.cached_tokens, 0),
        "output_tokens": usage.completion_tokens,
    }
    if usage.cached_tokens:
        out["cache_read_input_tokens"] = usage.cached_tokens
    return out


def sse(event: Event) -> str:
    name, data = event
    return f"event: {name}\ndata: {json.dumps(data)}\n\n"


def collect(events: Iterable[Event]) -> dict[str, Any]:
    """The non-streamed message: Anthropic's events folded, as its SDK folds them."""
    message: dict[str, Any] = {}
    partial_json: dict[int, str] = {}
    for name, data in events:
        if name == "message_start":
            message = {**data["message"], "content": []}
        elif name == "content_block_start":
            message["content"].append(dict(data["content_block"]))
        elif name == "content_block_delta":
            block, delta = message["content"][data["index"]], data["delta"]
            if delta["type"] == "text_delta":
                block["text"] += delta["text"]
            elif delta["type"] == "thinking_delta":
                block["thinking"] += delta["thinking"]
            elif delta["type"] == "input_json_delta":
                partial_json[data["index"]] = partial_json.get(data["index"], "") + delta["partial_json"]
        elif name == "message_delta":
            message.update(data["delta"])
            message["usage"] = {**message.get("usage", {}), **data["usage"]}
    for index, text in partial_json.items():
        try:
            value = json.loads(text)
        except ValueError:
            value = {"_raw": text}  # a model that wrote broken JSON: keep what it said
        message["content"][index]["input"] = value if isinstance(value, dict) else {"value": value}
    return message


def run(stream: MessageStream, chunks: Iterable[Any]) -> Iterator[Event]:
    """Drive the state machine over a finished chunk sequence (tests, and the shape the route follows)."""
    yield from stream.start()
    for chunk in chunks:
        for piece in pieces(chunk):
            yield from stream.feed(piece)
    yield from stream.finish()


# --- legacy completions -----------------------------------------------------------------------
