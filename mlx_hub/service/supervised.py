"""The hub's side of running under the supervisor (``supervisor.py``; the wire is in ``supervision.py``).

A hub started by the supervisor finds the socket pair's descriptor and what to
start with (``Launch``) in its environment. It then:

- takes its listening sockets from the supervisor (``ports.set_socket_source``)
  and hands back the ones it closes for good;
- reports its models (serving, loaded, loading, generating, held back) on
  every state change, so a crash can be blamed and the same set restored;
- after a restart, serves the models that were serving, loads the ones that
  were loaded (JIT ones too), holds back a model blamed for two crashes in a
  row, and keeps requests that waited in the sockets' backlog until that is
  done: a request sent during the restart is served, not refused;
- shows the restarts and the last crash in status, ``/health`` and ``/metrics``.
"""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import logging
import os
import socket
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from starlette.types import ASGIApp, Receive, Scope, Send

from mlx_hub.config import HubConfig
from mlx_hub.core import ports
from mlx_hub.core.errors import HubError
from mlx_hub.core.ports import PortError, listen_socket
from mlx_hub.core.states import OCCUPYING, MemoryState, PortState
from mlx_hub.core.status import Supervision
from mlx_hub.service.supervision import CHANNEL_ENV, LAUNCH_ENV, Launch, Reader, Snapshot, send, stop_grace
from mlx_hub.web.security import key_accepted

if TYPE_CHECKING:
    from mlx_hub.service.api import Hub

log = logging.getLogger("mlx_hub.supervised")

#: How long a request that waited through a restart waits for the models to come back.
RESTORE_WAIT_SECONDS = 300.0


class SupervisorChannel:
    """The hub's end of the socket pair: a ``ports.SocketSource`` and the line for its reports.

    If the supervisor has gone (killed on its own), the hub binds its own
    sockets and keeps serving; it just will not be restarted.
    """

    def __init__(self, fd: int, held: list[tuple[str, int]]):
        self.sock = socket.socket(fileno=fd)
        self._reader = Reader(self.sock)
        self._lock = threading.Lock()
        self._held = set(held)

    def _ask(self, message: dict[str, Any]) -> tuple[dict[str, Any], list[int]]:
        with self._lock:
            send(self.sock, message)
            got = self._reader.read()
        if got is None:
            raise OSError("the supervisor has gone")
        return got

    def bind(self, host: str, port: int) -> socket.socket:
        try:
            reply, fds = self._ask({"op": "bind", "host": host, "port": port})
        except OSError:
            return listen_socket(host, port)
        if "error" in reply or not fds:
            for fd in fds:
                os.close(fd)
            raise PortError(str(reply.get("error") or f"no socket for {host}:{port}"))
        for extra in fds[1:]:
            os.close(extra)
        self._held.add((host, port))
        sock = socket.socket(fileno=fds[0])
        sock.setblocking(False)
        return sock

    def release(self, host: str, port: int) -> None:
        self._held.discard((host, port))
        with contextlib.suppress(OSError):
            self._ask({"op": "release", "host": host, "port": port})

    def holds(self, host: str, port: int) -> bool:
        return (host, port) in self._held

    def tell(self, message: dict[str, Any]) -> None:
        """A report the supervisor does not answer; lost (with a log line) if it has gone."""
        with self._lock:
            try:
                send(self.sock, message)
            except OSError as exc:
                log.debug("the supervisor did not take a report: %s", exc)


class RestoreGate:
    """Hold requests that arrive while a restarted hub brings its models back (model ports: all but
    ``/health``; the controller: ``/v1``), then let them through.

    A request without a valid API key is not held: it goes straight on to its 401, so a client
    with a wrong key learns it now, not after the restore.
    """

    def __init__(
        self,
        app: ASGIApp,
        restored: asyncio.Event,
        holds: Callable[[str], bool],
        keys: Callable[[], frozenset[str]],
    ):
        self.app = app
        self.restored = restored
        self.holds = holds
        self.keys = keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] == "http"
            and not self.restored.is_set()
            and self.holds(scope["path"])
            and key_accepted(scope, self.keys())
        ):
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.restored.wait(), RESTORE_WAIT_SECONDS)
        await self.app(scope, receive, send)


def _model_paths(path: str) -> bool:
    return path != "/health"


def _v1_paths(path: str) -> bool:
    return path == "/v1" or path.startswith("/v1/")


class Supervised:
    """Everything a hub does because a supervisor runs it (see the module)."""

    def __init__(self, channel: SupervisorChannel, launch: Launch):
        self.channel = channel
        self.launch = launch
        self.restarting = launch.restarts > 0
        self.restored = asyncio.Event()
        self._last: Snapshot | None = None
        self._ready = False

    @classmethod
    def from_env(cls) -> Supervised | None:
        """The supervision this process was started under, or None; takes the variables out of the
        environment so that processes the hub starts do not inherit them."""
        fd = os.environ.pop(CHANNEL_ENV, None)
        launch = Launch.from_env(os.environ.pop(LAUNCH_ENV, None))
        if not fd:
            return None
        channel = SupervisorChannel(int(fd), launch.held_ports)
        ports.set_socket_source(channel)
        # A SIGSEGV or SIGABRT leaves the crashing thread's stack in hub.log. Only that thread's: walking
        # the others' frames while they run can itself segfault, and the crash would read as SIGSEGV.
        faulthandler.enable(all_threads=False)
        return cls(channel, launch)

    @property
    def supervisor_pid(self) -> int:
        return os.getppid()

    def names(self, config: HubConfig) -> list[str]:
        """The models ``hub.start`` starts: what the launch serves, less those held back, in hub.yaml."""
        known = {m.name for m in config.models}
        wanted = self.launch.serve if self.launch.serve is not None else config.startup_models()
        return [n for n in wanted if n in known and n not in self.launch.held_back]

    def runtime_fields(self) -> dict[str, Any]:
        """What hub_runtime.json says about the supervision."""
        return {
            "supervisor_pid": self.supervisor_pid,
            "restarts": self.launch.restarts,
            "last_crash": self.launch.last_crash,
        }

    def attach(self, hub: Hub) -> None:
        """Report the hub's changes, show the restarts, and (after a restart) hold requests until restored."""
        hub.supervision = Supervision(
            supervisor_pid=self.supervisor_pid,
            restarts=self.launch.restarts,
            last_crash=self.launch.last_crash,
        )
        hub.observers.append(lambda: self.report(hub))
        if not self.restarting:
            self.restored.set()
            return
        build = hub.app_factory

        def keys() -> frozenset[str]:
            return hub.api_keys

        def gated(owner: Hub, slot: Any) -> Any:
            app = build(owner, slot)
            app.add_middleware(RestoreGate, restored=self.restored, holds=_model_paths, keys=keys)
            return app

        hub.app_factory = gated
        hub.wrap_controller(lambda app: RestoreGate(app, self.restored, _v1_paths, keys))

    async def after_start(self, hub: Hub) -> None:
        """After ``hub.start``: hold back, load what was loaded, open the gate, tell the supervisor."""
        try:
            await self._restore(hub)
        finally:
            self.restored.set()
            self._ready = True
            self.report(hub)
            self.channel.tell({"op": "ready"})

    async def _restore(self, hub: Hub) -> None:
        for name, reason in self.launch.held_back.items():
            slot = hub.slots.get(name)
            if slot is None:
                continue
            slot.hold_back(reason)
            log.warning("model '%s' %s", name, reason)
            with contextlib.suppress(HubError):
                await hub.start_model(name)  # its port answers 503 with the reason
        for name in self.launch.load:
            slot = hub.slots.get(name)
            if slot is None or slot.held_back or slot.memory_state is MemoryState.LOADED:
                continue
            try:
                await hub.load(name)
            except HubError as exc:
                log.error("model '%s' was loaded before the crash and did not load again: %s", name, exc)

    def stopping(self, drain_timeout: float) -> None:
        """Tell the supervisor this hub was asked to stop: its exit from now on is final, never a crash,
        and a shutdown that outlasts the grace (``drain_timeout`` and a margin) is killed."""
        self.channel.tell({"op": "stopping", "grace": stop_grace(drain_timeout)})

    def report(self, hub: Hub) -> None:
        """Tell the supervisor the models' states, when they changed since the last report."""
        slots = list(hub.slots.values())
        snapshot = Snapshot(
            serving=[s.name for s in slots if s.port_state in (PortState.RUNNING, PortState.STARTING)],
            loaded=[s.name for s in slots if s.memory_state is MemoryState.LOADED],
            loading=[s.name for s in slots if s.memory_state is MemoryState.LOADING],
            generating=[s.name for s in slots if s.active > 0 and s.memory_state in OCCUPYING],
            held_back={s.name: s.held_back for s in slots if s.held_back},
            ready=self._ready,
        )
        if snapshot != self._last:
            self._last = snapshot
            self.channel.tell(snapshot.message())
