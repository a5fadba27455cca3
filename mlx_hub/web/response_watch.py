"""What a response reports, read from its bytes as they pass: status, usage, first text, error code.

The model port's gate sends every inference response through a ``ResponseWatch``
(``tracing.RequestTrace.send``); what it notes becomes plain figures for the
core: the request record's fields and the token count ``/metrics`` adds up.
Scanning bytes is an HTTP concern, so it lives here and not in the core.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import Any

_COMPLETION_TOKENS = re.compile(rb'"(?:completion_tokens|output_tokens)"\s*:\s*(\d+)')  # OpenAI, Anthropic
_PROMPT_TOKENS = re.compile(rb'"(?:prompt_tokens|input_tokens)"\s*:\s*(\d+)')
_CACHED_TOKENS = re.compile(rb'"(?:cached_tokens|cache_read_input_tokens)"\s*:\s*(\d+)')
# Generated text in any API's stream: chat's content, completions' and Anthropic's text, responses' delta.
_GENERATED = re.compile(rb'"(?:content|text|reasoning_content|delta|arguments|partial_json)"\s*:\s*"[^"]')
# An error envelope's code when it is a word, else its type (upstream's 404 has code 404; Anthropic has no code).
_ERROR_CODE = re.compile(rb'"error"\s*:\s*\{[^{}]*?"code"\s*:\s*"([\w.\-]{1,64})"')
_ERROR_TYPE = re.compile(rb'"error"\s*:\s*\{[^{}]*?"type"\s*:\s*"([\w.\-]{1,64})"')


class ResponseWatch:
    """Wraps ``send`` to note what a response reports, as it passes, without buffering it.

    The status code; the usage (completion, prompt and cached prompt tokens)
    from a JSON body or a stream's final chunk (upstream sends usage there
    unasked); when a stream's first generated text went out; the error
    envelope's code; whether the last byte was sent. ``keep`` bytes of the
    body are kept for the request log's ``request_log_bodies``.
    """

    def __init__(self, send: Callable[[dict[str, Any]], Any], *, keep: int = 0):
        self._send = send
        self.status = 500
        self.started = False  # the response's first message has gone out
        self.complete = False  # ... and its last
        self.stream = False
        self.tokens = 0
        self.prompt_tokens: int | None = None
        self.cached_tokens: int | None = None
        self.first_text_at: float | None = None  # time.monotonic() of a stream's first generated text
        self.error_code: str | None = None
        self.kept = bytearray()
        self._keep = keep
        self._tail = b""

    async def send(self, message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
            self.started = True
            self.stream = any(
                k.lower() == b"content-type" and v.startswith(b"text/event-stream")
                for k, v in message.get("headers", [])
            )
        elif message["type"] == "http.response.body":
            self._note(message.get("body", b""))
            self.complete = not message.get("more_body", False)
        await self._send(message)

    def _note(self, body: bytes) -> None:
        chunk = self._tail + body
        for match in _COMPLETION_TOKENS.finditer(chunk):
            self.tokens = max(self.tokens, int(match.group(1)))
        for match in _PROMPT_TOKENS.finditer(chunk):
            self.prompt_tokens = max(self.prompt_tokens or 0, int(match.group(1)))
        for match in _CACHED_TOKENS.finditer(chunk):
            self.cached_tokens = max(self.cached_tokens or 0, int(match.group(1)))
        if self.first_text_at is None and self.stream and _GENERATED.search(body):
            self.first_text_at = time.monotonic()
        if self.error_code is None and (self.status >= 400 or b'"error"' in chunk):
            found = _ERROR_CODE.search(chunk) or _ERROR_TYPE.search(chunk)
            self.error_code = found.group(1).decode() if found else None
        if len(self.kept) < self._keep:
            self.kept += body[: self._keep - len(self.kept)]
        self._tail = chunk[-64:]  # a field split across two chunks is still found
