"""The dashboard's live parts in headless Chromium against a live hub: playground, requests, logs, charts."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from benchmarks.dashboard import fill_request_log
from mlx_hub import Hub
from mlx_hub.testing.tinymodel import text_only_logit_bias

from .helpers import LiveController, free_port
from .test_dashboard import browser_needed, page  # noqa: F401 (the fixture)

SCREENSHOT = os.environ.get("MLX_HUB_SCREENSHOT")  # docs/dashboard.png: redraw docs/dashboard.md's picture


@pytest.fixture
async def live(
    hub_config, hub_logging: Callable[[Any], Path], tiny_llama: Path, tiny_qwen: Path, tmp_path: Path
) -> AsyncIterator[LiveController]:
    doc = hub_config(
        [
            {"name": "alpha", "model_path": str(tiny_llama), "default": True, "context_length": 2048},
            {
                "name": "beta",
                "model_path": str(tiny_qwen),
                "jit_enabled": True,
                "context_length": 2048,
                "request_params": {
                    "logit_bias": text_only_logit_bias(tiny_qwen)
                },  # text, never an early stop
            },
        ]
    )
    path = tmp_path / "hub.yaml"
    path.write_text(yaml.safe_dump(doc))
    hub = Hub.from_config(path, model_logs=True)
    hub.activity.sample_interval = 0.5
    hub_logging(hub.config)
    async with LiveController(hub, free_port()) as controller:
        yield controller


async def chat(tab: Any, model: str, text: str, max_tokens: int = 12) -> None:
    await tab.select_option("#pg-model", model)
    await tab.fill("#pg-max", str(max_tokens))
    await tab.fill("#pg-input", text)
    await tab.click("#pg-send")


@browser_needed
async def test_playground_requests_logs_and_charts(page: Any, live: LiveController, tmp_path: Path) -> None:  # noqa: F811
    await page.goto(f"{live.url}/hub/")
    await page.locator("#live-mode", has_text="live").wait_for(timeout=15_000)
    await page.locator("#pg-model option[value='beta']").wait_for(state="attached")
    await page.select_option("#pg-model", "beta")
    assert "JIT" in await page.locator("#pg-state").inner_text()  # not started: the first message starts it

    await chat(page, "beta", "Hello there")
    answer = page.locator(".pg-assistant .pg-text").last
    await page.locator("#pg-send:not([disabled])").wait_for(timeout=60_000)  # the stream ended
    assert (await answer.inner_text()).strip() not in ("", "…")
    stats = await page.locator("#pg-stats").inner_text()
    assert "TTFT" in stats and "tokens/s" in stats and "12 tokens" in stats
    await page.locator("#pg-state", has_text="loaded").wait_for(timeout=10_000)
    assert live.hub.slots["beta"].memory_state.value == "loaded"

    # The request arrived in the table by the event stream, with its figures.
    row = page.locator('#request-rows tr[data-request-model="beta"]').first
    await row.wait_for(timeout=10_000)
    cells = await row.locator("td").all_inner_texts()
    assert cells[1:5] == ["beta", "openai", "/v1 → /v1/chat/completions", "200"]
    assert cells[6] == "12" and cells[8].endswith(" s") and cells[11] == "stream"

    # The log panel, following beta's own log: the hub's line for that request is there.
    await page.locator("#log-model option[value='beta']").wait_for(state="attached")
    await page.select_option("#log-model", "beta")
    await page.locator(".log-line", has_text="request via v1: /v1/chat/completions 200").wait_for(
        timeout=15_000
    )
    await page.fill("#log-filter", "Initialized")
    await page.locator("#log-count", has_text="lines match").wait_for()
    shown = await page.locator(".log-line").all_inner_texts()
    assert shown and all("Initialized" in line for line in shown)
    await page.fill("#log-filter", "")
    # A second message while following: its line streams into the open panel.
    before = await page.locator(".log-line", has_text="request via v1").count()
    await chat(page, "beta", "And again")
    await page.locator("#pg-send:not([disabled])").wait_for(timeout=60_000)
    await page.wait_for_function(
        f"document.querySelectorAll('.log-line').length && "
        f"[...document.querySelectorAll('.log-line')].filter(n => n.textContent.includes('request via v1')).length > {before}",
        timeout=15_000,
    )
    assert await page.locator(".pg-user").count() == 2  # one conversation

    # The charts: memory areas and the budget line; beta's decode speed.
    weights = page.locator("#chart-memory path.area.weights_bytes")
    await weights.wait_for(state="attached", timeout=10_000)
    top = await page.evaluate(
        "document.querySelector('#chart-memory path.area.weights_bytes').getBBox().height"
    )
    assert top > 10  # the axis follows what is used, not a budget far above it
    # Both requests may fall in one sample: one point (a dot), so the line is looked for, not seen.
    await page.locator("#chart-speed path[data-model='beta']").wait_for(state="attached", timeout=10_000)
    assert await page.locator("#chart-speed circle").count() >= 1
    legend = await page.locator("#legend-memory").inner_text()
    assert "weights" in legend and "MLX active" in legend and "above the chart" in legend
    assert page.errors == []
    shot = Path(SCREENSHOT) if SCREENSHOT else tmp_path / "dashboard.png"
    await page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 20_000


@browser_needed
async def test_playground_with_api_keys(page: Any, hub_config, tiny_llama: Path) -> None:  # noqa: F811
    bias = {"logit_bias": text_only_logit_bias(tiny_llama)}
    doc = hub_config(
        [{"name": "alpha", "model_path": str(tiny_llama), "default": True, "request_params": bias}],
        api_keys=["sekret"],
    )
    async with LiveController(Hub.from_config(doc), free_port()) as live:
        await page.goto(f"{live.url}/hub/")
        await page.locator("#key-form").wait_for()
        await page.fill("#key-input", "sekret")
        await page.click("#key-form button")
        await page.locator("#live-mode", has_text="live").wait_for(
            timeout=20_000
        )  # the events stream has the key
        await page.locator("#pg-model option[value='alpha']").wait_for(state="attached")
        await chat(page, "alpha", "Hi", max_tokens=5)
        await page.locator("#pg-send:not([disabled])").wait_for(timeout=60_000)
        assert "5 tokens" in await page.locator("#pg-stats").inner_text()
        await page.locator('#request-rows tr[data-request-model="alpha"]').first.wait_for(timeout=10_000)
        assert await page.evaluate("sessionStorage.getItem('mlx-hub-api-key')") == "sekret"
        assert await page.evaluate("localStorage.length") == 0  # the key stays in this tab's session
        assert page.errors == []


@browser_needed
async def test_twenty_models_and_ten_thousand_requests(page: Any, hub_config, tiny_llama: Path) -> None:  # noqa: F811
    names = [f"model-{i:02d}" for i in range(20)]
    doc = hub_config([{"name": n, "model_path": str(tiny_llama), "jit_enabled": True} for n in names])
    fill_request_log(Path(doc["log_path"]), names, 10_000)
    async with LiveController(Hub.from_config(doc), free_port()) as live:
        await page.goto(f"{live.url}/hub/")
        await page.locator("#model-rows tr[data-model='model-19']").wait_for(timeout=20_000)
        assert await page.locator("#model-rows tr").count() == 20
        await page.locator("#request-rows tr[data-request]").nth(99).wait_for(timeout=20_000)
        assert await page.locator("#request-rows tr").count() == 100  # a page at a time, never all 10,000
        await page.click("#request-more")
        await page.locator("#request-rows tr").nth(199).wait_for(timeout=20_000)
        await page.select_option("#request-model", "model-07")
        await page.wait_for_function(
            "[...document.querySelectorAll('#request-rows tr')].every(r => r.dataset.requestModel === 'model-07')"
            " && document.querySelectorAll('#request-rows tr').length === 100",
            timeout=20_000,
        )
        assert page.errors == []
