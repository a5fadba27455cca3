"""``mlx-openai-server-hub requests`` against a real detached daemon, across a restart."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from .test_cli import cli, kill_leftover_daemon, write_hub_files


@pytest.fixture
def hub_files(tmp_path: Path, tiny_llama: Path, tiny_qwen: Path) -> Iterator[dict[str, Any]]:
    files = write_hub_files(tmp_path, tiny_llama, tiny_qwen)
    yield files
    kill_leftover_daemon(files)


def test_requests_table_survives_a_daemon_restart(hub_files: dict[str, Any]) -> None:
    path, doc = hub_files["path"], hub_files["doc"]
    assert cli(path, "start").returncode == 0
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{doc['port']}/v1", api_key="x", max_retries=0)
    client.chat.completions.create(model="alpha", messages=[{"role": "user", "content": "Hi"}], max_tokens=3)
    shown = cli(path, "requests")
    assert shown.returncode == 0, shown.stderr
    header, row = shown.stdout.splitlines()[:2]
    assert header.split()[:6] == ["TIME", "MODEL", "API", "ROUTE", "VIA", "STATUS"]
    assert row.split()[2:7] == ["alpha", "openai", "/v1/chat/completions", "v1", "200"]
    assert cli(path, "shutdown").returncode == 0

    offline = cli(path, "requests", "--model", "alpha")  # no hub: read from requests.db
    assert (
        offline.returncode == 0
        and "no hub is running" in offline.stdout
        and "/v1/chat/completions" in offline.stdout
    )
    assert cli(path, "start").returncode == 0
    again = cli(path, "requests", "--json", "--since", "1h")
    assert again.returncode == 0, again.stderr
    (logged,) = json.loads(again.stdout)
    assert logged["model"] == "alpha" and logged["status"] == 200 and logged["prompt_tokens"] > 0
    assert json.loads(cli(path, "requests", "--json", "--model", "beta").stdout) == []
    wrong = cli(path, "requests", "--since", "yesterday")
    assert wrong.returncode == 2 and "15m, 2h or 7d" in wrong.stderr
    assert cli(path, "shutdown").returncode == 0
