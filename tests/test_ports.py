"""Port assignment policy and its persistence."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from mlx_hub.config import ModelConfig, parse_config
from mlx_hub.core.ports import PortBook, PortError, assign_ports, bind_socket

from .helpers import free_port


def entries(*specs: tuple[str, int | None]) -> list[ModelConfig]:
    return [ModelConfig(name=n, model_path="x", port=p) for n, p in specs]


def test_explicit_ports_first_then_auto_skipping_controller_and_busy() -> None:
    busy = {47851}
    got = assign_ports(
        entries(("a", None), ("b", 47852), ("c", None), ("d", None)),
        controller_port=47850,
        starting_port=47850,
        previous={},
        is_free=lambda m, p: p not in busy,
    )
    assert got == {"b": 47852, "a": 47853, "c": 47854, "d": 47855}


def test_previous_assignments_are_reused_if_still_free() -> None:
    got = assign_ports(
        entries(("new", None), ("old", None)),
        controller_port=8000,
        starting_port=47850,
        previous={"old": 47860},
        is_free=lambda m, p: True,
    )
    assert got == {"new": 47850, "old": 47860}


def test_previous_port_taken_by_a_stranger_moves_on() -> None:
    got = assign_ports(
        entries(("old", None)),
        controller_port=8000,
        starting_port=47850,
        previous={"old": 47860},
        is_free=lambda m, p: p != 47860,
    )
    assert got == {"old": 47850}


def test_ports_we_hold_count_as_ours() -> None:
    # During a reload our own listeners make the probe say "busy".
    got = assign_ports(
        entries(("a", None), ("b", None)),
        controller_port=8000,
        starting_port=47850,
        previous={"a": 47850, "b": 47851},
        is_free=lambda m, p: False if p in (47850, 47851) else True,
        held={"a": 47850, "b": 47851},
    )
    assert got == {"a": 47850, "b": 47851}


def test_portbook_persists_and_survives_corruption(tmp_path: Path) -> None:
    start = free_port()
    doc = {"host": "127.0.0.1", "port": free_port(), "model_starting_port": start, "log_path": str(tmp_path)}
    first = parse_config(
        {**doc, "models": [{"name": "a", "model_path": "x"}, {"name": "b", "model_path": "x"}]}
    )
    book = PortBook.for_config(first)
    ports = book.assign(first)
    assert json.loads((tmp_path / "ports.json").read_text()) == ports
    # b first now, and a new model in between: everyone keeps their port.
    second = parse_config(
        {
            **doc,
            "models": [
                {"name": "b", "model_path": "x"},
                {"name": "c", "model_path": "x"},
                {"name": "a", "model_path": "x"},
            ],
        }
    )
    again = book.assign(second)
    assert again["a"] == ports["a"] and again["b"] == ports["b"] and again["c"] not in ports.values()
    (tmp_path / "ports.json").write_text("{not json")
    assert book.load() == {}
    assert not list(tmp_path.glob(".ports.json.*"))  # no temporary files left behind


def test_bind_socket_names_a_taken_port() -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        with pytest.raises(PortError, match=f"port {port} on 127.0.0.1 is already in use"):
            bind_socket("127.0.0.1", port)


def test_auto_range_takes_the_lowest_free_port_in_its_range() -> None:
    models = [
        ModelConfig(name=n, model_path="x", port=p)
        for n, p in (("a", "auto:team"), ("b", "auto:team"), ("c", None))
    ]
    got = assign_ports(
        models,
        controller_port=8000,
        starting_port=47850,
        previous={},
        is_free=lambda m, p: p != 47901,
        ranges={"team": (47900, 47910)},
    )
    assert got == {"a": 47900, "b": 47902, "c": 47850}


def test_previous_port_outside_the_range_is_not_kept() -> None:
    models = [ModelConfig(name="a", model_path="x", port="auto:exp")]
    got = assign_ports(
        models,
        controller_port=8000,
        starting_port=47850,
        previous={"a": 47850},
        is_free=lambda m, p: True,
        ranges={"exp": (48000, 48001)},
    )
    assert got == {"a": 48000}


def test_full_range_names_the_range() -> None:
    models = [ModelConfig(name=n, model_path="x", port="auto:tiny") for n in ("a", "b")]
    with pytest.raises(PortError, match=r"no free port in range 'tiny' \(48000-48000\) for model 'b'"):
        assign_ports(
            models,
            controller_port=8000,
            starting_port=47850,
            previous={},
            is_free=lambda m, p: True,
            ranges={"tiny": (48000, 48000)},
        )


def test_portbook_places_auto_range_ports_inside_their_range(tmp_path: Path) -> None:
    low = free_port()
    cfg = parse_config(
        {
            "host": "127.0.0.1",
            "port": free_port(),
            "log_path": str(tmp_path),
            "port_ranges": {"team": [low, min(low + 20, 65535)]},
            "models": [{"name": "a", "model_path": "x", "port": "auto:team"}],
        }
    )
    port = PortBook.for_config(cfg).assign(cfg)["a"]
    assert low <= port <= low + 20
    assert json.loads((tmp_path / "ports.json").read_text()) == {"a": port}
