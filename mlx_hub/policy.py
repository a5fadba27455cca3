"""Pure decisions about which model loads, waits, or gives way. No I/O, no clocks.

Callers pass in a snapshot of each model (``Candidate``) and the current time,
so every rule here is a plain function tested without a server.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Candidate:
    """What a policy needs to know about one model at one instant."""

    name: str
    loaded: bool  # holds weights, or is loading or unloading them
    busy: bool  # a request is running or waiting for it
    last_used: float  # monotonic seconds: the last request's end, or the load's end
    group: str | None = None
    jit: bool = False
    auto_unload_seconds: float | None = None


def is_idle_expired(model: Candidate, now: float) -> bool:
    """A JIT model with an idle timer that ran out, and nothing in flight."""
    if not (model.loaded and model.jit and model.auto_unload_seconds is not None):
        return False
    return not model.busy and now - model.last_used >= model.auto_unload_seconds


def idle_expired(models: Iterable[Candidate], now: float) -> list[str]:
    """Names of models the idle reaper should unload now."""
    return [m.name for m in models if is_idle_expired(m, now)]


def seconds_until_idle_unload(model: Candidate, now: float) -> float | None:
    """Countdown for status displays; None where no timer runs (busy, no timer, unloaded)."""
    if not (model.loaded and model.jit and model.auto_unload_seconds is not None) or model.busy:
        return None
    return max(0.0, model.auto_unload_seconds - (now - model.last_used))


@dataclass(frozen=True)
class GroupDecision:
    """``admit``: load now. ``evict``: unload that model first, then ask again. Else wait."""

    admit: bool
    evict: str | None = None

    @property
    def wait(self) -> bool:
        return not self.admit and self.evict is None


def group_admission(
    loading: str,
    members: Sequence[Candidate],
    *,
    max_loaded: int | None,
    now: float,
    min_idle_seconds: float | None = None,
) -> GroupDecision:
    """May ``loading`` take a place in its group?

    Below ``max_loaded`` it may. At the cap, the least recently used member
    with nothing in flight gives way; with ``idle_unload_trigger_min`` set, only
    members idle at least that long qualify (the reference hub's rule), so a
    model in active use is not thrown out by a neighbour's single request.
    If none qualifies the caller waits and asks again.
    """
    if max_loaded is None:
        return GroupDecision(admit=True)
    others = [m for m in members if m.name != loading and m.loaded]
    if len(others) < max_loaded:
        return GroupDecision(admit=True)
    victims = [
        m
        for m in others
        if not m.busy and (min_idle_seconds is None or now - m.last_used >= min_idle_seconds)
    ]
    if not victims:
        return GroupDecision(admit=False)
    return GroupDecision(admit=False, evict=min(victims, key=lambda m: m.last_used).name)
