"""The registry commands: ``scan``, ``ensure``, ``offload``, ``export litellm``, ``list``,
``reconcile`` and ``assign-team``.

They work on the Hugging Face cache, hub.yaml and the hub's files in
``log_path``; none needs a running hub (``list`` asks one for its ports when
it runs).
"""

from __future__ import annotations

from pathlib import Path

import click
from rich.table import Table
from rich.text import Text

from mlx_hub.cli.terminal import api_key, config_option, console, fail, load, ok, warn
from mlx_hub.config import ConfigError, HubConfig


@click.command()
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
    from mlx_hub.registry.edit import add_to_config
    from mlx_hub.registry.scan import scan as scan_cache

    path, cfg = load(config)
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


CONVERT_OPTION = click.option(
    "--convert",
    type=click.Choice(["auto", "force", "skip"]),
    default="auto",
    show_default=True,
    help="auto: convert only checkpoints that are not MLX-ready; force: always; skip: never.",
)
PRECONVERTED_OPTION = click.option(
    "--preconverted",
    type=click.Choice(["auto", "yes", "no"]),
    default="auto",
    show_default=True,
    help="Override the MLX-ready detection (orgs $MLX_PRECONVERTED_ORGS, name hints $MLX_PRECONVERTED_HINTS).",
)
QUANTIZE_OPTION = click.option(
    "--quantize", type=click.IntRange(2, 8), help="Quantize to this many bits while converting."
)
NO_OFFLOAD_OPTION = click.option(
    "--no-offload", is_flag=True, help="Keep the base weights in the cache after a conversion."
)


def ensure_model(
    cfg: HubConfig | None, repo: str, convert: str, quantize: int | None, preconverted: str, no_offload: bool
) -> str:
    """``ensure``'s work for ``ensure`` and ``load``: returns the model_path hub.yaml should serve.

    After a conversion the base weights go to hub.yaml's ``offload_path``
    (when set and unless ``no_offload``), as mlxctl offloads by default.
    """
    from mlx_hub.registry.convert import ensure as ensure_repo
    from mlx_hub.registry.convert import offload as offload_weights

    try:
        result = ensure_repo(repo, convert=convert, quantize=quantize, preconverted=preconverted)
    except Exception as exc:  # huggingface_hub (offline, unknown repo), conversion errors
        fail(f"cannot ensure {repo}: {exc}")
    if not result.converted:
        ok(f"{repo}: MLX-ready in the Hugging Face cache")
        return result.model_path
    ok(f"{repo}: converted to MLX in {result.model_path} (from {result.source})")
    if cfg is not None and cfg.offload_path and not no_offload:
        try:
            moved = offload_weights(repo, Path(cfg.offload_path), cfg)
            ok(f"base weights of {repo} moved to {moved} (offload_path; --no-offload keeps them)")
        except ValueError as exc:
            warn(f"base weights of {repo} stay in the cache: {exc}")
    return result.model_path


@click.command()
@config_option
@click.argument("repo")
@CONVERT_OPTION
@PRECONVERTED_OPTION
@QUANTIZE_OPTION
@NO_OFFLOAD_OPTION
@click.option(
    "--add", is_flag=True, help="Append an entry for it to hub.yaml (keeps comments; writes hub.yaml.bak)."
)
def ensure(
    config: str | None,
    repo: str,
    convert: str,
    preconverted: str,
    quantize: int | None,
    no_offload: bool,
    add: bool,
) -> None:
    """Download REPO (or use the cache) and convert it to MLX when it needs it.

    $MLX_CONVERT_CMD (with {repo} {src} {dest}) replaces mlx_lm.convert. With
    hub.yaml's offload_path set, the base weights move there afterwards.
    """
    from mlx_hub.config import find_config, load_config
    from mlx_hub.registry.edit import add_to_config

    if add:
        path, cfg = load(config)
    else:  # ensure needs no hub.yaml; one that is there lends its offload_path
        try:
            path = find_config(config or click.get_current_context().find_root().params.get("config"))
            cfg = load_config(path)
        except ConfigError:
            cfg = None
    model_path = ensure_model(cfg, repo, convert, quantize, preconverted, no_offload)
    if add:
        added = add_to_config(path, [model_path])
        if added:
            ok(f"added {', '.join(added)} to {path}; run `reload` to serve it")
        else:
            warn(f"{path} already serves {model_path}")


@click.command()
@config_option
@click.argument("target", required=False)
@click.option("--to", "to", type=click.Path(file_okay=False), help="Backroom folder (default: offload_path).")
@click.option("--all", "everything", is_flag=True, help="Every conversion source that no model serves.")
def offload(config: str | None, target: str | None, to: str | None, everything: bool) -> None:
    """Move the base weights of a converted model (repo id or folder) out of the cache.

    Only the recorded source of a conversion qualifies, and never while a
    hub.yaml entry serves from it.
    """
    from mlx_hub.registry.convert import offload as offload_weights
    from mlx_hub.registry.convert import offload_all

    _, cfg = load(config)
    folder = to or cfg.offload_path
    if folder is None:
        fail("say where the base weights go: --to FOLDER, or offload_path in hub.yaml", code=2)
    if everything == bool(target):
        fail("name one TARGET or pass --all", code=2)
    if everything:
        moved, skipped = offload_all(Path(folder).expanduser(), cfg)
        for path in moved:
            ok(f"moved {path.name} to {path}")
        for repo, why in skipped.items():
            warn(f"{repo} stays: {why}")
        if not moved and not skipped:
            console.print("no conversion source is left in the cache")
        return
    assert target is not None
    try:
        moved_to = offload_weights(target, Path(folder).expanduser(), cfg)
    except ValueError as exc:
        fail(str(exc))
    ok(f"moved {target} to {moved_to}")


@click.group()
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
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Write here instead of printing.")
def export_litellm(
    config: str | None,
    hubs: tuple[str, ...],
    via: str,
    host: str | None,
    output: str | None,
) -> None:
    """A LiteLLM model_list for this hub, or for several running hubs behind one gateway.

    --hub URLs are read with --api-key (default: the first key of $MLX_HUB_API_KEY).
    """
    import yaml

    from mlx_hub.registry.export import litellm_from_hubs, litellm_model_list

    try:
        if hubs:
            entries = litellm_from_hubs(list(hubs), api_key(None).value)
        else:
            _, cfg = load(config)
            entries = litellm_model_list(cfg, via=via, host=host)
    except Exception as exc:
        fail(f"cannot build the LiteLLM config: {exc}")
    text = yaml.safe_dump({"model_list": entries}, sort_keys=False)
    if output:
        from mlx_hub.fsutil import atomic_write_text

        atomic_write_text(output, text)
        ok(f"wrote {len(entries)} model(s) to {output}")
    else:
        click.echo(text, nl=False)


# ----------------------------------------------------------------------------- mlxctl's registry views


def _ports_now(cfg: HubConfig, path: Path) -> tuple[dict[str, int], str]:
    """Each model's port: the running hub's, else the port book's (what the next start gives)."""
    from mlx_hub.cli.client import ClientError, find_running
    from mlx_hub.core.ports import PortBook

    try:
        found = find_running(cfg.log_dir, api_key(path))
    except ClientError:
        found = None
    if found is not None:
        try:
            status = found[1].status()
            return {row.id: row.metadata.port for row in status.models}, "running hub"
        except ClientError:
            pass
    book = PortBook.for_config(cfg).load()
    return {m.name: m.fixed_port or book.get(m.name) for m in cfg.models}, "port book"


def _size(value: int | None) -> str:
    if value is None:
        return "-"
    return f"{value / 1e9:.2f} GB" if value >= 1e8 else f"{value / 1e6:.1f} MB"


@click.command("list")
@config_option
def list_command(config: str | None) -> None:
    """Every configured model: its port, size on disk, repo, source and what it was converted from."""
    from mlx_hub.registry.disk import on_disk

    path, cfg = load(config)
    ports, origin = _ports_now(cfg, path)
    table = Table(
        title=f"{path} · ports from the {origin}", title_justify="left", box=None, header_style="bold"
    )
    for column in ("NAME", "PORT", "SIZE", "REPO", "SOURCE", "CONVERTED FROM", "MODEL"):
        table.add_column(column, justify="right" if column in ("PORT", "SIZE") else "left")
    for m in cfg.models:
        disk = on_disk(m.model_path)
        table.add_row(
            m.name,
            str(ports.get(m.name) or m.port or "-"),
            _size(disk.size),
            disk.repo or "-",
            disk.source if disk.source != "missing" else Text("missing", style="red"),
            disk.origin or "-",
            m.model_path,
        )
    console.print(table)


@click.command()
@config_option
def reconcile(config: str | None) -> None:
    """Forget the ports of models gone from hub.yaml and clear runtime files a dead hub left."""
    from mlx_hub.core.ports import PortBook
    from mlx_hub.service.runtime import clear_runtime, pid_alive, read_runtime

    path, cfg = load(config)
    released = PortBook.for_config(cfg).release_missing(cfg)
    for name, port in sorted(released.items(), key=lambda item: item[1]):
        ok(f"released port {port} (model '{name}' is no longer in {path.name})")
    runtime = read_runtime(cfg.log_dir)
    if runtime is not None and not pid_alive(runtime.pid):
        clear_runtime(cfg.log_dir, runtime.pid)
        ok(f"cleared the runtime files of hub pid {runtime.pid}, which is no longer running")
    if not released and (runtime is None or pid_alive(runtime.pid)):
        console.print("nothing to reconcile")


@click.command("assign-team")
@config_option
@click.argument("range_name", metavar="RANGE")
@click.option("--priority", multiple=True, help="A model to place first (repeatable, in order).")
@click.option("--dry-run", is_flag=True, help="Print the assignment; leave hub.yaml as it is.")
def assign_team(config: str | None, range_name: str, priority: tuple[str, ...], dry_run: bool) -> None:
    """Give the models of RANGE fixed ports, mlxctl's way: --priority first, then largest on disk.

    RANGE is a name in hub.yaml's port_ranges (its models: `port: auto:RANGE`
    or a port inside it) or LOW-HIGH (the models pinned inside it). The ports
    are written into hub.yaml (comments kept, hub.yaml.bak written).
    """
    import re

    from mlx_hub.registry.disk import on_disk, team_ports
    from mlx_hub.registry.edit import set_ports

    path, cfg = load(config)
    if range_name in cfg.port_ranges:
        span = cfg.port_ranges[range_name]
    elif match := re.fullmatch(r"(\d+)-(\d+)", range_name):
        span = (int(match.group(1)), int(match.group(2)))
    else:
        known = ", ".join(sorted(cfg.port_ranges)) or "none defined"
        fail(f"no port range {range_name!r} (port_ranges: {known}; or write LOW-HIGH)", code=2)
    members = [
        m
        for m in cfg.models
        if m.port_range == range_name or (m.fixed_port is not None and span[0] <= m.fixed_port <= span[1])
    ]
    if not members:
        fail(f"no model of {path} draws from {range_name} ({span[0]}-{span[1]})", code=2)
    unknown = [n for n in priority if n not in {m.name for m in members}]
    if unknown:
        fail(f"--priority names models outside {range_name}: {', '.join(unknown)}", code=2)
    names = {m.name for m in members}
    reserved = {cfg.port} | {m.fixed_port for m in cfg.models if m.fixed_port and m.name not in names}
    sizes = {m.name: on_disk(m.model_path).size for m in members}
    try:
        plan = team_ports(
            [m.name for m in members], span, sizes=sizes, priority=list(priority), reserved=reserved
        )
    except ValueError as exc:
        fail(str(exc))
    table = Table(box=None, header_style="bold")
    for column in ("PORT", "NAME", "SIZE", "WAS"):
        table.add_column(column)
    was = {m.name: str(m.port or "auto") for m in members}
    for name, port in plan.items():
        table.add_row(str(port), name, _size(sizes[name]), was[name])
    console.print(table)
    if dry_run:
        console.print(f"dry run: {path} is unchanged")
        return
    try:
        set_ports(path, plan)
    except ConfigError as exc:
        fail(f"{path} would not load with these ports, so it is unchanged:\n" + "\n".join(exc.problems))
    ok(f"wrote {len(plan)} port(s) into {path} (previous version: {path.name}.bak); `reload` applies them")
