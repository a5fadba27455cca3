"""Shared fixtures: real generated models, real ports, real hubs."""

from __future__ import annotations

import gc
import logging
import os
import sys
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from .helpers import free_port, free_range

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a typo'd path must never reach for the network
# Prompt caches never go to ~/mlx-openai-server-hub: a session folder here (for environments copied at
# import, such as tests/test_cli.py's), and a folder of each test's own below (_private_prompt_cache).
os.environ.setdefault("MLX_HUB_PROMPT_CACHE_PATH", tempfile.mkdtemp(prefix="mlx-hub-prompt-cache-"))
os.environ.setdefault(
    "LITELLM_LOCAL_MODEL_COST_MAP", "True"
)  # LiteLLM fetches one from GitHub at import otherwise


_frozen: list[bool] = []


@pytest.fixture(autouse=True)
def _freeze_imported_objects() -> Iterator[None]:
    """After the first test that imported upstream, move what exists to gc's permanent generation.

    Torch, transformers and upstream leave millions of objects that every full
    collection walks: each unload collected twice (upstream's cleanup, then the
    hub's free_memory) for about 1 s in all. The daemon does the same with
    ``freeze_gc``. Frozen after that test's own teardown and a collection, so
    nothing of the test's models is frozen; objects made later collect as ever.
    """
    yield
    if not _frozen and "app.server" in sys.modules:
        gc.collect()
        gc.freeze()
        _frozen.append(True)


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def tiny_llama(models_dir: Path) -> Path:
    from mlx_hub.testing.tinymodel import make_model

    return make_model(models_dir / "tiny-llama", arch="llama")


@pytest.fixture(scope="session")
def tiny_qwen(models_dir: Path) -> Path:
    from mlx_hub.testing.tinymodel import make_model

    return make_model(models_dir / "tiny-qwen", arch="qwen2", seed=1)


@pytest.fixture(scope="session")
def small_llama(models_dir: Path) -> Path:
    """Big enough (a few MB) that a memory measurement means something."""
    from mlx_hub.testing.tinymodel import make_model

    shape = {"hidden_size": 256, "num_hidden_layers": 4, "intermediate_size": 768}
    return make_model(models_dir / "small-llama", arch="llama", shape=shape, seed=2)


@pytest.fixture(scope="session")
def harmony_model(models_dir: Path) -> Path:
    """A model that answers gpt-oss's Harmony format (a get_weather tool call), with Harmony's vocabulary.

    Sets ``TIKTOKEN_ENCODINGS_BASE`` for this process and the servers it starts,
    so the Harmony parser finds o200k offline.
    """
    from mlx_hub.testing.tinymodel import make_harmony_model

    from .helpers import harmony_vocab

    os.environ.setdefault("TIKTOKEN_ENCODINGS_BASE", str(harmony_vocab(models_dir / "tiktoken")))
    return make_harmony_model(models_dir / "tiny-harmony")


@pytest.fixture
def hub_config(tmp_path: Path) -> Callable[..., dict[str, Any]]:
    """Build a hub.yaml-shaped dict on loopback with free ports and a private log_path."""

    def build(models: list[dict[str, Any]], **hub: Any) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "host": "127.0.0.1",
            "port": free_port(),
            "model_starting_port": free_range(),
            "log_path": str(tmp_path / "logs"),
            "models": models,
        }
        doc.update(hub)
        return doc

    return build


@pytest.fixture
async def make_hub() -> AsyncIterator[Callable[..., Any]]:
    """Start hubs for a test and always shut them down, even when the test fails."""
    from mlx_hub import Hub

    hubs: list[Hub] = []

    async def start(config: Any, **kwargs: Any) -> Hub:
        kwargs.setdefault("reap_interval", 0.05)
        hub = Hub.from_config(config, **kwargs)
        hubs.append(hub)
        await hub.start()
        return hub

    yield start
    for hub in hubs:
        await hub.shutdown()


@pytest.fixture(scope="session")
def tiny_embedder(models_dir: Path) -> Path:
    from mlx_hub.testing.tinymodel import make_embedding_model

    return make_embedding_model(models_dir / "tiny-embed", seed=3)


@pytest.fixture(scope="session")
def tiny_vlm(models_dir: Path) -> Path:
    from mlx_hub.testing.tinymodel import make_vlm_model

    return make_vlm_model(models_dir / "tiny-llava", seed=4)


@pytest.fixture(scope="session")
def mute_vlm(models_dir: Path, tiny_vlm: Path) -> Path:
    """``tiny_vlm`` with every token an end of turn: each answer is empty, its first token ends it.

    A random model ends its turn at once only by chance, and upstream's multimodal
    handler ignores ``logit_bias``; the model's own ``eos_token_id`` list does it every time.
    """
    import json
    import shutil

    path = models_dir / "tiny-llava-mute"
    if not path.exists():
        shutil.copytree(tiny_vlm, path)
        config = json.loads((path / "config.json").read_text())
        config["eos_token_id"] = list(range(config["text_config"]["vocab_size"]))
        (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.fixture(scope="session")
def tiny_whisper(models_dir: Path) -> Path:
    from mlx_hub.testing.tinymodel import make_whisper_model

    return make_whisper_model(models_dir / "tiny-whisper", seed=7)


@pytest.fixture(scope="session")
def speech(models_dir: Path) -> Path:
    from mlx_hub.testing.tinymodel import make_speech

    return make_speech(models_dir / "tone.wav")


@pytest.fixture
async def start() -> AsyncIterator[Callable[[dict[str, Any]], Any]]:
    """Start a hub with its controller from a hub.yaml-shaped dict; stopped after the test."""
    from mlx_hub import Hub

    from .helpers import LiveController

    running: list[LiveController] = []

    async def go(doc: dict[str, Any]) -> LiveController:
        live = LiveController(Hub.from_config(doc, reap_interval=0.05), free_port())
        await live.__aenter__()
        running.append(live)
        return live

    yield go
    for live in running:
        await live.__aexit__()


#: Shapes where a request's KV cache and prefill are a visible share of memory (tests/test_memory.py, the soak).
MEMORY_SHAPES: dict[str, dict[str, Any]] = {
    "llama": {"hidden_size": 256, "num_hidden_layers": 4, "intermediate_size": 512, "num_attention_heads": 8,
              "num_key_value_heads": 2, "max_position_embeddings": 4096},
    "qwen2": {"hidden_size": 384, "num_hidden_layers": 4, "intermediate_size": 768, "num_attention_heads": 6,
              "num_key_value_heads": 2, "max_position_embeddings": 4096},
}  # fmt: skip


@pytest.fixture(scope="session")
def memory_models(models_dir: Path) -> dict[str, Path]:
    """A llama and a qwen2 for memory measurements, by architecture."""
    from mlx_hub.testing.tinymodel import make_model

    return {
        arch: make_model(models_dir / f"mem-{arch}", arch=arch, shape=shape, seed=11)
        for arch, shape in MEMORY_SHAPES.items()
    }


@pytest.fixture
async def fast(hub_config) -> AsyncIterator[Callable[..., Any]]:
    """The fast tier: hubs on a FakeEngine, their apps reached in-process (``fakes.port``)."""
    from mlx_hub import Hub
    from mlx_hub.testing.fake_engine import FakeEngine
    from mlx_hub.web.model_app import build_model_app

    hubs: list[Hub] = []

    async def make(models: list[dict[str, Any]], engine: FakeEngine | None = None, **hub: Any) -> Hub:
        built = Hub.from_config(
            hub_config(models, **hub),
            app_factory=build_model_app,
            engine=engine or FakeEngine(),
            reap_interval=0.02,
        )
        hubs.append(built)
        await built.start()
        return built

    yield make
    for built in hubs:
        await built.shutdown(drain_timeout=0.2)


@pytest.fixture
def hub_logging() -> Iterator[Callable[[Any], Path]]:
    """The daemon's logging (hub.log and a file per model) for one test, undone afterwards."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    from mlx_hub.core import logs

    yield lambda config: logs.setup(config, console=False)
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
            handler.close()
    for handler in handlers:
        if handler not in root.handlers:
            root.addHandler(handler)
    root.setLevel(level)
    from loguru import logger

    logger.remove()
    logs._model_sinks.clear()
    logger.add(sys.stderr)


@pytest.fixture(autouse=True)
def _private_prompt_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test keeps its prompt caches in its own folder, never in ~/mlx-openai-server-hub."""
    monkeypatch.setenv("MLX_HUB_PROMPT_CACHE_PATH", str(tmp_path / "prompt-cache"))
