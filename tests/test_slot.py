"""ModelSlot's two state machines: every legal move works, every other one raises."""

from __future__ import annotations

import itertools

import pytest

from mlx_hub.config import ModelConfig
from mlx_hub.core.slot import ModelSlot
from mlx_hub.core.states import MEMORY_MOVES, PORT_MOVES, MemoryState, PortState, StateError
from mlx_hub.engine.base import Loaded


def slot() -> ModelSlot:
    return ModelSlot(ModelConfig(name="m", model_path="/x"), 47850, "127.0.0.1")


@pytest.mark.parametrize(("start", "end"), list(itertools.product(PortState, PortState)))
def test_port_moves(start: PortState, end: PortState) -> None:
    s = slot()
    s.model_port.state = start
    if end in PORT_MOVES[start]:
        s.model_port.move(end, "why" if end is PortState.FAILED else None)
        assert s.port_state is end and s.port_changed_at is not None
        assert s.port_error == ("why" if end is PortState.FAILED else None)
    else:
        with pytest.raises(StateError, match=f"from {start} to {end}"):
            s.model_port.move(end)
        assert s.port_state is start


@pytest.mark.parametrize(("start", "end"), list(itertools.product(MemoryState, MemoryState)))
def test_memory_moves(start: MemoryState, end: MemoryState) -> None:
    s = slot()
    s.memory_state = start
    if end in MEMORY_MOVES[start]:
        s.move_memory(end, "broken")
        assert s.memory_state is end
        assert (s.memory_error == "broken") is (end is MemoryState.FAILED)
    else:
        with pytest.raises(StateError):
            s.move_memory(end)
        assert s.memory_state is start


def test_a_load_and_an_unload_through_the_slot() -> None:
    s = slot()
    s.move_memory(MemoryState.LOADING)
    handler = object()
    s.loaded(Loaded(handler=handler, memory_bytes=1234, load_seconds=0.5))
    assert (s.memory_state, s.handler, s.memory_bytes, s.load_count) == (MemoryState.LOADED, handler, 1234, 1)
    with pytest.raises(StateError):
        s.release_handler()  # only while unloading
    s.begin_request()
    assert s.busy and s.active == 1
    s.end_request()
    assert not s.busy
    s.move_memory(MemoryState.UNLOADING)
    assert s.release_handler() is handler and s.handler is None
    s.unloaded(1200)
    assert (s.memory_state, s.memory_bytes, s.freed_bytes) == (MemoryState.UNLOADED, 0, 1200)
    with pytest.raises(StateError):
        s.loaded(Loaded(handler=handler, memory_bytes=1, load_seconds=0.1))  # not loading
