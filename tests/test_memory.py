"""Memory that holds in one process: each request's KV cache and prefill count in the budget.

Three tiers: the pure rules (``policy.request_admission``, ``reservation.request_need``,
budget words), the gate on a fake engine (evict, wait, 503, 400, status and
metrics), and generated models on real ports (the estimate against MLX's
measured memory, an allocation error mid-stream, a 400 naming the request).
The soak under load is tests/reliability/test_memory_soak.py.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from mlx_hub.config import ModelConfig, parse_config
from mlx_hub.core.admission import resolve_budget
from mlx_hub.core.hub import Hub
from mlx_hub.core.policy import Candidate, request_admission
from mlx_hub.engine import memory, reservation
from mlx_hub.engine.mlx import MLXEngine
from mlx_hub.testing.fake_engine import FakeEngine, fake, port

from .helpers import hello, long_chat, meta

engine = MLXEngine()  # one real engine for this module's direct loads

Make = Callable[..., Any]

# ----------------------------------------------------------------- pure rules


def model(name: str, size: int, *, reserved: int = 0, busy: bool = False, **kw: Any) -> Candidate:
    return Candidate(name=name, loaded=True, busy=busy, last_used=kw.pop("last_used", 0.0), size=size,
                     reserved=reserved, **kw)  # fmt: skip


def test_request_fits_beside_weights_and_reservations() -> None:
    models = [model("a", 400, reserved=100, busy=True), model("b", 300)]
    assert request_admission("a", 200, models, budget=1000).admit
    assert request_admission("a", 200, models, budget=None).admit


def test_request_over_budget_evicts_the_idle_model_then_waits() -> None:
    models = [model("a", 400, reserved=300, busy=True), model("b", 300, last_used=1.0)]
    decision = request_admission("a", 200, models, budget=1000)
    assert decision.evict == "b"
    busy_b = [models[0], model("b", 300, busy=True)]
    assert request_admission("a", 200, busy_b, budget=1000).wait
    pinned_b = [models[0], model("b", 300, pinned=True)]
    assert request_admission("a", 200, pinned_b, budget=1000).wait


def test_a_request_that_cannot_fit_even_alone_is_impossible() -> None:
    models = [model("a", 700), model("b", 100)]
    assert request_admission("a", 301, models, budget=1000).impossible
    assert not request_admission("a", 300, models, budget=1000).impossible


def test_a_batch_pads_every_sequence_to_its_longest() -> None:
    from mlx_hub.core.policy import batch_padding

    assert batch_padding(100, [], 0) == 0  # alone: its own KV
    assert batch_padding(100, [1000], 1000) == 900  # a short joining a long: held at the long's length
    assert batch_padding(1000, [100], 100) == 900  # a long joining a short: the short grows to it
    assert batch_padding(100, [1000, 100], 1000 + 1000) == 900  # a third short: held at the long too
    assert batch_padding(1000, [1000], 1000) == 0  # equal lengths pad nothing


def test_a_batched_request_reserves_the_padding_of_its_batch() -> None:
    from mlx_hub.core.slot import ModelSlot

    slot = ModelSlot(ModelConfig(name="m", model_path="/x"), 47850, "127.0.0.1")
    long = slot.reservation(kv=1000, prefill=50_000, batched=True)
    slot.begin_request(long)
    assert (
        slot.reservation(kv=10, prefill=500, batched=True).bytes == 1000 + 50_000
    )  # held at the long's size
    assert slot.reservation(kv=10, prefill=500, batched=False).bytes == 510  # one at a time: its own
    slot.end_request(long)
    assert slot.reserved_bytes == 0 and slot.reservation(kv=10, prefill=500, batched=True).bytes == 510


def test_batch_padding_does_not_make_a_request_impossible() -> None:
    models = [model("a", 400, reserved=300, busy=True)]
    decision = request_admission("a", 700, models, budget=1000, alone=500)  # 700 with its batch's padding
    assert not decision.impossible and decision.wait


def test_a_prompt_cache_does_not_make_a_request_impossible() -> None:
    models = [model("a", 700, evictable=400)]
    decision = request_admission("a", 500, models, budget=1000)
    assert not decision.impossible and decision.wait


def test_loads_count_the_reservations_of_requests_in_flight() -> None:
    from mlx_hub.core.policy import budget_admission

    running = [model("a", 400, reserved=500, busy=True)]
    assert budget_admission("b", 200, running, budget=1000).wait
    assert budget_admission("b", 100, running, budget=1000).admit


def shape(**kw: Any) -> reservation.KVShape:
    base = dict(layers=4, heads=8, kv_heads=2, head_dim=32, hidden=256, intermediate=512, vocab=300,
                dtype_bytes=2, context=8192, windows=(None,) * 4)  # fmt: skip
    return reservation.KVShape(**{**base, **kw})


def test_kv_grows_with_tokens_in_blocks_and_stops_at_the_context() -> None:
    s = shape()
    per_block = 4 * 2 * 2 * 32 * 2 * reservation.KV_STEP
    assert reservation.request_need(s, 10, 10).kv_bytes == per_block
    assert reservation.request_need(s, 300, 0).kv_bytes == 2 * per_block
    capped = reservation.request_need(s, 8000, 4000)
    assert capped.tokens == 8192 and capped.kv_bytes == 32 * per_block


def test_the_prompt_cache_copies_count_while_the_request_runs() -> None:
    plain = reservation.request_need(shape(), 1000, 100).kv_bytes
    assert reservation.request_need(shape(cache_copies=2), 1000, 100).kv_bytes == 3 * plain


def test_rotating_and_sliding_layers_keep_their_window() -> None:
    full = reservation.request_need(shape(), 4000, 100)
    rotating = reservation.request_need(shape(windows=(1024,) * 4), 4000, 100)
    mixed = reservation.request_need(shape(windows=(1024, 1024, 1024, None)), 4000, 100)
    assert rotating.kv_bytes < mixed.kv_bytes < full.kv_bytes
    assert rotating.kv_bytes == 4 * 1024 * 2 * 2 * 32 * 2


def test_kv_bits_shrink_the_cache() -> None:
    plain = reservation.request_need(shape(), 2000, 100).kv_bytes
    assert reservation.request_need(shape(kv_bits=4), 2000, 100).kv_bytes < plain / 3


def test_prefill_takes_the_worst_chunk() -> None:
    one_chunk = reservation.request_need(shape(), 2049, 0).prefill_bytes  # 2048 tokens prefilled, one decoded
    two_chunks = reservation.request_need(shape(), 4097, 0).prefill_bytes  # the second sees 4096 keys
    assert two_chunks > 1.7 * one_chunk  # twice the attention scores, the same activations
    assert reservation.request_need(None, 5000, 5000).bytes == 0


def test_kv_shape_reads_config_and_entry(tmp_path: Path) -> None:
    import json

    (tmp_path / "config.json").write_text(
        json.dumps(
            {
                "num_hidden_layers": 6,
                "num_attention_heads": 8,
                "num_key_value_heads": 4,
                "hidden_size": 512,
                "sliding_window": 128,
                "sliding_window_pattern": 3,
                "torch_dtype": "bfloat16",
                "max_position_embeddings": 4096,
            }
        )
    )
    entry = ModelConfig(name="m", model_path=str(tmp_path), kv_bits=8)
    s = reservation.kv_shape(entry)
    assert s is not None and (s.layers, s.kv_heads, s.head_dim, s.dtype_bytes) == (6, 4, 64, 2)
    assert s.windows == (128, 128, None, 128, 128, None) and s.kv_bits == 8 and s.context == 4096
    bounded = reservation.kv_shape(ModelConfig(name="m", model_path=str(tmp_path), context_length=1000))
    assert bounded is not None and bounded.windows == (128, 128, 1000, 128, 128, 1000)
    assert (
        reservation.kv_shape(ModelConfig(name="e", model_path=str(tmp_path), model_type="embeddings")) is None
    )


@pytest.mark.parametrize("word", ["auto", "AUTO", "none", None])
def test_budget_words(word: Any) -> None:
    cfg = parse_config({"max_memory": word, "models": [{"name": "a", "model_path": "x"}]})
    budget, source = resolve_budget(cfg.max_memory, FakeEngine())
    if word is None or word == "none":
        assert (budget, source) == (None, "none")
    else:
        assert (budget, source) == (3 << 32, "auto")


def test_auto_is_the_default_and_a_fraction_of_memory_without_metal() -> None:
    cfg = parse_config({"models": [{"name": "a", "model_path": "x"}]})
    assert cfg.max_memory == "auto"
    total = memory.system_memory()
    if memory.recommended_working_set() is None and total is not None:
        assert memory.working_set() == int(total * memory.AUTO_SYSTEM_FRACTION)


def test_bad_budget_words_name_the_field() -> None:
    from mlx_hub.config import ConfigError

    with pytest.raises(ConfigError) as info:
        parse_config({"max_memory": "automatic", "models": [{"name": "a", "model_path": "x"}]})
    assert "max_memory" in str(info.value)


# ------------------------------------------------------------- the gate, fast


async def test_requests_reserve_and_show_in_status_and_metrics(fast: Make) -> None:
    fe = FakeEngine(sizes={"a": 1000}, request_bytes_per_token=10)
    hub = await fast([fake("a")], fe, max_memory=10_000)
    fe.block("a")
    async with port(hub, "a") as a:
        running = [
            asyncio.create_task(a.post("/v1/chat/completions", json=hello("a", n))) for n in (100, 200)
        ]
        while meta(hub, "a")["in_flight"] < 2:
            await asyncio.sleep(0.01)
        row = meta(hub, "a")
        assert row["kv_reserved_bytes"] == 3000  # both batched requests count
        assert hub.status()["memory"]["reserved_bytes"] == 3000
        scrape = (await httpx.AsyncClient(transport=httpx.ASGITransport(app=hub_controller(hub)),
                                          base_url="http://127.0.0.1").get("/metrics")).text  # fmt: skip
        assert 'mlx_hub_model_kv_reserved_bytes{model="a"} 3000.0' in scrape
        assert "mlx_hub_memory_reserved_bytes 3000.0" in scrape and "mlx_hub_mlx_peak_memory_bytes" in scrape
        fe.unblock("a")
        assert [(await r).status_code for r in running] == [200, 200]
    row = meta(hub, "a")
    assert row["kv_reserved_bytes"] == 0 and row["memory_peak_bytes"] == 4000
    assert fe.limit == 10_000  # MLX's memory limit follows the budget


def hub_controller(hub: Hub) -> Any:
    from mlx_hub.web.controller import build_controller_app

    return build_controller_app(hub, request_shutdown=lambda: None)


async def test_a_request_evicts_an_idle_model_to_fit(fast: Make) -> None:
    fe = FakeEngine(sizes={"a": 4000, "b": 4000}, request_bytes_per_token=10)
    hub = await fast([fake("a"), fake("b")], fe, max_memory=10_000)
    async with port(hub, "a") as a:
        small = await a.post("/v1/chat/completions", json=hello("a", 100))  # 1000 bytes: fits
        assert small.status_code == 200 and meta(hub, "b")["memory_state"] == "loaded"
        big = await a.post("/v1/chat/completions", json=hello("a", 500))  # 5000 bytes: b must go
    assert big.status_code == 200 and meta(hub, "b")["memory_state"] == "unloaded"
    assert fe.active == 4000


async def test_a_request_waits_then_gets_503_with_retry_after(fast: Make) -> None:
    fe = FakeEngine(sizes={"a": 4000}, request_bytes_per_token=10)
    hub = await fast([fake("a", queue_timeout=0.3)], fe, max_memory=10_000)
    fe.block("a")
    async with port(hub, "a") as a:
        first = asyncio.create_task(a.post("/v1/chat/completions", json=hello("a", 400)))
        while meta(hub, "a")["in_flight"] < 1:
            await asyncio.sleep(0.01)
        refused = await a.post("/v1/chat/completions", json=hello("a", 300))  # 4000 + 4000 + 3000 > 10000
        waited = asyncio.create_task(a.post("/v1/chat/completions", json=hello("a", 300)))
        await asyncio.sleep(0.05)
        fe.unblock("a")  # the first ends: the waiting one fits now
        assert (await first).status_code == 200 and (await waited).status_code == 200
    assert refused.status_code == 503 and refused.headers["retry-after"] == "5"
    error = refused.json()["error"]
    assert error["code"] == "memory_budget_exceeded" and "3000 bytes" in error["message"]


async def test_a_request_that_never_fits_gets_400_at_once(fast: Make) -> None:
    fe = FakeEngine(sizes={"a": 4000}, request_bytes_per_token=10)
    hub = await fast([fake("a", queue_timeout=60)], fe, max_memory=10_000)
    async with port(hub, "a") as a:
        refused = await a.post("/v1/chat/completions", json=hello("a", 700))  # 4000 + 7000 > 10000
    error = refused.json()["error"]
    assert refused.status_code == 400 and error["code"] == "request_exceeds_memory_budget"
    assert "700 tokens" in error["message"] and "7000 bytes" in error["message"]
    assert "10000 bytes" in error["message"] and meta(hub, "a")["in_flight"] == 0


async def test_no_budget_admits_everything(fast: Make) -> None:
    fe = FakeEngine(sizes={"a": 4000}, request_bytes_per_token=10)
    hub = await fast([fake("a")], fe, max_memory="none")
    async with port(hub, "a") as a:
        assert (await a.post("/v1/chat/completions", json=hello("a", 10_000))).status_code == 200
    assert hub.budget is None and hub.status()["memory"]["budget_source"] == "none" and fe.limit is None


async def test_reload_sets_the_new_budget_and_limit(fast: Make, hub_config, tmp_path: Path) -> None:
    fe = FakeEngine()
    hub = await fast([fake("a")], fe, max_memory=10_000)
    await hub.reload(hub_config([fake("a")], max_memory=20_000))
    assert hub.budget == 20_000 and fe.limit == 20_000


# ------------------------------------------------------ generated models, real ports


def lm(name: str, path: Path, **kw: Any) -> dict[str, Any]:
    return {"name": name, "model_path": str(path), "default": True, **kw}


def chat_url(hub: Hub, name: str) -> str:
    return f"http://127.0.0.1:{hub.slots[name].port}/v1/chat/completions"


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("batching", [True, False], ids=["batched", "single"])
async def test_estimate_matches_measured_memory(
    make_hub, hub_config, memory_models: dict[str, Path], arch: str, batching: bool
) -> None:
    """The gate's reservation against what MLX's active memory rose to during the request: within 25 %."""
    import mlx.core as mx

    hub = await make_hub(hub_config([lm("m", memory_models[arch], disable_batching=not batching)]))
    body = long_chat("m", 1300, 8, offset=7)
    need = hub.engine.estimate_request(hub.slots["m"].entry, body)
    async with httpx.AsyncClient(timeout=300) as http:
        assert (await http.post(chat_url(hub, "m"), json=long_chat("m", 20, 2, offset=3))).status_code == 200
        mx.clear_cache()
        before = mx.get_active_memory()
        mx.reset_peak_memory()
        reply = await http.post(chat_url(hub, "m"), json=body)
        measured = mx.get_peak_memory() - before
    assert reply.status_code == 200
    usage = reply.json()["usage"]
    assert abs(need.prompt_tokens - usage["prompt_tokens"]) <= 2, (need, usage)  # the template, counted
    ratio = need.bytes / measured
    print(
        f"{arch} {'batched' if batching else 'single'}: estimate {need.bytes} / measured {measured} = {ratio:.3f}"
    )
    assert 0.75 <= ratio <= 1.25, (need, measured)
    slot = hub.slots["m"]
    assert slot.peak_bytes >= need.bytes  # the reservation the gate took is this estimate


async def test_a_request_too_big_for_the_budget_gets_400_naming_it(
    make_hub, hub_config, memory_models: dict[str, Path]
) -> None:
    path = memory_models["llama"]
    hub = await make_hub(hub_config([lm("m", path)], max_memory=int(engine.estimate(ModelConfig(name="m", model_path=str(path))) * 1.5)))  # fmt: skip
    async with httpx.AsyncClient(timeout=300) as http:
        small = await http.post(chat_url(hub, "m"), json=long_chat("m", 30, 4))
        big = await http.post(chat_url(hub, "m"), json=long_chat("m", 3000, 500, offset=1))
    assert small.status_code == 200
    error = big.json()["error"]
    assert big.status_code == 400 and error["code"] == "request_exceeds_memory_budget", big.text
    assert "tokens" in error["message"] and f"{hub.budget} bytes" in error["message"]
    assert meta(hub, "m")["in_flight"] == 0 and meta(hub, "m")["kv_reserved_bytes"] == 0


class FailingModel:
    """Stands in for a model's forward pass and raises MLX's allocation error on one call (a decode step).

    CPU MLX 0.32 cannot be made to raise it for real: an allocation beyond the
    machine's memory there ends the process with SIGSEGV. Metal raises this
    RuntimeError from the generation thread, which is what this reproduces.
    """

    def __init__(self, inner: Any, fail_at: int):
        self.inner, self.fail_at, self.calls = inner, fail_at, 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError(
                "[metal::malloc] Attempting to allocate 68719476736 bytes which is greater than the "
                "maximum allowed buffer size of 28991029248 bytes."
            )
        return self.inner(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def live_sequences(generator: Any) -> int:
    """Sequences mlx-lm's BatchGenerator still holds (waiting, prefilling or decoding), each with its KV."""
    return (
        len(generator._unprocessed_sequences)
        + len(generator._prompt_batch)
        + len(generator._generation_batch)
    )


async def settled(read: Callable[[], Any], done: Callable[[Any], bool], seconds: float = 30) -> Any:
    """Read ``read()`` until ``done`` says yes, for at most ``seconds``; the last value either way.

    A reply reaches the client a moment before the threads that served it have
    let go of its arrays (upstream's worker unwinds a failed generator after
    queueing its error; the KV is stored on its own thread), so memory is read
    until it shows the release, never right after the reply alone.
    """
    deadline = asyncio.get_running_loop().time() + seconds
    while not done(value := read()) and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.05)
    return value


def cached(hub: Hub) -> int:
    """What upstream's prompt caches hold in memory, over every model (none where it keeps them on disk)."""
    return sum(slot.prompt_cache_bytes for slot in hub.slots.values())


@pytest.mark.parametrize("batching", [True, False], ids=["batched", "single"])
async def test_an_allocation_error_fails_that_request_alone(
    make_hub, hub_config, memory_models: dict[str, Path], batching: bool
) -> None:
    import mlx.core as mx

    hub = await make_hub(
        hub_config(
            [
                lm("a", memory_models["llama"], disable_batching=not batching),
                lm("b", memory_models["qwen2"]),
            ]
        )
    )
    handler = hub.slots["a"].handler
    # Before the first request: upstream's batch scheduler keeps the model it first saw.
    handler.model.model = failing = FailingModel(handler.model.model, fail_at=-1)
    async with httpx.AsyncClient(timeout=300) as http:
        assert (await http.post(chat_url(hub, "a"), json=long_chat("a", 10, 2, offset=2))).status_code == 200
        memory.free_memory()
        before = mx.get_active_memory() - cached(hub)
        failing.calls, failing.fail_at = 0, 3  # the prefill, one decode step, then the error
        other = asyncio.create_task(http.post(chat_url(hub, "b"), json=long_chat("b", 400, 16, offset=5)))
        events = []
        async with http.stream("POST", chat_url(hub, "a"), json=long_chat("a", 600, 32, stream=True)) as s:
            assert s.status_code == 200  # the stream had begun
            events = [line async for line in s.aiter_lines() if line.startswith("data: ")]
        assert any("metal::malloc" in e and '"error"' in e for e in events), events
        assert events[-1] == "data: [DONE]"  # the stream ended, with the error event before its end
        if (
            batching
        ):  # the failed sequence left mlx-lm's BatchGenerator with its error (patches: batch_failure...)
            assert live_sequences(handler._batch_scheduler._batch_generator) == 0
        failing.calls, failing.fail_at = 0, 3
        plain = await http.post(chat_url(hub, "a"), json=long_chat("a", 600, 8, offset=9))
        assert plain.status_code == 503 and plain.json()["error"]["code"] == "memory_exhausted", plain.text
        assert plain.headers["retry-after"] == "5"
        assert (await other).status_code == 200  # the other model served meanwhile
        need = hub.engine.estimate_request(hub.slots["a"].entry, long_chat("a", 600, 32))

        def left() -> int:
            """What is left over the loaded model and upstream's prompt cache."""
            memory.free_memory()
            return mx.get_active_memory() - cached(hub) - before

        # Two requests failed; had either kept its KV cache, at least one whole cache would be left. What
        # remains (a quarter of one, batched) is the batch generator's own state, which outlives any request.
        remains = await settled(left, lambda n: n < 0.5 * need.kv_bytes)
        assert remains < 0.5 * need.kv_bytes, (remains, need)
        failing.fail_at = -1
        again = await http.post(chat_url(hub, "a"), json=long_chat("a", 30, 4, offset=4))
        assert again.status_code == 200
    assert meta(hub, "a")["kv_reserved_bytes"] == 0 and meta(hub, "a")["memory_state"] == "loaded"
    scrape = hub.metrics.render().decode()
    assert 'mlx_hub_allocation_failures_total{model="a"} 2.0' in scrape


@pytest.mark.parametrize("batching", [True, False], ids=["batched", "single"])
async def test_a_finished_request_leaves_no_kv_in_memory(
    make_hub, hub_config, memory_models: dict[str, Path], batching: bool
) -> None:
    """patches/mlx_openai_server.idle_workers_hold_no_kv: upstream's idle worker (one at a time) and
    batch scheduler kept the last request's KV alive until the next request, counted nowhere (its
    reservation ended, the prompt cache keeps it on disk). Streamed or not, it must go.

    The client has its answer a moment before upstream has stored the KV (on its own thread),
    so the store and the memory are read until they show it, for a bounded time.
    """
    import mlx.core as mx

    hub = await make_hub(hub_config([lm("m", memory_models["llama"], disable_batching=not batching)]))
    store = hub.prompt_store

    def active() -> int:
        memory.free_memory()
        return mx.get_active_memory()

    def stored(seen: set[str]) -> int:
        """The bytes of the request's KV, once upstream has put it in the prompt cache (else 0)."""
        new = [e.nbytes for e in store.entries(store.known["m"]) if e.id not in seen and e.tokens > 500]
        return max(new, default=0)

    async with httpx.AsyncClient(timeout=300) as http:
        warm = await http.post(chat_url(hub, "m"), json=long_chat("m", 10, 2, offset=1))
        assert warm.status_code == 200  # the batch generator, made on the first request, is there now
        for offset, stream in ((3, False), (5, True)):
            before, seen = active(), {e.id for e in store.entries(store.known["m"])}
            reply = await http.post(
                chat_url(hub, "m"), json=long_chat("m", 600, 8, offset=offset, stream=stream)
            )
            assert reply.status_code == 200
            kv = await settled(functools.partial(stored, seen), bool)
            left = await settled(lambda before=before: active() - before, lambda left, kv=kv: left < kv / 4)
            assert kv and left < kv / 4, (stream, left, kv)
    assert meta(hub, "m")["prompt_cache_bytes"] == 0  # none of it held in memory, none counted
