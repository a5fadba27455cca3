"""The whole hub from Python: the controller served by the Hub object, and mounted in a user's app."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from mlx_hub import Hub

from .helpers import REPO, checkout_env, free_port, hello, text_only
from .test_hub import lm

EXAMPLE = REPO / "examples" / "embed_in_fastapi.py"


async def test_the_hub_object_serves_the_controller(hub_config, tiny_llama: Path) -> None:
    port = free_port()
    doc = hub_config([lm("chat", tiny_llama, default=True)], port=port)
    url = f"http://127.0.0.1:{port}"
    async with (
        Hub.from_config(doc, controller=True) as hub,
        httpx.AsyncClient(base_url=url, timeout=60) as http,
    ):
        status = await http.get("/hub/status")
        assert status.status_code == 200 and status.json()["counts"]["loaded"] == 1
        reply = await http.post("/v1/chat/completions", json=hello("chat", 4, **text_only(tiny_llama)))
        assert reply.status_code == 200 and reply.json()["choices"][0]["message"]["content"]
        metrics = await http.get("/metrics")
        assert "mlx_hub_model_loaded" in metrics.text
        assert (await http.get("/hub/")).status_code == 200
        assert hub.status_document().model("chat").memory_state == "loaded"
    with pytest.raises(httpx.ConnectError):  # shutdown closed the controller too
        httpx.get(f"{url}/health", timeout=2)


def test_the_documented_example_runs(tmp_path: Path, tiny_llama: Path, hub_config) -> None:
    """examples/embed_in_fastapi.py, as docs/python-api.md shows it, mounts the hub in a FastAPI app."""
    code = EXAMPLE.read_text()
    page = (REPO / "docs" / "python-api.md").read_text()
    body = code[code.index("import contextlib") :]
    assert body in page, "docs/python-api.md's example must be examples/embed_in_fastapi.py as it is"
    config = tmp_path / "hub.yaml"
    config.write_text(yaml.safe_dump(hub_config([lm("chat", tiny_llama, default=True)])))
    port = free_port()
    log = tmp_path / "example.log"  # a file, not a pipe nobody drains: a full pipe blocks the app's logging
    with log.open("wb") as out:
        app = subprocess.Popen(
            [sys.executable, str(EXAMPLE), str(config), str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=os.environ.copy(),
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{url}/hello", timeout=2).json()["loaded"] == ["chat"]:
                    break
            except (httpx.HTTPError, ValueError, KeyError):
                pass
            assert app.poll() is None and time.monotonic() < deadline, "the example did not start"
            time.sleep(0.3)
        assert httpx.get(f"{url}/hub/status", timeout=10).json()["models"][0]["id"] == "chat"
        reply = httpx.post(
            f"{url}/v1/chat/completions", json=hello("chat", 4, **text_only(tiny_llama)), timeout=60
        )
        assert reply.status_code == 200
        app.send_signal(signal.SIGINT)
        code = app.wait(60)
        assert code == 0, f"the example exited with {code}:\n{log.read_text(errors='replace')[-4000:]}"
    finally:
        if app.poll() is None:
            app.kill()
            app.wait(10)


def test_the_process_exits_cleanly(tmp_path: Path, tiny_llama: Path, tiny_vlm: Path, hub_config) -> None:
    """A script that runs batched, one-at-a-time and multimodal models and returns exits 0.

    MLX's and upstream's threads (a batch scheduler, inference workers) must be
    stopped before the interpreter tears down; once, one that was not aborted the
    process with "terminate called without an active exception" (exit 134).
    """
    from .test_model_types import image_chat, vlm_entry

    doc = hub_config(
        [
            lm("batched", tiny_llama, default=True),
            lm("single", tiny_llama, default=True, disable_batching=True),
            vlm_entry("see", tiny_vlm),
        ]
    )
    requests = {
        "batched": hello("batched", 4, **text_only(tiny_llama)),
        "single": hello("single", 4, **text_only(tiny_llama)),
        "see": image_chat("see", tiny_vlm),
    }
    script = tmp_path / "run.py"
    script.write_text(
        "import asyncio, sys, httpx\n"
        "from mlx_hub import Hub\n"
        f"DOC, REQUESTS = {doc!r}, {requests!r}\n"
        "async def main():\n"
        "    async with Hub.from_config(DOC) as hub:\n"
        "        async with httpx.AsyncClient(timeout=120) as http:\n"
        "            for name, body in REQUESTS.items():\n"
        "                url = f'http://127.0.0.1:{hub.slots[name].port}/v1/chat/completions'\n"
        "                reply = await http.post(url, json=body)\n"
        "                print(name, reply.status_code, flush=True)\n"
        "asyncio.run(main())\n"
    )
    env = checkout_env()
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["batched", "200", "single", "200", "see", "200"], out.stdout
    assert "terminate called" not in out.stderr
