"""``mlx-openai-server-hub <command>``: the command line."""

from __future__ import annotations

import asyncio
import sys

import click
from rich.console import Console
from rich.table import Table

from . import __version__
from .config import ConfigError, find_config, load_config

console = Console()
err_console = Console(stderr=True)

CONFIG_HELP = "hub.yaml to use (else $MLX_HUB_CONFIG, ./hub.yaml, ~/mlx-openai-server-hub/hub.yaml)."


def _load(config: str | None):
    try:
        path = find_config(config)
        return path, load_config(path)
    except ConfigError as exc:
        for line in exc.problems:
            err_console.print(f"[red]error:[/red] {line}", markup=True, highlight=False)
        sys.exit(2)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="mlx-openai-server-hub")
def main() -> None:
    """Serve many MLX models from one process, each on its own OpenAI-compatible port."""


@main.command()
@click.option("--config", "config", type=click.Path(dir_okay=False), help=CONFIG_HELP)
@click.option("--foreground", is_flag=True, help="Run in this process until Ctrl-C (the only mode so far).")
def start(config: str | None, foreground: bool) -> None:
    """Start the hub and every `default: true` model."""
    path, cfg = _load(config)
    if not foreground:
        err_console.print("[yellow]detached mode is not available yet; running in the foreground[/yellow]")
    from .daemon import serve, setup_logging

    setup_logging(cfg.log_level)
    asyncio.run(serve(cfg, config_path=path, on_ready=print_ready))


def print_ready(hub) -> None:
    table = Table(title="mlx-openai-server-hub", title_justify="left")
    for column in ("model", "port", "memory", "OpenAI base URL"):
        table.add_column(column)
    for row in hub.status()["models"]:
        meta = row["metadata"]
        host = "127.0.0.1" if meta["host"] in ("0.0.0.0", "") else meta["host"]
        url = f"http://{host}:{meta['port']}/v1" if meta["process_state"] == "running" else "-"
        table.add_row(row["id"], meta["process_state"], meta["memory_state"], url)
    console.print(table)
    console.print("Press Ctrl-C to stop.")


@main.command()
@click.option("--config", "config", type=click.Path(dir_okay=False), help=CONFIG_HELP)
def models(config: str | None) -> None:
    """List the models hub.yaml configures (no running hub needed)."""
    path, cfg = _load(config)
    table = Table(title=str(path), title_justify="left")
    for column in ("name", "type", "port", "jit", "auto-unload", "group", "default", "model_path"):
        table.add_column(column)
    for m in cfg.models:
        table.add_row(
            m.name,
            m.model_type,
            str(m.port) if m.port else "auto",
            "yes" if m.jit_enabled else "no",
            f"{m.auto_unload_minutes:g} min" if m.auto_unload_minutes else "-",
            m.group or "-",
            "yes" if m.default else "no",
            m.model_path,
        )
    console.print(table)


if __name__ == "__main__":
    main()
