"""``mlx-openai-server-hub <command>``: the reference hub's commands, plus ``models``.

Commands other than ``start --foreground`` and ``models`` talk to the running
daemon over its controller port, found through ``hub_runtime.json`` in the
config's ``log_path``. Exit codes: 0 done, 1 failed, 2 bad config or usage.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, NoReturn

import click
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from . import __version__, views
from .client import ClientError, HubClient, connect, find_running
from .config import ConfigError, HubConfig, find_config, load_config, log_dir_of
from .status import HubStatus

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)

CONFIG_HELP = "hub.yaml to use (default: $MLX_HUB_CONFIG, ./hub.yaml, ~/mlx-openai-server-hub/hub.yaml)."
# ----------------------------------------------------------------------------- output


def ok(message: str) -> None:
    console.print(Text("✓ ", style="green") + Text(message))


def warn(message: str) -> None:
    console.print(Text("! ", style="yellow") + Text(message, style="yellow"))


def fail(message: str, code: int = 1) -> NoReturn:
    for i, line in enumerate(message.splitlines() or [""]):
        prefix = Text("error: ", style="bold red") if i == 0 else Text("       ")
        err_console.print(prefix + Text(line))
    sys.exit(code)


def print_status(status: HubStatus, url: str, names: Iterable[str] = ()) -> None:
    rows, unknown = views.pick(status, names)
    if unknown:
        fail(
            f"no model named {', '.join(unknown)} (models: {', '.join(sorted(r.id for r in status.models))})"
        )
    console.print(views.summary(status, url))
    console.print(views.status_table(rows))
    for warning in status.warnings:
        warn(warning)


# ----------------------------------------------------------------------------- config


def _path(config: str | None) -> Path:
    if config is None:  # `mlx-openai-server-hub --config X status` works as well as `status --config X`
        config = click.get_current_context().find_root().params.get("config")
    try:
        return find_config(config)
    except ConfigError as exc:
        fail("\n".join(exc.problems), code=2)


def _load(config: str | None) -> tuple[Path, HubConfig]:
    path = _path(config)
    try:
        return path, load_config(path)
    except ConfigError as exc:
        fail("\n".join(exc.problems), code=2)


def _log_dir(config: str | None, *, quiet_config_errors: bool = False) -> Path:
    """Where the running hub's runtime file is, found even when hub.yaml has since been broken."""
    path = _path(config)
    try:
        return load_config(path).log_dir
    except ConfigError as exc:
        if not quiet_config_errors:
            warn(f"{path} has errors; the running hub keeps its last good config:")
            for line in exc.problems:
                warn("  " + line)
        return log_dir_of(path)


def _connect(config: str | None, *, quiet_config_errors: bool = False) -> tuple[str, HubClient]:
    try:
        runtime, client = connect(_log_dir(config, quiet_config_errors=quiet_config_errors))
    except ClientError as exc:
        fail(exc.message)
    return runtime.url, client


config_option = click.option(
    "--config", "config", type=click.Path(dir_okay=False), envvar=None, help=CONFIG_HELP
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
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

    With NAMES, start those models instead of the default ones. While a hub
    already runs for this config, start NAMES there and print its status.
    """
    path, cfg = _load(config)
    unknown = [n for n in names if n not in {m.name for m in cfg.models}]
    if unknown:
        fail(f"no model named {', '.join(unknown)} in {path}", code=2)
    try:
        found = find_running(cfg.log_dir)
    except ClientError as exc:
        fail(exc.message)
    if found is not None:
        runtime, client = found
        warn(f"the hub is already running (pid {runtime.pid}) at {runtime.url}")
        _run_actions(client, names, "start")
        print_status(client.status(), runtime.url)
        return
    if foreground:
        _start_foreground(path, cfg, names)
        return
    _start_detached(path, cfg, names, wait_seconds)


def _start_foreground(path: Path, cfg: HubConfig, names: tuple[str, ...]) -> None:
    from . import logs
    from .daemon import DaemonError, serve
    from .ports import connect_host

    logs.setup(cfg, console=True)
    url = f"http://{connect_host(cfg.host)}:{cfg.port}"

    def ready(hub: Any) -> None:
        print_status(hub.status_document(), url)
        ok(f"hub running in the foreground; dashboard {url}/hub/ · Ctrl-C stops it")

    try:
        asyncio.run(serve(cfg, config_path=path, names=names or None, on_ready=ready))
    except DaemonError as exc:
        fail(str(exc))


def _start_detached(path: Path, cfg: HubConfig, names: tuple[str, ...], wait_seconds: float) -> None:
    from .daemon import spawn
    from .runtime import read_runtime

    process = spawn(path, cfg, names)
    hub_log = cfg.log_dir / "hub.log"
    deadline = time.monotonic() + wait_seconds
    client: HubClient | None = None
    with err_console.status("starting the hub…") as spinner:
        while True:
            code = process.poll()
            if code is not None:
                tail = _tail(hub_log, 15)
                fail(f"the hub exited while starting (exit code {code}); last lines of {hub_log}:\n{tail}")
            runtime = read_runtime(cfg.log_dir)
            if runtime is not None and runtime.pid == process.pid:
                client = client or HubClient(runtime.url)
                try:
                    status = client.status()
                except ClientError:
                    status = None
                if status is not None:
                    if status.ready:
                        break
                    busy = views.loading_models(status)
                    spinner.update(
                        f"starting the hub… loading {', '.join(busy)}" if busy else "starting the hub…"
                    )
            if time.monotonic() > deadline:
                fail(
                    f"the hub (pid {process.pid}) did not finish starting in {wait_seconds:g} s; see {hub_log}"
                )
            time.sleep(0.2)
    assert client is not None and runtime is not None
    print_status(status, runtime.url)
    ok(f"hub started (pid {process.pid}); dashboard {runtime.url}/hub/ · log {hub_log}")
    failed = views.failed_models(status)
    if failed:
        fail(f"some models did not start: {', '.join(failed)} (see the warnings above)")


def _tail(path: Path, lines: int) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


@main.command()
@config_option
def shutdown(config: str | None) -> None:
    """Stop every model and the hub itself."""
    from .runtime import pid_alive

    log_dir = _log_dir(config)
    try:
        found = find_running(log_dir)
    except ClientError as exc:
        fail(exc.message)
    if found is None:
        warn("no hub is running for this config; nothing to shut down")
        return
    runtime, client = found
    client.shutdown()
    deadline = time.monotonic() + 120
    with err_console.status(f"stopping the hub (pid {runtime.pid})…"):
        while pid_alive(runtime.pid):
            if time.monotonic() > deadline:
                fail(f"the hub (pid {runtime.pid}) is still running after 120 s; see {log_dir / 'hub.log'}")
            time.sleep(0.2)
    ok(f"hub stopped (pid {runtime.pid})")


@main.command()
@config_option
def reload(config: str | None) -> None:
    """Re-read hub.yaml: start new models, stop removed ones, restart changed ones."""
    _, client = _connect(config, quiet_config_errors=True)  # the hub's answer names them
    try:
        result = client.reload()
    except ClientError as exc:
        fail(exc.message)
    for key, verb in (("started", "started"), ("stopped", "stopped"), ("unchanged", "unchanged")):
        names = result.get(key) or []
        if names:
            (ok if key != "unchanged" else console.print)(f"{verb}: {', '.join(names)}")
    ok("reloaded")


@main.command()
@config_option
@click.argument("names", nargs=-1)
def status(config: str | None, names: tuple[str, ...]) -> None:
    """Show the hub and each model (or NAMES): states, port, group, memory, idle timer."""
    url, client = _connect(config)
    print_status(client.status(), url, names)


@main.command()
@config_option
def stop(config: str | None) -> None:
    """Stop every model but keep the hub running (start them again with `start-model`)."""
    _, client = _connect(config)
    result = client.service("stop")
    stopped = result.get("models") or []
    ok(f"stopped {', '.join(stopped)}" if stopped else "no model was running")


def _run_actions(client: HubClient, names: Iterable[str], action: str) -> None:
    failures = 0
    for name in names:
        try:
            result = client.model(name, action)
        except ClientError as exc:
            failures += 1
            err_console.print(Text("✗ ", style="red") + Text(f"{name}: {exc.message}"))
            continue
        word = result["status"]
        (ok if word in ("started", "stopped", "loaded", "unloaded") else warn)(
            f"{name}: {word.replace('_', ' ')}"
        )
    if failures:
        sys.exit(1)


def _action_command(action: str, help_text: str) -> Callable[..., None]:
    @config_option
    @click.argument("names", nargs=-1, required=True)
    def command(config: str | None, names: tuple[str, ...]) -> None:
        _, client = _connect(config)
        _run_actions(client, names, action)

    command.__doc__ = help_text
    return command


main.command("start-model")(
    _action_command("start", "Open the port of each model NAME (loading it unless JIT).")
)
main.command("stop-model")(_action_command("stop", "Unload each model NAME and close its port."))
main.command("load-model")(
    _action_command("load", "Load the weights of each model NAME (its port must run).")
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
    url, client = _connect(config)

    def frame() -> Group:
        try:
            status = client.status()
        except ClientError as exc:
            return Group(Text(f"{time.strftime('%H:%M:%S')} · {exc.message}", style="red"))
        header = Text(f"{time.strftime('%H:%M:%S')} · every {interval:g}s · Ctrl-C to quit\n", style="dim")
        return Group(header, views.summary(status, url), views.watch_table(status, time.time()))

    try:
        with Live(frame(), console=console, auto_refresh=False) as live:
            while True:
                time.sleep(interval)
                live.update(frame(), refresh=True)
    except KeyboardInterrupt:
        pass


# ----------------------------------------------------------------------------- offline


@main.command()
@config_option
def models(config: str | None) -> None:
    """List the models hub.yaml configures (no running hub needed)."""
    path, cfg = _load(config)
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


# ----------------------------------------------------------------------------- registry


@main.command()
@config_option
@click.option(
    "--cache",
    "cache_dir",
    type=click.Path(file_okay=False),
    help="Hugging Face cache (default: HF_HUB_CACHE).",
)
@click.option(
    "--add",
    is_flag=True,
    help="Append MLX-ready models missing from hub.yaml (keeps comments; writes hub.yaml.bak).",
)
def scan(config: str | None, cache_dir: str | None, add: bool) -> None:
    """List MLX-ready models in the Hugging Face cache, and which hub.yaml entry serves each."""
    from .registry import add_to_config
    from .registry import scan as scan_cache

    path, cfg = _load(config)
    try:
        found = scan_cache(cache_dir, cfg)
    except Exception as exc:  # huggingface_hub's CacheNotFound and corrupted-cache errors
        fail(f"cannot scan the Hugging Face cache: {exc}")
    table = Table(box=None, header_style="bold", pad_edge=False)
    for column in ("REPO", "MLX", "ARCH", "QUANT", "SIZE", "ENTRY", "PORT", "SNAPSHOT"):
        table.add_column(column, justify="right" if column in ("SIZE", "PORT") else "left")
    for m in found:
        table.add_row(
            m.repo_id,
            "yes" if m.mlx_ready else Text("no", style="dim"),
            m.architecture or "-",
            f"{m.quantization_bits}-bit" if m.quantization_bits else "-",
            f"{m.size_on_disk / 1e9:.2f} GB" if m.size_on_disk >= 1e8 else f"{m.size_on_disk / 1e6:.1f} MB",
            m.entry or "-",
            str(m.port) if m.port else "-",
            str(m.snapshot),
        )
    console.print(table)
    missing = [m.repo_id for m in found if m.mlx_ready and m.entry is None]
    if not add:
        if missing:
            console.print(f"{len(missing)} MLX-ready model(s) not in {path}; `scan --add` appends them.")
        return
    added = add_to_config(path, missing)
    if added:
        ok(
            f"added {', '.join(added)} to {path} (previous version: {path.name}.bak); run `reload` to serve them"
        )
    else:
        warn("nothing to add: every MLX-ready model in the cache is already in hub.yaml")


@main.command()
@config_option
@click.argument("repo")
@click.option(
    "--convert",
    type=click.Choice(["auto", "force", "skip"]),
    default="auto",
    show_default=True,
    help="auto: convert only checkpoints that are not MLX-ready; force: always; skip: never.",
)
@click.option("--quantize", type=click.IntRange(2, 8), help="Quantize to this many bits while converting.")
@click.option(
    "--add", is_flag=True, help="Append an entry for it to hub.yaml (keeps comments; writes hub.yaml.bak)."
)
def ensure(config: str | None, repo: str, convert: str, quantize: int | None, add: bool) -> None:
    """Download REPO (or use the cache) and convert it to MLX when it needs it."""
    from .registry import add_to_config
    from .registry import ensure as ensure_repo

    path = _path(config) if add else None
    try:
        result = ensure_repo(repo, convert=convert, quantize=quantize)
    except Exception as exc:  # huggingface_hub (offline, unknown repo) and mlx_lm.convert errors
        fail(f"cannot ensure {repo}: {exc}")
    if result.converted:
        ok(f"{repo}: converted to MLX in {result.model_path} (from {result.source})")
    else:
        ok(f"{repo}: MLX-ready in the Hugging Face cache")
    if path is not None:
        added = add_to_config(path, [result.model_path])
        if added:
            ok(f"added {', '.join(added)} to {path}; run `reload` to serve it")
        else:
            warn(f"{path} already serves {result.model_path}")


@main.command()
@config_option
@click.argument("target")
@click.option(
    "--to", "to", required=True, type=click.Path(file_okay=False), help="Backroom folder to move it into."
)
def offload(config: str | None, target: str, to: str) -> None:
    """Move the base weights of a converted model (repo id or folder) out of the cache.

    Only the recorded source of a conversion qualifies, and never while a
    hub.yaml entry serves from it.
    """
    from .registry import offload as offload_weights

    _, cfg = _load(config)
    try:
        moved = offload_weights(target, Path(to).expanduser(), cfg)
    except ValueError as exc:
        fail(str(exc))
    ok(f"moved {target} to {moved}")


@main.group()
def export() -> None:
    """Publish this hub's models to other tools."""


@export.command("litellm")
@config_option
@click.option(
    "--hub", "hubs", multiple=True, help="A running hub's URL (repeatable); default: this config's models."
)
@click.option(
    "--via",
    type=click.Choice(["controller", "port"]),
    default="controller",
    show_default=True,
    help="Point each model at the controller's /v1 or at its own port.",
)
@click.option("--host", help="Host name clients should use (default: the hub's host; 127.0.0.1 for 0.0.0.0).")
@click.option("--api-key", envvar="MLX_HUB_API_KEY", help="Key for --hub URLs (default: $MLX_HUB_API_KEY).")
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Write here instead of printing.")
def export_litellm(
    config: str | None,
    hubs: tuple[str, ...],
    via: str,
    host: str | None,
    api_key: str | None,
    output: str | None,
) -> None:
    """A LiteLLM model_list for this hub, or for several running hubs behind one gateway."""
    import yaml

    from .registry import litellm_from_hubs, litellm_model_list

    try:
        if hubs:
            entries = litellm_from_hubs(list(hubs), api_key)
        else:
            _, cfg = _load(config)
            entries = litellm_model_list(cfg, via=via, host=host)
    except Exception as exc:
        fail(f"cannot build the LiteLLM config: {exc}")
    text = yaml.safe_dump({"model_list": entries}, sort_keys=False)
    if output:
        from .fsutil import atomic_write_text

        atomic_write_text(output, text)
        ok(f"wrote {len(entries)} model(s) to {output}")
    else:
        click.echo(text, nl=False)


if __name__ == "__main__":
    main()
