"""Start upstream's own server and the hub on the same models, and diff what they answer.

Upstream runs as ``mlx-openai-server launch``, twice: once with ``--config``
(upstream's multi-model YAML: every case but one, one handler subprocess per
model, the same path a flag launch takes since 1.8) and once with flags
(``--model-path``, ``--served-model-name``, sampling flags), so both of
upstream's ways of writing options are covered. The hub runs as its own daemon
(``start --foreground``) on a hub.yaml holding the same fields plus ``name``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import yaml

BIN = Path(sys.executable).parent
#: Keys whose values differ on every call by design: ids and clocks.
VOLATILE = frozenset({"id", "created", "created_at", "system_fingerprint", "call_id", "item_id"})
#: Keys that differ on purpose: the hub's prompt caches persist and are shared by entries of one
#: model (docs/migrating.md, "What differs on purpose"), so it may reuse more of a prompt than upstream;
#: the tokens generated from it are the same and are compared.
REUSE = frozenset({"cached_tokens"})
#: Values that differ on purpose (docs/migrating.md, "What differs on purpose"): upstream's chat route
#: says "stop" for an answer cut at max_tokens, the hub says "length", as OpenAI does.
SAME_AS = {("finish_reason", "length"): "stop"}


def _normal(key: str, value: Any) -> Any:
    if key in VOLATILE | REUSE:
        return "<volatile>"
    if isinstance(value, str) and (key, value) in SAME_AS:
        return SAME_AS[(key, value)]
    return normalize(value)


def normalize(value: Any) -> Any:
    """A JSON document with ids and timestamps blanked, for comparing two servers' answers."""
    if isinstance(value, dict):
        return {k: _normal(k, v) for k, v in value.items()}
    if isinstance(value, list):
        return [normalize(v) for v in value]
    return value


def sse_events(text: str) -> list[Any]:
    """The ``data:`` payloads of a server-sent event stream, JSON-decoded where they are JSON."""
    events = []
    for line in text.splitlines():
        if not line.startswith("data:"):
            continue
        payload = line[len("data:") :].strip()
        try:
            events.append(json.loads(payload))
        except ValueError:
            events.append(payload)
    return events


def answer(response: httpx.Response) -> dict[str, Any]:
    """What a client sees: status, content type and the normalized body (stream events one by one)."""
    kind = response.headers.get("content-type", "").split(";")[0]
    if kind == "text/event-stream":
        body: Any = [normalize(e) for e in sse_events(response.text)]
    else:
        try:
            body = normalize(response.json())
        except ValueError:
            body = response.text
    return {"status": response.status_code, "type": kind, "body": body}


def _wait(url: str, process: subprocess.Popen[bytes], log: Path, ready: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{url} exited with {process.returncode}:\n{log.read_text()[-4000:]}")
        try:
            response = httpx.get(url, timeout=2)
            if ready(response):
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} not ready after {timeout:g} s:\n{log.read_text()[-4000:]}")


@contextmanager
def _process(args: list[str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    with log.open("wb") as out:
        process = subprocess.Popen(
            args, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    try:
        yield process
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(10)


class Pair:
    """Upstream and the hub serving the same cases; ``send`` puts one request to both."""

    def __init__(self, upstream: dict[str, str], hub: dict[str, str], controller: str):
        self.upstream = upstream  # served name -> base URL
        self.hub = hub  # served name -> the hub model port's base URL
        self.controller = controller
        self.client = httpx.Client(timeout=120)

    def send(
        self, served: str, path: str, body: dict[str, Any] | None = None, files: dict[str, Any] | None = None
    ) -> tuple[Any, Any]:
        """The same request to upstream and to the hub's port for ``served``; their answers, normalized.

        With ``files`` the request is multipart (``body`` becomes its form fields);
        without a body it is a GET.
        """
        replies = []
        for base in (self.upstream[served], self.hub[served]):
            if files is not None:
                response = self.client.post(base + path, data=body, files=files)
            elif body is None:
                response = self.client.get(base + path)
            else:
                response = self.client.post(base + path, json=body)
            replies.append(answer(response))
        return replies[0], replies[1]


@contextmanager
def serve_pair(
    work: Path, cases: dict[str, dict[str, Any]], flag_case: str, flags: list[str], ports: list[int]
) -> Iterator[Pair]:
    """Start both sides on ``cases`` (served name -> upstream fields); ``flag_case`` gets its own flag launch."""
    from mlx_hub.engine.whisper import ensure_ffmpeg as _ensure_ffmpeg

    _ensure_ffmpeg()  # upstream's whisper needs the program on PATH as much as the hub's does
    up_port, flag_port, hub_port, *model_ports = ports
    host = "127.0.0.1"
    listed = {served: fields for served, fields in cases.items() if served != flag_case}
    up_yaml = work / "upstream.yaml"
    up_yaml.write_text(
        yaml.safe_dump(
            {
                "server": {"host": host, "port": up_port, "no_log_file": True},
                "models": [{"served_model_name": s, **f} for s, f in listed.items()],
            }
        )
    )
    hub_yaml = work / "hub.yaml"
    hub_models = [
        {"name": f"hub-{s}", "served_model_name": s, "default": True, "port": p, **f}
        for (s, f), p in zip(cases.items(), model_ports, strict=False)
    ]
    hub_yaml.write_text(
        yaml.safe_dump(
            {
                "host": host,
                "port": hub_port,
                "log_path": str(work / "logs"),
                # A cache folder of its own: upstream starts cold, so the hub must too.
                "prompt_cache_path": str(work / "prompt-cache"),
                "models": hub_models,
            }
        )
    )
    launch = [str(BIN / "mlx-openai-server"), "launch"]
    flag_model = cases[flag_case]["model_path"]
    flag_args = [*launch, "--model-path", flag_model, "--served-model-name", flag_case, *flags]
    flag_args += ["--host", host, "--port", str(flag_port), "--no-log-file"]
    up_url, flag_url, hub_url = (f"http://{host}:{p}" for p in (up_port, flag_port, hub_port))

    def upstream_ready(r: httpx.Response) -> bool:
        return r.status_code == 200

    def hub_ready(r: httpx.Response) -> bool:
        status = r.json()
        return status.get("ready") and status["counts"]["loaded"] == len(cases)

    with (
        _process([*launch, "--config", str(up_yaml)], work / "upstream.log") as up,
        _process(flag_args, work / "upstream-flags.log") as flag,
        _process(
            [str(BIN / "mlx-openai-server-hub"), "start", "--foreground", "--config", str(hub_yaml)],
            work / "hub.out",
        ) as hub,
    ):
        _wait(f"{up_url}/health", up, work / "upstream.log", upstream_ready, 300)
        _wait(f"{flag_url}/health", flag, work / "upstream-flags.log", upstream_ready, 300)
        _wait(f"{hub_url}/hub/status", hub, work / "hub.out", hub_ready, 300)
        upstream = {s: up_url for s in listed} | {flag_case: flag_url}
        ports_of = {m["served_model_name"]: m["port"] for m in hub_models}
        yield Pair(upstream, {s: f"http://{host}:{p}" for s, p in ports_of.items()}, hub_url)
