"""Pure decisions about which model loads, waits, or gives way. No I/O, no clocks.

Callers pass in a snapshot of each model (``Candidate``) and the current time,
so every rule here is a plain function tested without a server.
"""

from __future__ import annotations

import math
import re
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
    size: int = 0  # bytes it accounts for: measured once loaded, estimated while loading
    pinned: bool = False  # never evicted, by a group or by the memory budget
    frees: int | None = (
        None  # bytes its unload gives back, if not ``size`` (weights another model shares stay)
    )
    reserved: int = 0  # bytes its requests in flight reserve (KV cache and prefill working memory)
    evictable: int = 0  # of ``size``, what it can drop without unloading (its prompt cache)


def is_idle_expired(model: Candidate, now: float) -> bool:
    """A JIT model with an idle timer that ran out, and nothing in flight."""
    if not (model.loaded and model.jit and model.auto_unload_seconds is not None):
        return False
    return not model.busy and now - model.last_used >= model.auto_unload_seconds


def idle_expired(models: Iterable[Candidate], now: float) -> list[str]:
    """Names of models the idle reaper should unload now."""
    return [m.name for m in models if is_idle_expired(m, now)]


def idle_timeout(
    keep_alive: float | None, minutes: float | None, group_minutes: float | None
) -> float | None:
    """Seconds idle before unloading: a request's keep_alive, else the entry's ``auto_unload_minutes``,
    else its group's ``idle_unload_trigger_min`` (the group's idle rule, where the member sets none)."""
    if keep_alive is not None:
        return None if keep_alive == float("inf") else keep_alive
    if minutes is None:
        minutes = group_minutes
    return None if minutes is None else minutes * 60.0


def seconds_until_idle_unload(model: Candidate, now: float) -> float | None:
    """Countdown for status displays; None where no timer runs (busy, no timer, unloaded)."""
    if not (model.loaded and model.jit and model.auto_unload_seconds is not None) or model.busy:
        return None
    return max(0.0, model.auto_unload_seconds - (now - model.last_used))


@dataclass(frozen=True)
class Admission:
    """``admit``: load now. ``evict``: unload that model first, then ask again.

    Neither: wait for a change and ask again; ``impossible``: waiting cannot help.
    """

    admit: bool
    evict: str | None = None
    impossible: bool = False

    @property
    def wait(self) -> bool:
        return not self.admit and self.evict is None and not self.impossible


ADMIT = Admission(admit=True)


def _least_recently_used(victims: Sequence[Candidate]) -> Admission:
    if not victims:
        return Admission(admit=False)
    return Admission(admit=False, evict=min(victims, key=lambda m: m.last_used).name)


def group_admission(
    loading: str,
    members: Sequence[Candidate],
    *,
    max_loaded: int | None,
    now: float,
    min_idle_seconds: float | None = None,
) -> Admission:
    """May ``loading`` take a place in its group?

    Below ``max_loaded`` it may. At the cap, the least recently used member
    with nothing in flight gives way; with ``idle_unload_trigger_min`` set, only
    members idle at least that long qualify (the reference hub's rule), so a
    model in active use is not thrown out by a neighbour's single request.
    If none qualifies the caller waits and asks again.
    """
    if max_loaded is None:
        return ADMIT
    others = [m for m in members if m.name != loading and m.loaded]
    if len(others) < max_loaded:
        return ADMIT
    return _least_recently_used(
        [
            m
            for m in others
            if not m.busy
            and not m.pinned
            and (min_idle_seconds is None or now - m.last_used >= min_idle_seconds)
        ]
    )


def budget_admission(
    loading: str, need: int, models: Sequence[Candidate], *, budget: int | None
) -> Admission:
    """Does ``need`` more bytes fit under ``budget`` beside the models already held?

    If not, the least recently used idle, unpinned model (any group) gives way,
    one at a time until it fits. A model bigger than the whole budget is
    ``impossible``; everyone busy or pinned means wait.
    """
    if budget is None:
        return ADMIT
    if need > budget:
        return Admission(admit=False, impossible=True)
    others = [m for m in models if m.name != loading and m.loaded]
    if sum(m.size + m.reserved for m in others) + need <= budget:
        return ADMIT
    return _evict_for(others)


def _evict_for(others: Sequence[Candidate]) -> Admission:
    """The least recently used idle, unpinned model of ``others`` to unload, or wait if there is none."""
    victims = [m for m in others if not m.busy and not m.pinned]
    # Unloading a model whose weights another loaded model shares frees only its
    # own part: models that free something go first; sharers only when nothing
    # else is left (the last of them then frees the copy).
    freeing = [m for m in victims if (m.size if m.frees is None else m.frees) > 0]
    return _least_recently_used(freeing or victims)


def request_admission(
    model: str, need: int, models: Sequence[Candidate], *, budget: int | None, alone: int | None = None
) -> Admission:
    """May a request that reserves ``need`` bytes start on ``model`` (which is loaded) now?

    Everything held counts: every loaded model's bytes (weights and prompt
    caches) plus the reservations of the requests already in flight, each
    batched request on its own. If that plus ``need`` fits ``budget`` it starts;
    else idle unpinned models give way as for a load, least recently used first;
    else the caller waits. A request that would not fit beside its own model's
    weights even with everything else unloaded (and its own prompt cache
    dropped) is ``impossible``; ``alone`` is what it would need then, if not
    ``need`` (a batch's padding is not there when the request runs alone).
    """
    if budget is None:
        return ADMIT
    own = next((m for m in models if m.name == model), None)
    if (own.size - own.evictable if own is not None else 0) + (need if alone is None else alone) > budget:
        return Admission(admit=False, impossible=True)
    held = [m for m in models if m.loaded]
    if sum(m.size + m.reserved for m in held) + need <= budget:
        return ADMIT
    return _evict_for([m for m in held if m.name != model])


def batch_padding(own_kv: int, in_flight_kv: Sequence[int], reserved_kv: int) -> int:
    """Extra KV bytes a request joining a model's batch reserves: a batch pads every sequence to its longest.

    mlx-lm's batched cache holds each of the batch's ``n`` sequences at the
    longest one's length, so the batch's KV is ``n x longest``, not the sum of
    each request's own. ``reserved_kv`` is what the batch's requests already
    reserve for KV (their own and their padding); the newcomer adds what is
    missing for the batch it joins.
    """
    longest = max([own_kv, *in_flight_kv])
    return max(0, (len(in_flight_kv) + 1) * longest - reserved_kv - own_kv)


_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_keep_alive(value: object) -> float:
    """A request's ``keep_alive`` in seconds: ``math.inf`` for never, 0 for right after.

    Accepts what Ollama users send: a number of seconds, a negative number
    for "never", or a duration string like ``"10m"``, ``"1h30m"``, ``"45s"``.
    """
    if isinstance(value, bool):
        raise ValueError("keep_alive must be seconds or a duration like '10m', not a boolean")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip().lower()
        try:
            seconds = float(text)
        except ValueError:
            negative = text.startswith("-")
            body = text.lstrip("-")
            parts = _DURATION.findall(body)
            if not parts or "".join(n + u for n, u in parts) != body:
                raise ValueError(f"keep_alive {value!r} is not seconds or a duration like '10m'") from None
            seconds = sum(float(n) * _UNIT_SECONDS[u] for n, u in parts) * (-1 if negative else 1)
    else:
        raise ValueError(f"keep_alive must be seconds or a duration like '10m', not {type(value).__name__}")
    if math.isnan(seconds):
        raise ValueError("keep_alive must be a number")
    return math.inf if seconds < 0 else seconds


@dataclass(frozen=True)
class Placement:
    """Where one entry serves: what a reload compares between the running hub and the new config."""

    name: str
    runtime: object  # anything that compares equal exactly when nothing that matters changed
    port: int
    host: str
    default: bool = False


@dataclass(frozen=True)
class ReloadPlan:
    """What a reload does: ``remove`` and ``replace`` stop first, then ``start`` starts."""

    remove: list[str]  # no longer configured
    keep: list[str]  # unchanged: same runtime options, port and host; left running as they are
    replace: list[str]  # new, or changed in a way that needs a fresh slot (new config's order)
    start: list[str]  # of ``replace``: the defaults, and those that were running before


def reload_plan(current: Sequence[Placement], running: set[str], wanted: Sequence[Placement]) -> ReloadPlan:
    """Diff the running hub against a new config, entry by entry."""
    now = {p.name: p for p in current}
    wanted_names = {p.name for p in wanted}
    keep, replace, start = [], [], []
    for new in wanted:
        old = now.get(new.name)
        if old is not None and (old.runtime, old.port, old.host) == (new.runtime, new.port, new.host):
            keep.append(new.name)
            continue
        replace.append(new.name)
        if new.default or new.name in running:
            start.append(new.name)
    remove = sorted(name for name in now if name not in wanted_names)
    return ReloadPlan(remove=remove, keep=keep, replace=replace, start=start)
