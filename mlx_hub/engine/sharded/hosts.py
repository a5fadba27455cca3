"""Where each rank of a sharded model runs, and the files MLX's backends read to find each other.

``hosts`` (one rank per item) and mlx.launch's JSON hostfile (``[{"ssh": ...,
"ips": [...], "rdma": [...]}]``) both become a list of ``RankPlace``. A place
on this machine is started directly; any other through ``ssh``, as mlx.launch
does. No MLX is imported here: the hub's process never joins the group.
"""

from __future__ import annotations

import ipaddress
import json
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlx_hub.config.distributed import DistributedConfig


class PlacementError(ValueError):
    """The hosts cannot form a group as written; the message names the host and what to do."""


@dataclass(frozen=True)
class RankPlace:
    """One rank: its number, the host as written (the ssh name), the address peers reach it on."""

    rank: int
    host: str
    ip: str
    local: bool
    rdma: tuple[str | None, ...] = ()  # jaccl: this rank's device towards each other rank


def own_addresses() -> frozenset[str]:
    """Names and addresses that mean this machine (loopback included)."""
    names = {"localhost", socket.gethostname(), socket.getfqdn()}
    addresses: set[str] = set()
    for name in list(names):
        try:
            addresses.update(info[4][0] for info in socket.getaddrinfo(name, None))
        except OSError:
            continue
    return frozenset(n.lower() for n in names | addresses)


def _is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def _resolve(host: str) -> str:
    try:
        ipaddress.ip_address(host)
        return host
    except ValueError:
        pass
    try:
        return socket.getaddrinfo(host, None, socket.AF_INET)[0][4][0]
    except OSError as exc:
        raise PlacementError(
            f"host {host!r} cannot be resolved ({exc}); give its address, or fix its name"
        ) from None


def _entries(cfg: DistributedConfig) -> list[dict[str, Any]]:
    if cfg.hosts is not None:
        return [{"ssh": h, "ips": []} for h in cfg.hosts]
    path = Path(str(cfg.hostfile)).expanduser()
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise PlacementError(f"hostfile {path} cannot be read: {exc}") from None
    if (
        not isinstance(data, list)
        or len(data) < 2
        or not all(isinstance(h, dict) and h.get("ssh") for h in data)
    ):
        raise PlacementError(
            f'hostfile {path} must be a JSON list of at least two {{"ssh": host, "ips": [address]}} objects'
        )
    return data


def places(cfg: DistributedConfig) -> list[RankPlace]:
    """Every rank's place, rank 0 first; ``PlacementError`` if a host cannot be placed."""
    mine = own_addresses()
    out = []
    for rank, item in enumerate(_entries(cfg)):
        host = str(item["ssh"])
        ips = [str(ip) for ip in item.get("ips") or []]
        ip = ips[0] if ips else _resolve(host)
        # A hostfile's ssh name decides: its ips are how the ranks reach each other, not where it runs.
        local = (
            host.lower() in mine
            or _is_loopback(host)
            or (not ips and (ip.lower() in mine or _is_loopback(ip)))
        )
        out.append(RankPlace(rank, host, ip, local, tuple(item.get("rdma") or ())))
    if cfg.hosts is not None and any(not p.local for p in out) and any(_is_loopback(p.ip) for p in out):
        where = next(p for p in out if _is_loopback(p.ip))
        raise PlacementError(
            f"rank {where.rank} is on {where.host} ({where.ip}), which the other machines cannot reach; "
            "list this machine by its network address or name"
        )
    if cfg.backend == "jaccl" and not all(len(p.rdma) == len(out) for p in out):
        raise PlacementError(
            "backend jaccl needs a hostfile whose every host lists an rdma device per rank "
            "(write it with `mlx.distributed_config --backend jaccl --auto-setup`)"
        )
    return out


def ring_hostfile(group: list[RankPlace], first_port: int) -> str:
    """The ring backend's ``MLX_HOSTFILE`` content: one ``ip:port`` per rank, ports counting up."""
    return json.dumps([[f"{p.ip}:{first_port + p.rank}"] for p in group])


def jaccl_devices(group: list[RankPlace]) -> str:
    """jaccl's ``MLX_IBV_DEVICES`` content: each rank's device towards every other (null for itself)."""
    return json.dumps([list(p.rdma) for p in group])
