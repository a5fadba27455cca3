"""The bridge to mlx-openai-server: per-release arguments, real loads, real frees."""

from __future__ import annotations

import asyncio
import importlib.util
import inspect
import json
import logging
import os
import shutil
from pathlib import Path

import httpx
import pytest

from mlx_hub.config import ModelConfig
from mlx_hub.engine import handlers, memory, patches, versions
from mlx_hub.engine.base import EngineError
from mlx_hub.engine.mlx import MLXEngine
from mlx_hub.engine.patches import switch
from mlx_hub.testing.tinymodel import text_only_logit_bias
from tests.helpers import base_url, hello, text_only

engine = MLXEngine()  # one real engine for this module's direct loads


def entry(path: Path | str, **kw) -> ModelConfig:
    return ModelConfig(name=kw.pop("name", "m"), model_path=str(path), **kw)


@pytest.mark.compat
def test_entry_becomes_the_installed_releases_own_config() -> None:
    cfg = handlers.upstream_entry(entry("/x", context_length=4096, served_model_name="nick"))
    assert type(cfg).__module__ == "app.config" and type(cfg).__name__ == "ModelEntryConfig"
    assert cfg.model_path == "/x" and cfg.context_length == 4096
    expected = os.environ.get("MLX_HUB_EXPECT_UPSTREAM")
    if expected:
        assert versions.upstream_version() == expected
    if versions.upstream_version().startswith("1.6."):
        # 1.6.x calls the served name model_id and still takes max_concurrency.
        assert cfg.model_id == "nick" and cfg.max_concurrency == 1
    else:
        assert cfg.served_model_name == "nick" and not hasattr(cfg, "max_concurrency")
        assert cfg.kv_group_size == 64 and cfg.batch_prefill_step_size == 2048
    # Upstream's own __post_init__ ran: a parser name picks its message converter.
    assert handlers.upstream_entry(entry("/x", tool_call_parser="glm4_moe")).message_converter == "glm4_moe"


@pytest.mark.compat
def test_option_the_release_lacks_warns_once(caplog: pytest.LogCaptureFixture) -> None:
    import dataclasses

    from app.config import ModelEntryConfig

    known = {f.name for f in dataclasses.fields(ModelEntryConfig)}
    lacking = "max_concurrency" if "max_concurrency" not in known else "kv_bits"
    value = {"max_concurrency": 2, "kv_bits": 8}[lacking]
    handlers._warned.discard(lacking)
    caplog.set_level(logging.WARNING, "mlx_hub.engine")
    for _ in range(3):
        cfg = handlers.upstream_entry(entry("/x", **{lacking: value}))
    assert not hasattr(cfg, lacking)
    warnings = [r.getMessage() for r in caplog.records if lacking in r.getMessage()]
    assert len(warnings) == 1 and "ignored" in warnings[0]


async def test_every_option_reaches_the_handler(tiny_llama: Path, tmp_path: Path) -> None:
    """What a differential run cannot see (greedy speculative decoding answers as plain greedy) is checked here."""
    options = {
        "served_model_name": "nick",
        "draft_model_path": str(tiny_llama),
        "num_draft_tokens": 3,
        "kv_bits": 4,
        "kv_group_size": 32,
        "quantized_kv_start": 5,
        "prompt_cache_size": 3,
        "prompt_cache_max_bytes": 1 << 20,
        "prompt_cache_dir": str(tmp_path / "pc"),
        "batch_completion_size": 4,
        "batch_prefill_size": 2,
        "batch_prefill_step_size": 256,
        "disable_batching": True,
        "context_length": 1024,
        "default_temperature": 0.3,
        "default_max_tokens": 7,
        "default_seed": 9,
        "default_repetition_context_size": 11,
    }
    loaded = await engine.load(entry(tiny_llama, **options))
    h = loaded.handler
    try:
        assert h.served_model_name == "nick" and h.model_path == str(tiny_llama)
        assert h.model.draft_model is not None and h.model.num_draft_tokens == 3
        assert (h.kv_bits, h.kv_group_size, h.quantized_kv_start) == (4, 32, 5)
        assert (h.prompt_cache.max_size, h.prompt_cache.max_bytes) == (3, 1 << 20)
        assert h.prompt_cache.cache_dir == tmp_path / "pc"
        assert (h._batch_completion_size, h._batch_prefill_size, h._batch_prefill_step_size) == (4, 2, 256)
        assert h._disable_batching is True
        assert h.model.context_length is None  # upstream's rule: a draft model drops context_length
        assert h._uses_model_sampling_defaults  # upstream's endpoints read the defaults off the handler
        assert (h.default_temperature, h.default_max_tokens, h.default_seed) == (0.3, 7, 9)
        assert h.default_repetition_context_size == 11 and h.default_top_p is None
    finally:
        await engine.unload(h, "m")
        del h, loaded
    bounded = await engine.load(entry(tiny_llama, context_length=1024))
    assert bounded.handler.model.context_length == 1024
    await engine.unload(bounded.handler, "m")
    del bounded
    memory.free_memory()


@pytest.mark.skipif(importlib.util.find_spec("mflux") is not None, reason="mflux is installed here")
def test_image_model_without_mflux_is_a_clear_error() -> None:
    with pytest.raises(EngineError, match="needs the mflux package"):
        handlers.handler_class("image-generation")


@pytest.mark.compat
async def test_load_measures_weights_and_unload_returns_memory(small_llama: Path) -> None:
    weights = (small_llama / "model.safetensors").stat().st_size
    memory.free_memory()
    before = memory.active_memory()
    loaded = await engine.load(entry(small_llama, context_length=2048))
    # What the load added is the weights (fp16 on disk and in memory), give or
    # take small buffers: within 20 %.
    assert abs(loaded.memory_bytes - weights) < 0.2 * weights, (loaded.memory_bytes, weights)
    handler = loaded.handler
    del loaded
    await engine.unload(handler, "m")
    del handler
    memory.free_memory()
    leftover = memory.active_memory() - before
    # Tolerance: 1 % of the weights. Measured leftovers are a few bytes (MLX's
    # own scalars); a leaked weight tensor of this model is >= 256 KB (2.5 %).
    assert abs(leftover) <= 0.01 * weights, leftover


async def test_missing_folder_is_named(tmp_path: Path) -> None:
    with pytest.raises(EngineError, match=r"model_path .*nowhere does not exist"):
        await engine.load(entry(tmp_path / "nowhere"))


async def test_corrupt_weights_fail_and_free(tiny_llama: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in tiny_llama.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    (broken / "model.safetensors").write_bytes(b"\x00garbage" * 100)
    memory.free_memory()
    before = memory.active_memory()
    with pytest.raises(EngineError):
        await engine.load(entry(broken))
    memory.free_memory()
    assert memory.active_memory() - before < 64 * 1024


def test_text_only_bias_covers_exactly_the_special_tokens(tiny_llama: Path) -> None:
    """The bias tests lean on must name the end-of-turn token and leave plain text alone."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_llama))
    bias = text_only_logit_bias(tiny_llama)
    ids = {int(i) for i in bias}
    assert tokenizer.eos_token_id in ids and set(tokenizer.all_special_ids) <= ids
    assert ids == set(tokenizer.added_tokens_decoder)  # and no ordinary token
    assert set(bias.values()) == {-100}


async def test_a_budget_bounds_upstreams_prompt_cache(make_hub, hub_config, tiny_llama: Path) -> None:
    """patches/mlx_openai_server.bound_prompt_cache: upstream's LRUPromptCache is unbounded by default;
    under a budget it may keep at most PROMPT_CACHE_SHARE of it (switched off, this fails)."""
    from mlx_hub.engine.patches.mlx_openai_server import PROMPT_CACHE_SHARE

    entry = {"name": "m", "model_path": str(tiny_llama), "default": True}
    doc = hub_config([entry], max_memory="1GB")
    hub = await make_hub(doc)
    cache = hub.slots["m"].handler.prompt_cache
    assert cache.max_bytes == int((1 << 30) * PROMPT_CACHE_SHARE)
    assert (await hub.reload({**doc, "max_memory": "512MB"}))["unchanged"] == ["m"]
    assert cache.max_bytes == int((1 << 29) * PROMPT_CACHE_SHARE)  # a new budget bounds a cache already held


async def test_lm_models_batch_on_the_installed_mlx_lm(make_hub, hub_config, tiny_llama: Path) -> None:
    """patches/mlx_lm.stop_sequences: on mlx-lm 0.32 upstream's scheduler cannot import its stop-sequence
    type, turns batching off, and serves every request one at a time (switched off, this fails there)."""
    doc = hub_config([{"name": "m", "model_path": str(tiny_llama), "default": True}])
    hub = await make_hub(doc)
    assert handlers.one_at_a_time(hub.slots["m"].entry) is None
    request = hello("m", 6, temperature=0, **text_only(tiny_llama))
    async with httpx.AsyncClient(base_url=base_url(hub, "m"), timeout=60) as client:
        replies = await asyncio.gather(*(client.post("/chat/completions", json=request) for _ in range(3)))
    answers = [r.json() for r in replies]
    assert all(r.status_code == 200 for r in replies), answers
    assert len({a["choices"][0]["message"]["content"] for a in answers}) == 1  # greedy: one answer
    assert all(a["usage"]["completion_tokens"] == 6 for a in answers)
    scheduler = hub.slots["m"].handler._batch_scheduler
    assert scheduler is not None and scheduler.get_stats()["running"]


@pytest.mark.skipif(not switch.needed_here("stop_sequences"), reason="mlx-lm here has SequenceStateMachine")
def test_the_stop_sequence_adapter_builds_what_upstream_asks() -> None:
    patches.mlx_lm.stop_sequences()
    generate = importlib.import_module("mlx_lm.generate")
    machine = generate.SequenceStateMachine({"normal": [([5, 6], None), ([9], None)]}, initial="normal")
    matcher = machine.matcher()
    assert [matcher.advance(t) for t in (5, 7, 5, 6)] == [False, False, False, True]
    assert machine.matcher().advance(9)
    with pytest.raises(ValueError, match="stop sequences only"):
        generate.SequenceStateMachine({"normal": [([1], "thinking")], "thinking": []}, initial="normal")


async def test_queue_timeout_bounds_waiting_not_generating(make_hub, hub_config, tiny_llama: Path) -> None:
    """patches/mlx_openai_server.queue_timeout_bounds_waiting: one at a time, upstream timed out a running
    generation after queue_timeout (500 "Inference timed out"); it must bound the wait only."""
    model = {"name": "m", "model_path": str(tiny_llama), "default": True}
    hub = await make_hub(hub_config([{**model, "disable_batching": True, "queue_timeout": 0.05}]))
    request = hello("m", 400, temperature=0, **text_only(tiny_llama))
    async with httpx.AsyncClient(base_url=base_url(hub, "m"), timeout=120) as client:
        reply = await client.post("/chat/completions", json=request)
    assert reply.status_code == 200, reply.text
    assert reply.json()["usage"]["completion_tokens"] == 400


@pytest.mark.skipif(
    "trust_remote_code"
    not in inspect.signature(importlib.import_module("mlx_lm.utils").load_model).parameters,
    reason="this mlx-lm builds no architecture from a model's own file",
)
async def test_trust_remote_code_reaches_a_models_own_architecture(tiny_llama: Path, tmp_path: Path) -> None:
    """mlx-lm 0.32 builds a model from the ``model_file`` its config names only with trust_remote_code;
    the hub's shared-weights loader forwards hub.yaml's option (upstream hands it to the tokenizer alone)."""
    folder = tmp_path / "own-arch"
    shutil.copytree(tiny_llama, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_file": "own_arch.py"}))
    (folder / "own_arch.py").write_text(
        "from mlx_lm.models import llama\n\nModelArgs = llama.ModelArgs\n\n\nclass Model(llama.Model):\n    pass\n"
    )
    with pytest.raises(EngineError, match="trust_remote_code"):
        await engine.load(entry(folder, name="untrusted"))
    loaded = await engine.load(entry(folder, name="trusted", trust_remote_code=True))
    try:
        assert type(loaded.handler.model.model).__module__ == "custom_model"
    finally:
        await engine.unload(loaded.handler, "trusted")


def test_one_at_a_time_names_why() -> None:
    """What admission reserves and what a load logs: each reason upstream serves one request at a time."""
    from types import SimpleNamespace

    plain = entry("/x")
    assert handlers.one_at_a_time(plain) is None  # lm batches on both stacks
    assert "disable_batching" in handlers.one_at_a_time(entry("/x", disable_batching=True))
    assert "draft model" in handlers.one_at_a_time(entry("/x", draft_model_path="/d"))
    unmergeable = SimpleNamespace(model=SimpleNamespace(cache_is_batchable=False))
    assert "is_batchable" in handlers.one_at_a_time(plain, unmergeable)
    assert not handlers.batches(plain, unmergeable)
    assert "embeddings" in handlers.one_at_a_time(entry("/x", model_type="embeddings"))
