"""The fast tier: Hub, the load gate and /v1 routing on a fake engine, in-process (httpx.ASGITransport)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from mlx_hub.core.hub import Hub
from mlx_hub.testing.fake_engine import FakeEngine, fake, port
from mlx_hub.web.controller import build_controller_app

from .helpers import hello, meta

Make = Callable[..., Any]


def controller(hub: Hub) -> httpx.AsyncClient:
    app = build_controller_app(hub, request_shutdown=lambda: None)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1")


async def test_jit_loads_once_for_concurrent_requests(fast: Make) -> None:
    engine = FakeEngine()
    hub = await fast([fake("j", jit_enabled=True)], engine)
    assert meta(hub, "j")["memory_state"] == "unloaded"
    async with port(hub, "j") as http:
        replies = await asyncio.gather(
            *(http.post("/v1/chat/completions", json=hello("j", 4)) for _ in range(6))
        )
    assert [r.status_code for r in replies] == [200] * 6
    assert replies[0].json()["choices"][0]["message"]["content"] == "answer from j"
    assert engine.loads["j"] == 1 and meta(hub, "j")["memory_state"] == "loaded"


async def test_v1_routes_by_name_served_name_and_path(fast: Make) -> None:
    hub = await fast([fake("a", served_model_name="Alpha"), fake("b")])
    async with controller(hub) as http:
        for model, owner in (("a", "a"), ("Alpha", "a"), ("fake/b", "b")):
            reply = await http.post("/v1/chat/completions", json=hello(model, 4))
            assert reply.json()["choices"][0]["message"]["content"] == f"answer from {owner}", model
        missing = await http.post("/v1/chat/completions", json=hello("nope", 4))
        lost = await http.post("/v1/nowhere", json=hello("a", 4))
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
    assert lost.status_code == 404 and lost.json()["error"]["type"] == "invalid_request_error"
    async with port(hub, "a") as http:
        elsewhere = await http.post("/v1/chat/completions", json=hello("b", 4))
    assert elsewhere.status_code == 404 and elsewhere.json()["detail"]["error"]["type"] == "model_not_found"


async def test_group_evicts_the_idle_member_and_refuses_when_all_are_busy(fast: Make) -> None:
    engine = FakeEngine()
    models = [fake(n, jit_enabled=True, group="g", queue_timeout=0.2) for n in ("a", "b")]
    hub = await fast(models, engine, groups=[{"name": "g", "max_loaded": 1}])
    async with port(hub, "a") as a, port(hub, "b") as b:
        assert (await a.post("/v1/chat/completions", json=hello("a", 4))).status_code == 200
        assert (await b.post("/v1/chat/completions", json=hello("b", 4))).status_code == 200
        assert meta(hub, "a")["memory_state"] == "unloaded"  # evicted for b
        engine.block("b")
        busy = asyncio.create_task(b.post("/v1/chat/completions", json=hello("b", 4)))
        await asyncio.sleep(0.05)
        refused = await a.post("/v1/chat/completions", json=hello("a", 4))
        engine.unblock("b")
        assert (await busy).status_code == 200
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "group_at_capacity"


async def test_budget_evicts_least_recently_used(fast: Make) -> None:
    engine = FakeEngine(sizes={"a": 600, "b": 600})
    hub = await fast([fake("a", jit_enabled=True), fake("b", jit_enabled=True)], engine, max_memory=1000)
    async with port(hub, "a") as a, port(hub, "b") as b:
        await a.post("/v1/chat/completions", json=hello("a", 4))
        await b.post("/v1/chat/completions", json=hello("b", 4))
    assert meta(hub, "a")["memory_state"] == "unloaded" and engine.active == 600


async def test_a_failed_load_is_contained(fast: Make) -> None:
    hub = await fast([fake("bad"), fake("good")], FakeEngine(failing={"bad"}))
    async with port(hub, "bad") as bad, port(hub, "good") as good:
        refused = await bad.post("/v1/chat/completions", json=hello("bad", 4))
        served = await good.post("/v1/chat/completions", json=hello("good", 4))
    assert refused.status_code == 503 and "no weights" in refused.json()["error"]["message"]
    assert served.status_code == 200 and hub.status_document().status == "degraded"


async def test_keep_alive_zero_unloads_after_the_request(fast: Make) -> None:
    hub = await fast([fake("k", jit_enabled=True)])
    async with port(hub, "k") as http:
        await http.post("/v1/chat/completions", json=hello("k", 4, keep_alive=0))
    for _ in range(100):
        if meta(hub, "k")["memory_state"] == "unloaded":
            break
        await asyncio.sleep(0.01)
    assert meta(hub, "k")["memory_state"] == "unloaded"


async def test_stop_cancels_what_outlives_the_drain(fast: Make) -> None:
    engine = FakeEngine()
    hub = await fast([fake("s")], engine)
    engine.block("s")
    async with port(hub, "s") as http:
        pending = asyncio.create_task(http.post("/v1/chat/completions", json=hello("s", 4)))
        await asyncio.sleep(0.05)
        assert meta(hub, "s")["in_flight"] == 1
        assert await hub.stop_model("s", drain_timeout=0.1) == "stopped"
        # In-process, the request runs in the client's own task, which the stop
        # cancels; over a socket the client gets 503 model_stopped (test_stop.py).
        with pytest.raises(asyncio.CancelledError):
            await pending
    assert engine.active == 0 and meta(hub, "s")["memory_state"] == "unloaded"


async def test_reload_restarts_only_what_changed(fast: Make, hub_config) -> None:
    engine = FakeEngine()
    hub = await fast([fake("keep"), fake("change")], engine)
    new = hub_config([fake("keep"), fake("change", default_temperature=0.5), fake("added")])
    new.update(
        port=hub.config.port, model_starting_port=hub.config.model_starting_port, log_path=hub.config.log_path
    )
    result = await hub.reload(new)
    assert result == {
        "started": ["change", "added"],
        "stopped": ["change"],
        "unchanged": ["keep"],
        "failed": {},
    }
    assert engine.loads == {"keep": 1, "change": 2, "added": 1}


def test_this_run_is_on_the_stack_it_expects() -> None:
    """make test runs the suite on the newest stack, then the fast, equivalence and compat tiers on
    upstream's pins (MLX_HUB_EXPECT_STACK=old); a wrong PYTHONPATH would test the same stack twice."""
    from packaging.version import Version

    from mlx_hub.engine.versions import installed_stack, untested_stack

    stack = installed_stack()
    old = os.environ.get("MLX_HUB_EXPECT_STACK") == "old"
    assert (Version(stack["mlx-lm"]) < Version("0.32")) is old, stack
    assert (Version(stack["mlx-vlm"]) < Version("0.5")) is old, stack
    assert untested_stack() is None, untested_stack()


def test_an_untested_combination_warns_naming_the_versions() -> None:
    from mlx_hub.engine.versions import untested_stack

    newest = {"mlx-openai-server": "1.8.1", "mlx-lm": "0.32.2", "mlx-vlm": "0.7.10"}
    assert untested_stack(newest) is None
    assert untested_stack({**newest, "mlx-lm": "0.31.3", "mlx-vlm": "0.4.4"}) is None  # upstream's pins
    warning = untested_stack({**newest, "mlx-lm": "0.33.0"})
    assert warning and "mlx-lm 0.33.0" in warning and "mlx-vlm 0.7.10" in warning and "tested:" in warning
    assert "mlx-openai-server missing" in (untested_stack({**newest, "mlx-openai-server": None}) or "")


async def test_a_port_is_what_the_hub_is_given(hub_config: Callable[..., dict[str, Any]]) -> None:
    """The core opens and closes a model's port through the server it is handed, and knows no HTTP server:
    a model served some other way (here, only in-process) is a slot like any other."""
    from mlx_hub.web.model_app import build_model_app

    served: list[tuple[Any, ...]] = []

    class Recording:
        def __init__(self, app: Any, host: str, port: int, *, name: str):
            self.where = (host, port, name)

        async def start(self) -> None:
            served.append(("start", *self.where))

        async def stop(self, timeout: float = 15.0) -> None:
            served.append(("stop", *self.where))

    hub = Hub.from_config(
        hub_config([fake("a")]), app_factory=build_model_app, serve=Recording, engine=FakeEngine()
    )
    await hub.start()
    try:
        number = hub.slots["a"].port
        assert served == [("start", "127.0.0.1", number, "model 'a'")]
        async with port(hub, "a") as http:
            assert (await http.post("/v1/chat/completions", json=hello("a", 4))).status_code == 200
        await hub.stop_model("a")
        assert served[-1] == ("stop", "127.0.0.1", number, "model 'a'")
    finally:
        await hub.shutdown(drain_timeout=0.2)
