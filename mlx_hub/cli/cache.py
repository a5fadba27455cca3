"""``mlx-openai-server-hub cache``: the prompt caches kept on disk, listed or cleared.

While a hub runs for the config, both go through its controller (so its live
caches forget what is deleted); otherwise they read and change the folder
directly, under the same lock a hub takes.
"""

from __future__ import annotations

import time
from typing import Any

import click
from rich.table import Table

from mlx_hub.cli.client import ClientError, find_running
from mlx_hub.cli.terminal import config_option, console, fail, load, ok, warn
from mlx_hub.engine.base import PromptStoreError
from mlx_hub.engine.prompt_listing import describe
from mlx_hub.engine.prompt_store import PromptStore, open_store


def _size(value: int) -> str:
    return f"{value / 2**30:.2f} GiB" if value >= 2**28 else f"{value / 2**20:.1f} MiB"


def _ago(stamp: float | None) -> str:
    if stamp is None:
        return "-"
    seconds = max(time.time() - stamp, 0)
    for unit, width in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= width:
            return f"{seconds / width:.0f} {unit} ago"
    return f"{seconds:.0f} s ago"


def _local_store(config: str | None) -> PromptStore | None:
    """The config's cache folder when no hub runs; None when hub.yaml turns persistence off."""
    _, cfg = load(config)
    if cfg.prompt_cache_cap <= 0 or not cfg.prompt_cache_folder.exists():
        return None
    try:
        return open_store(cfg.prompt_cache_folder, cfg.prompt_cache_cap)
    except PromptStoreError as exc:
        fail(str(exc))


def _running(config: str | None) -> Any:
    _, cfg = load(config)
    try:
        found = find_running(cfg.log_dir)
    except ClientError as exc:
        fail(exc.message)
    return None if found is None else found[1]


@click.group(invoke_without_command=True)
@config_option
@click.pass_context
def cache(ctx: click.Context, config: str | None) -> None:
    """List the prompt caches kept on disk: per model identity, its entries, bytes and last use."""
    if ctx.invoked_subcommand is not None:
        return
    client = _running(config)
    listing = client.prompt_caches() if client is not None else describe(_local_store(config))
    if not listing["enabled"]:
        warn(
            "prompt caches are not kept on disk (prompt_cache_disk_size is 0, or the folder does not exist yet)"
        )
        return
    table = Table(box=None, header_style="bold")
    for column in ("IDENTITY", "MODELS", "ENTRIES", "SIZE", "LAST USE"):
        table.add_column(column)
    for row in listing["identities"]:
        names = ", ".join(row["names"]) or "-"
        if not row["known"]:
            names += " (another hub's)" if row.get("in_use") else " (not in hub.yaml)"
        table.add_row(
            row["key"],
            names,
            str(row["entries"]),
            _size(row["bytes"]),
            _ago(row["last_use"]),
        )
    console.print(table)
    console.print(
        f"{_size(listing['disk_bytes'])} of {_size(listing['cap_bytes'])} (prompt_cache_disk_size) in {listing['path']}"
    )


@cache.command("clear")
@config_option
@click.argument("name", required=False)
def clear(config: str | None, name: str | None) -> None:
    """Delete model NAME's prompt caches (profiles sharing its weights and options share them), or all."""
    client = _running(config)
    if client is not None:
        try:
            cleared = client.clear_prompt_caches(name)["cleared"]
        except ClientError as exc:
            fail(exc.message)
    else:
        store = _local_store(config)
        cleared = [] if store is None else store.clear(None if name is None else [name])
        _, cfg = load(config)
        if name is not None and not cleared and name not in {m.name for m in cfg.models}:
            fail(f"no model named '{name}' has prompt caches")
    ok(f"cleared {len(cleared)} prompt cache folder(s)" + (f" of '{name}'" if name else ""))
