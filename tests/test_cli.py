"""The CLI against a real detached daemon: every command, kills, signals and reloads."""

from __future__ import annotations

import json
import os
import pty
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml

from .helpers import Drain, free_port, free_range

ENV = {**os.environ, "COLUMNS": "200", "HF_HUB_OFFLINE": "1", "NO_COLOR": "1"}


def cli(
    config: Path, *args: str, timeout: float = 180, env_extra: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mlx_hub.cli", *args, "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**ENV, **(env_extra or {})},
    )


def runtime(log_dir: Path) -> dict[str, Any] | None:
    path = log_dir / "hub_runtime.json"
    return json.loads(path.read_text()) if path.exists() else None


def wait_gone(pid: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        try:  # a zombie of ours: reap it
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return
        except ChildProcessError:
            try:  # not ours: gone once its /proc entry is, or a zombie its parent has yet to reap
                state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except FileNotFoundError:  # it ended between the two looks
                return
            if state == "Z":
                return
        time.sleep(0.1)
    raise AssertionError(f"pid {pid} still running")


def interrupt_in_terminal(command: list[str], once_shown: str, timeout: float = 60) -> tuple[int, str]:
    """Run ``command`` on a pseudo-terminal, press Ctrl-C once ``once_shown`` is on screen.

    Waiting for the screen, not a fixed sleep, keeps a slow machine from
    interrupting the command while it is still importing. The screen is read
    all along, also while the command exits: a full terminal would block its
    last redraw, and it would never exit.
    """
    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        command,
        stdin=follower,
        stdout=follower,
        stderr=follower,
        env=ENV,
    )
    os.close(follower)
    screen = Drain(open(leader, "rb", buffering=0))
    try:
        if not screen.wait_for(once_shown, timeout):
            raise AssertionError(f"{once_shown!r} never appeared:\n{screen.text}")
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    return code, screen.finish()


def test_the_terminal_is_read_while_the_command_exits() -> None:
    """A command that writes much as it ends (watch's last redraw) is not left blocked on a full terminal."""
    script = (
        "import sys, time\ntry:\n    print('ready', flush=True)\n    time.sleep(120)\n"
        "except KeyboardInterrupt:\n    sys.stdout.write('x' * 1_000_000)\n    sys.stdout.flush()\n"
    )
    code, screen = interrupt_in_terminal([sys.executable, "-c", script], once_shown="ready")
    assert code == 0 and screen.count("x") == 1_000_000


def write_hub_files(folder: Path, tiny_llama: Path, tiny_qwen: Path) -> dict[str, Any]:
    doc = {
        "host": "127.0.0.1",
        "port": free_port(),
        "model_starting_port": free_range(),
        "log_path": str(folder / "logs"),
        "models": [
            {"name": "alpha", "model_path": str(tiny_llama), "default": True, "context_length": 2048},
            {
                "name": "beta",
                "model_path": str(tiny_qwen),
                "default": True,
                "jit_enabled": True,
                "group": "g",
            },
            {
                "name": "gamma",
                "model_path": str(tiny_qwen),
                "jit_enabled": True,
                "group": "g",
                "no_log_file": True,
            },
        ],
        "groups": [{"name": "g", "max_loaded": 1}],
    }
    path = folder / "hub.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return {"path": path, "doc": doc, "logs": folder / "logs"}


def kill_leftover_daemon(files: dict[str, Any]) -> None:
    info = runtime(files["logs"])
    if info:  # never leave a daemon behind a failed test: its supervisor first, so nothing restarts it
        for pid in (info.get("supervisor_pid"), info["pid"]):
            try:
                if pid:
                    os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture
def hub_files(tmp_path: Path, tiny_llama: Path, tiny_qwen: Path) -> Iterator[dict[str, Any]]:
    files = write_hub_files(tmp_path, tiny_llama, tiny_qwen)
    yield files
    kill_leftover_daemon(files)


@pytest.fixture(scope="module")
def daemon(
    tmp_path_factory: pytest.TempPathFactory, tiny_llama: Path, tiny_qwen: Path
) -> Iterator[dict[str, Any]]:
    """One daemon for the command-by-command tests below, which run in order against it."""
    files = write_hub_files(tmp_path_factory.mktemp("cli"), tiny_llama, tiny_qwen)
    yield files
    kill_leftover_daemon(files)


def rows(output: str) -> dict[str, list[str]]:
    """The status table as {model: cells}."""
    table = {}
    for line in output.splitlines():
        cells = line.split()
        if cells and cells[0] in ("alpha", "beta", "gamma", "delta"):
            table[cells[0]] = cells
    return table


def test_start_prints_the_table_and_writes_the_runtime_files(daemon: dict[str, Any]) -> None:
    path, logs, doc = daemon["path"], daemon["logs"], daemon["doc"]
    started = cli(path, "start")
    assert started.returncode == 0, started.stderr
    assert "hub started" in started.stdout
    info = runtime(logs)
    assert info and info["port"] == doc["port"] and info["config_path"] == str(path)
    assert (logs / "hub.pid").read_text().strip() == str(info["pid"])
    table = rows(started.stdout)
    assert table["alpha"][1:3] == ["running", "loaded"] and table["beta"][1:3] == ["running", "unloaded"]
    assert table["gamma"][1:3] == ["inactive", "unloaded"]
    ports = json.loads((logs / "ports.json").read_text())
    assert table["alpha"][3] == str(ports["alpha"])
    assert "2/3 started" in started.stdout and "1/3 loaded" in started.stdout
    again = cli(path, "start")
    assert again.returncode == 0 and f"already running (pid {info['pid']})" in again.stdout
    only = cli(path, "status", "beta")
    assert list(rows(only.stdout)) == ["beta"]


def test_a_models_lines_go_to_its_own_log(daemon: dict[str, Any]) -> None:
    """A request on beta's own port loads it and writes upstream's lines to beta.log."""
    logs = daemon["logs"]
    ports = json.loads((logs / "ports.json").read_text())
    reply = openai.OpenAI(
        base_url=f"http://127.0.0.1:{ports['beta']}/v1", api_key="x"
    ).chat.completions.create(model="beta", messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
    assert reply.choices[0].message.content is not None
    beta_log = (logs / "beta.log").read_text()
    assert "Initialized MLXHandler" in beta_log  # the load, in beta's context
    assert "BatchScheduler admitted" in beta_log  # upstream's own scheduler thread, started for beta
    assert "BatchScheduler admitted" not in (logs / "hub.log").read_text()
    assert not (logs / "gamma.log").exists()  # no_log_file


def test_model_commands_follow_the_group_rule(daemon: dict[str, Any]) -> None:
    path = daemon["path"]
    out = cli(path, "start-model", "gamma")
    assert out.returncode == 0 and "gamma: started" in out.stdout
    out = cli(path, "load-model", "gamma")
    assert out.returncode == 0 and "gamma: loaded" in out.stdout
    status = cli(path, "status")
    table = rows(status.stdout)
    assert table["gamma"][2] == "loaded" and table["beta"][2] == "unloaded"  # group g: max_loaded 1
    assert "Group 'g' is at max_loaded (1)" in status.stdout
    float(table["gamma"][6])  # the MB column holds a number
    out = cli(path, "unload-model", "gamma", "nope")
    assert out.returncode == 1 and "gamma: unloaded" in out.stdout and "no model named 'nope'" in out.stderr
    out = cli(path, "stop-model", "gamma")
    assert out.returncode == 0 and "gamma: stopped" in out.stdout


def test_watch_draws_the_reference_columns(daemon: dict[str, Any]) -> None:
    path, logs = daemon["path"], daemon["logs"]
    code, watch_out = interrupt_in_terminal(
        [sys.executable, "-m", "mlx_hub.cli", "watch", "--interval", "0.5", "--config", str(path)],
        once_shown="alpha.log",
    )
    assert code == 0, watch_out
    for column in ("NAME", "STATE", "PID", "GROUP", "UPTIME", "EXIT", "LOG", "PORT", "MEMORY", "MB"):
        assert column in watch_out
    assert str(logs / "alpha.log") in watch_out
    assert cli(path, "watch", "--interval", "0.1").returncode == 2


def test_stop_keeps_the_daemon(daemon: dict[str, Any]) -> None:
    path = daemon["path"]
    out = cli(path, "stop")
    assert out.returncode == 0 and "alpha" in out.stdout and "beta" in out.stdout
    table = rows(cli(path, "status").stdout)
    assert all(cells[1] == "inactive" for cells in table.values())
    assert cli(path, "start-model", "alpha").returncode == 0
    listed = cli(path, "models")
    assert listed.returncode == 0 and "alpha" in listed.stdout and "group g: max_loaded 1" in listed.stdout


def test_shutdown_leaves_nothing_behind(daemon: dict[str, Any]) -> None:
    path, logs = daemon["path"], daemon["logs"]
    info = runtime(logs)
    assert info is not None
    out = cli(path, "shutdown")
    assert out.returncode == 0 and "hub stopped" in out.stdout
    wait_gone(info["pid"])
    assert runtime(logs) is None and not (logs / "hub.pid").exists()
    out = cli(path, "status")
    assert out.returncode == 1 and "mlx-openai-server-hub start" in out.stderr
    assert cli(path, "shutdown").returncode == 0  # nothing to do is not an error
    version = cli(path, "--version")
    assert version.returncode == 0 and "mlx-openai-server-hub, version 0." in version.stdout


def test_start_with_names_starts_those_models(hub_files: dict[str, Any]) -> None:
    path = hub_files["path"]
    out = cli(path, "start", "gamma")
    assert out.returncode == 0, out.stderr
    table = rows(out.stdout)
    assert table["gamma"][1] == "running" and table["alpha"][1] == "inactive"
    out = cli(path, "start", "alpha")  # the hub runs: start alpha there
    assert out.returncode == 0 and "alpha: started" in out.stdout
    assert cli(path, "start", "nope").returncode == 2
    assert cli(path, "shutdown").returncode == 0


def test_sigkill_leaves_stale_state_that_start_replaces(hub_files: dict[str, Any]) -> None:
    """Both processes killed at once (a power cut, kill -9 of the group): the next start cleans up."""
    path, logs = hub_files["path"], hub_files["logs"]
    assert cli(path, "start").returncode == 0
    first = runtime(logs)
    ports = json.loads((logs / "ports.json").read_text())
    os.kill(first["supervisor_pid"], signal.SIGKILL)
    os.kill(first["pid"], signal.SIGKILL)
    wait_gone(first["pid"])
    wait_gone(first["supervisor_pid"])
    assert runtime(logs) == first  # the killed hub could not clean up
    out = cli(path, "start")
    assert out.returncode == 0, out.stderr
    second = runtime(logs)
    assert second["pid"] != first["pid"]
    assert json.loads((logs / "ports.json").read_text()) == ports  # same ports after the crash
    assert rows(out.stdout)["alpha"][1:3] == ["running", "loaded"]
    assert cli(path, "shutdown").returncode == 0


@pytest.mark.parametrize("target", ["hub", "supervisor"])
def test_sigterm_shuts_down_cleanly(hub_files: dict[str, Any], target: str) -> None:
    """SIGTERM to either process (launchd and systemd send it to the supervisor) ends both, cleanly."""
    path, logs = hub_files["path"], hub_files["logs"]
    assert cli(path, "start").returncode == 0
    info = runtime(logs)
    os.kill(info["pid"] if target == "hub" else info["supervisor_pid"], signal.SIGTERM)
    wait_gone(info["pid"])
    wait_gone(info["supervisor_pid"])
    assert runtime(logs) is None
    log = (logs / "hub.log").read_text()
    assert "model 'alpha' unloaded" in log and log.rstrip().endswith("hub stopped")


def test_reload_reconciles_and_refuses_broken_config(hub_files: dict[str, Any], tiny_llama: Path) -> None:
    path, doc = hub_files["path"], hub_files["doc"]
    assert cli(path, "start").returncode == 0
    assert cli(path, "start-model", "gamma").returncode == 0
    port = doc["port"]
    before = httpx.get(f"http://127.0.0.1:{port}/hub/status").json()
    alpha_loaded_at = before["models"][0]["metadata"]["memory_last_transition_at"]

    models = [m for m in doc["models"] if m["name"] != "gamma"]  # removed
    models[1] = {**models[1], "context_length": 1024}  # beta changed
    models.append({"name": "delta", "model_path": str(tiny_llama), "default": True})  # added
    path.write_text(yaml.safe_dump({**doc, "models": models}, sort_keys=False))
    out = cli(path, "reload")
    assert out.returncode == 0, out.stderr
    assert "started: beta, delta" in out.stdout and "stopped: gamma, beta" in out.stdout
    assert "unchanged: alpha" in out.stdout
    after = httpx.get(f"http://127.0.0.1:{port}/hub/status").json()
    names = {m["id"]: m["metadata"] for m in after["models"]}
    assert list(names) == ["alpha", "beta", "delta"]
    assert names["alpha"]["memory_last_transition_at"] == alpha_loaded_at  # untouched, still loaded
    assert names["delta"]["memory_state"] == "loaded"

    path.write_text(path.read_text().replace("context_length: 1024", "context_lenght: 1024"))
    out = cli(path, "reload")
    assert out.returncode == 1
    assert (
        "model 'beta' (models[1]): field 'context_lenght'" in out.stderr
        and "did you mean 'context_length'" in out.stderr
    )
    assert rows(cli(path, "status").stdout)["alpha"][1:3] == ["running", "loaded"]
    assert cli(path, "shutdown").returncode == 0


def test_start_reports_config_errors_and_a_busy_controller_port(
    hub_files: dict[str, Any], tmp_path: Path
) -> None:
    path, doc = hub_files["path"], hub_files["doc"]
    bad = tmp_path / "bad.yaml"
    bad.write_text("models:\n  - {name: a, model_path: x, jit_enabled: yes, auto_unload_minutes: 0}\n")
    out = cli(bad, "start")
    assert out.returncode == 2 and "field 'auto_unload_minutes'" in out.stderr
    import socket

    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", doc["port"]))
        squatter.listen()
        out = cli(path, "start")
    assert out.returncode == 1
    assert f"port {doc['port']} on 127.0.0.1 is already in use" in out.stderr


def test_foreground_runs_until_interrupted(hub_files: dict[str, Any]) -> None:
    path, logs, doc = hub_files["path"], hub_files["logs"], hub_files["doc"]
    process = subprocess.Popen(
        [sys.executable, "-m", "mlx_hub.cli", "start", "--foreground", "--config", str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=ENV,
    )
    assert process.stdout is not None and process.stderr is not None
    out, err = Drain(process.stdout), Drain(process.stderr)  # both read all along: its log is on stderr
    try:
        shown = out.wait_for("hub running in the foreground", 120)  # printed once the hub is ready
        assert shown, out.text + err.text
        assert httpx.get(f"http://127.0.0.1:{doc['port']}/health").json()["ready"]
        assert runtime(logs)["supervisor_pid"] == process.pid  # the CLI supervises the hub
        process.send_signal(signal.SIGINT)
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)
    assert process.returncode == 0
    assert "alpha" in out.finish()
    assert "hub stopped" in err.finish() and runtime(logs) is None
