"""The pure policies: idle expiry and group admission/eviction order."""

from __future__ import annotations

from mlx_hub.policy import Candidate, group_admission, idle_expired, seconds_until_idle_unload


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
