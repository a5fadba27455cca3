"""The parent that brings the hub back: one process must not mean one fatal crash.

Every model lives in the hub's one process, so a Metal abort, a SIGSEGV from
an allocation CPU MLX cannot back, or the OS's memory killer takes all of them
at once. ``start`` (detached or ``--foreground``) therefore runs the hub as the
child of this small process, which imports nothing of MLX, torch or upstream
and so has nothing to crash on. It:

- holds every listening socket the hub serves (``supervision`` describes the
  socket pair they travel over), as gunicorn and systemd socket activation
  do: while the hub restarts, connections wait in the sockets' backlog instead
  of being refused, and the new hub serves them;
- keeps the hub's last report of its models, so the restarted hub serves and
  loads the same ones, and holds back a model blamed for two crashes in a row;
- restarts a hub that died by a signal or an unexpected exit at once, then
  after 1, 2, 4 ... 60 s while it keeps crashing (a 5-minute healthy run
  resets that), and gives up after hub.yaml's ``max_restarts`` restarts within
  10 minutes; a configuration error (``EXIT_CONFIG``) is not retried;
- writes each crash, and a decision to give up, to hub.log and hub_runtime.json.

SIGTERM, SIGINT (Ctrl-C) and ``shutdown`` end both. A hub asked to stop says
so (``stopping``) before its shutdown begins, so however it then ends it is not
restarted; it has ``drain_timeout`` plus a margin to finish, then it is killed
(SIGKILL): a shutdown that hangs never keeps this process, or ``shutdown``,
waiting. Under launchd or systemd this is the process they watch.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import logging.handlers
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from mlx_hub.config import ConfigError, HubConfig, find_config, load_config
from mlx_hub.core.logs import FORMAT, HUB_LOG, PrivateWatchedFile
from mlx_hub.core.ports import PortError, listen_socket
from mlx_hub.fsutil import private_dir, private_opener
from mlx_hub.service.runtime import Runtime, clear_runtime, read_runtime, write_runtime
from mlx_hub.service.supervision import (
    CHANNEL_ENV,
    EXIT_CONFIG,
    KILL_WAIT,
    LAUNCH_ENV,
    LOG_TAIL,
    Crash,
    Launch,
    Reader,
    RestartPolicy,
    Snapshot,
    blame,
    describe_exit,
    next_launch,
    send,
    stop_grace,
)

log = logging.getLogger("mlx_hub.supervisor")

Address = tuple[str, int]

#: How often the wait for a running hub looks whether it has ended (a stop wakes it at once).
POLL_SECONDS = 0.5


class Sockets:
    """The listening sockets the supervisor holds for the hub, by (host, port)."""

    def __init__(self) -> None:
        self._held: dict[Address, socket.socket] = {}
        self._claimed: set[Address] = set()  # bound by the current hub since it started
        self._lock = threading.Lock()

    def hold(self, host: str, port: int) -> socket.socket:
        """The socket for ``host:port``, bound now if not yet held (``PortError`` if it cannot be)."""
        with self._lock:
            sock = self._held.get((host, port))
            if sock is None:
                sock = self._held[(host, port)] = listen_socket(host, port)
            self._claimed.add((host, port))
            return sock

    def release(self, host: str, port: int) -> None:
        with self._lock:
            sock = self._held.pop((host, port), None)
            self._claimed.discard((host, port))
        if sock is not None:
            sock.close()

    def held(self) -> list[Address]:
        with self._lock:
            return list(self._held)

    def new_hub(self) -> None:
        """A new hub starts: nothing is claimed by it yet."""
        with self._lock:
            self._claimed.clear()

    def drop_unclaimed(self, keep: Address) -> list[int]:
        """Close what the restarted hub did not take back (a model it no longer serves); returns the ports."""
        with self._lock:
            gone = [a for a in self._held if a not in self._claimed and a != keep]
            socks = [self._held.pop(a) for a in gone]
        for sock in socks:
            sock.close()
        return [port for _, port in gone]

    def close_all(self) -> None:
        with self._lock:
            socks, self._held = list(self._held.values()), {}
            self._claimed.clear()
        for sock in socks:
            sock.close()


class Supervisor:
    """Run the hub for ``config`` as a child process and restart it after a crash (see the module)."""

    def __init__(
        self,
        config_path: Path,
        config: HubConfig,
        names: Sequence[str] = (),
        *,
        console: bool = False,
        on_ready: Callable[[int], None] | None = None,
    ):
        self.config_path = config_path
        self.config = config
        self.first = list(names) or config.startup_models()
        self.console = console
        self.on_ready = on_ready  # called with the restart count each time a hub is ready
        self.sockets = Sockets()
        self.policy = RestartPolicy(config.max_restarts)
        self.snapshot = Snapshot()
        self.restarts = 0
        self.last_crash: Crash | None = None
        self.stopping = threading.Event()
        self.grace = stop_grace(config.drain_timeout)  # the hub's ``stopping`` says its current one
        self.child: subprocess.Popen[bytes] | None = None
        self.started_at = time.time()
        self._announcer: threading.Thread | None = None

    # ------------------------------------------------------------------ the loop

    def run(self) -> int:
        """Serve until a clean exit, a signal, a configuration error or too many crashes; the exit status."""
        controller = (self.config.host, self.config.port)
        try:
            self.sockets.hold(*controller)
        except PortError as exc:
            log.error("the controller cannot listen: %s; change `port` in %s", exc, self.config_path)
            return 1
        self._catch_signals()
        launch = Launch(serve=list(self.first))
        blamed_before: dict[str, str] = {}
        try:
            while True:
                began = time.monotonic()
                code, pid = self._run_child(launch)
                if self.stopping.is_set() or code == 0:
                    return 0
                if code == EXIT_CONFIG:
                    reason = f"the hub's configuration is invalid (see {self.log_path}); not restarting"
                    self._give_up(pid, reason)
                    return 2
                crash = self._record_crash(code, pid, time.monotonic() - began, blamed_before)
                delay = self.policy.next_delay(time.monotonic(), crash.uptime_seconds)
                if delay is None:
                    self._give_up(pid, self._too_many(crash))
                    return 1
                launch = self._relaunch(crash, pid, delay, blamed_before)
                blamed_before = crash.blamed
                if self.stopping.wait(delay):
                    return 0
        finally:
            if self._announcer is not None:
                self._announcer.join(timeout=10)  # its lines belong before the exit
            self.sockets.close_all()
            current = read_runtime(self.config.log_dir)
            if current is not None and current.supervisor_pid == os.getpid() and current.state != "gave_up":
                clear_runtime(self.config.log_dir)

    def _too_many(self, crash: Crash) -> str:
        return (
            f"the hub crashed {self.policy.max_restarts + 1} times within 10 minutes (max_restarts: "
            f"{self.policy.max_restarts}); last: {crash.cause()}. Not restarting; see {self.log_path}"
        )

    def _relaunch(self, crash: Crash, pid: int, delay: float, blamed_before: dict[str, str]) -> Launch:
        """Count the restart, say when it comes, and what the next hub serves and loads."""
        self.restarts += 1
        serve, load, held = next_launch(self.snapshot, self.first, crash.blamed, blamed_before)
        log.warning(
            "hub (pid %d) %s; restart %d in %g s, serving %s",
            pid,
            crash.cause(),
            self.restarts,
            delay,
            ", ".join(serve) or "no models",
        )
        for name, why in held.items():
            log.warning("model '%s' %s", name, why)
        self._write_runtime(pid, "restarting")
        return Launch(
            serve=serve,
            load=load,
            held_back=held,
            restarts=self.restarts,
            last_crash=crash.as_dict(),
        )

    def _record_crash(self, code: int, pid: int, ran_for: float, blamed_before: dict[str, str]) -> Crash:
        exit_code, signal_name = describe_exit(code)
        blamed = blame(self.snapshot)
        _, _, held = next_launch(self.snapshot, self.first, blamed, blamed_before)
        self.last_crash = Crash(
            at=time.time(),
            pid=pid,
            exit_code=exit_code,
            signal=signal_name,
            loading=list(self.snapshot.loading),
            generating=list(self.snapshot.generating),
            blamed=blamed,
            held_back=held,
            log_tail=self._log_tail(),
            uptime_seconds=round(ran_for, 1),
        )
        return self.last_crash

    def _give_up(self, pid: int, reason: str) -> None:
        log.error("%s", reason)
        self._write_runtime(pid, "gave_up", gave_up=reason)

    # ------------------------------------------------------------------ one hub

    def _run_child(self, launch: Launch) -> tuple[int, int]:
        """Start one hub with ``launch`` and wait for it to end; (its return code, its pid)."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sockets.new_hub()
        # Until it reports, the new hub stands for what it was asked to do (a crash before its first
        # report then restores the same set).
        self.snapshot = Snapshot(
            serving=list(launch.serve or []), loaded=list(launch.load), held_back=launch.held_back
        )
        launch = dataclasses.replace(launch, held_ports=self.sockets.held())
        env = {**os.environ, CHANNEL_ENV: str(theirs.fileno()), LAUNCH_ENV: launch.to_env()}
        command = [sys.executable, "-m", "mlx_hub.service.daemon", "--config", str(self.config_path)]
        if self.console:
            command.append("--console")
        self.child = subprocess.Popen(command, stdin=subprocess.DEVNULL, env=env, pass_fds=[theirs.fileno()])
        theirs.close()
        listener = threading.Thread(
            target=self._listen, args=(ours, launch.restarts), name="supervisor:channel", daemon=True
        )
        listener.start()
        if self.stopping.is_set():  # a signal came while it was being spawned
            self.child.terminate()
        code = self._wait(self.child)
        listener.join(timeout=5)
        ours.close()
        return code, self.child.pid

    def _wait(self, child: subprocess.Popen[bytes]) -> int:
        """The hub's return code once it ends; once a stop is asked, at most the grace and a kill away."""
        while (code := child.poll()) is None:
            if self.stopping.wait(POLL_SECONDS):
                return self._wait_stopping(child)
        return code

    def _wait_stopping(self, child: subprocess.Popen[bytes]) -> int:
        """A hub asked to stop (a signal here, or ``shutdown``) gets ``self.grace`` s, then SIGKILL."""
        with contextlib.suppress(subprocess.TimeoutExpired):
            return child.wait(timeout=self.grace)
        log.error(
            "the hub (pid %d) did not stop within %g s of being asked; killing it", child.pid, self.grace
        )
        child.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            return child.wait(timeout=KILL_WAIT)
        log.error("the hub (pid %d) outlived SIGKILL by %g s; leaving it", child.pid, KILL_WAIT)
        return -signal.SIGKILL

    def _listen(self, channel: socket.socket, restarts: int) -> None:
        """Answer the hub's requests and keep its reports until it goes away."""
        reader = Reader(channel)
        while (got := reader.read()) is not None:
            message, fds = got
            for fd in fds:
                os.close(fd)  # the hub sends none; never leak one
            op = message.get("op")
            try:
                if op == "bind":
                    self._bind(channel, str(message["host"]), int(message["port"]))
                elif op == "release":
                    self.sockets.release(str(message["host"]), int(message["port"]))
                    send(channel, {"ok": True})
                elif op == "state":
                    self.snapshot = Snapshot.from_message(message)
                elif op == "ready":
                    self._ready(restarts)
                elif op in ("stopping", "stopped"):  # asked to stop ("stopped": an older hub, once done)
                    self.grace = float(message.get("grace", self.grace))
                    self.stopping.set()  # its exit, however it ends, is final
            except OSError:
                return  # the hub went away mid-answer

    def _bind(self, channel: socket.socket, host: str, port: int) -> None:
        try:
            sock = self.sockets.hold(host, port)
        except PortError as exc:
            send(channel, {"error": str(exc)})
            return
        send(channel, {"ok": True}, [sock.fileno()])

    def _ready(self, restarts: int) -> None:
        closed = self.sockets.drop_unclaimed(keep=(self.config.host, self.config.port))
        if closed:
            log.info("closed ports the restarted hub no longer serves: %s", ", ".join(map(str, closed)))
        if restarts:
            log.warning("hub restarted (restart %d) and ready", restarts)
        if self.on_ready is not None:  # on its own thread: it may call the hub, which may be asking us
            self._announcer = threading.Thread(
                target=self._announce, args=(restarts,), name="supervisor:ready", daemon=True
            )
            self._announcer.start()

    def _announce(self, restarts: int) -> None:
        assert self.on_ready is not None
        try:
            self.on_ready(restarts)
        except Exception:
            log.exception("reporting the hub as ready failed")

    # ------------------------------------------------------------------ signals, files

    def _catch_signals(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._stop)

    def _stop(self, signum: int, _frame: object) -> None:
        """End both processes: the hub gets SIGTERM (its clean shutdown), then this loop returns."""
        self.stopping.set()
        child = self.child
        if child is not None and child.poll() is None:
            log.info("%s: stopping the hub (pid %d)", signal.Signals(signum).name, child.pid)
            try:
                child.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass

    @property
    def log_path(self) -> Path:
        return self.config.log_dir / HUB_LOG

    def _log_tail(self) -> list[str]:
        try:
            with open(self.log_path, "rb") as handle:
                handle.seek(max(0, handle.seek(0, os.SEEK_END) - 16384))
                lines = handle.read().decode("utf-8", errors="replace").splitlines()
        except OSError:
            return []
        return lines[-LOG_TAIL:]

    def _write_runtime(self, pid: int, state: str, gave_up: str | None = None) -> None:
        """hub_runtime.json while no hub runs: the dead hub's pid, this process, the crash, the decision."""
        current = read_runtime(self.config.log_dir)
        runtime = Runtime(
            pid=pid,
            host=self.config.host,
            port=self.config.port,
            config_path=str(self.config_path),
            started_at=current.started_at if current is not None else self.started_at,
            supervisor_pid=os.getpid(),
            state=state,
            restarts=self.restarts,
            last_crash=self.last_crash.as_dict() if self.last_crash is not None else None,
            gave_up=gave_up,
        )
        try:
            write_runtime(self.config.log_dir, runtime)
        except OSError as exc:
            log.error("could not write %s: %s", self.config.log_dir / "hub_runtime.json", exc)


def setup_logging(config: HubConfig, *, console: bool) -> None:
    """hub.log (reopened after the hub rotates it), and the terminal in the foreground."""
    handler: logging.Handler = PrivateWatchedFile(private_dir(config.log_dir) / HUB_LOG, encoding="utf-8")
    handler.setFormatter(logging.Formatter(FORMAT, datefmt="%Y-%m-%d %H:%M:%S"))
    log.addHandler(handler)
    if console:
        stream = logging.StreamHandler(sys.stderr)
        stream.setFormatter(logging.Formatter(FORMAT, datefmt="%H:%M:%S"))
        log.addHandler(stream)
    log.setLevel(logging.INFO)
    log.propagate = False


def run(
    config_path: Path,
    config: HubConfig,
    names: Sequence[str] = (),
    *,
    console: bool = False,
    on_ready: Callable[[int], None] | None = None,
) -> int:
    """Supervise the hub for ``config`` in this process (``start --foreground`` calls this)."""
    setup_logging(config, console=console)
    return Supervisor(config_path, config, names, console=console, on_ready=on_ready).run()


def spawn(config_path: Path, config: HubConfig, names: Sequence[str] = ()) -> subprocess.Popen[bytes]:
    """Start the supervisor (and through it the hub) detached: its own session, output to hub.log."""
    with open(private_dir(config.log_dir) / HUB_LOG, "ab", opener=private_opener) as hub_log:
        return subprocess.Popen(
            [sys.executable, "-m", "mlx_hub.service.supervisor", "--config", str(config_path), *names],
            stdin=subprocess.DEVNULL,
            stdout=hub_log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            close_fds=True,
        )


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m mlx_hub.service.supervisor``: what ``spawn`` runs."""
    parser = argparse.ArgumentParser(prog="python -m mlx_hub.service.supervisor")
    parser.add_argument("--config")
    parser.add_argument("names", nargs="*")
    args = parser.parse_args(argv)
    try:
        path = find_config(args.config)
        config = load_config(path)
    except ConfigError as exc:
        print("\n".join(exc.problems), file=sys.stderr)
        return 2
    return run(path, config, args.names)


if __name__ == "__main__":
    sys.exit(main())
