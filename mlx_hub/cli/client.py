"""A small HTTP client for a running hub's controller, used by the CLI."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import quote

import httpx

from mlx_hub.core.requestlog import PAGE_LIMIT
from mlx_hub.core.status import HubStatus
from mlx_hub.service.runtime import Runtime, clear_runtime, pid_alive, read_runtime

#: Loads of big models take minutes; the controller answers when they finish.
ACTION_TIMEOUT = 900.0


class ClientError(RuntimeError):
    """The hub answered with an error; ``message`` is its text, ``status`` the HTTP code."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.message = message
        self.status = status


class NotRunning(ClientError):
    """No hub answers for this config."""


class ApiKey(NamedTuple):
    """The key the CLI sends, and where it came from (named when the hub refuses it)."""

    value: str | None
    source: str = ""


NO_KEY = ApiKey(None)


def refused_key_message(url: str, key: ApiKey) -> str:
    """One line for a 401: which key to set, and where the one that was sent came from."""
    if key.value is None:
        return (
            f"the hub at {url} needs an API key: set MLX_HUB_API_KEY to one of its api_keys "
            "(or pass --api-key KEY, or list the key in hub.yaml's api_keys)"
        )
    return (
        f"the hub at {url} refused the API key from {key.source}: set MLX_HUB_API_KEY "
        "(or pass --api-key) to one of the api_keys the hub was started with"
    )


class HubClient:
    def __init__(self, base_url: str, *, timeout: float = ACTION_TIMEOUT, key: ApiKey = NO_KEY):
        self.base_url = base_url.rstrip("/")
        self.key = key
        headers = {"Authorization": f"Bearer {key.value}"} if key.value else {}
        self._http = httpx.Client(
            base_url=self.base_url, timeout=httpx.Timeout(timeout, connect=5.0), headers=headers
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> HubClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: str, path: str, params: dict[str, Any] | None = None) -> Any:
        try:
            response = self._http.request(method, path, params=params)
        except httpx.TransportError as exc:
            raise NotRunning(f"no hub answers at {self.base_url} ({exc.__class__.__name__})") from None
        try:
            body = response.json()
        except ValueError:
            body = None
        if response.status_code == 401:
            raise ClientError(refused_key_message(self.base_url, self.key), 401)
        if response.is_error:
            message = response.text
            if isinstance(body, dict) and isinstance(body.get("error"), dict):
                message = body["error"].get("message", message)
            raise ClientError(message, response.status_code)
        return body

    def health(self) -> dict[str, Any]:
        return self._call("GET", "/health")

    def status(self) -> HubStatus:
        return HubStatus.model_validate(self._call("GET", "/hub/status"))

    def model(self, name: str, action: str) -> dict[str, Any]:
        return self._call("POST", f"/hub/models/{name}/{action}")

    def service(self, action: str) -> dict[str, Any]:
        return self._call("POST", f"/hub/service/{action}")

    def reload(self) -> dict[str, Any]:
        return self._call("POST", "/hub/reload")

    def shutdown(self) -> dict[str, Any]:
        return self._call("POST", "/hub/shutdown")

    def requests(self, *, limit: int = 100, **params: Any) -> list[dict[str, Any]]:
        """The request log, newest first (``/hub/requests``: model, since, before), page by page up to ``limit``."""
        query = {k: v for k, v in params.items() if v is not None}
        rows: list[dict[str, Any]] = []
        while len(rows) < limit:
            page = min(limit - len(rows), PAGE_LIMIT)
            data = self._call("GET", "/hub/requests", {**query, "limit": page})["data"]
            rows.extend(data)
            if len(data) < page:
                break
            query["before"] = data[-1]["id"]
        return rows

    def prompt_caches(self) -> dict[str, Any]:
        return self._call("GET", "/hub/prompt-cache")

    def clear_prompt_caches(self, name: str | None = None) -> dict[str, Any]:
        return self._call("POST", "/hub/prompt-cache/clear" + (f"?model={quote(name)}" if name else ""))


def find_running(log_dir: Path, key: ApiKey = NO_KEY) -> tuple[Runtime, HubClient] | None:
    """The hub this config's runtime file names, if it is alive and answers as itself.

    Under a supervisor the hub's pid changes with each restart; a hub whose
    supervisor is the one on file is the same hub. A runtime file whose
    processes are gone is stale and removed (unless it says why the
    supervisor gave up), so the next ``start`` is not misled by a hub that was killed.
    """
    runtime = read_runtime(log_dir)
    if runtime is None:
        return None
    try:
        with HubClient(runtime.url, timeout=5.0) as probe:
            health = probe.health()
    except ClientError:
        health = None
    if health is not None and _same_hub(runtime, health):
        return dataclasses.replace(runtime, pid=health["pid"]), HubClient(runtime.url, key=key)
    if not pid_alive(runtime.owner_pid):
        if runtime.state != "gave_up":
            clear_runtime(log_dir, runtime.pid)
        return None
    if runtime.state == "restarting":
        cause = (runtime.last_crash or {}).get("cause", "it crashed")
        raise ClientError(
            f"the hub is restarting after a crash ({cause}; restart {runtime.restarts}); "
            f"try again in a moment, or see {log_dir / 'hub.log'}"
        )
    raise ClientError(
        f"a hub process (pid {runtime.pid}) is alive but does not answer at {runtime.url}; "
        f"see {log_dir / 'hub.log'}, or stop it with `kill {runtime.owner_pid}`"
    )


def _same_hub(runtime: Runtime, health: dict[str, Any]) -> bool:
    if health.get("pid") == runtime.pid:
        return True
    return runtime.supervisor_pid is not None and health.get("supervisor_pid") == runtime.supervisor_pid


def connect(log_dir: Path, key: ApiKey = NO_KEY) -> tuple[Runtime, HubClient]:
    found = find_running(log_dir, key)
    if found is None:
        runtime = read_runtime(log_dir)
        if runtime is not None and runtime.state == "gave_up":
            raise NotRunning(
                f"no hub is running for this config: {runtime.gave_up}; "
                "start it again with `mlx-openai-server-hub start`"
            )
        raise NotRunning("no hub is running for this config; start it with `mlx-openai-server-hub start`")
    return found
