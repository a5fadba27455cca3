"""One pass per request: what is worked out once (per load, per request) stays worked out once.

Each test here pins one rule of issue 35's item 2 so that a later change that
quietly brings back the repeated work fails: a model's batching judged per
load, not per request; one test of a model name; one route table; one read and
parse of a body; one key check.
"""

from __future__ import annotations

import ast
import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mlx_hub.config import ModelConfig
from mlx_hub.testing.fake_engine import FakeEngine, fake, port

from .helpers import hello

Make = Callable[..., Any]
PACKAGE = Path(__file__).resolve().parents[1] / "mlx_hub"


class JudgingEngine(FakeEngine):
    """A fake engine whose loads batch, counting how often anything asks whether they do."""

    def __init__(self) -> None:
        super().__init__()
        self.judged = 0

    def batches(self, entry: ModelConfig, handler: Any = None) -> bool:
        self.judged += 1
        return True


async def test_batching_is_judged_once_per_load_not_per_request(fast: Make) -> None:
    engine = JudgingEngine()
    hub = await fast([fake("b", jit_enabled=True)], engine)
    async with port(hub, "b") as http:
        replies = await asyncio.gather(
            *(http.post("/v1/chat/completions", json=hello("b", 4)) for _ in range(5))
        )
        assert [r.status_code for r in replies] == [200] * 5
        assert hub.slots["b"].batches and engine.judged == engine.loads["b"] == 1
        await hub.unload("b")
        assert (await http.post("/v1/chat/completions", json=hello("b", 4))).status_code == 200
    assert engine.judged == engine.loads["b"] == 2


def test_one_function_says_whether_a_name_is_an_entry() -> None:
    """Every name test goes through ``ModelConfig.answers_to``: no ``x in entry.names`` elsewhere."""
    entry = ModelConfig(name="e", model_path="org/m", served_model_name="served", aliases=["nick"])
    assert all(entry.answers_to(n) for n in ("e", "org/m", "served", "nick"))
    assert not any(entry.answers_to(n) for n in ("E", "", None, "org"))
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Compare)
                and any(isinstance(op, ast.In | ast.NotIn) for op in node.ops)
                and any(isinstance(c, ast.Attribute) and c.attr == "names" for c in node.comparators)
                and "entry" in ast.unparse(node)
            ):
                offenders.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}: {ast.unparse(node)}")
    assert offenders == [], "match names with ModelConfig.answers_to:\n" + "\n".join(offenders)


def declared(routes: list[Any], prefix: str = "") -> list[tuple[str, set[str]]]:
    """Every (path, methods) of an app's routes, through the routers it includes."""
    found = []
    for route in routes:
        included = getattr(route, "original_router", None)  # FastAPI 0.13x and later: an include
        if included is not None:
            found += declared(included.routes, prefix + route.include_context.prefix)
        else:
            found.append((prefix + route.path, set(getattr(route, "methods", None) or ()) - {"HEAD"}))
    return found


async def test_the_route_table_names_every_route_the_apps_serve(fast: Make) -> None:
    """Each app's routes are in the table, for that app and its methods; upstream's are all named."""
    from app.api.endpoints import router
    from fastapi import FastAPI

    from mlx_hub.web.controller import build_controller_app
    from mlx_hub.web.routes import TABLE, App, route_of

    hub = await fast([fake("m")])
    model_app = hub.slots["m"].app
    controller_app = build_controller_app(hub, request_shutdown=lambda: None)
    while not isinstance(controller_app, FastAPI):  # under the guards and /v1 routing
        controller_app = controller_app.app
    missing = []
    for served_by, app in ((App.MODEL, model_app), (App.CONTROLLER, controller_app)):
        for path, methods in declared(app.routes):
            found = route_of(path, served_by)
            if TABLE.get(path) is not found or not methods <= found.methods:
                missing.append(f"{served_by}: {sorted(methods)} {path}")
    for route in router.routes:
        if route.path not in TABLE:
            missing.append(f"upstream: {route.path}")
    assert missing == [], "add these to web/routes.py's TABLE:\n" + "\n".join(missing)


def test_the_route_table_says_which_routes_a_sharded_entry_answers() -> None:
    """The load gate reads ``sharded`` from the table; the rank proxy's own routes must be those."""
    from fastapi import FastAPI

    from mlx_hub.web.rank_proxy import add_rank_routes
    from mlx_hub.web.routes import TABLE

    app = FastAPI()
    add_rank_routes(app, slot=None)  # type: ignore[arg-type]  # the handlers read the slot per request
    answered = {path for path, methods in declared(app.routes) if "POST" in methods and "{" not in path}
    assert answered == {path for path, route in TABLE.items() if route.sharded}


def test_the_layers_name_no_paths_of_their_own() -> None:
    """Outside web/routes.py a path appears only where a route is declared (``@router.get(path)``)."""
    declaring = {"get", "post", "add_api_route", "api_route"}
    offenders = []
    for path in sorted((PACKAGE / "web").rglob("*.py")):
        if path.name == "routes.py":
            continue
        tree = ast.parse(path.read_text())
        declared = {
            id(node.args[0])
            for node in ast.walk(tree)
            if isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in declaring
            and node.args
        }
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Constant)
                and isinstance(node.value, str)
                and node.value.startswith(("/v1", "/hub", "/health", "/metrics"))
                and id(node) not in declared
            ):
                offenders.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}: {node.value!r}")
    assert offenders == [], "read the route table (web/routes.py) instead:\n" + "\n".join(offenders)


async def test_a_body_is_parsed_once_and_a_key_checked_once(fast: Make, monkeypatch: Any) -> None:
    """Through /v1 a request meets the router, the port's key guard, the gate, the finish-reason
    writer and the route: the hub parses its body once and checks its key once. Upstream's chat
    route parses the body itself (FastAPI), which is upstream's, not the hub's."""
    import json

    from mlx_hub.web import security

    from .test_fast import controller

    hub = await fast([fake("m")])
    hub.api_keys = frozenset({"sesame"})
    parsed: list[bytes] = []
    checked: list[object] = []
    loads, names_one = json.loads, security._names_one
    monkeypatch.setattr(json, "loads", lambda text, *a, **k: (parsed.append(text), loads(text, *a, **k))[1])
    monkeypatch.setattr(security, "_names_one", lambda *a: (checked.append(a), names_one(*a))[1])
    messages = {"model": "m", "max_tokens": 4, "messages": [{"role": "user", "content": "Hello"}]}
    headers = {"authorization": "Bearer sesame", "content-type": "application/json"}
    async with controller(hub) as http:
        for path, body, route_parses in (
            ("/v1/messages", messages, 0),
            ("/v1/chat/completions", hello("m", 4), 1),
        ):
            raw = json.dumps(body).encode()
            parsed.clear()
            checked.clear()
            reply = await http.post(path, content=raw, headers=headers)
            assert reply.status_code == 200, reply.text
            assert parsed.count(raw) == 1 + route_parses, path
            assert len(checked) == 1, path
