"""A hub whose models need no torch tensors runs transformers without torch (patches/transformers_imports).

torch is installed (mlx-whisper and outlines require it) and transformers
imports its compiler and distributed modules, and scikit-learn with scipy,
whenever it can: a text hub process carried 200 MB and 6 s of imports it
never used. The proof reads the daemon's own memory map: scikit-learn's and
scipy's libraries are mapped into the process or they are not.
"""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from typing import Any

import httpx
import openai
import yaml

from mlx_hub.engine.patches.transformers_imports import torch_free

from .test_cli import cli, kill_leftover_daemon, runtime
from .test_structured_answers import SCHEMA, assert_matches_schema


def test_only_types_that_ask_for_no_torch_tensor_go_without() -> None:
    assert torch_free({"lm"}) and torch_free({"lm", "embeddings", "whisper"}) and torch_free(set())
    assert not torch_free({"lm", "multimodal"}) and not torch_free({"image-generation"})


def libraries(pid: int) -> set[str]:
    """The installed packages with a shared library mapped into process ``pid``."""
    return set(re.findall(r"site-packages/([A-Za-z0-9_]+)", Path(f"/proc/{pid}/maps").read_text()))


async def answer_with_torch(config: dict[str, Any], asked: dict[str, Any]) -> str | None:
    """The same request to the same model in a hub inside this test process, whose transformers has torch."""
    from mlx_hub import Hub

    async with Hub.from_config(config) as hub:
        port = hub.slots[config["models"][0]["name"]].port
        client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        reply = await client.chat.completions.create(**asked, temperature=0)
        return reply.choices[0].message.content


def test_a_text_hub_leaves_torch_to_its_core(
    hub_config,
    tmp_path: Path,
    tiny_qwen: Path,
    tiny_embedder: Path,
    tiny_whisper: Path,
    speech: Path,
    tiny_vlm: Path,
) -> None:
    doc: dict[str, Any] = hub_config(
        [
            {"name": "m", "model_path": str(tiny_qwen), "default": True, "context_length": 2048},
            {"name": "embed", "model_path": str(tiny_embedder), "model_type": "embeddings", "default": True},
        ]
    )
    path = tmp_path / "hub.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    files = {"logs": tmp_path / "logs"}
    try:
        started = cli(path, "start")
        assert started.returncode == 0, started.stderr
        info = runtime(files["logs"])
        assert info is not None
        lean = libraries(info["pid"])
        # With the patch off, scikit-learn's and scipy's libraries are both mapped.
        assert "tokenizers" in lean and not lean & {"sklearn", "scipy"}, lean
        assert "transformers runs without torch in this process" in (files["logs"] / "hub.log").read_text()

        url = f"http://127.0.0.1:{doc['port']}/v1"
        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0)
        reply = client.chat.completions.create(
            model="m",
            messages=[{"role": "user", "content": "What is the capital of France? Answer in JSON."}],
            max_tokens=96,
            temperature=0,
            response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": SCHEMA}},
        )
        assert_matches_schema(reply.choices[0].message.content or "")  # outlines' constraint, torch-free
        asked = {"model": "m", "messages": [{"role": "user", "content": "Name a city."}], "max_tokens": 12}
        lean_answer = client.chat.completions.create(**asked, temperature=0).choices[0].message.content
        with_torch = hub_config(doc["models"][:1], log_path=str(tmp_path / "logs-here"))
        assert lean_answer == asyncio.run(answer_with_torch(with_torch, asked))  # same tokens, same text
        vectors = client.embeddings.create(model="embed", input=["hello world", "paris"])
        assert len(vectors.data) == 2 and len(vectors.data[0].embedding) > 0

        # A reload adds whisper (its stack does not use transformers) and a multimodal model (it does).
        doc["models"] += [
            {"name": "ears", "model_path": str(tiny_whisper), "model_type": "whisper", "default": True},
            {"name": "see", "model_path": str(tiny_vlm), "model_type": "multimodal", "default": True},
        ]
        path.write_text(yaml.safe_dump(doc, sort_keys=False))
        reloaded = cli(path, "reload")
        assert "see" in reloaded.stdout + reloaded.stderr
        status = httpx.get(f"http://127.0.0.1:{doc['port']}/hub/status").json()
        see = next(m["metadata"] for m in status["models"] if m["id"] == "see")
        error = json.dumps(see)
        assert (
            "needs torch in transformers" in error
            and "`mlx-openai-server-hub shutdown`, then `start`" in error
        ), see
        # The refusal took nothing down: the others answer.
        again = client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=4
        )
        assert again.choices[0].message.content is not None
        with speech.open("rb") as audio:
            heard = client.audio.transcriptions.create(model="ears", file=audio, temperature=0.0)
        assert isinstance(heard.text, str)
        assert cli(path, "shutdown").returncode == 0
    finally:
        kill_leftover_daemon(files)
