"""The CLI's tables: ``status``, ``watch`` and the one-line summary, drawn from a ``HubStatus``."""

from __future__ import annotations

from collections.abc import Iterable

from rich.table import Table
from rich.text import Text

from mlx_hub.core.status import HubStatus, ModelStatus

STATE_STYLE = {
    "running": "green",
    "loaded": "green",
    "starting": "yellow",
    "loading": "yellow",
    "stopping": "yellow",
    "unloading": "yellow",
    "failed": "bold red",
    "inactive": "dim",
    "unloaded": "dim",
}


def _styled(state: str | None) -> Text:
    state = state or "-"
    return Text(state, style=STATE_STYLE.get(state, ""))


def _mb(value: int | None) -> str:
    return f"{value / 1e6:,.1f}" if value else "-"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else (f"{minutes}m{secs:02d}s" if minutes else f"{secs}s")


def pick(status: HubStatus, names: Iterable[str]) -> tuple[list[ModelStatus], list[str]]:
    """The rows for ``names`` (all when empty) and the names the hub does not know."""
    wanted = list(names)
    if not wanted:
        return status.models, []
    known = {row.id for row in status.models}
    return [row for row in status.models if row.id in wanted], [n for n in wanted if n not in known]


def summary(status: HubStatus, url: str) -> Text:
    counts, memory = status.counts, status.memory
    line = Text()
    line.append(f"hub pid {status.pid}", style="bold")
    line.append(f" · {url}")
    line.append(f" · {counts.started}/{counts.registered} started")
    line.append(f" · {counts.loaded}/{counts.registered} loaded")
    line.append(f" · models {_mb(memory.models_bytes)} MB, MLX active {_mb(memory.active_bytes)} MB")
    return line


def status_table(rows: Iterable[ModelStatus]) -> Table:
    """The ``status`` view: one row per model with both states, port, memory and idle timer."""
    table = Table(box=None, header_style="bold", pad_edge=False)
    for column in ("MODEL", "PROCESS", "MEMORY", "PORT", "GROUP", "TYPE", "MB", "IDLE UNLOAD", "IN FLIGHT"):
        table.add_column(column, justify="right" if column in ("PORT", "MB", "IN FLIGHT") else "left")
    for row in rows:
        m = row.metadata
        table.add_row(
            row.id,
            _styled(m.process_state),
            _styled(m.memory_state),
            str(m.port),
            m.group or "-",
            m.model_type,
            _mb(m.memory_bytes),
            _duration(m.idle_seconds_left),
            str(m.in_flight),
        )
    return table


def watch_table(status: HubStatus, now: float) -> Table:
    """The ``watch`` view: the reference's columns plus port, memory state and MB."""
    table = Table(box=None, header_style="bold", pad_edge=False)
    for column in ("NAME", "STATE", "PID", "GROUP", "UPTIME", "EXIT", "LOG", "PORT", "MEMORY", "MB"):
        table.add_column(column)
    for row in status.models:
        m = row.metadata
        table.add_row(
            row.id,
            _styled(m.process_state),
            str(m.pid or "-"),
            m.group or "-",
            _duration(now - m.started_at) if m.started_at else "-",
            str(m.exit_code) if m.exit_code is not None else "-",
            m.log_file or "-",
            str(m.port),
            _styled(m.memory_state),
            _mb(m.memory_bytes),
        )
    return table


def failed_models(status: HubStatus) -> list[str]:
    return [r.id for r in status.models if "failed" in (r.metadata.process_state, r.metadata.memory_state)]


def loading_models(status: HubStatus) -> list[str]:
    return [r.id for r in status.models if r.metadata.memory_state == "loading"]


def group_lines(status: HubStatus) -> list[str]:
    """One line per group: members loaded against its cap, and its idle trigger."""
    lines = []
    for group in status.groups:
        cap = str(group.max_loaded) if group.max_loaded is not None else "no cap"
        trigger = (
            f"idle unload after {group.idle_unload_trigger_min:g} min"
            if group.idle_unload_trigger_min is not None
            else "no idle trigger"
        )
        members = ", ".join(group.models) or "no members"
        lines.append(f"group {group.name}: {group.loaded}/{cap} loaded · {trigger} · {members}")
    return lines


#: Lines of hub.log shown under a crash (the status document keeps more).
CRASH_LOG_LINES = 8


def crash_lines(status: HubStatus) -> list[Text]:
    """The last crash the supervisor brought the hub back from: its signal or exit code, what was
    loading or generating, and the last lines of hub.log before it."""
    crash = status.last_crash
    if crash is None:
        return []
    how = f"signal {crash.signal}" if crash.signal else f"exit code {crash.exit_code}"
    doing = [f"loading {', '.join(crash.loading)}"] if crash.loading else []
    doing += [f"generating {', '.join(crash.generating)}"] if crash.generating else []
    head = (
        f"last crash: hub pid {crash.pid}, {how}, after {crash.uptime_seconds:g} s"
        + (f", {'; '.join(doing)}" if doing else "")
        + "; hub.log before it:"
    )
    return [
        Text(head, style="yellow"),
        *(Text(f"  {line}", style="dim") for line in crash.log_tail[-CRASH_LOG_LINES:]),
    ]
