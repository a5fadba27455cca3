"""The supervisor's decisions and wire, without processes: backoff, giving up, blame, what comes back."""

from __future__ import annotations

import inspect
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from mlx_hub.service.supervision import (
    Crash,
    Launch,
    Reader,
    RestartPolicy,
    Snapshot,
    blame,
    describe_exit,
    next_launch,
    send,
)


def test_restarts_at_once_then_backs_off_to_a_minute() -> None:
    policy = RestartPolicy(max_restarts=100, window=10**9)
    delays = [policy.next_delay(now=float(i), ran_for=1.0) for i in range(10)]
    assert delays == [0, 1, 2, 4, 8, 16, 32, 60, 60, 60]


def test_five_healthy_minutes_reset_the_backoff() -> None:
    policy = RestartPolicy(max_restarts=100, window=10**9)
    assert [policy.next_delay(float(i), ran_for=5.0) for i in range(3)] == [0, 1, 2]
    assert policy.next_delay(1000.0, ran_for=300.0) == 0  # it ran five minutes: a fresh start
    assert policy.next_delay(1001.0, ran_for=1.0) == 1


def test_gives_up_after_max_restarts_within_ten_minutes() -> None:
    policy = RestartPolicy(max_restarts=5)
    assert all(policy.next_delay(float(i), ran_for=400.0) is not None for i in range(5))
    assert policy.next_delay(5.0, ran_for=400.0) is None  # a sixth crash within 600 s
    fresh = RestartPolicy(max_restarts=2)
    assert fresh.next_delay(0.0, 400.0) == 0 and fresh.next_delay(100.0, 400.0) == 0
    assert fresh.next_delay(700.0, 400.0) == 0  # the first restart has left the window
    assert RestartPolicy(max_restarts=0).next_delay(0.0, 1.0) is None  # 0: never restart


def test_a_crash_is_blamed_on_loads_and_on_a_lone_generation() -> None:
    assert blame(Snapshot(loading=["a"], generating=["b"])) == {"a": "loading", "b": "generating"}
    assert blame(Snapshot(generating=["a", "b"])) == {}  # two generating: neither can be blamed
    assert blame(Snapshot(loading=["a"], generating=["a"])) == {"a": "loading"}
    assert blame(Snapshot(loaded=["a"])) == {}


def test_the_restarted_hub_serves_and_loads_what_was_there() -> None:
    snapshot = Snapshot(
        serving=["a", "b", "j"], loaded=["a", "j"], loading=["b"], generating=["a"], ready=True
    )
    serve, load, held = next_launch(snapshot, first=["a", "z"], blamed=blame(snapshot), blamed_before={})
    assert serve == ["a", "b", "j"] and load == ["a", "j", "b"] and held == {}
    # Blamed for loading twice in a row: held back (its port still serves); the rest come back.
    serve, load, held = next_launch(snapshot, ["a"], {"b": "loading"}, {"b": "loading"})
    assert "b" in serve and "b" not in load and "crashed the hub while loading" in held["b"]
    assert "load-model b" in held["b"]
    # Blamed for different things, or not in a row: nothing is held back.
    assert next_launch(snapshot, ["a"], {"b": "loading"}, {"b": "generating"})[2] == {}
    # Died before it was ready: what it had been asked to start comes back too.
    early = Snapshot(serving=["a"], loading=["a"])
    assert next_launch(early, ["a", "z"], {"a": "loading"}, {})[0] == ["a", "z"]
    # A model the dead hub held back stays held back.
    kept = Snapshot(serving=["b"], held_back={"b": "why"}, ready=True)
    assert next_launch(kept, [], {}, {})[2] == {"b": "why"}


def test_exits_and_causes_read_as_people_say_them() -> None:
    assert describe_exit(-9) == (None, "SIGKILL") and describe_exit(-11) == (None, "SIGSEGV")
    assert describe_exit(-6) == (None, "SIGABRT") and describe_exit(3) == (3, None)
    crash = Crash(
        at=0.0,
        pid=1,
        exit_code=None,
        signal="SIGSEGV",
        loading=["a"],
        generating=[],
        blamed={"a": "loading"},
        held_back={},
        log_tail=[],
        uptime_seconds=1.0,
    )
    assert crash.cause() == "killed by SIGSEGV while a loading"
    assert crash.as_dict()["cause"] == crash.cause()


def test_a_launch_travels_through_the_environment() -> None:
    launch = Launch(serve=["a"], load=["a"], held_back={"b": "why"}, restarts=2, held_ports=[("0.0.0.0", 80)])
    assert Launch.from_env(launch.to_env()) == launch
    assert Launch.from_env(None) == Launch()


def test_sockets_travel_over_the_channel() -> None:
    ours, theirs = socket.socketpair()
    listener = socket.create_server(("127.0.0.1", 0))
    try:
        send(ours, {"op": "state", "serving": ["a"]})
        send(ours, {"ok": True}, [listener.fileno()])
        reader = Reader(theirs)
        first, none = reader.read()
        second, fds = reader.read()
        assert first == {"op": "state", "serving": ["a"]} and none == []
        assert second == {"ok": True} and len(fds) == 1
        received = socket.socket(fileno=fds[0])
        assert received.getsockname() == listener.getsockname()  # the same listening socket
        with socket.create_connection(listener.getsockname()):
            conn, _ = received.accept()  # the copy accepts what the original's backlog holds
            conn.close()
        received.close()
        ours.close()
        assert reader.read() is None  # the other side has gone
    finally:
        listener.close()
        theirs.close()


@pytest.mark.parametrize("module", ["mlx_hub.service.supervisor", "mlx_hub.cli.main"])
def test_the_supervisor_imports_no_mlx_torch_or_upstream(module: str) -> None:
    """It must not crash the way the hub can: nothing of MLX, torch, upstream or the hub core in it."""
    heavy = (
        "mlx",
        "mlx_lm",
        "mlx_vlm",
        "torch",
        "transformers",
        "app",
        "mlx_hub.core.hub",
        "mlx_hub.engine.mlx",
    )
    probe = f"import sys, {module}; print(sorted(m for m in sys.modules if m in {heavy!r}))"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_max_restarts_is_checked_in_hub_yaml() -> None:
    from mlx_hub.config import ConfigError, parse_config

    models = [{"name": "a", "model_path": "/x"}]
    assert parse_config({"models": models}).max_restarts == 5
    assert parse_config({"models": models, "max_restarts": 0}).max_restarts == 0
    with pytest.raises(ConfigError) as info:
        parse_config({"models": models, "max_restarts": -1})
    assert "field 'max_restarts'" in info.value.problems[0]


def test_a_stop_kills_a_hub_that_ignores_sigterm(tmp_path: Path) -> None:
    """The supervisor's stop sends SIGTERM, and SIGKILL once the grace has passed: a real child that
    ignores SIGTERM ends, and the wait for it returns."""
    from mlx_hub.config import parse_config
    from mlx_hub.service.supervisor import Supervisor

    config = parse_config({"models": [{"name": "a", "model_path": "/x"}], "log_path": str(tmp_path)})
    supervisor = Supervisor(tmp_path / "hub.yaml", config)
    supervisor.grace = 0.5
    stubborn = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print(flush=True); time.sleep(600)"
    child = supervisor.child = subprocess.Popen([sys.executable, "-c", stubborn], stdout=subprocess.PIPE)
    try:
        assert child.stdout is not None and child.stdout.readline() == b"\n"  # it ignores SIGTERM from here
        supervisor._stop(signal.SIGTERM, None)
        assert supervisor._wait(child) == -signal.SIGKILL
    finally:
        child.kill()
        child.wait(timeout=30)


def test_the_supervisor_never_waits_without_a_timeout() -> None:
    """Whatever the hub does, the supervisor (and so `shutdown`, which waits for it) is never stuck."""
    from mlx_hub.service import supervision, supervisor

    for module in (supervisor, supervision):
        unbounded = re.findall(r"\.(?:wait|join|communicate)\(\)", inspect.getsource(module))
        assert not unbounded, f"{module.__name__}: {unbounded}"


async def test_a_start_that_raises_ends_the_daemon_with_the_reason(
    hub_config, tiny_llama: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An error out of the models' start (an import that fails in the preload, say) used to leave the
    daemon running and never ready: the CLI waited out its timeout with nothing in hub.log."""
    import asyncio

    from mlx_hub.config import read_config
    from mlx_hub.service import api
    from mlx_hub.service.daemon import DaemonError, serve

    async def broken(self: object, names: object = None, **kwargs: object) -> list[str]:
        raise ModuleNotFoundError("import of torch halted; None in sys.modules")

    monkeypatch.setattr(api.Hub, "start", broken)
    config, _ = read_config(hub_config([{"name": "a", "model_path": str(tiny_llama)}]))
    with pytest.raises(DaemonError, match="the hub could not start: ModuleNotFoundError: import of torch"):
        await asyncio.wait_for(serve(config), 60)
    assert not (config.log_dir / "hub_runtime.json").exists()  # it cleaned up as any stop does
