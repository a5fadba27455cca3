"""Which port each model gets, and keeping that answer stable across restarts.

Clients and gateways (LiteLLM, editors) remember a model's URL, so an
auto-assigned port is persisted in ``<log_path>/ports.json`` and reused on the
next reload or start, as long as nothing else has taken it meanwhile.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from mlx_hub.config import HubConfig, ModelConfig
from mlx_hub.fsutil import atomic_write_json, read_json

log = logging.getLogger(__name__)

PORTS_FILE = "ports.json"
MAX_PORT = 65535


class PortError(RuntimeError):
    """A port cannot be had; the message names the port and who wanted it."""


def connect_host(host: str) -> str:
    """Where a client on this machine reaches a server bound to ``host`` (0.0.0.0 is not an address)."""
    return "127.0.0.1" if host in ("0.0.0.0", "", "::") else host


def _bind_host(host: str) -> str:
    return "" if host in ("0.0.0.0", "") else host


class SocketSource(Protocol):
    """Where listening sockets come from when a supervisor holds them (``supervised.py``)."""

    def bind(self, host: str, port: int) -> socket.socket: ...
    def release(self, host: str, port: int) -> None: ...
    def holds(self, host: str, port: int) -> bool: ...


_source: SocketSource | None = None


def set_socket_source(source: SocketSource | None) -> None:
    """Take listening sockets from ``source`` (a supervisor that keeps them across restarts), or bind here."""
    global _source
    _source = source


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening socket for ``host:port``: from the supervisor when one holds the hub's sockets,
    else bound here (``listen_socket``)."""
    return _source.bind(host, port) if _source is not None else listen_socket(host, port)


def release_socket(host: str, port: int) -> None:
    """The hub has closed ``host:port`` for good: a supervisor stops holding it, so it refuses connections."""
    if _source is not None:
        _source.release(host, port)


def listen_socket(host: str, port: int) -> socket.socket:
    """Bind and listen now, so a taken port is a clear error before serving starts.

    uvicorn would otherwise report it by calling ``sys.exit`` inside the hub's
    event loop. The socket is handed to uvicorn, so there is no window in which
    another process could take the port between the check and the bind.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((_bind_host(host), port))
        sock.listen(2048)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise PortError(f"port {port} on {host} is already in use by another process") from None
        raise PortError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock


def is_port_free(host: str, port: int) -> bool:
    """Whether the hub can listen on ``host:port``: nobody has it, or our supervisor holds it for us."""
    if _source is not None and _source.holds(host, port):
        return True
    try:
        listen_socket(host, port).close()
    except PortError:
        return False
    return True


def assign_ports(
    models: Iterable[ModelConfig],
    *,
    controller_port: int,
    starting_port: int,
    previous: dict[str, int],
    is_free: Callable[[ModelConfig, int], bool],
    held: dict[str, int] | None = None,
    ranges: dict[str, tuple[int, int]] | None = None,
) -> dict[str, int]:
    """Give every model a port: pinned first, then its previous one, then the lowest free.

    A model with ``port: auto:<range>`` draws from that named range (its
    previous port only counts if it lies inside); the others from
    ``starting_port`` upwards. ``held`` are ports this hub itself serves right
    now (by model name); they count as free for their owner and taken for
    everyone else, since a probe cannot tell our own listener from a
    stranger's. ``is_free(entry, port)``: whether ``entry`` could listen on
    ``port`` (on its own host). Pure apart from ``is_free``, so the policy is
    testable without sockets.
    """
    plan = _Plan(list(models), controller_port, starting_port, previous, is_free, held or {}, ranges or {})
    plan.keep_previous()
    plan.place_newcomers()
    return plan.result


@dataclass
class _Plan:
    """One run of ``assign_ports``: what is taken so far, and who has which port."""

    models: list[ModelConfig]
    controller_port: int
    starting_port: int
    previous: dict[str, int]
    is_free: Callable[[ModelConfig, int], bool]
    held: dict[str, int]
    ranges: dict[str, tuple[int, int]]
    result: dict[str, int] = field(default_factory=dict)
    taken: set[int] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.taken.add(self.controller_port)
        for entry in self.models:  # pinned ports first: nothing moves them
            if entry.fixed_port is not None:
                self.result[entry.name] = entry.fixed_port
                self.taken.add(entry.fixed_port)
        self.taken.update(port for name, port in self.held.items() if self.result.get(name, port) == port)

    def usable(self, entry: ModelConfig, port: int) -> bool:
        return self.held.get(entry.name) == port or (port not in self.taken and self.is_free(entry, port))

    def span(self, entry: ModelConfig) -> tuple[int, int]:
        return (
            self.ranges[entry.port_range] if entry.port_range is not None else (self.starting_port, MAX_PORT)
        )

    def keep_previous(self) -> None:
        """Everyone whose previous port is still usable (and in its range) keeps it, before any newcomer
        is placed, so hub.yaml order never moves a model. Ports remembered for models that left the
        config stay reserved too: a model that comes back gets its old URL."""
        for entry in self.models:
            old = self.previous.get(entry.name)
            low, high = self.span(entry)
            if (
                entry.name not in self.result
                and old is not None
                and low <= old <= high
                and self.usable(entry, old)
            ):
                self.result[entry.name] = old
                self.taken.add(old)
        self.taken.update(port for name, port in self.previous.items() if name not in self.result)

    def place_newcomers(self) -> None:
        """Newcomers (and models whose old port was taken) get the lowest free port of their span."""
        for entry in self.models:
            if entry.name in self.result:
                continue
            low, high = self.span(entry)
            port = next((p for p in range(low, high + 1) if self.usable(entry, p)), None)
            if port is None:
                where = f"range '{entry.port_range}' ({low}-{high})" if entry.port_range else f"{low} upwards"
                raise PortError(f"no free port in {where} for model '{entry.name}'")
            if entry.name in self.previous:
                log.warning(
                    "model '%s': its previous port %d is taken; now on %d",
                    entry.name,
                    self.previous[entry.name],
                    port,
                )
            self.result[entry.name] = port
            self.taken.add(port)


class PortBook:
    """The persisted name-to-port assignments of one hub (``<log_path>/ports.json``)."""

    def __init__(self, path: Path):
        self.path = path

    @classmethod
    def for_config(cls, cfg: HubConfig) -> PortBook:
        return cls(cfg.log_dir / PORTS_FILE)

    def load(self) -> dict[str, int]:
        data = read_json(self.path, {})
        if not isinstance(data, dict):
            return {}
        return {str(k): v for k, v in data.items() if isinstance(v, int) and not isinstance(v, bool)}

    def release_missing(self, cfg: HubConfig) -> dict[str, int]:
        """Forget the ports of models no longer in ``cfg`` (``reconcile``); returns what was released."""
        book = self.load()
        names = {m.name for m in cfg.models}
        released = {n: p for n, p in book.items() if n not in names}
        if released:
            atomic_write_json(self.path, {n: p for n, p in book.items() if n in names})
        return released

    def assign(self, cfg: HubConfig, held: dict[str, int] | None = None) -> dict[str, int]:
        """Assign ports for ``cfg`` and persist them (merged with other names seen before)."""
        previous = self.load()
        assigned = assign_ports(
            cfg.models,
            controller_port=cfg.port,
            starting_port=cfg.model_starting_port,
            previous=previous,
            is_free=lambda entry, port: is_port_free(cfg.host_of(entry), port),  # where it will listen
            held=held,
            ranges=cfg.port_ranges,
        )
        # Keep entries for models that left the config, so a model that comes
        # back gets its old port, unless a current model now holds that port.
        in_use = set(assigned.values())
        merged = {n: p for n, p in previous.items() if n not in assigned and p not in in_use}
        merged.update(assigned)
        if merged != previous:
            try:
                atomic_write_json(self.path, merged)
            except OSError as exc:
                # Serving matters more than remembering: the old file stays
                # intact (the write is atomic) and the hub carries on.
                log.warning("could not save %s (%s); ports may differ after a restart", self.path, exc)
        return assigned


def team_spans(cfg: HubConfig) -> dict[str, tuple[int, int]]:
    """The port ranges this hub draws from: each named ``port_ranges`` entry, and the automatic block.

    The automatic block runs from ``model_starting_port`` over as many ports
    as there are models drawing from it (the ports it would hand out).
    """
    spans = dict(cfg.port_ranges)
    automatic = sum(1 for m in cfg.models if m.port is None)
    if automatic:
        spans["auto"] = (cfg.model_starting_port, cfg.model_starting_port + automatic - 1)
    return spans


def foreign_listeners(cfg: HubConfig, ours: set[int], timeout: float = 0.2) -> dict[int, str]:
    """Ports in this hub's ranges (and pinned model ports) where something that is not this hub listens.

    ``ours`` are the ports this hub serves right now. A connect, not a bind,
    tells a listener from a free port without disturbing either.
    """
    where: dict[int, str] = {}
    for name, (low, high) in team_spans(cfg).items():
        for port in range(low, high + 1):
            where.setdefault(port, f"range {name}" if name != "auto" else "automatic ports")
    for entry in cfg.models:
        if entry.fixed_port is not None:
            where.setdefault(entry.fixed_port, f"model '{entry.name}'")
    host = connect_host(cfg.host)
    found = {}
    for port in sorted(set(where) - ours):
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=timeout):
            found[port] = where[port]
    return found
