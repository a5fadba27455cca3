"""The KV estimate counts each layer for what its cache holds: growing KV, a window, or a fixed state.

The plan is read from the loaded model's own caches (engine/cache_plan.py) and
checked against the bytes mlx-lm's caches really hold after a prefill of N
tokens and M decode steps, as ``generate_step`` runs them: exact for every
architecture here, hybrid (olmo_hybrid: gated-delta layers with an
``ArraysCache`` state) and sliding-window (plamo3: ``RotatingKVCache``) included.
The config formula, which counts every layer as full attention, stays the
estimate before a model is loaded.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from mlx_hub.config import ModelConfig
from mlx_hub.engine import reservation
from mlx_hub.engine.cache_plan import GROW, STATE, WINDOW, CachePlan, LayerCache, measure
from mlx_hub.engine.tinymodel_archs import ARCHS

from .helpers import long_chat
from .test_hub import lm

PLAN_ARCHS = ["llama", "olmo_hybrid", "plamo3", "gptj"]
#: (prompt tokens, decode steps): inside the first block, past a 64-token window, several blocks.
RUNS = [(100, 20), (300, 40), (700, 10)]


def _model(models_dir: Path, name: str) -> Path:
    if not ARCHS[name].available():
        pytest.skip(f"mlx-lm {_version()} has no mlx_lm.models.{name} (since {ARCHS[name].since})")
    from mlx_hub.testing.tinymodel import make_model

    return make_model(models_dir / f"plan-{name}", arch=name, seed=21)


def _version() -> str:
    from importlib.metadata import version

    return version("mlx-lm")


def _cache_bytes(model: object, prompt: int, steps: int) -> int:
    """The most a request's caches hold: ``prompt - 1`` tokens prefilled, then ``steps`` decoded."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    caches = make_prompt_cache(model)
    tokens = mx.random.randint(0, 200, (1, prompt))
    model(tokens[:, : prompt - 1], cache=caches)  # type: ignore[operator]
    mx.eval([c.state for c in caches])
    peak = sum(c.nbytes for c in caches)
    y = tokens[:, prompt - 1 :]
    for _ in range(steps):
        y = model(y, cache=caches)[:, -1:].argmax(-1)  # type: ignore[operator]
        mx.eval(y, [c.state for c in caches])
        peak = max(peak, sum(c.nbytes for c in caches))
    return peak


@pytest.mark.parametrize("name", PLAN_ARCHS)
def test_the_plan_matches_the_caches_after_a_prefill(models_dir: Path, name: str) -> None:
    from mlx_lm import load
    from mlx_lm.models.cache import make_prompt_cache

    path = _model(models_dir, name)
    model, _ = load(str(path))
    plan = measure(model, make_prompt_cache, None)
    assert plan is not None
    config = reservation.kv_shape(ModelConfig(name="m", model_path=str(path), prompt_cache_size=0))
    for prompt, steps in RUNS:
        actual = _cache_bytes(model, prompt, steps)
        estimate = plan.kv_bytes(prompt, prompt + steps, prefill_step=reservation.PREFILL_STEP)
        by_config = reservation.request_need(config, prompt, steps).kv_bytes
        print(f"{name} {prompt}+{steps}: plan {estimate} / actual {actual}; config formula {by_config}")
        assert estimate == actual, (name, prompt, steps)
        if name != "llama" and name != "gptj":  # hybrid and windowed: the config formula overcounts
            assert by_config > actual


def test_the_plan_reads_each_layer_kind(models_dir: Path) -> None:
    from mlx_lm import load
    from mlx_lm.models.cache import make_prompt_cache

    hybrid, _ = load(str(_model(models_dir, "olmo_hybrid")))
    plan = measure(hybrid, make_prompt_cache, None)
    assert plan is not None and [c.kind for c in plan.layers] == [STATE, STATE, STATE, GROW]
    assert plan.layers[0].state_bytes > 0 and plan.windows == (None,)
    windowed, _ = load(str(_model(models_dir, "plamo3")))
    plan = measure(windowed, make_prompt_cache, None)
    assert plan is not None and [(c.kind, c.window) for c in plan.layers] == [(WINDOW, 64)] * 3 + [(GROW, 0)]
    # A model without make_cache (qwen2) and a context_length: every layer a window of that size, as
    # upstream builds it. One with make_cache (llama) keeps its own caches: context_length bounds nothing.
    plain, _ = load(str(_model(models_dir, "qwen2")))
    plan = measure(plain, make_prompt_cache, 512)
    assert plan is not None and {(c.kind, c.window) for c in plan.layers} == {(WINDOW, 512)}
    own, _ = load(str(_model(models_dir, "llama")))
    plan = measure(own, make_prompt_cache, 512)
    assert plan is not None and {c.kind for c in plan.layers} == {GROW}


def test_a_state_only_model_has_no_attention_scores() -> None:
    """A pure state-space plan: the same bytes at any length, and a prefill of activations only."""
    base = dict(layers=2, heads=4, kv_heads=4, head_dim=16, hidden=64, intermediate=128, vocab=300,
                dtype_bytes=2, context=None, windows=(None, None))  # fmt: skip
    plan = CachePlan((LayerCache(STATE, state_bytes=1000),) * 2)
    shape = reservation.KVShape(**base, plan=plan)  # type: ignore[arg-type]
    short, long = reservation.request_need(shape, 100, 10), reservation.request_need(shape, 5000, 1000)
    assert short.kv_bytes == long.kv_bytes == 2000
    full = reservation.request_need(reservation.KVShape(**base), 5000, 1000)  # type: ignore[arg-type]
    assert long.prefill_bytes < full.prefill_bytes and full.kv_bytes > 100 * long.kv_bytes


def test_kv_bits_quantize_only_growing_layers() -> None:
    grow = LayerCache(GROW, token_bytes=2 * 2 * 16 * 2, kv_heads=2, k_dim=16, v_dim=16, dtype_bytes=2)
    window = LayerCache(WINDOW, token_bytes=2 * 2 * 16 * 2, window=64, kv_heads=2, k_dim=16, v_dim=16)
    plan = CachePlan((grow, window))
    plain = plan.kv_bytes(1000, 1100, prefill_step=2048)
    quantized = plan.kv_bytes(1000, 1100, prefill_step=2048, kv_bits=4, kv_group_size=16)
    assert quantized - window.token_bytes * window.held(1000, 1100, 2048) < plain / 3


async def test_a_loaded_hybrid_is_estimated_by_its_plan(make_hub, hub_config, models_dir: Path) -> None:
    """Through a real hub: once loaded, a request on a hybrid model reserves what its layers hold."""
    path = _model(models_dir, "olmo_hybrid")
    entry = lm("h", path, prompt_cache_size=0)
    body = long_chat("h", 600, 50)
    before_load = reservation.estimate_request(ModelConfig(**entry), body, reservation.PromptCounter())
    hub = await make_hub(hub_config([entry]))
    plan = hub.engine.plans["h"]
    need = hub.engine.estimate_request(hub.slots["h"].entry, body)
    assert need.kv_bytes == plan.kv_bytes(
        need.prompt_tokens, need.tokens, prefill_step=reservation.PREFILL_STEP
    )
    assert need.kv_bytes < 0.5 * before_load.kv_bytes  # the config formula counts 4 attention layers, not 1
    assert await hub.unload("h") == "unloaded"
    assert "h" not in hub.engine.plans


async def test_entries_sharing_a_model_share_its_measurement(
    monkeypatch: pytest.MonkeyPatch, tiny_llama: Path
) -> None:
    """The probe is a decode step (most of a second for a 0.5B model on a CPU): a second entry of a
    loaded model reuses the first's plan, so its load stays cheap; another cache size measures anew."""
    from mlx_hub.engine import cache_plan
    from mlx_hub.engine.mlx import MLXEngine

    calls: list[int | None] = []
    original = cache_plan.measure

    def counted(model: object, make: object, max_kv_size: int | None) -> CachePlan | None:
        calls.append(max_kv_size)
        return original(model, make, max_kv_size)

    monkeypatch.setattr(cache_plan, "measure", counted)
    engine = MLXEngine()
    names = [("a", 512), ("b", 512), ("c", 256)]
    loaded = [
        await engine.load(ModelConfig(name=n, model_path=str(tiny_llama), context_length=size))
        for n, size in names
    ]
    try:
        assert calls == [512, 256]
        assert engine.plans["a"] is engine.plans["b"] and engine.plans["c"] is not engine.plans["a"]
    finally:
        for (name, _), item in zip(names, loaded, strict=True):
            await engine.unload(item.handler, name)


async def test_a_model_loaded_again_reuses_its_measurement(
    monkeypatch: pytest.MonkeyPatch, tiny_llama: Path, tmp_path: Path
) -> None:
    """A JIT model's first request waits for its load, probe included: a model unloaded (idle, a group
    swap) and loaded again keeps the plan its first load measured; changed weights measure anew."""
    from mlx_hub.engine import cache_plan
    from mlx_hub.engine.mlx import MLXEngine

    calls: list[int | None] = []
    original = cache_plan.measure

    def counted(model: object, make: object, max_kv_size: int | None) -> CachePlan | None:
        calls.append(max_kv_size)
        return original(model, make, max_kv_size)

    monkeypatch.setattr(cache_plan, "measure", counted)
    engine = MLXEngine()
    folder = Path(shutil.copytree(tiny_llama, tmp_path / "model"))
    entry = ModelConfig(name="a", model_path=str(folder), context_length=512)
    for _ in range(2):
        loaded = await engine.load(entry)
        plan = engine.plans["a"]
        await engine.unload(loaded.handler, "a")
        del loaded
        engine.free_memory()
    assert calls == [512]
    weights = next(folder.glob("*.safetensors"))
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # the weights were replaced
    loaded = await engine.load(entry)
    await engine.unload(loaded.handler, "a")
    assert calls == [512, 512]
    assert plan is not None
