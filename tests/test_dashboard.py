"""The /hub/ dashboard in headless Debian Chromium, driven by Playwright, against a live hub."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from mlx_hub import Hub
from mlx_hub.web.dashboard import ASSETS

from .helpers import LiveController, free_port

CHROMIUM = os.environ.get("MLX_HUB_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
INJECTED = '<img src=x onerror="window.__xss=1"><script>window.__xss=2</script>'


def _browser_missing() -> str | None:
    if not Path(CHROMIUM).exists():
        return f"no Chromium at {CHROMIUM} (make test installs Debian's chromium with apt where it can)"
    try:
        import playwright  # noqa: F401
    except ImportError:
        return "the playwright package is not installed"
    return None


browser_needed = pytest.mark.skipif(_browser_missing() is not None, reason=str(_browser_missing()))


@pytest.fixture
async def page() -> AsyncIterator[Any]:
    from playwright.async_api import async_playwright

    async with async_playwright() as pw:
        # Playwright gives every launch a fresh, empty profile of its own.
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = await browser.new_page(viewport={"width": 1500, "height": 1000})
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.errors = errors
        yield page
        await browser.close()


@pytest.fixture
async def live(
    hub_config, tiny_llama: Path, tiny_qwen: Path, tmp_path: Path
) -> AsyncIterator[LiveController]:
    weird = tmp_path / INJECTED.replace("/", "_")  # markup in a path and in its error message
    doc = hub_config(
        [
            {"name": "alpha", "model_path": str(tiny_llama), "default": True, "context_length": 2048},
            {"name": "beta", "model_path": str(tiny_qwen), "context_length": 2048, "group": "g"},
            {"name": "broken", "model_path": str(weird), "default": True},
        ],
        groups=[{"name": "g", "max_loaded": 1}],
    )
    path = tmp_path / "hub.yaml"
    path.write_text(yaml.safe_dump(doc))
    async with LiveController(Hub.from_config(path), free_port()) as controller:
        yield controller


async def row_text(page: Any, name: str) -> str:
    return await page.locator(f'tr[data-model="{name}"]').inner_text()


async def click(page: Any, name: str, action: str) -> None:
    await page.locator(f'tr[data-model="{name}"] button[data-action="{action}"]').click()


async def expect_toast(page: Any, text: str) -> None:
    await page.locator(".toast", has_text=text).first.wait_for(timeout=30_000)


async def wait_row(page: Any, name: str, text: str) -> None:
    await page.locator(f'tr[data-model="{name}"]', has_text=text).wait_for(timeout=30_000)


async def counts_match(page: Any, live: LiveController) -> None:
    status = live.hub.status()["counts"]
    await page.locator(
        "#count-started", has_text=f"{status['started']} / {status['registered']} started"
    ).wait_for(timeout=10_000)
    await page.locator(
        "#count-loaded", has_text=f"{status['loaded']} / {status['registered']} loaded"
    ).wait_for(timeout=10_000)


@browser_needed
async def test_buttons_drive_the_hub(page: Any, live: LiveController, tmp_path: Path) -> None:
    await page.goto(f"{live.url}/hub/")
    await page.wait_for_selector('tr[data-model="alpha"]')
    assert "RUNNING" in await row_text(page, "alpha") and "LOADED" in await row_text(page, "alpha")
    assert "INACTIVE" in await row_text(page, "beta")
    assert (
        await page.locator('tr[data-model="beta"] button[data-action="load"]').count() == 0
    )  # port not running
    await counts_match(page, live)
    assert await page.locator("#openai-url").inner_text() == f"{live.url}/v1"
    assert await page.locator("#anthropic-url").inner_text() == live.url

    await click(page, "beta", "start")
    await expect_toast(page, "beta: started")
    await wait_row(page, "beta", "RUNNING")
    await wait_row(page, "beta", "LOADED")
    await counts_match(page, live)
    await page.locator('.chip[data-group="g"]', has_text="g 1/1 loaded").wait_for()

    await click(page, "beta", "unload")
    await expect_toast(page, "beta: unloaded")
    await wait_row(page, "beta", "UNLOADED")
    assert live.hub.status()["models"][1]["metadata"]["memory_state"] == "unloaded"
    await counts_match(page, live)

    await click(page, "beta", "load")
    await expect_toast(page, "beta: loaded")
    await wait_row(page, "beta", "MB")  # memory figure and load time beside LOADED
    assert "loaded in" in await row_text(page, "beta")
    row = await row_text(page, "beta")  # the memory cell: weights, KV reserved, the budget (auto by default)
    assert "weights" in row and "KV 0.0 MB reserved" in row and "budget" in row

    await click(page, "beta", "stop")
    await expect_toast(page, "beta: stopped")
    await wait_row(page, "beta", "INACTIVE")
    assert await page.locator('tr[data-model="beta"] button[data-action="load"]').count() == 0
    await counts_match(page, live)
    assert (await page.locator("#flash").inner_text()) == "beta: stopped"

    # Markup in a path and in an error message is shown as text, never run.
    broken = await row_text(page, "broken")
    assert "FAILED" in broken and '<img src=x onerror="window.__xss=1">' in broken
    assert await page.evaluate("window.__xss") is None
    assert (
        await page.locator("tr[data-model='broken'] img, #warning-list img, #model-rows script").count() == 0
    )
    assert page.errors == []
    await page.screenshot(path=str(tmp_path / "dashboard.png"), full_page=True)
    assert (tmp_path / "dashboard.png").stat().st_size > 10_000


@browser_needed
async def test_service_buttons_and_offline_state(page: Any, live: LiveController) -> None:
    await page.goto(f"{live.url}/hub/")
    await page.wait_for_selector('tr[data-model="alpha"]')
    await page.click("#btn-stop")
    await expect_toast(page, "stopped: alpha, broken")
    await wait_row(page, "alpha", "INACTIVE")
    # Start brings back the startup models; one that fails says why.
    await page.click("#btn-start")
    await expect_toast(page, "started: alpha; did not start: broken (")
    await wait_row(page, "alpha", "LOADED")
    assert live.hub.slots["alpha"].memory_state.value == "loaded"
    await page.click("#btn-reload")
    await expect_toast(page, "Reloaded: 0 started, 0 stopped, 3 unchanged")
    await live.server.stop()
    await page.click("#btn-refresh")
    await page.locator("#hub-pill", has_text="OFFLINE").wait_for(timeout=10_000)
    assert "not answering" in await page.locator("#flash").inner_text()
    assert await page.locator('tr[data-model="alpha"] button').first.is_disabled()


@browser_needed
async def test_memory_cell_shows_the_disk_cache_against_its_cap(page: Any, live: LiveController) -> None:
    import httpx

    async with httpx.AsyncClient(timeout=60) as client:
        reply = await client.post(
            f"http://127.0.0.1:{live.hub.slots['alpha'].port}/v1/chat/completions",
            json={
                "model": "alpha",
                "messages": [{"role": "user", "content": "Hello there"}],
                "max_tokens": 3,
            },
        )
    assert reply.status_code == 200
    await live.hub.unload("alpha")  # what is on disk stays, and the cell says so while unloaded
    await page.goto(f"{live.url}/hub/")
    await wait_row(page, "alpha", "disk cache")
    row = await row_text(page, "alpha")
    cap = live.hub.status()["prompt_cache"]["cap_bytes"]
    assert f"of {cap / 1e9:.1f} GB · 0 hits" in row and "UNLOADED" in row
    assert "prompt caches on disk" in await page.locator("#mem-text").inner_text()
    assert page.errors == []


@browser_needed
async def test_names_and_transitions_render_safely(page: Any, live: LiveController) -> None:
    """hub.yaml rejects markup in names; the page must not trust that, and must lock busy rows."""
    status = live.hub.status()
    evil = {**status["models"][0], "id": INJECTED}
    evil["metadata"] = {**evil["metadata"], "memory_state": "loading", "in_flight": 2}
    status["models"] = [evil, *status["models"][1:]]
    status["warnings"] = [INJECTED]

    async def fake_status(route: Any) -> None:
        await route.fulfill(status=200, content_type="application/json", body=json.dumps(status))

    await page.route("**/hub/status", fake_status)
    await page.route("**/hub/events", lambda route: route.abort())  # no live events: the poll's fakes stay
    await page.goto(f"{live.url}/hub/")
    await page.locator("#live-mode", has_text="polling every 5 s").wait_for()  # the fallback
    row = page.locator("#model-rows tr").first
    await row.wait_for()
    assert INJECTED in await row.locator("td.name").inner_text()
    assert "2 in flight" in await row.inner_text()
    assert INJECTED in await page.locator("#warning-list").inner_text()
    assert await page.evaluate("window.__xss") is None
    # While the weights are loading, no button of that row may be pressed.
    buttons = row.locator("button")
    assert await buttons.count() == 2
    for i in range(2):
        assert await buttons.nth(i).is_disabled()


@browser_needed
async def test_a_sharded_model_shows_its_ranks(page: Any, live: LiveController) -> None:
    """Each rank is a line under the model's memory: rank, host, pid, state, memory (status as tests/test_sharded.py
    sees a real group report it; a host name is text, never markup)."""
    status = live.hub.status()
    row = status["models"][0]
    ranks = [
        {
            "rank": 0,
            "host": "127.0.0.1",
            "pid": 4242,
            "state": "loaded",
            "memory_bytes": 52_000_000,
            "local": True,
        },
        {
            "rank": 1,
            "host": INJECTED,
            "pid": 777,
            "state": "loaded",
            "memory_bytes": 51_000_000,
            "local": False,
        },
    ]
    row["metadata"] = {**row["metadata"], "memory_state": "loaded", "ranks": ranks}

    async def fake_status(route: Any) -> None:
        await route.fulfill(status=200, content_type="application/json", body=json.dumps(status))

    await page.route("**/hub/status", fake_status)
    await page.route("**/hub/events", lambda route: route.abort())
    await page.goto(f"{live.url}/hub/")
    lines = page.locator(f'tr[data-model="{row["id"]}"] .rank')
    await lines.first.wait_for()
    assert await lines.count() == 2
    assert await lines.nth(0).inner_text() == "rank 0 · 127.0.0.1 · PID 4242 · loaded · 52.0 MB"
    assert f"rank 1 · {INJECTED} (remote) · PID 777" in await lines.nth(1).inner_text()
    assert await page.evaluate("window.__xss") is None


def test_wheel_ships_the_dashboard(tmp_path: Path) -> None:
    """Build the wheel, install it alone, and load the page from the installed copy."""
    repo = Path(__file__).resolve().parents[1]
    out = tmp_path / "dist"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(out),
            str(repo),
        ],
        check=True,
        capture_output=True,
    )
    wheel = next(out.glob("mlx_openai_server_hub-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for asset in ASSETS:
        assert f"mlx_hub/static/{asset}" in names
    target = tmp_path / "installed"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        check=True,
        capture_output=True,
    )
    # The installed copy alone provides mlx_hub; dependencies come from this environment.
    site = next(p for p in sys.path if p.endswith("site-packages"))
    port = free_port()
    script = f"""
import asyncio, httpx, mlx_hub
assert mlx_hub.__file__.startswith({str(target)!r}), mlx_hub.__file__
from mlx_hub import Hub
from mlx_hub.web.dashboard import ASSETS
from mlx_hub.web.controller import build_controller_app
from mlx_hub.web.server import AppServer
async def main():
    hub = Hub.from_config({{"log_path": {str(tmp_path / "logs")!r}, "models": [{{"name": "a", "model_path": "x/y"}}]}})
    server = AppServer(build_controller_app(hub, request_shutdown=lambda: None), "127.0.0.1", {port}, name="c")
    await server.start()
    async with httpx.AsyncClient() as http:
        page = await http.get("http://127.0.0.1:{port}/hub/")
        js = await http.get("http://127.0.0.1:{port}/hub/assets/hub.js")
    await server.stop()
    assert page.status_code == 200 and "MLX Hub Status" in page.text, page.text
    assert js.status_code == 200 and "textContent" in js.text
    print("page ok")
asyncio.run(main())
"""
    env = {**os.environ, "PYTHONPATH": f"{target}{os.pathsep}{site}"}
    result = subprocess.run(
        [sys.executable, "-S", "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path
    )
    assert result.returncode == 0 and "page ok" in result.stdout, result.stderr


@browser_needed
async def test_dashboard_asks_for_the_api_key_once(page: Any, hub_config, tiny_llama: Path) -> None:
    doc = hub_config([{"name": "alpha", "model_path": str(tiny_llama), "default": True}], api_keys=["sekret"])
    async with LiveController(Hub.from_config(doc), free_port()) as live:
        await page.goto(f"{live.url}/hub/")
        await page.locator("#key-form").wait_for()
        assert "needs an API key" in await page.locator("#flash").inner_text()
        await page.fill("#key-input", "wrong")
        await page.click("#key-form button")
        await page.locator("#flash", has_text="refused").wait_for()
        await page.fill("#key-input", "sekret")
        await page.click("#key-form button")
        await page.wait_for_selector('tr[data-model="alpha"]')
        assert await page.locator("#key-form").is_hidden()
        await click(page, "alpha", "unload")  # the key travels with control requests too
        await expect_toast(page, "alpha: unloaded")
        await page.reload()  # kept for the browser session: no second prompt
        await page.wait_for_selector('tr[data-model="alpha"]')
        assert await page.locator("#key-form").is_hidden()
