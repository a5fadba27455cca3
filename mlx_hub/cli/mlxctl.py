"""mlxctl's verbs: ``load`` a model in one step (ensure, add to hub.yaml, reload, load), ``unload``
by port or name, and ``unload-all``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from mlx_hub.cli import registry as registry_commands
from mlx_hub.cli.actions import report_failures, run_actions, start_detached, stop_all
from mlx_hub.cli.client import ClientError, find_running
from mlx_hub.cli.terminal import api_key, config_option, connect_hub, fail, load, ok, print_status
from mlx_hub.config import ConfigError, HubConfig, load_config


@click.command("load")
@config_option
@click.argument("model")
@click.argument("port", required=False)
@click.option("--name", help="Entry name (default: made from the repo or folder name).")
@registry_commands.CONVERT_OPTION
@registry_commands.PRECONVERTED_OPTION
@registry_commands.QUANTIZE_OPTION
@registry_commands.NO_OFFLOAD_OPTION
@click.option(
    "--wait", "wait_seconds", default=900.0, show_default=True, help="Seconds to wait for a new hub."
)
def load_command(
    config: str | None,
    model: str,
    port: str | None,
    name: str | None,
    convert: str,
    preconverted: str,
    quantize: int | None,
    no_offload: bool,
    wait_seconds: float,
) -> None:
    """Serve MODEL (a Hugging Face repo, a folder or an entry's name) now, on PORT (a number, auto or auto:RANGE).

    mlxctl's `load <model> <port>` in one step: ensure it (download, convert),
    add it to hub.yaml (comments kept, hub.yaml.bak written), reload the
    running hub (or start one) and load it.
    """
    path, cfg = load(config)
    model_path = _model_path(cfg, model, convert, quantize, preconverted, no_offload)
    entry = _entry_for(path, cfg, model_path, port, name)
    try:
        found = find_running(cfg.log_dir, api_key(path))
    except ClientError as exc:
        fail(exc.message)
    if found is None:  # a new hub: the startup models, and this one
        fresh = load_config(path)
        start_detached(path, fresh, tuple(dict.fromkeys([*fresh.startup_models(), entry])), wait_seconds)
        return
    runtime, client = found
    result = client.reload()
    if entry in (result.get("failed") or {}):
        report_failures({entry: result["failed"][entry]})
    run_actions(client, [entry], "load")
    print_status(client.status(), runtime.url, [entry])


def _model_path(
    cfg: HubConfig, model: str, convert: str, quantize: int | None, preconverted: str, no_offload: bool
) -> str:
    """What MODEL names: an entry of hub.yaml, a local folder, else a repo to ensure (download, convert)."""
    folder = Path(model).expanduser()
    if any(m.name == model for m in cfg.models) and not folder.is_dir():
        return model  # an entry's name: serve that entry
    if folder.is_dir():
        return str(folder.resolve())
    return registry_commands.ensure_model(cfg, model, convert, quantize, preconverted, no_offload)


def _entry_for(path: Path, cfg: HubConfig, model_path: str, port: str | None, name: str | None) -> str:
    """The entry that serves ``model_path``: the one hub.yaml has, else a new one added to it."""
    from mlx_hub.registry.edit import add_entries  # ruamel.yaml: only the commands that edit pay for it

    fields: dict[str, Any] = {}
    if port is not None and port != "auto":
        fields["port"] = int(port) if port.isdigit() else port
    existing = next((m for m in cfg.models if model_path in (m.model_path, m.name)), None)
    if existing is not None:
        if name and name != existing.name:
            fail(
                f"{path} already serves {model_path} as '{existing.name}'; drop --name or edit hub.yaml",
                code=2,
            )
        if "port" in fields and fields["port"] != existing.port:
            fail(
                f"'{existing.name}' is configured with port {existing.port or 'auto'}; edit hub.yaml to move it"
            )
        return existing.name
    try:
        (entry,) = add_entries(path, [{"name": name, "model_path": model_path, **fields, "default": True}])
    except (ValueError, ConfigError) as exc:
        fail(f"cannot add {model_path} to {path}: {exc}", code=2)
    ok(f"added '{entry}' to {path}")
    return entry


@click.command("unload")
@config_option
@click.argument("targets", nargs=-1, required=True)
def unload_command(config: str | None, targets: tuple[str, ...]) -> None:
    """Stop the models on these ports or with these names (mlxctl's `unload PORT`)."""
    _, client = connect_hub(config)
    status = client.status()
    by_port = {str(row.metadata.port): row.id for row in status.models if row.metadata.port}
    names = []
    for target in targets:
        name = by_port.get(target) if target.isdigit() else target
        if name is None:
            fail(f"no model of this hub is on port {target} (ports: {', '.join(sorted(by_port)) or 'none'})")
        names.append(name)
    run_actions(client, names, "stop")


@click.command("unload-all")
@config_option
def unload_all(config: str | None) -> None:
    """Stop every model, keeping the hub (mlxctl's `unload-all`; the same as `stop`)."""
    _, client = connect_hub(config)
    stop_all(client)
