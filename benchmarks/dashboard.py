"""The dashboard under load: 20 models and 10,000 logged requests, how fast the page answers.

``python -m benchmarks.dashboard [--out FILE]`` builds a hub of 20 JIT entries of a
small generated model (ports open, nothing loaded), fills its request log with
10,000 rows spread over a day, and measures, as medians of several tries:

- each route the page reads (``/hub/``, ``/hub/status``, ``/hub/requests`` for all
  models and for one, ``/hub/history``), over HTTP;
- in headless Chromium (when ``/usr/bin/chromium`` and playwright are there): from
  navigation to the page showing all 20 models and the newest 100 requests, and to
  the event stream being live.

The target is under a second for the page. Tests never assert on these figures
(tests/test_dashboard_activity.py loads the same data and checks the page works).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import socket
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from mlx_hub.core.requestlog import RequestLog, RequestRecord, db_path

CHROMIUM = Path("/usr/bin/chromium")
MODELS, ROWS, TRIES = 20, 10_000, 7


def fill_request_log(folder: Path, models: list[str], rows: int) -> None:
    """``rows`` finished requests spread over ``models`` and the last day, as a long-running hub leaves them."""
    log = RequestLog(db_path(folder), days=7, max_rows=max(100_000, rows), bodies=False)
    log.open()
    now = time.time()
    for i in range(rows):
        log.write(
            RequestRecord(
                ts=now - 86400 + i * 86400 / rows,
                model=models[i % len(models)],
                route="/v1/chat/completions",
                api="openai",
                via="port" if i % 3 else "v1",
                status=200 if i % 17 else 503,
                total_s=0.5 + (i % 10) / 10,
                error=None if i % 17 else "memory_exhausted",
                stream=bool(i % 2),
                prompt_tokens=100 + i % 50,
                cached_tokens=i % 40,
                completion_tokens=64,
                wait_s=0.01,
                ttft_s=0.2 if i % 2 else None,
                tokens_per_s=40.0 + i % 7,
            )
        )
    log.close()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def _http_times(url: str, names: list[str]) -> dict[str, float]:
    routes = {
        "page /hub/": "/hub/",
        "status": "/hub/status",
        "requests (100, all models)": "/hub/requests?limit=100",
        f"requests (100, {names[7]})": f"/hub/requests?limit=100&model={names[7]}",
        "history": "/hub/history",
    }
    out = {}
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:
        for label, path in routes.items():
            times = []
            for _ in range(TRIES):
                started = time.perf_counter()
                reply = await http.get(path)
                reply.raise_for_status()
                times.append(time.perf_counter() - started)
            out[label] = round(statistics.median(times), 4)
    return out


async def _browser_times(url: str) -> dict[str, float] | None:
    try:
        from playwright.async_api import async_playwright
    except ImportError:
        return None
    if not CHROMIUM.exists():
        return None
    rendered, live = [], []
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(
            executable_path=str(CHROMIUM), args=["--no-sandbox", "--disable-gpu"]
        )
        page = await browser.new_page(viewport={"width": 1500, "height": 1000})
        for _ in range(TRIES):
            started = time.perf_counter()
            await page.goto(f"{url}/hub/")
            await page.locator("#model-rows tr").nth(MODELS - 1).wait_for()
            await page.locator("#request-rows tr[data-request]").nth(99).wait_for()
            rendered.append(time.perf_counter() - started)
            await page.locator("#live-mode", has_text="live").wait_for()
            live.append(time.perf_counter() - started)
        await browser.close()
    return {
        "page shows 20 models and 100 requests": round(statistics.median(rendered), 4),
        "event stream live": round(statistics.median(live), 4),
    }


async def measure(cache: Path) -> dict[str, Any]:
    from mlx_hub import Hub
    from mlx_hub.testing.tinymodel import make_model

    model = make_model(cache / "tiny-llama", arch="llama")
    names = [f"model-{i:02d}" for i in range(MODELS)]
    with tempfile.TemporaryDirectory() as folder:
        logs = Path(folder) / "logs"
        fill_request_log(logs, names, ROWS)
        port = _free_port()
        config = {
            "host": "127.0.0.1",
            "port": port,
            "model_starting_port": _free_port(),
            "log_path": str(logs),
            "models": [
                {"name": n, "model_path": str(model), "jit_enabled": True, "default": True} for n in names
            ],
        }
        hub = Hub.from_config(config, controller=True)
        await hub.start()
        try:
            url = f"http://127.0.0.1:{port}"
            return {
                "models": MODELS,
                "logged_requests": ROWS,
                "tries": TRIES,
                "http_seconds": await _http_times(url, names),
                "browser_seconds": await _browser_times(url),
            }
        finally:
            hub.activity.close_streams()
            await hub.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.dashboard")
    parser.add_argument("--cache", type=Path, default=Path(".cache/bench"))
    parser.add_argument("--out", type=Path, help="write the figures here as JSON")
    args = parser.parse_args()
    result = asyncio.run(measure(args.cache))
    result["date"] = dt.date.today().isoformat()
    for group in ("http_seconds", "browser_seconds"):
        for label, seconds in (result[group] or {}).items():
            print(f"{label:45s} {seconds * 1000:8.1f} ms")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
