"""What the supervisor and the hub it runs agree on, and the supervisor's decisions.

The supervisor (``supervisor.py``) is a small parent process; the hub
(``daemon.py`` with ``supervised.py``) is its child. They talk over one Unix
socket pair, in JSON lines, with listening sockets passed as file descriptors:

- ``bind`` (hub -> supervisor, answered): the listening socket for a host and
  port. The supervisor binds it the first time and keeps its own copy, so
  the socket outlives a crashed hub and connections wait in its backlog.
- ``release`` (answered): the hub closed that port for good (a model stopped);
  the supervisor closes its copy, so the port refuses connections again.
- ``state`` (not answered): which models serve, are loaded, loading or
  generating, and which are held back. The supervisor keeps the last one; it
  is what a restart brings back and what a crash is blamed on.
- ``ready`` (not answered): the hub has started (or restored) its models.
- ``stopping`` (not answered): the hub was asked to stop and begins its
  shutdown, which may take ``grace`` seconds. However the hub ends from then
  on (a shutdown that raises, hangs, or is killed) it is not a crash: the
  supervisor does not restart it, and kills it once the grace has passed.

The decisions (how long to wait before a restart, when to give up, which
model a crash is blamed on, what the next hub restores) are pure functions
here, tested without processes. This module imports only the standard library.
"""

from __future__ import annotations

import json
import signal
import socket
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

#: The hub's end of the socket pair (a file descriptor number).
CHANNEL_ENV = "MLX_HUB_SUPERVISOR_FD"
#: JSON: what the hub starts with (``Launch``).
LAUNCH_ENV = "MLX_HUB_LAUNCH"
#: The hub's exit status for a configuration error: not retried (sysexits' EX_CONFIG).
EXIT_CONFIG = 78

#: Restart policy defaults (the issue's numbers): backoff cap, healthy run that resets it, give-up window.
MAX_DELAY = 60.0
HEALTHY_AFTER = 300.0
WINDOW = 600.0
#: Lines of hub.log kept with a crash.
LOG_TAIL = 20
#: What a shutdown may take beyond letting requests drain (``drain_timeout``): unloading, closing ports.
SHUTDOWN_MARGIN = 15.0
#: How long the supervisor waits for a hub it killed to be gone before it stops waiting.
KILL_WAIT = 10.0


def stop_grace(drain_timeout: float) -> float:
    """Seconds a hub asked to stop has to end before the supervisor kills it."""
    return drain_timeout + SHUTDOWN_MARGIN


def stop_bound(drain_timeout: float) -> float:
    """The longest a stop takes under the supervisor: the grace, then a kill and the wait for it."""
    return stop_grace(drain_timeout) + KILL_WAIT


# ----------------------------------------------------------------------------- wire


def send(sock: socket.socket, message: dict[str, Any], fds: Sequence[int] = ()) -> None:
    """One JSON line, with ``fds`` attached; the line says how many it carries (``"fds": n``)."""
    if fds:
        message = {**message, "fds": len(fds)}
    data = json.dumps(message).encode() + b"\n"
    sent = socket.send_fds(sock, [data], list(fds)) if fds else 0
    sock.sendall(data[sent:])


class Reader:
    """JSON lines from a stream socket, each with the descriptors sent along with it.

    A receive may return several lines and the descriptors of any of them, so
    descriptors queue in arrival order and each line takes as many as it says
    it carries (they arrive no later than the line's last byte).
    """

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self._buffer = b""
        self._fds: list[int] = []

    def read(self) -> tuple[dict[str, Any], list[int]] | None:
        """The next message and its descriptors; None once the other side has gone."""
        while b"\n" not in self._buffer:
            try:
                data, fds, _, _ = socket.recv_fds(self.sock, 65536, 16)
            except OSError:
                return None
            self._fds.extend(fds)
            if not data:
                return None
            self._buffer += data
        line, _, self._buffer = self._buffer.partition(b"\n")
        message = json.loads(line)
        count = int(message.pop("fds", 0)) if isinstance(message, dict) else 0
        mine, self._fds = self._fds[:count], self._fds[count:]
        return message, mine


# ----------------------------------------------------------------------------- what the hub reports


@dataclass(frozen=True)
class Snapshot:
    """The hub's models as it last reported them (the ``state`` message)."""

    serving: list[str] = field(default_factory=list)  # port running or starting
    loaded: list[str] = field(default_factory=list)
    loading: list[str] = field(default_factory=list)
    generating: list[str] = field(default_factory=list)  # a request in the handler
    held_back: dict[str, str] = field(default_factory=dict)  # name: why it is not loaded again
    ready: bool = False  # the hub had started (or restored) what it was asked to

    @classmethod
    def from_message(cls, message: dict[str, Any]) -> Snapshot:
        known = {k: message[k] for k in cls.__dataclass_fields__ if k in message}
        return cls(**known)

    def message(self) -> dict[str, Any]:
        return {"op": "state", **asdict(self)}


def blame(snapshot: Snapshot) -> dict[str, str]:
    """Which models a crash is blamed on, and for what: each model that was loading, and the
    model whose request was running if it was the only one generating."""
    suspects = {name: "loading" for name in snapshot.loading}
    if len(snapshot.generating) == 1 and snapshot.generating[0] not in suspects:
        suspects[snapshot.generating[0]] = "generating"
    return suspects


def describe_exit(returncode: int) -> tuple[int | None, str | None]:
    """(exit code, signal name): a negative return code is the signal that ended the process."""
    if returncode < 0:
        try:
            return None, signal.Signals(-returncode).name
        except ValueError:
            return None, f"signal {-returncode}"
    return returncode, None


@dataclass(frozen=True)
class Crash:
    """One death of the hub, as status, the CLI and hub_runtime.json show it."""

    at: float
    pid: int
    exit_code: int | None
    signal: str | None
    loading: list[str]
    generating: list[str]
    blamed: dict[str, str]  # name: "loading" | "generating"
    held_back: dict[str, str]  # models not loaded again after this crash, and why
    log_tail: list[str]
    uptime_seconds: float

    def cause(self) -> str:
        """``killed by SIGKILL`` or ``exited with code 1``, plus what was happening."""
        how = f"killed by {self.signal}" if self.signal else f"exited with code {self.exit_code}"
        doing = [f"{n} {'loading' if k == 'loading' else 'generating'}" for n, k in self.blamed.items()]
        return how + (f" while {', '.join(doing)}" if doing else "")

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "cause": self.cause()}


# ----------------------------------------------------------------------------- decisions


class RestartPolicy:
    """When to restart a crashed hub: at once, then after 1, 2, 4 ... ``max_delay`` s while it keeps
    crashing; a run of ``healthy_after`` s resets the backoff; more than ``max_restarts`` restarts
    within ``window`` s and it gives up."""

    def __init__(
        self,
        max_restarts: int = 5,
        *,
        window: float = WINDOW,
        healthy_after: float = HEALTHY_AFTER,
        max_delay: float = MAX_DELAY,
    ):
        self.max_restarts = max_restarts
        self.window = window
        self.healthy_after = healthy_after
        self.max_delay = max_delay
        self.restarts: list[float] = []  # when each restart was decided
        self.streak = 0  # crashes since the last healthy run

    def next_delay(self, now: float, ran_for: float) -> float | None:
        """Seconds to wait before restarting a hub that crashed at ``now`` after ``ran_for`` s; None: give up."""
        if ran_for >= self.healthy_after:
            self.streak = 0
        recent = [t for t in self.restarts if now - t < self.window]
        if len(recent) >= self.max_restarts:
            return None
        self.restarts = [*recent, now]
        delay = 0.0 if self.streak == 0 else min(2.0 ** (self.streak - 1), self.max_delay)
        self.streak += 1
        return delay


def crashed_twice(name: str, kind: str) -> str:
    """The reason a model is held back: it was blamed for two crashes in a row."""
    return (
        f"crashed the hub while {kind} (twice in a row), so it is not loaded again automatically; "
        f"load it by hand (`mlx-openai-server-hub load-model {name}`) once the cause is fixed"
    )


@dataclass(frozen=True)
class Launch:
    """What a hub starts with: the models to serve and load, those held back, and the crash history."""

    serve: list[str] | None = None  # None: the names given to start, else hub.yaml's startup set
    load: list[str] = field(default_factory=list)  # loaded when it died (JIT ones included)
    held_back: dict[str, str] = field(default_factory=dict)
    restarts: int = 0
    last_crash: dict[str, Any] | None = None
    held_ports: list[tuple[str, int]] = field(default_factory=list)  # sockets the supervisor holds

    def to_env(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_env(cls, text: str | None) -> Launch:
        data = json.loads(text) if text else {}
        data["held_ports"] = [(str(h), int(p)) for h, p in data.get("held_ports", [])]
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


def next_launch(
    snapshot: Snapshot,
    first: Iterable[str],
    blamed: dict[str, str],
    blamed_before: dict[str, str],
) -> tuple[list[str], list[str], dict[str, str]]:
    """What the restarted hub serves, loads and holds back.

    It serves what was serving, plus (when the hub died before it was ready)
    what it had been asked to start, ``first``. It loads what was loaded or
    loading. A model blamed for this crash and the one before, for the same
    thing, is held back: its port opens, its weights stay off, status says why.
    Models the dead hub held back stay held back.
    """
    serve = list(dict.fromkeys([*snapshot.serving, *([] if snapshot.ready else first)]))
    held = dict(snapshot.held_back)
    for name, kind in blamed.items():
        if blamed_before.get(name) == kind:
            held[name] = crashed_twice(name, kind)
    load = [n for n in dict.fromkeys([*snapshot.loaded, *snapshot.loading]) if n not in held]
    for name in held:
        if name not in serve:
            serve.append(name)  # its port answers, with the reason
    return serve, load, held
