"""The registry commands: ``scan``, ``ensure``, ``offload`` and ``export litellm``.

They work on the Hugging Face cache and hub.yaml; none needs a running hub.
"""

from __future__ import annotations

from pathlib import Path

import click
from rich.table import Table
from rich.text import Text

from .terminal import config_option, config_path, console, fail, load, ok, warn


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
    from .registry import add_to_config
    from .registry import scan as scan_cache

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


@click.command()
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

    path = config_path(config) if add else None
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


@click.command()
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

    _, cfg = load(config)
    try:
        moved = offload_weights(target, Path(to).expanduser(), cfg)
    except ValueError as exc:
        fail(str(exc))
    ok(f"moved {target} to {moved}")


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
            _, cfg = load(config)
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
