"""The contenders, each in its own process, and the client that times them.

- ``HubProcess``: this project's daemon, driven over its control API.
- ``LaunchedServer``: ``mlx-openai-server launch``, one process per model, started on demand
  (how orchestrators and upstream's own multi-model mode host models).
- ``MlxLmServer``: ``mlx_lm.server``, mlx-lm's own server with its continuous batching.
- ``BareWorker``: a warm process with mlx-lm imported: load and ``stream_generate``, the floor.
"""

from __future__ import annotations

import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import httpx
import yaml

from mlx_hub.core.status import HubStatus, ModelMetadata

MESSAGES = [{"role": "user", "content": "Hello"}]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rss_bytes(pid: int) -> int:
    """Resident memory of a process and all its descendants (ps works on Linux and macOS).

    mlx-openai-server 1.8 runs each handler in a child process, so a server's
    cost is its whole process tree.
    """
    out = subprocess.run(["ps", "-A", "-o", "pid=,ppid=,rss="], capture_output=True, text=True, check=True)
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for line in out.stdout.splitlines():
        p, parent, kb = (int(x) for x in line.split())
        children.setdefault(parent, []).append(p)
        rss[p] = kb * 1024
    total, todo = 0, [pid]
    while todo:
        current = todo.pop()
        total += rss.get(current, 0)
        todo.extend(children.get(current, []))
    return total


def stop_process(process: subprocess.Popen) -> None:
    """SIGTERM (a clean shutdown for both servers), then SIGKILL if it does not end in 60 s."""
    process.terminate()
    try:
        process.wait(60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def wait_for(
    predicate: Callable[[], bool], timeout: float, what: str, process: subprocess.Popen | None = None
) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{what}: the process exited with code {process.returncode}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not ready after {timeout:g} s")
        time.sleep(0.02)


def stream_chat(
    base_url: str, model: str, max_tokens: int, messages: Sequence[dict] = MESSAGES, **extra: Any
) -> dict[str, Any]:
    """Stream one greedy chat completion; time to the first token, decode tokens/s and the reply.

    ``extra`` goes into the request body as is (``logit_bias``, ...).
    """
    body = {
        "model": model,
        "messages": list(messages),
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
        **extra,
    }
    started = time.perf_counter()
    first = last = None
    chunks = 0
    usage: dict[str, Any] = {}
    text = ""
    with httpx.stream("POST", f"{base_url}/chat/completions", json=body, timeout=1800) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line.strip() == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            usage = chunk.get("usage") or usage
            choices = chunk.get("choices") or []
            if choices and (content := (choices[0].get("delta") or {}).get("content")):
                now = time.perf_counter()
                first = first or now
                last = now
                chunks += 1
                text += content
    if first is None:
        raise RuntimeError(f"{model}: no token came back")
    return {
        "first_token_s": first - started,
        "tokens": usage.get("completion_tokens") or chunks,
        "tps": (chunks - 1) / (last - first) if chunks > 1 and last > first else None,
        "total_s": time.perf_counter() - started,
        "text": text,
        "prompt_tokens": usage.get("prompt_tokens"),
        "cached_tokens": (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0,
    }


class HubProcess:
    """The hub daemon (``python -m mlx_hub.service.daemon``) on loopback ports of its own."""

    def __init__(
        self,
        workdir: Path,
        models: list[dict[str, Any]],
        groups: list[dict[str, Any]] | None = None,
        **hub: Any,  # more hub.yaml options (prompt_cache_path, ...)
    ):
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        config = {
            "host": "127.0.0.1",
            "port": self.port,
            "model_starting_port": free_port(),
            "log_path": str(workdir / "logs"),
            "log_level": "WARNING",
            "models": models,
            "groups": groups or [],
            **hub,
        }
        self.config_path = workdir / "hub.yaml"
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        self.url = f"http://127.0.0.1:{self.port}"
        self._log = open(workdir / "hub.out", "ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "mlx_hub.service.daemon", "--config", str(self.config_path)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        wait_for(self._ready, 300, "hub", self.process)
        self.http = httpx.Client(base_url=self.url, timeout=900)

    def _ready(self) -> bool:
        try:
            return httpx.get(f"{self.url}/health", timeout=1).json().get("ready", False)
        except httpx.HTTPError:
            return False

    @property
    def pid(self) -> int:
        return self.process.pid

    def rss(self) -> int:
        return rss_bytes(self.pid)

    def status(self) -> HubStatus:
        return HubStatus.model_validate(self.http.get("/hub/status").json())

    def model(self, name: str) -> ModelMetadata:
        return self.status().model(name)

    def act(self, name: str, action: str) -> str:
        response = self.http.post(f"/hub/models/{name}/{action}")
        response.raise_for_status()
        return response.json()["status"]

    def port_url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.model(name).port}/v1"

    def close(self) -> None:
        self.http.close()
        stop_process(self.process)
        self._log.close()


class LaunchedServer:
    """``mlx-openai-server launch`` for one model, as its own process."""

    def __init__(self, model_path: Path, workdir: Path, context_length: int = 4096):
        self.model_id = str(model_path)  # launch serves a model under its path
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        workdir.mkdir(parents=True, exist_ok=True)
        self._log = open(workdir / f"launch-{self.port}.out", "ab")
        self.started = time.perf_counter()
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "app.main",
                "launch",
                "--model-path",
                str(model_path),
                "--model-type",
                "lm",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--context-length",
                str(context_length),
                "--no-log-file",
                "--log-level",
                "WARNING",
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def ready(self) -> bool:
        try:
            return httpx.get(f"{self.url}/health", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def wait_ready(self) -> None:
        wait_for(self.ready, 600, "mlx-openai-server launch", self.process)

    def rss(self) -> int:
        return rss_bytes(self.process.pid)

    def close(self) -> None:
        stop_process(self.process)
        self._log.close()


class MlxLmServer:
    """``mlx_lm.server`` (mlx-lm's own HTTP server, continuous batching) for one model, as its own process.

    Its ``/health`` answers as soon as its generation thread runs, before the
    model has loaded (the first request waits for that), so callers that time
    a start measure to a first token, not to ``ready``.
    """

    def __init__(self, model_path: Path, workdir: Path):
        self.model_id = "default_model"  # mlx_lm.server's name for the model given on its command line
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        workdir.mkdir(parents=True, exist_ok=True)
        self._log = open(workdir / f"mlx-lm-server-{self.port}.out", "ab")
        self.started = time.perf_counter()
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mlx_lm",
                "server",
                "--model",
                str(model_path),
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--log-level",
                "WARNING",
            ],  # fmt: skip
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def ready(self) -> bool:
        try:
            return httpx.get(f"{self.url}/health", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def wait_ready(self) -> None:
        wait_for(self.ready, 600, "mlx_lm.server", self.process)

    def close(self) -> None:
        stop_process(self.process)
        self._log.close()


class BareWorker:
    """A warm process with mlx-lm imported (see bare_worker.py)."""

    def __init__(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.bare_worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            cwd=Path(__file__).resolve().parents[1],
        )
        assert json.loads(self.process.stdout.readline())["ready"]

    def call(self, **command: Any) -> dict[str, Any]:
        self.process.stdin.write(json.dumps(command) + "\n")
        self.process.stdin.flush()
        return json.loads(self.process.stdout.readline())

    def load_first_token(self, path: Path) -> dict[str, Any]:
        result = self.call(cmd="load_first_token", path=str(path), messages=MESSAGES, max_tokens=1)
        self.call(cmd="unload")
        return result

    def stream(self, path: Path, max_tokens: int) -> dict[str, Any]:
        return self.call(cmd="stream", path=str(path), messages=MESSAGES, max_tokens=max_tokens)

    def unload(self) -> None:
        self.call(cmd="unload")

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(30)


def summary(values: Sequence[float]) -> dict[str, float]:
    """Median and spread (min, max) of repeated measurements."""
    values = [v for v in values if v is not None]
    if not values:
        return {"median": float("nan"), "min": float("nan"), "max": float("nan"), "n": 0}
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def stack_line(stack: dict[str, str | None] | None) -> str:
    """Which libraries a run measured, for every results table (results move between stacks)."""
    if not stack:
        return "Stack: not recorded"
    return "Stack: " + ", ".join(f"{package} {version or 'missing'}" for package, version in stack.items())


def machine_name() -> str:
    system = {"darwin": "macos", "linux": "linux"}.get(sys.platform, sys.platform)
    return f"{system}-{platform.machine()}-{os.cpu_count()}cpu"
