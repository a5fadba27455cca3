"""Which names the hub answers to: the Host check that defeats DNS rebinding.

A web page on ``evil.test`` can make its name resolve to 127.0.0.1 after it
has loaded. The browser then sends the page's requests to the hub, as
same-origin requests of ``evil.test``: the Origin check passes (Origin and
Host are both ``evil.test``), the loopback check passes (the browser runs on
this machine), and the page reads the answers. What gives it away is the
Host header: a name the hub is not served under. So every port answers only
to ``localhost``, a loopback or this machine's own address, the configured
``host``, this machine's names, and hub.yaml's ``allowed_hosts`` (a name a
reverse proxy or the LAN uses, ``mac-studio.local``). An IP literal cannot be
rebound, so an address the connection really arrived on is always accepted.
A request without Host (HTTP/1.0, an in-process call) names nothing and passes.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import socket
from collections.abc import Callable, Iterable

from starlette.types import ASGIApp, Receive, Scope, Send

from mlx_hub.config.hostnames import normal_name
from mlx_hub.web.asgi import header
from mlx_hub.web.responses import error_json

#: Always this machine: the unspecified addresses reach it too (``curl http://0.0.0.0:8000``).
THIS_MACHINE = frozenset({"localhost", "0.0.0.0", "::"})

_machine_names: frozenset[str] | None = None  # this machine's names and addresses, looked up once


def host_name(value: str) -> str | None:
    """The name in a Host header, without its port: ``[::1]:8000`` is ``::1``; None if malformed."""
    value = value.strip()
    if value.startswith("["):
        name, bracket, rest = value[1:].partition("]")
        if not bracket or (rest and not (rest.startswith(":") and rest[1:].isdigit())):
            return None
        return normal_name(name)
    if value.count(":") == 1:
        value, _, port = value.partition(":")
        if not port.isdigit():
            return None
    return normal_name(value) or None  # several colons: a bare IPv6 literal, compared as it is


def _address(name: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(name.split("%", 1)[0])
    except ValueError:
        return None


def is_loopback(name: str) -> bool:
    """``localhost`` or a loopback address (``127.0.0.0/8``, ``::1``, ``::ffff:127.x.x.x``)."""
    if name == "localhost":
        return True
    address = _address(name)
    if address is None:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return address.is_loopback or bool(mapped and mapped.is_loopback)


def _same_address(name: str, server: object) -> bool:
    """The Host is the IP literal of the socket the request arrived on (never a name: names can be rebound)."""
    if not isinstance(server, tuple | list) or not server:
        return False
    ours, theirs = _address(name), _address(str(server[0]))
    return ours is not None and ours == theirs


def machine_names() -> frozenset[str]:
    """This machine's host name, short name, FQDN, and the addresses its name resolves to.

    A DNS lookup, slow where DNS is; asked for only when a Host is not
    otherwise known, and only once per process.
    """
    global _machine_names
    if _machine_names is not None:
        return _machine_names
    hostname = socket.gethostname()
    names = {hostname, hostname.split(".", 1)[0]}
    with contextlib.suppress(OSError):
        names.add(socket.getfqdn())
    with contextlib.suppress(OSError, UnicodeError):
        names.update(str(info[4][0]) for info in socket.getaddrinfo(hostname, None))
    _machine_names = frozenset(normal_name(n) for n in names if n)
    return _machine_names


@dataclasses.dataclass(frozen=True)
class AllowedHosts:
    """The names one port answers to, built once per configuration."""

    names: frozenset[str]
    suffixes: tuple[str, ...] = ()  # from ``*.example.com``: any name ending in ``.example.com``
    anything: bool = False  # ``*``: the check is off

    @classmethod
    def of(cls, hosts: Iterable[str]) -> AllowedHosts:
        """From the configured ``host`` values and ``allowed_hosts`` entries."""
        names, suffixes = set(THIS_MACHINE), []
        for host in hosts:
            name = normal_name(host)
            if name == "*":
                return cls(frozenset(names), (), anything=True)
            if name.startswith("*."):
                suffixes.append(name[1:])
            elif name:
                names.add(name)
        return cls(frozenset(names), tuple(suffixes))

    def known(self, name: str, server: object = None) -> bool:
        """Allowed without a DNS lookup: configured, loopback, or the address the request arrived on."""
        return (
            self.anything
            or name in self.names
            or name.endswith(self.suffixes)
            or is_loopback(name)
            or _same_address(name, server)
        )


class HostGuard:
    """403 for a request whose Host is not a name this hub is served under.

    ``hosts`` gives the port's configured ``host`` values and hub.yaml's
    ``allowed_hosts``, read per request so a reload applies at once; the
    allowed set is rebuilt only when they change.
    """

    def __init__(self, app: ASGIApp, hosts: Callable[[], tuple[str, ...]]):
        self.app = app
        self.hosts = hosts
        self._built: tuple[tuple[str, ...], AllowedHosts] | None = None

    def allowed(self) -> AllowedHosts:
        hosts = self.hosts()
        if self._built is None or self._built[0] != hosts:
            self._built = (hosts, AllowedHosts.of(hosts))
        return self._built[1]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        value = header(scope, b"host")
        name = host_name(value) if value else ""
        if name == "" or (name is not None and await self._allows(name, scope.get("server"))):
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})  # before accept: the client sees 403
            return
        message = (
            f"Host {value!r} is not a name this hub is served under, so the request was refused "
            "(a guard against DNS rebinding). To reach the hub by that name (a LAN name, a reverse "
            "proxy), add it to allowed_hosts in hub.yaml"
        )
        await error_json(403, message, "permission_error", "host_not_allowed")(scope, receive, send)

    async def _allows(self, name: str, server: object) -> bool:
        if self.allowed().known(name, server):
            return True
        names = _machine_names if _machine_names is not None else await asyncio.to_thread(machine_names)
        return name in names
