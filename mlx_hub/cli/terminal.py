"""What every CLI command shares: the consoles, ok/warn/fail, the status print-out, and finding hub.yaml."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click
import yaml
from rich.console import Console
from rich.text import Text

from mlx_hub.cli import views
from mlx_hub.cli.client import ApiKey, ClientError, HubClient, connect
from mlx_hub.config import KEY_ENV, ConfigError, HubConfig, find_config, load_config, log_dir_of
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
    for line in views.crash_lines(status):
        console.print(line)


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
        folder = log_dir(config, quiet_config_errors=quiet_config_errors)
        runtime, client = connect(folder, api_key(config_path(config)))
    except ClientError as exc:
        fail(exc.message)
    return runtime.url, client


# ----------------------------------------------------------------------------- API key

KEY_HELP = "API key for a hub with api_keys (default: $MLX_HUB_API_KEY, then hub.yaml's first api_keys)."
_KEY_META = "mlx_hub.api_key"


def _remember_key(ctx: click.Context, _: click.Parameter, value: str | None) -> None:
    """``--api-key`` is taken before or after the command; the command's own wins."""
    if value:
        ctx.find_root().meta[_KEY_META] = value


def api_key(path: Path | None) -> ApiKey:
    """The key the CLI sends: ``--api-key``, else ``$MLX_HUB_API_KEY`` (its first key), else the
    first of hub.yaml's ``api_keys`` (read as plain YAML, so a hub.yaml broken since the start still
    yields it). ``ApiKey(None)`` when there is none."""
    context = click.get_current_context(silent=True)
    flag = context.find_root().meta.get(_KEY_META) if context is not None else None
    if flag:
        return ApiKey(flag, "--api-key")
    env = [k.strip() for k in os.environ.get(KEY_ENV, "").split(",") if k.strip()]
    if env:
        return ApiKey(env[0], f"${KEY_ENV}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) if path is not None else None
    except (OSError, yaml.YAMLError):
        data = None
    keys = data.get("api_keys") if isinstance(data, dict) else None
    if isinstance(keys, list) and keys and isinstance(keys[0], str) and keys[0].strip():
        return ApiKey(keys[0], f"{path}'s api_keys")
    return ApiKey(None)


F = TypeVar("F", bound=Callable[..., Any])


def config_option(command: F) -> F:
    """``--config`` and ``--api-key``, which every command takes (before or after its name)."""
    command = click.option("--api-key", "api_key", expose_value=False, callback=_remember_key, help=KEY_HELP)(
        command
    )
    return click.option("--config", "config", type=click.Path(dir_okay=False), envvar=None, help=CONFIG_HELP)(
        command
    )


class HubGroup(click.Group):
    """A refused or failed call to the hub ends the command with its one-line message, never a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ClientError as exc:
            fail(exc.message)
