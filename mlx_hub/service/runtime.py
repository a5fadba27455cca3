"""The files by which the CLI finds a running hub: ``hub_runtime.json`` and ``hub.pid`` in ``log_path``.

The daemon writes them atomically once its controller answers and removes them
on a clean exit. A file left by a killed hub is recognised as stale (its pid is
gone, or its port answers with another pid) and replaced. This module imports
neither the hub nor FastAPI, so ``status`` and friends start fast.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from mlx_hub.core.ports import connect_host
from mlx_hub.fsutil import atomic_write_json, atomic_write_text, read_json
from mlx_hub.version import __version__

RUNTIME_FILE = "hub_runtime.json"
PID_FILE = "hub.pid"


@dataclass(frozen=True)
class Runtime:
    pid: int
    host: str
    port: int
    config_path: str
    started_at: float
    version: str = __version__
    # Written under a supervisor (supervisor.py): its pid, and how the hub is doing across crashes.
    supervisor_pid: int | None = None
    state: str = "running"  # running | restarting (after a crash) | gave_up (too many crashes)
    restarts: int = 0
    last_crash: dict[str, Any] | None = None
    gave_up: str | None = None  # why the supervisor stopped restarting the hub

    @property
    def url(self) -> str:
        return f"http://{connect_host(self.host)}:{self.port}"

    @property
    def owner_pid(self) -> int:
        """The process whose life is the hub's: the supervisor where there is one, else the hub."""
        return self.supervisor_pid or self.pid


_REQUIRED = ("pid", "host", "port", "config_path", "started_at")
_OPTIONAL = ("supervisor_pid", "state", "restarts", "last_crash", "gave_up")


def read_runtime(log_dir: Path) -> Runtime | None:
    data = read_json(log_dir / RUNTIME_FILE)
    if not isinstance(data, dict):
        return None
    try:
        fields = {k: data[k] for k in _REQUIRED} | {k: data[k] for k in _OPTIONAL if k in data}
        return Runtime(**fields)
    except (KeyError, TypeError):
        return None


def write_runtime(log_dir: Path, runtime: Runtime) -> None:
    atomic_write_json(log_dir / RUNTIME_FILE, asdict(runtime))
    atomic_write_text(log_dir / PID_FILE, f"{runtime.pid}\n")


def clear_runtime(log_dir: Path, pid: int | None = None) -> None:
    """Remove the runtime files, only if they still describe ``pid`` (when given)."""
    current = read_runtime(log_dir)
    if pid is not None and current is not None and current.pid != pid:
        return
    for name in (RUNTIME_FILE, PID_FILE):
        try:
            (log_dir / name).unlink()
        except FileNotFoundError:
            pass


def pid_alive(pid: int) -> bool:
    """True for a running process; a zombie (killed, not yet reaped) counts as gone."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state != "Z"
    except (OSError, IndexError):
        pass
    try:
        out = subprocess.run(["ps", "-o", "stat=", "-p", str(pid)], capture_output=True, text=True, timeout=5)
        return bool(out.stdout.strip()) and not out.stdout.strip().startswith("Z")
    except (OSError, subprocess.SubprocessError):
        return True
