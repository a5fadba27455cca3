"""Every model type the hub serves: multimodal and whisper beside lm and embeddings.

Each through a real port and the official openai client, and each must give its
memory back on unload. The thread test runs in a fresh interpreter so that it
sees mlx-vlm exactly as imported, before the hub adapts it.
"""

from __future__ import annotations

import base64
import io
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from mlx_hub.engine import memory
from mlx_hub.engine.mlx import MLXEngine
from mlx_hub.engine.patches import switch

from .helpers import base_url, meta, text_only

engine = MLXEngine()  # one real engine for this module's direct loads


def _png(color: tuple[int, int, int]) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), color).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


IMAGE_URL = f"data:image/png;base64,{_png((200, 30, 30))}"


def vlm_entry(name: str, path: Path, **kw: Any) -> dict[str, Any]:
    return {"name": name, "model_path": str(path), "model_type": "multimodal", "default": True, **kw}


def image_chat(model: str, path: Path, **extra: Any) -> dict[str, Any]:
    content = [
        {"type": "text", "text": "What is in the picture?"},
        {"type": "image_url", "image_url": {"url": IMAGE_URL}},
    ]
    return {
        "model": model,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": 6,
        **text_only(path),
        **extra,
    }


def test_generation_on_another_thread_needs_the_thread_local_stream(tiny_vlm: Path) -> None:
    """mlx-vlm, imported on one thread, generates on another: on mlx-vlm 0.4 this fails as installed and
    works once adapted (patches/mlx_vlm); from 0.5 mlx-vlm's own stream is per thread, and no patch applies."""
    script = textwrap.dedent(
        f"""
        import sys, threading
        from mlx_vlm import load, generate
        from mlx_vlm.prompt_utils import apply_chat_template
        from mlx_hub.engine import memory
        from mlx_hub.engine import patches
        from mlx_hub.engine.mlx import MLXEngine
        model, processor = load({str(tiny_vlm)!r})
        prompt = apply_chat_template(processor, model.config, "Hi", num_images=0)
        def attempt():
            try:
                generate(model, processor, prompt, max_tokens=3, verbose=False)
                print("ok")
            except Exception as exc:
                print("error:", exc)
        for _ in range(2):
            worker = threading.Thread(target=attempt)
            worker.start(); worker.join()
            patches.apply()
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=240)
    lines = [line for line in out.stdout.splitlines() if line.startswith(("ok", "error:"))]
    assert len(lines) == 2, out.stdout + out.stderr
    if not switch.needed_here("thread_local_stream"):
        assert lines == ["ok", "ok"]  # the library does it
        return
    assert lines[0].startswith("error:") and "Stream" in lines[0], lines  # as installed
    assert lines[1] == "ok", lines  # after patches.apply()


@pytest.mark.parametrize("batching", ["on", "off"])
async def test_multimodal_chat_with_an_image(make_hub, hub_config, tiny_vlm: Path, batching: str) -> None:
    memory.free_memory()
    before = memory.active_memory()
    hub = await make_hub(hub_config([vlm_entry("see", tiny_vlm, disable_batching=batching == "off")]))
    client = openai.AsyncOpenAI(base_url=base_url(hub, "see"), api_key="unused", max_retries=0)
    reply = await client.chat.completions.create(**image_chat("see", tiny_vlm))
    assert reply.choices[0].message.content and reply.usage.completion_tokens == 6
    assert reply.usage.prompt_tokens > 10  # the image's patch tokens are in the prompt
    chunks = [
        c async for c in await client.chat.completions.create(**image_chat("see", tiny_vlm, stream=True))
    ]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text and any(c.choices and c.choices[0].finish_reason for c in chunks)
    held = meta(hub, "see")["memory_bytes"]
    assert held > 100_000
    assert await hub.unload("see") == "unloaded"
    memory.free_memory()
    assert abs(memory.active_memory() - before) <= 0.02 * held


async def test_whisper_transcribes_streams_and_frees(
    make_hub, hub_config, tiny_whisper: Path, speech: Path
) -> None:
    memory.free_memory()
    before = memory.active_memory()
    entry = {"name": "ears", "model_path": str(tiny_whisper), "model_type": "whisper", "default": True}
    hub = await make_hub(hub_config([entry]))
    held = meta(hub, "ears")["memory_bytes"]
    assert held > 1_000_000  # the weights load with the model, not inside its first request
    client = openai.AsyncOpenAI(base_url=base_url(hub, "ears"), api_key="unused", max_retries=0)
    with speech.open("rb") as audio:
        result = await client.audio.transcriptions.create(model="ears", file=audio, temperature=0.0)
    assert isinstance(result.text, str)
    with speech.open("rb") as audio:
        text_reply = await client.audio.transcriptions.create(
            model="ears", file=audio, temperature=0.0, response_format="text"
        )
    assert text_reply == result.text  # plain text (launch answers the JSON object); tests/test_transcripts.py
    async with httpx.AsyncClient(timeout=120) as http:
        with speech.open("rb") as audio:
            streamed = await http.post(
                f"{base_url(hub, 'ears')}/audio/transcriptions",
                data={"model": "ears", "stream": "true", "temperature": "0"},
                files={"file": ("tone.wav", audio, "audio/wav")},
            )
    assert streamed.status_code == 200, streamed.text
    assert streamed.text.rstrip().endswith("data: [DONE]")
    assert await hub.unload("ears") == "unloaded"
    memory.free_memory()
    assert abs(memory.active_memory() - before) <= 0.01 * held


async def test_two_whisper_entries_hold_their_own_weights(
    make_hub, hub_config, tiny_whisper: Path, models_dir: Path, speech: Path
) -> None:
    from mlx_hub.testing.tinymodel import make_whisper_model

    other = make_whisper_model(models_dir / "tiny-whisper-2", seed=8)
    entries = [
        {"name": name, "model_path": str(path), "model_type": "whisper", "default": True}
        for name, path in (("one", tiny_whisper), ("two", other))
    ]
    hub = await make_hub(hub_config(entries))
    assert meta(hub, "one")["memory_bytes"] > 1_000_000 and meta(hub, "two")["memory_bytes"] > 1_000_000
    client = openai.AsyncOpenAI(base_url=base_url(hub, "two"), api_key="unused", max_retries=0)
    assert await hub.unload("one") == "unloaded"
    memory.free_memory()
    before = memory.active_memory()
    with speech.open("rb") as audio:  # "two" still answers with its own weights
        assert isinstance(
            (await client.audio.transcriptions.create(model="two", file=audio, temperature=0.0)).text, str
        )
    memory.free_memory()
    # The request used the weights the load holds: mlx_whisper's own holder read no second copy.
    assert memory.active_memory() - before < 0.5 * meta(hub, "two")["memory_bytes"]
    assert hub.engine.whispers.folders() == {str(other)}


#: What upstream's routes call on a handler of each type (after checking its handler_type).
ROUTE_METHODS = {
    "lm": {"generate_text_stream", "generate_text_response"},
    "multimodal": {"generate_multimodal_stream", "generate_multimodal_response"},
    "embeddings": {"generate_embeddings_response"},
    "whisper": {
        "prepare_transcription_request",
        "generate_transcription_response",
        "generate_transcription_stream_from_data",
    },
    "image": {"generate_image", "edit_image"},
}
EVERY_TYPE = {"get_models", "get_queue_stats"}


def test_the_route_table_covers_every_handler_call_upstream_makes() -> None:
    """Read upstream's endpoints: a call the table above does not know fails here first."""
    import re

    import app.api.endpoints as endpoints

    called = set(re.findall(r"handler\.([a-z_]+)\(", Path(endpoints.__file__).read_text()))
    assert called == set().union(*ROUTE_METHODS.values(), EVERY_TYPE), called


@pytest.mark.parametrize("kind", ["lm", "multimodal", "embeddings", "whisper"])
async def test_hub_handlers_offer_what_upstreams_routes_call(
    kind: str, tiny_llama: Path, tiny_vlm: Path, tiny_embedder: Path, tiny_whisper: Path
) -> None:
    """The hub serves bare handlers where launch serves its proxy: each must answer the same calls."""
    from mlx_hub.config import ModelConfig

    path = {"lm": tiny_llama, "multimodal": tiny_vlm, "embeddings": tiny_embedder, "whisper": tiny_whisper}[
        kind
    ]
    memory.free_memory()
    before = memory.active_memory()
    loaded = await engine.load(ModelConfig(name="m", model_path=str(path), model_type=kind))
    handler = loaded.handler
    try:
        assert handler.handler_type == kind
        missing = {m for m in ROUTE_METHODS[kind] | EVERY_TYPE if not callable(getattr(handler, m, None))}
        assert not missing, missing
        assert loaded.memory_bytes > 100_000  # every type's weights are resident once loaded
        assert (await handler.get_models())[0]["id"] == str(path)
        assert isinstance(await handler.get_queue_stats(), dict)
    finally:
        await engine.unload(handler, "m")
        held = loaded.memory_bytes
        del handler, loaded
    memory.free_memory()
    assert abs(memory.active_memory() - before) <= 0.01 * held, kind  # and all of it comes back


async def test_queue_stats_route_on_a_hub_port(make_hub, hub_config, tiny_llama: Path) -> None:
    hub = await make_hub(hub_config([{"name": "q", "model_path": str(tiny_llama), "default": True}]))
    async with httpx.AsyncClient() as http:
        reply = await http.get(f"{base_url(hub, 'q')}/queue/stats")
    assert reply.status_code == 200 and reply.json()["status"] == "ok"
