"""``mlx-openai-server-hub <command>``: the reference hub's commands, plus ``models``.

Commands other than ``start --foreground`` and ``models`` talk to the running
daemon over its controller port, found through ``hub_runtime.json`` in the
config's ``log_path``. Exit codes: 0 done, 1 failed, 2 bad config or usage.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import click
from rich.console import Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from mlx_hub.cli import cache, mlxctl, views
from mlx_hub.cli import registry as registry_commands
from mlx_hub.cli.actions import report_failures, run_actions, start_detached, start_foreground, stop_all
from mlx_hub.cli.activity import requests_command
from mlx_hub.cli.client import ClientError, find_running
from mlx_hub.cli.terminal import (
    HubGroup,
    api_key,
    config_option,
    config_path,
    connect_hub,
    console,
    err_console,
    fail,
    load,
    log_dir,
    ok,
    print_status,
    warn,
)
from mlx_hub.config import ConfigError, HubConfig, load_config
from mlx_hub.version import __version__


@click.group(cls=HubGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "-V", "--version", prog_name="mlx-openai-server-hub")
@config_option
def main(config: str | None) -> None:
    """Serve many MLX models from one process, each on its own OpenAI-compatible port.

    Start with `mlx-openai-server-hub start`, then open http://127.0.0.1:8000/hub/
    or check `mlx-openai-server-hub status`.
    """


# ----------------------------------------------------------------------------- daemon


@main.command()
@config_option
@click.option("--foreground", is_flag=True, help="Run in this process until Ctrl-C (for launchd/systemd).")
@click.option(
    "--wait",
    "wait_seconds",
    default=900.0,
    show_default=True,
    help="Seconds to wait for the models to start.",
)
@click.argument("names", nargs=-1)
def start(config: str | None, foreground: bool, wait_seconds: float, names: tuple[str, ...]) -> None:
    """Start the hub in the background with its `default: true` models.

    A hub.yaml that sets `default` on no model starts every non-JIT model. With
    NAMES, start those models instead. While a hub already runs for this
    config, start NAMES there (no NAMES: the startup models that are not
    running, e.g. after `stop`) and print its status.
    """
    path, cfg = load(config)
    unknown = [n for n in names if n not in {m.name for m in cfg.models}]
    if unknown:
        fail(f"no model named {', '.join(unknown)} in {path}", code=2)
    try:
        found = find_running(cfg.log_dir, api_key(path))
    except ClientError as exc:
        fail(exc.message)
    if found is not None:
        runtime, client = found
        warn(f"the hub is already running (pid {runtime.pid}) at {runtime.url}")
        if names:
            run_actions(client, names, "start")
            print_status(client.status(), runtime.url)
            return
        result = client.service("start")
        for name in result.get("models") or []:
            ok(f"{name}: started")
        failed = result.get("failed") or {}
        if not result.get("models") and not failed:
            console.print("every startup model is already running")
        print_status(client.status(), runtime.url)
        if failed:
            report_failures(failed)
        return
    if foreground:
        start_foreground(path, cfg, names)
        return
    start_detached(path, cfg, names, wait_seconds)


@main.command()
@config_option
def shutdown(config: str | None) -> None:
    """Stop every model and the hub itself (and its supervisor)."""
    from mlx_hub.service.runtime import pid_alive, read_runtime

    folder = log_dir(config)
    stale = read_runtime(folder)
    if (
        stale is not None
        and stale.state == "restarting"
        and stale.supervisor_pid
        and pid_alive(stale.supervisor_pid)
    ):
        os.kill(stale.supervisor_pid, signal.SIGTERM)  # between two hubs: the supervisor alone ends it
        _wait_gone([stale.supervisor_pid], folder, _stop_timeout(config))
        ok(f"hub stopped while restarting (supervisor {stale.supervisor_pid})")
        return
    try:
        found = find_running(folder, api_key(config_path(config)))
    except ClientError as exc:
        fail(exc.message)
    if found is None:
        warn("no hub is running for this config; nothing to shut down")
        return
    runtime, client = found
    client.shutdown()
    pids = [runtime.pid, *([runtime.supervisor_pid] if runtime.supervisor_pid else [])]
    _wait_gone(pids, folder, _stop_timeout(config))
    ok(f"hub stopped (pid {runtime.pid})")


def _stop_timeout(config: str | None) -> float:
    """How long ``shutdown`` waits: the supervisor kills a hub whose shutdown outlasts its grace, so
    both are gone within ``stop_bound``; the rest is slack for a loaded machine."""
    from mlx_hub.service.supervision import stop_bound

    try:
        drain = load_config(config_path(config)).drain_timeout
    except ConfigError:  # the running hub keeps its last good config; assume the default
        drain = HubConfig.model_fields["drain_timeout"].default
    return stop_bound(drain) + 30


def _wait_gone(pids: list[int], folder: Path, timeout: float) -> None:
    from mlx_hub.service.runtime import pid_alive

    deadline = time.monotonic() + timeout
    with err_console.status(f"stopping the hub (pid {', '.join(map(str, pids))})…"):
        while any(pid_alive(pid) for pid in pids):
            if time.monotonic() > deadline:
                fail(
                    f"the hub (pid {pids[0]}) is still running after {timeout:g} s; see {folder / 'hub.log'}"
                )
            time.sleep(0.2)


@main.command()
@config_option
def reload(config: str | None) -> None:
    """Re-read hub.yaml: start new models, stop removed ones, restart changed ones."""
    _, client = connect_hub(config, quiet_config_errors=True)  # the hub's answer names them
    try:
        result = client.reload()
    except ClientError as exc:
        fail(exc.message)
    for key, verb in (("started", "started"), ("stopped", "stopped"), ("unchanged", "unchanged")):
        names = result.get(key) or []
        if names:
            (ok if key != "unchanged" else console.print)(f"{verb}: {', '.join(names)}")
    failed = result.get("failed") or {}
    if failed:
        report_failures(failed)
    ok("reloaded")


@main.command()
@config_option
@click.argument("names", nargs=-1)
def status(config: str | None, names: tuple[str, ...]) -> None:
    """Show the hub and each model (or NAMES): states, port, group, memory, idle timer.

    Also names listeners in this hub's port ranges that are not the hub's own.
    """
    url, client = connect_hub(config)
    status = client.status()
    print_status(status, url, names)
    try:
        cfg = load_config(config_path(config))
    except ConfigError:
        return  # connect_hub already warned; the running hub's view stands
    from mlx_hub.core.ports import foreign_listeners

    serving = ("running", "starting", "stopping")
    ours = {status.port} | {r.metadata.port for r in status.models if r.metadata.process_state in serving}
    for port, where in foreign_listeners(cfg, ours).items():
        warn(f"port {port} ({where}) is in use by another process, not this hub")


@main.command()
@config_option
@click.argument("names", nargs=-1)
def stop(config: str | None, names: tuple[str, ...]) -> None:
    """Stop NAMES (no NAMES: every model) but keep the hub running; `start` brings them back."""
    _, client = connect_hub(config)
    if names:
        run_actions(client, names, "stop")
        return
    stop_all(client)


def _action_command(action: str, help_text: str) -> Callable[..., None]:
    @config_option
    @click.argument("names", nargs=-1, required=True)
    def command(config: str | None, names: tuple[str, ...]) -> None:
        _, client = connect_hub(config)
        run_actions(client, names, action)

    command.__doc__ = help_text
    return command


main.command("start-model")(
    _action_command("start", "Open the port of each model NAME (loading it unless JIT).")
)
main.command("stop-model")(_action_command("stop", "Unload each model NAME and close its port."))
main.command("load-model")(
    _action_command("load", "Load the weights of each model NAME, opening its port if it is closed.")
)
main.command("unload-model")(
    _action_command("unload", "Free the weights of each model NAME; its port stays open.")
)


@main.command()
@config_option
@click.option("--interval", default=5.0, show_default=True, help="Seconds between refreshes (at least 0.5).")
def watch(config: str | None, interval: float) -> None:
    """Redraw the model table every --interval seconds until Ctrl-C."""
    if interval < 0.5:
        fail("--interval must be at least 0.5 seconds", code=2)
    url, client = connect_hub(config)

    def frame() -> Group:
        try:
            status = client.status()
        except ClientError as exc:
            return Group(Text(f"{time.strftime('%H:%M:%S')} · {exc.message}", style="red"))
        header = Text(f"{time.strftime('%H:%M:%S')} · every {interval:g}s · Ctrl-C to quit\n", style="dim")
        return Group(header, views.summary(status, url), views.watch_table(status, time.time()))

    try:
        if not console.is_terminal:  # a pipe or a log file: one frame after another, never redrawn
            while True:
                console.print(frame())
                console.file.flush()
                time.sleep(interval)
        with Live(frame(), console=console, auto_refresh=False) as live:
            while True:
                time.sleep(interval)
                live.update(frame(), refresh=True)
    except KeyboardInterrupt:
        pass


@main.command("help")
@click.argument("command", nargs=-1)
@click.pass_context
def help_command(ctx: click.Context, command: tuple[str, ...]) -> None:
    """Show how to use the hub, or COMMAND (`help export litellm`)."""
    root = ctx.find_root()
    target: click.Command = root.command
    context = root
    for word in command:
        sub = target.get_command(context, word) if isinstance(target, click.Group) else None
        if sub is None:
            known = (
                ", ".join(sorted(target.list_commands(context))) if isinstance(target, click.Group) else ""
            )
            fail(f"no command {' '.join(command)!r}; commands: {known}", code=2)
        context = click.Context(sub, info_name=word, parent=context)
        target = sub
    click.echo(target.get_help(context))


# ----------------------------------------------------------------------------- offline


@main.command()
@config_option
def models(config: str | None) -> None:
    """List the models hub.yaml configures (no running hub needed)."""
    path, cfg = load(config)
    table = Table(title=str(path), title_justify="left", box=None, header_style="bold")
    for column in ("NAME", "TYPE", "PORT", "JIT", "AUTO-UNLOAD", "GROUP", "DEFAULT", "MODEL"):
        table.add_column(column)
    for m in cfg.models:
        table.add_row(
            m.name,
            m.model_type,
            str(m.port) if m.port else "auto",  # a number or auto:<range>
            "yes" if m.jit_enabled else "no",
            f"{m.auto_unload_minutes:g} min" if m.auto_unload_minutes else "-",
            m.group or "-",
            "yes" if m.default else "no",
            m.model_path,
        )
    console.print(table)
    for group in cfg.groups:
        members = [m.name for m in cfg.models if m.group == group.name]
        limit = f"max_loaded {group.max_loaded}" if group.max_loaded else "no cap"
        console.print(f"group {group.name}: {limit}; members {', '.join(members) or 'none'}")


# ----------------------------------------------------------------------------- mlxctl's verbs and the registry


for command in (
    requests_command,
    mlxctl.load_command,
    mlxctl.unload_command,
    mlxctl.unload_all,
    registry_commands.scan,
    registry_commands.ensure,
    registry_commands.offload,
    registry_commands.export,
    registry_commands.list_command,
    registry_commands.reconcile,
    registry_commands.assign_team,
    cache.cache,
):
    main.add_command(command)


if __name__ == "__main__":
    main()
