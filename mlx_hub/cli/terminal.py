"""What every CLI command shares: the consoles, ok/warn/fail, the status print-out, and finding hub.yaml."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from pathlib import Path
from typing import NoReturn

import click
from rich.console import Console
from rich.text import Text

from mlx_hub.cli import views
from mlx_hub.cli.client import ClientError, HubClient, connect
from mlx_hub.config import ConfigError, HubConfig, find_config, load_config, log_dir_of
from mlx_hub.core.status import HubStatus

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)

CONFIG_HELP = (
    "hub.yaml to use (default: $MLX_HUB_CONFIG, ./hub.yaml, ~/mlx-openai-server-hub/hub.yaml, "
    "then mlx-server-orch's $MLXSERVER_MODELS_PATH and models.yaml)."
)
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
    for line in views.group_lines(status):
        console.print(line)
    for warning in status.warnings:
        warn(warning)


# ----------------------------------------------------------------------------- config


def config_path(config: str | None) -> Path:
    if config is None:  # `mlx-openai-server-hub --config X status` works as well as `status --config X`
        config = click.get_current_context().find_root().params.get("config")
    try:
        return find_config(config)
    except ConfigError as exc:
        fail("\n".join(exc.problems), code=2)


def load(config: str | None) -> tuple[Path, HubConfig]:
    path = config_path(config)
    try:
        return path, load_config(path)
    except ConfigError as exc:
        fail("\n".join(exc.problems), code=2)


def log_dir(config: str | None, *, quiet_config_errors: bool = False) -> Path:
    """Where the running hub's runtime file is, found even when hub.yaml has since been broken."""
    path = config_path(config)
    try:
        return load_config(path).log_dir
    except ConfigError as exc:
        if not quiet_config_errors:
            warn(f"{path} has errors; the running hub keeps its last good config:")
            for line in exc.problems:
                warn("  " + line)
        return log_dir_of(path)


def connect_hub(config: str | None, *, quiet_config_errors: bool = False) -> tuple[str, HubClient]:
    try:
        runtime, client = connect(log_dir(config, quiet_config_errors=quiet_config_errors))
    except ClientError as exc:
        fail(exc.message)
    return runtime.url, client


config_option = click.option(
    "--config", "config", type=click.Path(dir_okay=False), envvar=None, help=CONFIG_HELP
)
