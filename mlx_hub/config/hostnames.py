"""Host names in hub.yaml's ``allowed_hosts``: the names (besides its own) the hub answers to.

Each entry is what a client puts in its Host header, without the port: a
name (``mac-studio.local``), an address (``192.168.1.20``, ``::1`` or
``[::1]``), ``*.example.com`` for every name under a domain, or ``*`` for any
name at all (the Host check off). web/hosts.py compares them.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any

_LABEL = re.compile(r"^[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?$")


def normal_name(value: str) -> str:
    """A name as the Host check compares it: lower case, no brackets, no trailing dot."""
    name = value.strip().lower()
    if name.startswith("[") and name.endswith("]"):
        name = name[1:-1]
    return name.rstrip(".")


def _is_address(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _is_name(name: str) -> bool:
    return 0 < len(name) <= 253 and all(_LABEL.fullmatch(label) for label in name.split("."))


def check_host(value: Any) -> str:
    """One ``allowed_hosts`` entry, or a ValueError that says what to write instead."""
    name = normal_name(value) if isinstance(value, str) else ""
    if name == "*" or _is_address(name) or _is_name(name.removeprefix("*.")):
        return value
    raise ValueError(
        f"allowed_hosts entry {value!r} is not a host name: write the name a client puts in its URL, "
        "without scheme, port or path (mac-studio.local, 192.168.1.20, *.example.com, or * for any)"
    )
