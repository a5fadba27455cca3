"""The controller's HTTP API, served for real on a loopback port beside a live hub."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from mlx_hub import Hub
from mlx_hub.core import admission

from .helpers import LiveController, free_port

REFERENCE_MODEL_KEYS = {
    "process_state",
    "memory_state",
    "pid",
    "port",
    "group",
    "default",
    "model_type",
    "model_path",
    "auto_unload_minutes",
    "memory_last_transition_at",
    "memory_last_error",
    "exit_code",
}


@pytest.fixture
async def controller(
    hub_config, tiny_llama: Path, tiny_qwen: Path, tmp_path: Path
) -> AsyncIterator[dict[str, Any]]:
    doc = hub_config(
        [
            {"name": "a", "model_path": str(tiny_llama), "default": True, "group": "g", "jit_enabled": True},
            {
                "name": "b",
                "model_path": str(tiny_qwen),
                "group": "g",
                "jit_enabled": True,
                "queue_timeout": 0.3,
            },
            {"name": "c", "model_path": str(tiny_qwen), "jit_enabled": True, "auto_unload_minutes": 5},
        ],
        groups=[{"name": "g", "max_loaded": 1}],
    )
    path = tmp_path / "hub.yaml"
    path.write_text(yaml.safe_dump(doc))
    async with LiveController(Hub.from_config(path), free_port()) as live:
        async with httpx.AsyncClient(base_url=live.url, timeout=60) as http:
            yield {"hub": live.hub, "http": http, "path": path, "doc": doc, "shutdowns": live.shutdowns}


async def test_health_and_status_shape(controller: dict[str, Any]) -> None:
    http = controller["http"]
    health = (await http.get("/health")).json()
    assert health["status"] == "ok" and health["ready"] is True and health["pid"] > 0
    status = (await http.get("/hub/status")).json()
    for key in (
        "status",
        "timestamp",
        "host",
        "port",
        "controller_available",
        "counts",
        "warnings",
        "models",
    ):
        assert key in status
    assert status["counts"] == {"registered": 3, "started": 1, "loaded": 0}
    assert [m["id"] for m in status["models"]] == ["a", "b", "c"]
    for model in status["models"]:
        assert REFERENCE_MODEL_KEYS <= set(model["metadata"])
    assert status["models"][0]["metadata"]["process_state"] == "running"
    assert status["models"][1]["metadata"]["process_state"] == "inactive"


async def test_model_actions_answer_with_status_words(controller: dict[str, Any]) -> None:
    http = controller["http"]

    async def act(name: str, action: str) -> tuple[int, dict[str, Any]]:
        response = await http.post(f"/hub/models/{name}/{action}")
        return response.status_code, response.json()

    assert await act("c", "start") == (200, {"status": "started", "name": "c"})
    assert await act("c", "start") == (200, {"status": "already_running", "name": "c"})
    assert await act("c", "load") == (200, {"status": "loaded", "name": "c"})
    assert await act("c", "load") == (200, {"status": "already_loaded", "name": "c"})
    assert await act("c", "unload") == (200, {"status": "unloaded", "name": "c"})
    assert await act("c", "unload") == (200, {"status": "not_loaded", "name": "c"})
    assert await act("c", "stop") == (200, {"status": "stopped", "name": "c"})
    assert await act("c", "stop") == (200, {"status": "not_running", "name": "c"})
    # load on a closed port opens it: one command, as "stays off until explicitly loaded" implies
    assert await act("c", "load") == (200, {"status": "loaded", "name": "c"})
    assert await act("c", "stop") == (200, {"status": "stopped", "name": "c"})


async def test_errors_use_the_openai_envelope(controller: dict[str, Any]) -> None:
    http = controller["http"]
    response = await http.post("/hub/models/nope/start")
    assert response.status_code == 404
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and "no model named 'nope'" in error["message"]
    response = await http.post("/hub/models/a/explode")
    assert response.status_code == 422 and "error" in response.json()
    response = await http.get("/no/such/route")
    assert response.status_code == 404 and "error" in response.json()
    # Group g holds a; b cannot load while a is busy.
    hub = controller["hub"]
    await http.post("/hub/models/a/load")
    await http.post("/hub/models/b/start")
    await admission.acquire(hub, hub.slots["a"])
    try:
        response = await http.post("/hub/models/b/load")
    finally:
        admission.release(hub, hub.slots["a"])
    assert response.status_code == 429 and response.json()["error"]["code"] == "group_at_capacity"
    assert response.headers["retry-after"]


async def test_reload_applies_and_refuses_broken_files(controller: dict[str, Any]) -> None:
    http, path, doc = controller["http"], controller["path"], controller["doc"]
    new = {
        **doc,
        "models": doc["models"][:2]
        + [{"name": "d", "model_path": doc["models"][2]["model_path"], "default": True, "jit_enabled": True}],
    }
    path.write_text(yaml.safe_dump(new))
    response = await http.post("/hub/reload")
    assert response.json() == {"started": ["d"], "stopped": [], "unchanged": ["a", "b"], "failed": {}}
    path.write_text("models:\n  - {name: a, model_pth: x}\n")
    response = await http.post("/hub/reload")
    assert response.status_code == 400
    message = response.json()["error"]["message"]
    assert "running config keeps serving" in message and "did you mean 'model_path'" in message
    assert [m["id"] for m in (await http.get("/hub/status")).json()["models"]] == ["a", "b", "d"]


async def test_service_buttons(controller: dict[str, Any]) -> None:
    http = controller["http"]
    await http.post("/hub/models/c/start")
    body = (await http.post("/hub/service/stop")).json()
    assert body["status"] == "stopped" and sorted(body["models"]) == ["a", "c"]
    assert (await http.get("/hub/status")).json()["counts"]["started"] == 0
    body = (await http.post("/hub/service/start")).json()
    assert body == {"status": "started", "models": ["a"], "failed": {}, "reload": None}
    body = (await http.post("/hub/service/start")).json()  # only what is not running
    assert body == {"status": "started", "models": [], "failed": {}, "reload": None}
    body = (await http.post("/hub/service/reload")).json()
    assert body["reload"]["unchanged"] == ["a", "b", "c"]
    assert (await http.post("/hub/shutdown")).json() == {"status": "shutting_down"}
    await asyncio.sleep(0)
    assert controller["shutdowns"] == [True]


async def test_openapi_publishes_the_control_api(controller: dict[str, Any]) -> None:
    schema = (await controller["http"].get("/openapi.json")).json()
    paths = schema["paths"]
    for path in (
        "/health",
        "/hub/status",
        "/hub/reload",
        "/hub/shutdown",
        "/hub/models/{name}/{action}",
        "/hub/service/{action}",
    ):
        assert path in paths
    actions = paths["/hub/models/{name}/{action}"]["post"]["parameters"]
    enum = next(p for p in actions if p["name"] == "action")["schema"]
    assert set(schema["components"]["schemas"][enum["$ref"].rsplit("/", 1)[1]]["enum"]) == {
        "start",
        "stop",
        "load",
        "unload",
    }


async def test_status_page_can_be_disabled(hub_config, tiny_llama: Path) -> None:
    doc = hub_config([{"name": "a", "model_path": str(tiny_llama)}], enable_status_page=False)
    async with LiveController(Hub.from_config(doc), free_port()) as live:
        async with httpx.AsyncClient(base_url=live.url) as http:
            for path in ("/hub/", "/hub", "/hub/assets/hub.js"):
                response = await http.get(path)
                assert response.status_code == 404 and "error" in response.json()
            assert (await http.get("/hub/status")).status_code == 200
            response = await http.post("/hub/reload")  # built from a dict: no file to re-read
            assert response.status_code == 409 and response.json()["error"]["code"] == "no_config_file"


async def test_dashboard_files_are_served(controller: dict[str, Any]) -> None:
    http = controller["http"]
    for path in ("/hub/", "/hub"):
        page = await http.get(path)
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "/hub/assets/hub.js" in page.text
    script = await http.get("/hub/assets/hub.js")
    assert script.status_code == 200 and "javascript" in script.headers["content-type"]
    assert (await http.get("/hub/assets/..%2Fhub.py")).status_code == 404
    assert (await http.get("/hub/assets/secret.txt")).status_code == 404
