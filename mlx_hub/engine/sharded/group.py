"""A sharded model's ranks as child processes: launched, watched, and ended together.

The hub's process never joins the collective. It starts every rank (``rank.py``)
with MLX's environment contract, reads each rank's status lines, and watches for
the three ways a group dies: a rank exits, a rank stops reporting (a stopped or
unreachable host), or every rank reports but the serving loops stop stepping (a
collective that never returns, as in mlx#4475). Any of them ends the whole
group at once, with a reason that names the rank and its host, so a request in
flight gets an error instead of a hang and the next request launches it again.

Threads: none. Everything here runs on the hub's event loop (subprocess pipes
and a watchdog task); no MLX is imported.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shlex
import signal
import socket
import sys
import tempfile
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlx_hub.config.distributed import DistributedConfig
from mlx_hub.engine.sharded.hosts import RankPlace, jaccl_devices, places, ring_hostfile
from mlx_hub.engine.sharded.rank import STATUS_PREFIX

log = logging.getLogger(__name__)

#: Seconds a rank gets between SIGTERM and SIGKILL when the group ends.
STOP_GRACE_SECONDS = 5.0
WATCH_SECONDS = 0.25
#: The ssh a remote rank is started with (a test may point it at a stand-in).
SSH_ENV = "MLX_HUB_SSH"


class GroupError(RuntimeError):
    """The group could not start or ended; the message names the rank and host."""


@dataclass
class RankState:
    """What the hub knows of one rank: where it is, its process, and its last status line."""

    place: RankPlace
    process: asyncio.subprocess.Process | None = None
    pid: int | None = None  # the rank's own pid (on its host) from its status lines
    state: str = "starting"
    steps: int | None = None
    active: int | None = None
    peak: int | None = None
    error: str | None = None
    seen: float = field(default_factory=time.monotonic)  # when its last status line came
    stepped: float = field(default_factory=time.monotonic)  # when its step count last moved
    tail: deque[str] = field(default_factory=lambda: deque(maxlen=20))
    closed: float | None = None  # when its output ended: about when it exited, to tell who went first

    def where(self) -> str:
        pid = f", pid {self.pid}" if self.pid else ""
        return f"rank {self.place.rank} on {self.place.host}{pid}"

    def view(self) -> dict[str, Any]:
        return {
            "rank": self.place.rank,
            "host": self.place.host,
            "pid": self.pid,
            "state": self.state,
            "memory_bytes": self.active,
            "local": self.place.local,
        }


def _free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _ring_base(cfg: DistributedConfig, group: list[RankPlace]) -> int:
    """The first ring port: the configured one, or for a group on this machine alone, free ones."""
    if cfg.ring_port is not None:
        return cfg.ring_port
    if all(p.local for p in group):
        for _ in range(50):
            base = _free_port()
            if base + len(group) < 65535 and all(_is_free(base + i) for i in range(len(group))):
                return base
    return 32323  # mlx.launch's default


def _is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


class RankGroup:
    """One sharded model's ranks. ``start`` returns once every rank has loaded; ``stop`` ends them all."""

    def __init__(
        self,
        name: str,
        model_path: str,
        cfg: DistributedConfig,
        server_args: list[str],
    ):
        self.name = name
        self.model_path = model_path
        self.cfg = cfg
        self.server_args = server_args
        # Resolves once the group is over: with the failure's reason, or None after ``stop``.
        self.ended: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        self.ranks: list[RankState] = []
        self.failure: str | None = None
        self.url: str | None = None  # rank 0's HTTP server
        self.parallel: str | None = None
        self.loaded_seconds: float | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._files: list[Path] = []
        self._stopping = False

    # ------------------------------------------------------------------ launch

    async def start(self) -> None:
        """Launch every rank and wait until all have loaded; ``GroupError`` (all ended) if they cannot."""
        group = places(self.cfg)
        self.ranks = [RankState(p) for p in group]
        rank0 = group[0]
        http_host = "127.0.0.1" if rank0.local else rank0.ip
        port = _free_port(http_host) if rank0.local else (_ring_base(self.cfg, group) + len(group))
        self.url = f"http://{http_host}:{port}"
        env = self._backend_env(group)
        started = time.monotonic()
        for state in self.ranks:
            state.process = await self._spawn(state.place, env, http_host, port)
            self._tasks.append(asyncio.create_task(self._read(state, state.process.stdout, True)))
            self._tasks.append(asyncio.create_task(self._read(state, state.process.stderr, False)))
        watchdog = asyncio.create_task(self._watch(started))
        self._tasks.append(watchdog)
        while self.failure is None and not all(r.state == "loaded" for r in self.ranks):
            await asyncio.sleep(WATCH_SECONDS)
        if self.failure is not None:
            await self.stop()
            raise GroupError(self.failure)
        self.loaded_seconds = time.monotonic() - started

    def _backend_env(self, group: list[RankPlace]) -> dict[str, str]:
        """Files and variables every rank shares: ring's hostfile, or jaccl's coordinator and devices."""
        if self.cfg.backend == "ring":
            return {"MLX_HOSTFILE": ring_hostfile(group, _ring_base(self.cfg, group))}
        if self.cfg.backend == "jaccl":
            base = _ring_base(self.cfg, group)
            return {"MLX_JACCL_COORDINATOR": f"{group[0].ip}:{base}", "MLX_IBV_DEVICES": jaccl_devices(group)}
        return {}

    def _command(self, place: RankPlace, http_host: str, port: int) -> list[str]:
        python = self.cfg.python or sys.executable
        command = [python, "-m", "mlx_hub.engine.sharded.rank", "--model", self.model_path]
        command += ["--host", http_host, "--port", str(port), "--backend", self.cfg.backend]
        command += ["--parent-pid", str(os.getpid())] if place.local else []
        command += ["--parallel", self.cfg.parallel] if self.cfg.parallel else []
        return command + self.server_args

    async def _spawn(
        self, place: RankPlace, shared: dict[str, str], http_host: str, port: int
    ) -> asyncio.subprocess.Process:
        command = self._command(place, http_host, port)
        pipes = {"stdout": asyncio.subprocess.PIPE, "stderr": asyncio.subprocess.PIPE}
        if place.local:
            env = {**os.environ, "MLX_RANK": str(place.rank)}
            for name, content in shared.items():
                env[name] = self._file(content) if name in ("MLX_HOSTFILE", "MLX_IBV_DEVICES") else content
            return await asyncio.create_subprocess_exec(
                *command, env=env, stdin=asyncio.subprocess.DEVNULL, start_new_session=True, **pipes
            )
        script = ["set -e"]
        for name, content in shared.items():
            if name in ("MLX_HOSTFILE", "MLX_IBV_DEVICES"):
                script.append(f"f=$(mktemp); printf '%s' {shlex.quote(content)} > $f; export {name}=$f")
            else:
                script.append(f"export {name}={shlex.quote(content)}")
        script.append(f"export MLX_RANK={place.rank}")
        script.append("exec " + shlex.join(command))
        ssh = shlex.split(os.environ.get(SSH_ENV, "ssh")) + ["-tt", "-o", "BatchMode=yes"]
        ssh += ["-o", "ConnectTimeout=10", place.host, "; ".join(script)]
        return await asyncio.create_subprocess_exec(
            *ssh, stdin=asyncio.subprocess.PIPE, start_new_session=True, **pipes
        )

    def _file(self, content: str) -> str:
        fd, name = tempfile.mkstemp(prefix=f"mlx-hub-{self.name}-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            f.write(content)
        self._files.append(Path(name))
        return name

    # ----------------------------------------------------------------- watching

    async def _read(self, state: RankState, stream: asyncio.StreamReader | None, stdout: bool) -> None:
        if stream is None:
            return
        try:
            await self._lines(state, stream, stdout)
        finally:
            if stdout:
                state.closed = time.monotonic()

    async def _lines(self, state: RankState, stream: asyncio.StreamReader, stdout: bool) -> None:
        while line := await stream.readline():
            text = line.decode(errors="replace").rstrip("\r\n")
            if stdout and text.startswith(STATUS_PREFIX):
                self._status(state, text[len(STATUS_PREFIX) :])
                continue
            state.tail.append(text)
            log.info("[rank %d] %s", state.place.rank, text)  # to the model's own log (core/logs.py)

    def _status(self, state: RankState, payload: str) -> None:
        try:
            data = json.loads(payload)
        except ValueError:
            return
        now = time.monotonic()
        state.seen = now
        state.pid = data.get("pid", state.pid)
        state.state = data.get("state", state.state)
        state.error = data.get("error", state.error)
        state.active, state.peak = data.get("active", state.active), data.get("peak", state.peak)
        self.parallel = data.get("parallel", self.parallel)
        steps = data.get("steps")
        if steps is not None and steps != state.steps:
            state.steps, state.stepped = steps, now

    async def _watch(self, started: float) -> None:
        """End the group at the first sign one rank is gone or stuck."""
        while self.failure is None and not self._stopping:
            await asyncio.sleep(WATCH_SECONDS)
            reason = self._problem(time.monotonic(), started)
            if reason is not None and not self._stopping:
                self.failure = f"model '{self.name}': {reason}"
                log.error("%s; ending its group", self.failure)
                await self._end()
                if not self.ended.done():
                    self.ended.set_result(self.failure)

    def _problem(self, now: float, started: float) -> str | None:
        gone = [r for r in self.ranks if r.process is not None and r.process.returncode is not None]
        if gone:  # the first to go is the cause: the others die of losing it
            r = min(gone, key=lambda r: r.closed or now)
            said = r.error or next((t for t in reversed(r.tail) if _says_why(t)), "")
            return f"{r.where()} exited with code {r.process.returncode}" + (f": {said}" if said else "")
        joining = [r for r in self.ranks if r.state in ("starting", "joining")]
        if joining and now - started > self.cfg.join_seconds:
            names = ", ".join(r.where() for r in joining)
            return f"{names} did not join the group within {self.cfg.join_seconds:g} s (check that the host is reachable)"
        mute = [
            r
            for r in self.ranks
            if r.state == "loading" and r.steps is None and now - r.seen > self.cfg.join_seconds
        ]
        if mute:
            return f"{mute[0].where()} did not start serving within {self.cfg.join_seconds:g} s of joining"
        silent = [r for r in self.ranks if r.steps is not None and now - r.seen > self.cfg.stall_seconds]
        if silent:
            return f"{silent[0].where()} has not reported for {self.cfg.stall_seconds:g} s (stopped or unreachable)"
        serving = [r for r in self.ranks if r.state == "loaded" and r.steps is not None]
        if len(serving) == len(self.ranks) and all(now - r.stepped > self.cfg.stall_seconds for r in serving):
            return (
                f"the group made no progress for {self.cfg.stall_seconds:g} s: a collective is stuck "
                f"(ranks {', '.join(f'{r.place.rank} on {r.place.host}' for r in serving)}; see mlx#4475)"
            )
        return None

    # ------------------------------------------------------------------- ending

    async def stop(self) -> None:
        """End every rank: SIGTERM, then SIGKILL after a grace period; bounded, never hangs."""
        self._stopping = True
        await self._end()
        if not self.ended.done():
            self.ended.set_result(None)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(BaseException):
                await task
        self._tasks.clear()

    async def _end(self) -> None:
        processes = [r.process for r in self.ranks if r.process is not None and r.process.returncode is None]
        for process in processes:
            _signal_group(process, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_SECONDS
        for process in processes:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(process.wait(), max(deadline - time.monotonic(), 0.05))
        for process in processes:
            if process.returncode is None:
                _signal_group(process, signal.SIGKILL)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(process.wait(), 5)
        await self._end_remote()
        for path in self._files:
            path.unlink(missing_ok=True)
        self._files.clear()

    async def _end_remote(self) -> None:
        """Kill each remote rank by its pid on its host, in case its ssh session outlived the client."""
        for r in self.ranks:
            if r.place.local or r.pid is None:
                continue
            ssh = shlex.split(os.environ.get(SSH_ENV, "ssh")) + [
                "-o",
                "BatchMode=yes",
                "-o",
                "ConnectTimeout=5",
            ]
            with contextlib.suppress(Exception):
                process = await asyncio.create_subprocess_exec(
                    *ssh,
                    r.place.host,
                    f"kill -9 {r.pid} 2>/dev/null || true",
                    stdout=asyncio.subprocess.DEVNULL,
                    stderr=asyncio.subprocess.DEVNULL,
                )
                await asyncio.wait_for(process.wait(), 10)

    # ------------------------------------------------------------------- status

    def ranks_status(self) -> list[dict[str, Any]]:
        """``metadata.ranks``: one ``{rank, host, pid, state, memory_bytes}`` per rank."""
        return [r.view() for r in self.ranks]

    def local_memory(self) -> int:
        """MLX active memory of the ranks on this machine: what the hub's budget counts."""
        return sum(r.active or 0 for r in self.ranks if r.place.local)


def _says_why(line: str) -> bool:
    """A line of a rank's output that explains its end (an error, ssh's complaint), not routine logging."""
    return any(word in line for word in ("Error", "error", "ssh:", "Traceback", "refused", "denied"))


def _signal_group(process: asyncio.subprocess.Process, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, sig)
