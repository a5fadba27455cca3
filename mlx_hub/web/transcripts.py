"""Transcripts in every ``response_format`` OpenAI's /v1/audio/transcriptions answers.

Upstream 1.8.1 knows only ``json`` and ``text``, and answers ``text`` with the
JSON object as well; ``srt``, ``vtt`` and ``verbose_json`` are refused with
422. Subtitle tools and the ``openai`` SDK (which hands ``text``, ``srt`` and
``vtt`` back as the raw body) then get the wrong thing or nothing.

:class:`Transcripts` answers those four formats on a whisper model's port
(``json`` and streams stay upstream's). It prepares the request with the
handler's own upload handling, runs the handler's ``MLX_Whisper`` model on the
handler's inference thread (where upstream runs it), and formats what
mlx_whisper's ``transcribe`` returns: its text, its segments with their times,
its language. Anything it does not recognise (no file, a stream, a field
upstream rejects) goes to upstream's route unchanged, which answers as it
always does; another model's name is upstream's 404 ``model_not_found``.
"""

from __future__ import annotations

import contextlib
import math
import os
from typing import TYPE_CHECKING, Any

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from mlx_hub.web.asgi import header, replay, request_body
from mlx_hub.web.model_cards import names_another, unknown_model
from mlx_hub.web.routes import TRANSCRIPTIONS, route_of

if TYPE_CHECKING:
    from mlx_hub.core.slot import ModelSlot

#: The formats the hub answers itself; ``json`` is upstream's own answer.
FORMATS = ("text", "srt", "vtt", "verbose_json")
SEGMENT_KEYS = (
    "id",
    "seek",
    "start",
    "end",
    "text",
    "tokens",
    "temperature",
    "avg_logprob",
    "compression_ratio",
    "no_speech_prob",
)


def timestamp(seconds: float, decimal: str) -> str:
    """``HH:MM:SS,mmm`` (SRT, ``decimal=","``) or ``HH:MM:SS.mmm`` (WebVTT, ``"."``)."""
    millis = max(0, round(seconds * 1000))
    hours, millis = divmod(millis, 3_600_000)
    minutes, millis = divmod(millis, 60_000)
    secs, millis = divmod(millis, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{decimal}{millis:03d}"


def srt(segments: list[dict[str, Any]]) -> str:
    """SubRip: numbered cues from 1, each ``start --> end`` and its text, a blank line after each."""
    return "".join(
        f"{n}\n{timestamp(s['start'], ',')} --> {timestamp(s['end'], ',')}\n{s['text'].strip()}\n\n"
        for n, s in enumerate(segments, 1)
    )


def vtt(segments: list[dict[str, Any]]) -> str:
    """WebVTT: the ``WEBVTT`` header, then one cue per segment."""
    cues = "".join(
        f"{timestamp(s['start'], '.')} --> {timestamp(s['end'], '.')}\n{s['text'].strip()}\n\n"
        for s in segments
    )
    return f"WEBVTT\n\n{cues}"


def language_name(code: str | None) -> str | None:
    """OpenAI names the language (``english``); whisper reports its code (``en``)."""
    if not code:
        return code
    try:
        from mlx_whisper.tokenizer import LANGUAGES
    except ImportError:
        return code
    return LANGUAGES.get(code, code)


def verbose_json(result: dict[str, Any], duration: float) -> dict[str, Any]:
    """OpenAI's ``verbose_json``: the text, language, duration and each segment with its decoding figures."""
    segments = [
        {key: _plain(segment.get(key)) for key in SEGMENT_KEYS} for segment in result.get("segments") or []
    ]
    for segment in segments:
        segment["text"] = segment["text"] or ""
    return {
        "task": "transcribe",
        "language": language_name(result.get("language")),
        "duration": round(duration, 3),
        "text": (result.get("text") or "").strip(),
        "segments": segments,
        "usage": {"type": "duration", "seconds": int(duration)},
    }


def _plain(value: Any) -> Any:
    """A value JSON can carry: a non-finite figure (a model sure of nothing scores ``-inf``) becomes null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def formatted(response_format: str, result: dict[str, Any], duration: float) -> Response:
    """The HTTP answer for one of ``FORMATS``: plain text for the three text formats, JSON for the other."""
    segments = list(result.get("segments") or [])
    if response_format == "srt":
        return PlainTextResponse(srt(segments))
    if response_format == "vtt":
        return PlainTextResponse(vtt(segments))
    if response_format == "verbose_json":
        return JSONResponse(verbose_json(result, duration))
    return PlainTextResponse((result.get("text") or "").strip())


class Transcripts:
    """ASGI middleware on a whisper port: the hub's formats answered here, the rest passed to upstream."""

    def __init__(self, app: ASGIApp, slot: ModelSlot) -> None:
        self.app = app
        self.slot = slot

    def _ours(self, scope: Scope) -> bool:
        """A transcription upload to a whisper handler (its own method: no local keeps the handler)."""
        return (
            scope["type"] == "http"
            and scope["method"] == "POST"
            and route_of(scope["path"]).path == TRANSCRIPTIONS
            and header(scope, b"content-type").startswith("multipart/form-data")
            and hasattr(self.slot.handler, "_prepare_transcription_request")
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # No local here may hold the handler: a request cut by stop-model ends in an exception
        # whose traceback keeps this frame, and with it the weights, as long as the record lives.
        if not self._ours(scope):
            await self.app(scope, receive, send)
            return
        body = await request_body(scope, receive)
        if body.gone:
            return
        async with Request(scope, replay(body.raw, receive)).form() as form:
            response = await self._answer(self.slot.handler, dict(form))
        if response is None:
            await self.app(scope, receive, send)  # the route reads the body from the scope (BodyReplay)
        else:
            await response(scope, receive, send)

    async def _answer(self, handler: Any, form: dict[str, Any]) -> Response | None:
        """The answer in the hub's format, or None for upstream's route to answer."""
        from app.schemas.openai import TranscriptionRequest
        from pydantic import ValidationError

        response_format = form.pop("response_format", "json")
        model = form.get("model")
        stream = str(form.get("stream", "")).lower() in ("true", "1", "on", "yes")
        if response_format not in FORMATS or stream:
            return None
        if names_another(model, self.slot.entry):  # upstream's 404, not its 422 for the format
            return unknown_model(str(model), self.slot.entry.served_name)
        try:
            request = TranscriptionRequest(
                **{k: v for k, v in form.items() if k in TranscriptionRequest.model_fields}
            )
        except (ValidationError, TypeError):
            return None
        try:
            result, duration = await _transcribe(handler, request)
        except HTTPException as exc:  # the upload could not be read: 400, as upstream's route answers
            return JSONResponse({"detail": exc.detail}, status_code=exc.status_code)
        except Exception as exc:  # as upstream's route answers a failed transcription
            from app.utils.errors import create_error_response

            return JSONResponse(create_error_response(str(exc)), status_code=500)
        return formatted(str(response_format), result, duration)


async def _transcribe(handler: Any, request: Any) -> tuple[dict[str, Any], float]:
    """mlx_whisper's whole result for the upload, and its length, on the handler's inference thread."""
    data = await handler._prepare_transcription_request(request)
    audio_path = data.pop("audio_path")
    try:
        result = await handler.inference_worker.submit(handler.model, audio_path=audio_path, **data)
        return result, await handler.inference_worker.submit(_duration, audio_path)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(audio_path)


def _duration(audio_path: str) -> float:
    """The upload's length in seconds, as upstream measures it for ``usage``."""
    from app.models.mlx_whisper import calculate_audio_duration

    return float(calculate_audio_duration(audio_path))
