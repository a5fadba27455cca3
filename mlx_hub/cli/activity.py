"""``mlx-openai-server-hub requests``: the request log as a table.

It asks the running hub; with none running it reads ``<log_path>/requests.db``
itself, so the log of a hub that has stopped (or crashed) can still be read.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from typing import Any

import click
from rich.table import Table

from mlx_hub.cli.client import ClientError, find_running
from mlx_hub.cli.terminal import config_option, console, fail, log_dir, warn
from mlx_hub.core.requestlog import db_path, parse_since, query

COLUMNS = ("TIME", "MODEL", "API", "ROUTE", "VIA", "STATUS", "PROMPT", "CACHED", "OUT", "WAIT", "TTFT", "TOK/S", "TOTAL")  # fmt: skip
RIGHT = {"STATUS", "PROMPT", "CACHED", "OUT", "WAIT", "TTFT", "TOK/S", "TOTAL"}


@click.command("requests")
@config_option
@click.option("--model", "model", help="Only this model's requests.")
@click.option("--since", help="Only requests since then: 15m, 2h, 7d, epoch seconds or an ISO time.")
@click.option("--limit", default=50, show_default=True, type=click.IntRange(1, 10_000), help="Rows to show.")
@click.option("--json", "as_json", is_flag=True, help="Print the rows as JSON, newest first.")
def requests_command(
    config: str | None, model: str | None, since: str | None, limit: int, as_json: bool
) -> None:
    """Show the request log: each request's model, route, status, tokens and timings, newest first."""
    try:
        after = parse_since(since)
    except ValueError as exc:
        fail(str(exc), code=2)
    folder = log_dir(config)
    try:
        found = find_running(folder)
    except ClientError as exc:
        fail(exc.message)
    if found is not None:
        _, client = found
        try:
            rows = client.requests(model=model, since=after, limit=limit)
        except ClientError as exc:
            fail(exc.message)
    else:
        path = db_path(folder)
        if not as_json:
            warn(f"no hub is running for this config; reading {path}")
        rows = [r.public() for r in query(path, model=model, since=after, limit=limit)]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        console.print(
            "no requests logged" + (f" for {model}" if model else "") + (" in that time" if since else "")
        )
        return
    console.print(request_table(rows))


def request_table(rows: Iterable[dict[str, Any]]) -> Table:
    table = Table(box=None, header_style="bold", pad_edge=False)
    for column in COLUMNS:
        table.add_column(column, justify="right" if column in RIGHT else "left")
    table.add_column("NOTE")
    for r in rows:
        note = ", ".join(
            x for x in (r.get("error"), "client went away" if r.get("disconnected") else None) if x
        )
        table.add_row(
            time.strftime("%m-%d %H:%M:%S", time.localtime(r["ts"])),
            r["model"],
            r["api"],
            r["route"],
            r["via"],
            str(r["status"]),
            _number(r.get("prompt_tokens")),
            _number(r.get("cached_tokens")),
            _number(r.get("completion_tokens")),
            _seconds(r.get("wait_s")),
            _seconds(r.get("ttft_s")),
            "-" if r.get("tokens_per_s") is None else f"{r['tokens_per_s']:.1f}",
            _seconds(r.get("total_s")),
            note or "",
        )
    return table


def _number(value: int | None) -> str:
    return "-" if value is None else f"{value:,}"


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}s"
