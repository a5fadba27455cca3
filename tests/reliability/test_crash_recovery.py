"""The supervisor brings a crashed hub back: real processes, real signals, real ports.

The hub is started with the CLI, as a user would, and killed as Metal, a bad
allocation or the OS would kill it (SIGABRT, SIGSEGV, SIGKILL), or by the
test-only fault switch (``mlx_hub.faults``) for a model that crashes it on
every load.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from ..helpers import free_port, free_range, hello, text_only
from ..test_cli import cli, kill_leftover_daemon, rows, runtime, wait_gone

pytestmark = pytest.mark.reliability  # `make soak` runs these with the soak

#: Seconds a test waits for anything: a bound against hangs, never a speed check (the suite asserts
#: no wall-clock time; a loaded CI machine restores two models in anything from 5 to 60 s).
GENEROUS = 180.0


@pytest.fixture
def crash_files(tmp_path: Path) -> Iterator[dict[str, Any]]:
    files: dict[str, Any] = {"folder": tmp_path, "logs": tmp_path / "logs", "path": tmp_path / "hub.yaml"}
    yield files
    kill_leftover_daemon(files)


def write_config(files: dict[str, Any], models: list[dict[str, Any]], **hub: Any) -> dict[str, Any]:
    doc = {
        "host": "127.0.0.1",
        "port": free_port(),
        "model_starting_port": free_range(),
        "log_path": str(files["logs"]),
        "models": models,
        **hub,
    }
    files["path"].write_text(yaml.safe_dump(doc, sort_keys=False))
    files["doc"] = doc
    return doc


def ports_of(files: dict[str, Any]) -> dict[str, int]:
    return json.loads((files["logs"] / "ports.json").read_text())


def chat(
    url: str, model: str, path: Path, timeout: float = 120, headers: dict[str, str] | None = None
) -> httpx.Response:
    body = hello(model, 4, **text_only(path))
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=timeout, headers=headers)


def back_again(files: dict[str, Any], old_pid: int, deadline: float) -> dict[str, Any]:
    """The runtime file of the new hub, once it has replaced ``old_pid`` and is ready."""
    url = f"http://127.0.0.1:{files['doc']['port']}"
    while time.monotonic() < deadline:
        info = runtime(files["logs"])
        if info and info["pid"] != old_pid and info["state"] == "running":
            try:
                if httpx.get(f"{url}/health", timeout=5).json()["ready"]:
                    return info
            except httpx.TransportError:
                pass
        time.sleep(0.2)
    raise AssertionError(f"the hub did not come back; hub.log ends:\n{log_tail(files)}")


def answering_again(url: str, old_pid: int, deadline: float) -> dict[str, Any]:
    """``/health`` of the hub that replaced ``old_pid``, as soon as its controller answers (ready or not)."""
    while time.monotonic() < deadline:
        try:
            health = httpx.get(f"{url}/health", timeout=5).json()
            if health["pid"] != old_pid:
                return health
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"no new hub answered at {url}")


def log_tail(files: dict[str, Any], lines: int = 40) -> str:
    return "\n".join((files["logs"] / "hub.log").read_text(errors="replace").splitlines()[-lines:])


class Stream(threading.Thread):
    """A long streamed chat on one model port, read chunk by chunk until the connection ends."""

    def __init__(self, port: int, model: str, path: Path):
        super().__init__(daemon=True)
        self.url = f"http://127.0.0.1:{port}/v1/chat/completions"
        self.body = hello(model, 4000, stream=True, **text_only(path))
        self.chunks = 0
        self.error: BaseException | None = None
        self.finished = False
        self.flowing = threading.Event()

    def run(self) -> None:
        try:
            with httpx.stream("POST", self.url, json=self.body, timeout=120) as response:
                for line in response.iter_lines():
                    if line.startswith("data:"):
                        self.chunks += 1
                        if self.chunks >= 3:
                            self.flowing.set()
            self.finished = True
        except BaseException as exc:  # what the client sees when the hub dies
            self.error = exc
        finally:
            self.flowing.set()


class During(threading.Thread):
    """A request sent while the hub is down: it must wait in the backlog and be served."""

    def __init__(
        self,
        url: str,
        model: str,
        path: Path,
        headers: dict[str, str] | None = None,
        timeout: float = GENEROUS * 2,
    ):
        super().__init__(daemon=True)
        self.args = (url, model, path)
        self.headers = headers
        self.timeout = timeout
        self.response: httpx.Response | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.response = chat(*self.args, timeout=self.timeout, headers=self.headers)
        except BaseException as exc:
            self.error = exc


def kill_during_a_stream(
    files: dict[str, Any], sig: signal.Signals, streamer: str, paths: dict[str, Path]
) -> None:
    """Kill the hub with ``sig`` while ``streamer`` streams; check everything the issue asks for."""
    before = runtime(files["logs"])
    ports = ports_of(files)
    url = f"http://127.0.0.1:{files['doc']['port']}"
    other = next(n for n in paths if n != streamer)
    stream = Stream(ports[streamer], streamer, paths[streamer])
    stream.start()
    assert stream.flowing.wait(120) and stream.chunks >= 3, stream.error
    killed_at = time.monotonic()
    os.kill(before["pid"], sig)
    wait_gone(before["pid"])
    during = During(f"http://127.0.0.1:{ports[other]}", other, paths[other])  # the hub is down now
    during.start()
    stream.join(60)
    assert not stream.is_alive(), "the stream hung after the hub died"
    assert not stream.finished and isinstance(stream.error, httpx.TransportError), stream.error

    info = back_again(files, before["pid"], killed_at + GENEROUS)
    during.join(GENEROUS * 2)
    assert during.error is None and during.response is not None, during.error
    assert during.response.status_code == 200, during.response.text
    assert ports_of(files) == ports  # the same ports
    for name, path in paths.items():  # both answer, on their ports and through /v1
        assert chat(f"http://127.0.0.1:{ports[name]}", name, path).status_code == 200
        assert chat(url, name, path).status_code == 200
    assert info["restarts"] == before["restarts"] + 1 and info["supervisor_pid"] == before["supervisor_pid"]
    crash = info["last_crash"]
    assert crash["signal"] == sig.name and crash["pid"] == before["pid"]
    assert crash["generating"] == [streamer] and crash["blamed"] == {streamer: "generating"}
    assert crash["held_back"] == {}  # a different model each time: nothing was blamed twice in a row


def test_the_hub_comes_back_with_its_models_after_sigkill_sigsegv_and_sigabrt(
    crash_files: dict[str, Any], tiny_llama: Path, tiny_qwen: Path
) -> None:
    paths = {"alpha": tiny_llama, "beta": tiny_qwen}
    write_config(
        crash_files,
        [
            {"name": "alpha", "model_path": str(tiny_llama), "default": True},
            {"name": "beta", "model_path": str(tiny_qwen), "jit_enabled": True},  # loaded by a request below
        ],
    )
    path, doc = crash_files["path"], crash_files["doc"]
    started = cli(path, "start")
    assert started.returncode == 0, started.stderr
    assert (
        chat(f"http://127.0.0.1:{doc['port']}", "beta", tiny_qwen).status_code == 200
    )  # JIT: started, loaded
    for sig, streamer in ((signal.SIGKILL, "alpha"), (signal.SIGSEGV, "beta"), (signal.SIGABRT, "alpha")):
        kill_during_a_stream(crash_files, sig, streamer, paths)

    status = cli(path, "status")
    assert status.returncode == 0, status.stderr
    table = rows(status.stdout)
    assert table["alpha"][1:3] == ["running", "loaded"] and table["beta"][1:3] == ["running", "loaded"]
    assert (
        "restarted after a crash (3 restart(s)); last: killed by SIGABRT while alpha generating"
        in status.stdout
    )
    assert (
        "signal SIGABRT, after" in status.stdout and "generating alpha; hub.log before it:" in status.stdout
    )
    document = httpx.get(f"http://127.0.0.1:{doc['port']}/hub/status").json()
    assert document["restarts"] == 3 and document["last_crash"]["signal"] == "SIGABRT"
    assert any("mlx_hub" in line for line in document["last_crash"]["log_tail"])
    metrics = httpx.get(f"http://127.0.0.1:{doc['port']}/metrics").text
    assert "mlx_hub_restarts_total 3.0" in metrics
    log = (crash_files["logs"] / "hub.log").read_text()
    assert "killed by SIGSEGV while beta generating; restart 2" in log

    info = runtime(crash_files["logs"])
    os.kill(info["supervisor_pid"], signal.SIGTERM)  # what launchd and systemd send: both end, cleanly
    wait_gone(info["supervisor_pid"])
    wait_gone(info["pid"])
    assert runtime(crash_files["logs"]) is None
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://127.0.0.1:{doc['port']}/health", timeout=2)


def test_a_model_that_crashes_the_hub_on_every_load_is_held_back(
    crash_files: dict[str, Any], tiny_llama: Path, tiny_qwen: Path
) -> None:
    write_config(
        crash_files,
        [
            {"name": "good", "model_path": str(tiny_llama), "default": True},
            {"name": "bad", "model_path": str(tiny_qwen), "default": True},
        ],
    )
    path, doc = crash_files["path"], crash_files["doc"]
    faults = {"MLX_HUB_TEST_FAULTS": "1", "MLX_HUB_TEST_CRASH_ON_LOAD": "bad"}  # this test's hub alone
    env_start = cli(path, "start", env_extra=faults)
    assert env_start.returncode == 1 and "some models did not start: bad" in env_start.stderr
    table = {line.split()[0]: line.split() for line in env_start.stdout.splitlines() if line.strip()}
    assert table["good"][1:3] == ["running", "loaded"] and table["bad"][1:3] == ["running", "failed"]

    info = runtime(crash_files["logs"])
    assert info["restarts"] == 2 and info["last_crash"]["signal"] == "SIGABRT"
    assert info["last_crash"]["blamed"] == {"bad": "loading"} and "bad" in info["last_crash"]["held_back"]
    ports = ports_of(crash_files)
    refused = chat(f"http://127.0.0.1:{ports['bad']}", "bad", tiny_qwen)
    assert refused.status_code == 503
    assert "crashed the hub while loading (twice in a row)" in refused.json()["error"]["message"]
    assert runtime(crash_files["logs"])["pid"] == info["pid"]  # the request did not load it, or crash the hub
    assert chat(f"http://127.0.0.1:{doc['port']}", "good", tiny_llama).status_code == 200
    status = cli(path, "status")
    assert "crashed the hub while loading" in status.stdout and "SIGABRT while bad loading" in status.stdout


def test_too_many_crashes_and_the_supervisor_gives_up(crash_files: dict[str, Any], tiny_llama: Path) -> None:
    write_config(
        crash_files, [{"name": "alpha", "model_path": str(tiny_llama), "jit_enabled": True}], max_restarts=1
    )
    path, doc = crash_files["path"], crash_files["doc"]
    assert cli(path, "start").returncode == 0
    first = runtime(crash_files["logs"])
    os.kill(first["pid"], signal.SIGKILL)
    second = back_again(crash_files, first["pid"], time.monotonic() + GENEROUS)
    os.kill(second["pid"], signal.SIGKILL)
    wait_gone(second["supervisor_pid"])  # a second crash within 10 minutes is one too many
    info = runtime(crash_files["logs"])
    assert (
        info["state"] == "gave_up"
        and "crashed 2 times within 10 minutes (max_restarts: 1)" in info["gave_up"]
    )
    with pytest.raises(httpx.TransportError):  # the supervisor let the sockets go with it
        httpx.get(f"http://127.0.0.1:{doc['port']}/health", timeout=2)
    status = cli(path, "status")
    assert status.returncode == 1 and "crashed 2 times within 10 minutes" in status.stderr
    assert "Not restarting" in (crash_files["logs"] / "hub.log").read_text()
    assert cli(path, "start").returncode == 0  # a new start replaces the record
    assert runtime(crash_files["logs"])["state"] == "running"
    assert cli(path, "shutdown").returncode == 0


def test_a_configuration_error_is_not_retried(crash_files: dict[str, Any], tiny_llama: Path) -> None:
    write_config(crash_files, [{"name": "alpha", "model_path": str(tiny_llama), "jit_enabled": True}])
    path = crash_files["path"]
    assert cli(path, "start").returncode == 0
    info = runtime(crash_files["logs"])
    path.write_text(path.read_text().replace("jit_enabled", "jit_enable"))  # broken since the start
    os.kill(info["pid"], signal.SIGKILL)
    wait_gone(info["supervisor_pid"])
    after = runtime(crash_files["logs"])
    assert after["state"] == "gave_up" and "configuration is invalid" in after["gave_up"]
    assert after["restarts"] == 1  # it tried once, the hub refused the file, and that was that
    assert "field 'jit_enable'" in (crash_files["logs"] / "hub.log").read_text()


# ----------------------------------------------------------------------------- after a restart


def test_a_model_on_its_own_host_keeps_its_automatic_port_after_a_restart(
    crash_files: dict[str, Any], tiny_llama: Path
) -> None:
    """The hub on every address (the default), one model on loopback only with an automatic port: the
    restarted hub asks whether that port is free on the model's host, where the supervisor holds it,
    so the model keeps its socket (asked on the hub's host, the port looked taken and moved)."""
    entry = {"name": "alpha", "model_path": str(tiny_llama), "jit_enabled": True, "default": True}
    write_config(crash_files, [{**entry, "host": "127.0.0.1"}], host="0.0.0.0")
    path = crash_files["path"]
    assert cli(path, "start").returncode == 0
    ports, before = ports_of(crash_files), runtime(crash_files["logs"])
    os.kill(before["pid"], signal.SIGKILL)
    back_again(crash_files, before["pid"], time.monotonic() + GENEROUS)
    assert ports_of(crash_files) == ports, log_tail(crash_files)
    assert httpx.get(f"http://127.0.0.1:{ports['alpha']}/health", timeout=10).status_code == 200
    assert cli(path, "shutdown").returncode == 0


def test_a_request_without_a_key_is_refused_at_once_while_the_hub_restores(
    crash_files: dict[str, Any], tiny_llama: Path
) -> None:
    """Requests that arrive while a restarted hub restores its models are held until it is done, but
    a request without a valid key is answered 401 at once: here while the restore is still held back
    by the test (it would have waited for the restore, up to 300 s)."""
    hold = crash_files["folder"] / "hold-loads"
    write_config(
        crash_files, [{"name": "alpha", "model_path": str(tiny_llama), "default": True}], api_keys=["sesame"]
    )
    path, doc = crash_files["path"], crash_files["doc"]
    faults = {"MLX_HUB_TEST_FAULTS": "1", "MLX_HUB_TEST_HOLD_LOADS": str(hold)}
    assert cli(path, "start", env_extra=faults).returncode == 0  # alpha loaded: the file is not there yet
    url, port = f"http://127.0.0.1:{doc['port']}", ports_of(crash_files)["alpha"]
    before = runtime(crash_files["logs"])
    hold.touch()  # the next hub's load of alpha, and so its restore, waits while this file exists
    os.kill(before["pid"], signal.SIGKILL)
    assert not answering_again(url, before["pid"], time.monotonic() + GENEROUS)["ready"]
    keyed = During(url, "alpha", tiny_llama, headers={"Authorization": "Bearer sesame"}, timeout=GENEROUS * 2)
    keyed.start()
    for where in (url, f"http://127.0.0.1:{port}"):  # through /v1, and on the model's own port
        refused = chat(where, "alpha", tiny_llama, timeout=GENEROUS)  # without the fix: held 300 s
        assert refused.status_code == 401 and "missing or wrong API key" in refused.text
    assert not httpx.get(f"{url}/health", timeout=5).json()["ready"]  # still restoring: the file is there
    hold.unlink()
    keyed.join(GENEROUS * 2)
    assert keyed.response is not None and keyed.response.status_code == 200, keyed.error
    assert cli(path, "shutdown").returncode == 0


# ----------------------------------------------------------------------------- a shutdown is final

#: The test's hub.yaml sets drain_timeout 1, so a stop has 1 + 15 s (supervision.stop_grace).
GRACE_LOG = "did not stop within 16 s of being asked; killing it"


def start_with_shutdown_fault(files: dict[str, Any], model: Path, fault: str) -> dict[str, Any]:
    """A hub whose shutdown raises, hangs or is killed (``faults.SHUTDOWN_FAULT_ENV``); its runtime file."""
    entry = {"name": "alpha", "model_path": str(model), "jit_enabled": True, "default": True}
    write_config(files, [entry], drain_timeout=1)
    env = {"MLX_HUB_TEST_FAULTS": "1", "MLX_HUB_TEST_SHUTDOWN_FAULT": fault}
    started = cli(files["path"], "start", env_extra=env)
    assert started.returncode == 0, started.stderr
    info = runtime(files["logs"])
    assert info is not None
    return info


def assert_both_gone_for_good(files: dict[str, Any], info: dict[str, Any]) -> str:
    """Hub and supervisor gone, nothing restarted, the ports closed; hub.log."""
    wait_gone(info["pid"])
    wait_gone(info["supervisor_pid"])
    log = (files["logs"] / "hub.log").read_text(errors="replace")
    assert "; restart 1" not in log, log_tail(files)
    assert runtime(files["logs"]) is None
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://127.0.0.1:{files['doc']['port']}/health", timeout=2)
    return log


@pytest.mark.parametrize("fault", ["raise", "hang", "kill"])
def test_a_shutdown_that_fails_midway_stays_down(
    crash_files: dict[str, Any], tiny_llama: Path, fault: str
) -> None:
    """The hub tells its supervisor it is stopping before its shutdown begins, so a shutdown that
    raises or is killed is not a crash, and one that hangs is killed after the grace; `shutdown`
    returns (without the fix it waited 120 s for a supervisor that had restarted the hub, or hung)."""
    info = start_with_shutdown_fault(crash_files, tiny_llama, fault)
    out = cli(crash_files["path"], "shutdown", timeout=GENEROUS)  # without the fix: exit 1 after 120 s
    assert out.returncode == 0 and "hub stopped" in out.stdout, out.stderr + log_tail(crash_files)
    log = assert_both_gone_for_good(crash_files, info)
    assert (GRACE_LOG in log) == (fault == "hang")


def test_the_supervisors_stop_kills_a_hub_that_does_not_end(
    crash_files: dict[str, Any], tiny_llama: Path
) -> None:
    """SIGTERM to the supervisor (what launchd and systemd send) while the hub's shutdown hangs: the
    hub ignores the SIGTERM it is passed, and after the grace the supervisor sends SIGKILL."""
    info = start_with_shutdown_fault(crash_files, tiny_llama, "hang")
    os.kill(info["supervisor_pid"], signal.SIGTERM)
    assert GRACE_LOG in assert_both_gone_for_good(crash_files, info)
