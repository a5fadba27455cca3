"""Every transcription ``response_format`` answered as OpenAI answers it.

Measured before the fix (upstream 1.8.1's route): ``text`` came back as the
JSON object, and ``srt``, ``vtt`` and ``verbose_json`` were refused with 422.
The formatting is checked on its own, then through real HTTP with the
official SDK on a generated whisper model, on the model's port and the
controller's /v1.
"""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import openai

from mlx_hub.web.transcripts import srt, timestamp, verbose_json, vtt

from .test_peer_apis import close_clients, oai  # noqa: F401

SEGMENTS = [
    {"id": 0, "seek": 0, "start": 0.0, "end": 1.5, "text": " Hello there.", "tokens": [1, 2],
     "temperature": 0.0, "avg_logprob": -0.25, "compression_ratio": 1.1, "no_speech_prob": 0.01},
    {"id": 1, "seek": 150, "start": 3661.25, "end": 3662.0, "text": " Bye.", "tokens": [3],
     "temperature": 0.0, "avg_logprob": -0.5, "compression_ratio": 0.9, "no_speech_prob": 0.02},
]  # fmt: skip
SRT_CUE = re.compile(r"(\d+)\n\d\d:\d\d:\d\d,\d{3} --> \d\d:\d\d:\d\d,\d{3}\n[^\n]*\n\n")
VTT_CUE = re.compile(r"\d\d:\d\d:\d\d\.\d{3} --> \d\d:\d\d:\d\d\.\d{3}\n[^\n]*\n\n")


def test_timestamps_and_subtitles() -> None:
    assert timestamp(0, ",") == "00:00:00,000" and timestamp(3661.25, ".") == "01:01:01.250"
    assert timestamp(1.9996, ",") == "00:00:02,000" and timestamp(-0.01, ",") == "00:00:00,000"
    assert srt(SEGMENTS) == (
        "1\n00:00:00,000 --> 00:00:01,500\nHello there.\n\n2\n01:01:01,250 --> 01:01:02,000\nBye.\n\n"
    )
    assert vtt(SEGMENTS) == (
        "WEBVTT\n\n00:00:00.000 --> 00:00:01.500\nHello there.\n\n01:01:01.250 --> 01:01:02.000\nBye.\n\n"
    )
    assert srt([]) == "" and vtt([]) == "WEBVTT\n\n"


def test_verbose_json_is_openais_shape() -> None:
    result = {"text": " Hello there. Bye.", "language": "en", "segments": [{**SEGMENTS[0], "extra": 1}]}
    body = verbose_json(result, 2.04)
    unsure = verbose_json({"segments": [{**SEGMENTS[1], "avg_logprob": float("-inf")}]}, 1.0)
    assert unsure["segments"][0]["avg_logprob"] is None  # JSON has no -inf
    assert body == {
        "task": "transcribe",
        "language": "english",
        "duration": 2.04,
        "text": "Hello there. Bye.",
        "segments": [SEGMENTS[0]],
        "usage": {"type": "duration", "seconds": 2},
    }


async def test_every_format_through_http(start, hub_config, tiny_whisper: Path, speech: Path) -> None:
    entry = {"name": "ears", "model_path": str(tiny_whisper), "model_type": "whisper", "default": True}
    live = await start(hub_config([entry]))
    audio = speech.read_bytes()
    for url in (f"http://127.0.0.1:{live.hub.slots['ears'].port}", live.url):
        client = oai(url)

        async def transcribe(response_format: str, client: openai.AsyncOpenAI = client) -> object:
            return await client.audio.transcriptions.create(
                model="ears", file=("tone.wav", audio), temperature=0.0, response_format=response_format
            )

        whole = await transcribe("json")
        assert isinstance(whole, openai.types.audio.Transcription) and isinstance(whole.text, str)
        assert await transcribe("text") == whole.text.strip()  # the text itself, not a JSON object

        verbose = await transcribe("verbose_json")
        assert verbose.text == whole.text.strip() and verbose.language
        assert 1.4 < verbose.duration < 1.6  # the generated 1.5 s tone
        assert verbose.segments, verbose
        for segment in verbose.segments:
            # A random model's timestamp tokens are whatever it picks; only their form is checked.
            assert min(segment.start, segment.end) >= 0 and isinstance(segment.tokens, list)
            assert isinstance(segment.no_speech_prob, float) and isinstance(segment.temperature, float)
            assert segment.avg_logprob is None or isinstance(segment.avg_logprob, float)  # null for -inf

        subtitles = await transcribe("srt")
        assert isinstance(subtitles, str)
        assert [int(n) for n in SRT_CUE.findall(subtitles)] == list(range(1, len(verbose.segments) + 1))
        assert SRT_CUE.sub("", subtitles) == ""
        web = await transcribe("vtt")
        assert isinstance(web, str) and web.startswith("WEBVTT\n\n")
        assert len(VTT_CUE.findall(web)) == len(verbose.segments) and VTT_CUE.sub("", web[8:]) == ""

    async with httpx.AsyncClient(timeout=120) as http:
        port = f"http://127.0.0.1:{live.hub.slots['ears'].port}"
        reply = await http.post(
            f"{port}/v1/audio/transcriptions",
            data={"model": "ears", "response_format": "srt", "temperature": "0"},
            files={"file": ("tone.wav", audio, "audio/wav")},
        )
        assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/plain")
        other = await http.post(  # another model's name: upstream's own 404, as before
            f"{port}/v1/audio/transcriptions",
            data={"model": "nope", "response_format": "srt"},
            files={"file": ("tone.wav", audio, "audio/wav")},
        )
        assert other.status_code == 404, other.text
        unknown = await http.post(  # a format OpenAI does not have: upstream's 422
            f"{port}/v1/audio/transcriptions",
            data={"model": "ears", "response_format": "doc"},
            files={"file": ("tone.wav", audio, "audio/wav")},
        )
        assert unknown.status_code == 422, unknown.text
