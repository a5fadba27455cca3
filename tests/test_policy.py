"""The pure policies: idle expiry and group admission/eviction order."""

from __future__ import annotations

import math

import pytest

from mlx_hub.core.policy import (
    Candidate,
    Placement,
    group_admission,
    idle_expired,
    reload_plan,
    seconds_until_idle_unload,
)


def c(name: str, *, loaded: bool = True, busy: bool = False, last_used: float = 0.0, **kw) -> Candidate:
    return Candidate(name=name, loaded=loaded, busy=busy, last_used=last_used, **kw)


def test_idle_expiry_needs_jit_timer_and_quiet() -> None:
    models = [
        c("expired", jit=True, auto_unload_seconds=60, last_used=0),
        c("fresh", jit=True, auto_unload_seconds=60, last_used=50),
        c("busy", jit=True, auto_unload_seconds=60, last_used=0, busy=True),
        c("no-timer", jit=True, last_used=0),
        c("unloaded", jit=True, auto_unload_seconds=60, loaded=False),
    ]
    assert idle_expired(models, now=100) == ["expired"]
    assert seconds_until_idle_unload(models[1], now=100) == 10
    assert seconds_until_idle_unload(models[2], now=100) is None


def test_below_cap_admits() -> None:
    d = group_admission("b", [c("a"), c("b", loaded=False)], max_loaded=2, now=10)
    assert d.admit and d.evict is None


def test_no_cap_admits() -> None:
    assert group_admission("b", [c("a"), c("c")], max_loaded=None, now=10).admit


def test_at_cap_evicts_least_recently_used_idle_member() -> None:
    members = [
        c("x", last_used=5),
        c("y", last_used=1, busy=True),
        c("z", last_used=3),
        c("new", loaded=False),
    ]
    d = group_admission("new", members, max_loaded=3, now=10)
    assert not d.admit and d.evict == "z"  # y is older but busy


def test_at_cap_with_everyone_busy_waits() -> None:
    d = group_admission("new", [c("x", busy=True), c("new", loaded=False)], max_loaded=1, now=10)
    assert d.wait


def test_idle_trigger_protects_recently_used_members() -> None:
    members = [c("x", last_used=95), c("y", last_used=30), c("new", loaded=False)]
    assert group_admission("new", members, max_loaded=2, now=100, min_idle_seconds=60).evict == "y"
    members = [c("x", last_used=95), c("new", loaded=False)]
    assert group_admission("new", members, max_loaded=1, now=100, min_idle_seconds=60).wait


def test_budget_admits_what_fits_and_evicts_lru_idle_unpinned() -> None:
    from mlx_hub.core.policy import budget_admission

    held = [
        c("old", size=40, last_used=1),
        c("pinned", size=30, last_used=0, pinned=True),
        c("busy", size=20, last_used=0, busy=True),
    ]
    assert budget_admission("new", 10, held, budget=100).admit  # 90 + 10 fits exactly
    d = budget_admission("new", 20, held, budget=100)
    assert not d.admit and d.evict == "old"  # the only idle, unpinned one
    assert budget_admission("new", 200, held, budget=100).impossible  # never fits, even alone
    assert budget_admission("new", 60, held[1:], budget=100).wait  # pinned and busy never give way
    assert budget_admission("new", 10**12, held, budget=None).admit  # no budget, no limit


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (0, 0.0),
        (90, 90.0),
        ("45s", 45.0),
        ("10m", 600.0),
        ("1h30m", 5400.0),
        ("250ms", 0.25),
        (-1, math.inf),
        ("-5m", math.inf),
        ("12", 12.0),
    ],
)
def test_keep_alive_accepts_ollamas_forms(value: object, seconds: float) -> None:
    from mlx_hub.core.policy import parse_keep_alive

    assert parse_keep_alive(value) == seconds


@pytest.mark.parametrize("value", [True, "soon", "10x", "m10", [5], None, float("nan")])
def test_keep_alive_rejects_the_rest(value: object) -> None:
    from mlx_hub.core.policy import parse_keep_alive

    with pytest.raises(ValueError, match="keep_alive"):
        parse_keep_alive(value)


def p(name: str, runtime: object = "r", port: int = 1, host: str = "h", default: bool = False) -> Placement:
    return Placement(name, runtime, port, host, default)


def test_reload_plan_keeps_replaces_removes_and_restarts() -> None:
    current = [p("same"), p("options", "old"), p("moved", port=1), p("gone"), p("idle", "old")]
    wanted = [
        p("new", default=True),
        p("options", "new"),
        p("moved", port=2),
        p("same"),
        p("idle", "new"),
        p("quiet"),
    ]
    plan = reload_plan(current, {"same", "options", "moved"}, wanted)
    assert plan.keep == ["same"]
    assert plan.replace == ["new", "options", "moved", "idle", "quiet"]  # the new file's order
    assert plan.remove == ["gone"]
    # Restarted: defaults, and models that were running; "idle" was not, "quiet" is not a default.
    assert plan.start == ["new", "options", "moved"]


def test_budget_prefers_victims_that_free_something_over_sharers() -> None:
    from mlx_hub.core.policy import budget_admission

    # "a" and "b" share one copy that "a" carries; unloading either alone frees ~nothing.
    held = [
        c("a", size=600, frees=0, last_used=0),
        c("b", size=0, frees=0, last_used=1),
        c("solo", size=300, last_used=5),
    ]
    assert budget_admission("new", 300, held, budget=1000).evict == "solo"  # frees 300, though newer
    d = budget_admission("new", 700, held[:2], budget=1000)
    assert d.evict == "a"  # only sharers are left: they go, least recently used first
