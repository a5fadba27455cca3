"""Logs and the request log can hold prompts and answers: only their owner may read them."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import yaml

from mlx_hub.config import parse_config
from mlx_hub.core import logs
from mlx_hub.core.requestlog import RequestLog, db_path

from .test_cli import cli, kill_leftover_daemon, write_hub_files


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def shared_umask() -> Iterator[None]:
    """The usual umask (files 0644): what the hub must tighten, whatever the test runner's is."""
    old = os.umask(0o022)
    yield
    os.umask(old)


@pytest.fixture
def hub_files(tmp_path: Path, tiny_llama: Path, tiny_qwen: Path) -> Iterator[dict[str, Any]]:
    files = write_hub_files(tmp_path, tiny_llama, tiny_qwen)
    doc = {**files["doc"], "request_log_bodies": True}
    files["path"].write_text(yaml.safe_dump(doc, sort_keys=False))
    yield files
    kill_leftover_daemon(files)


def test_a_daemon_writes_its_logs_and_request_log_owner_only(
    shared_umask: None, hub_files: dict[str, Any]
) -> None:
    path, doc, folder = hub_files["path"], hub_files["doc"], hub_files["logs"]
    assert not folder.exists()
    assert cli(path, "start").returncode == 0
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{doc['port']}/v1", api_key="x", max_retries=0)
        client.chat.completions.create(
            model="alpha", messages=[{"role": "user", "content": "a secret prompt"}], max_tokens=3
        )
        shown = cli(
            path, "requests", "--json"
        )  # the hub has committed the row (and its prompt) when it answers
        assert "a secret prompt" in shown.stdout, shown.stderr
        written = {
            p.name: mode(p) for p in folder.iterdir() if p.name.endswith((".log", ".db", "-wal", "-shm"))
        }
        assert mode(folder) == 0o700
    finally:
        assert cli(path, "shutdown").returncode == 0
    assert {"hub.log", "alpha.log", "beta.log", "requests.db", "requests.db-wal"} <= written.keys(), written
    assert all(m == 0o600 for m in written.values()), {k: oct(m) for k, m in written.items()}


def test_files_an_older_hub_left_readable_are_tightened(
    shared_umask: None, tmp_path: Path, hub_logging: Callable[[Any], Path]
) -> None:
    folder = tmp_path / "logs"
    folder.mkdir()  # the user's folder: it keeps its mode
    for name in ("hub.log", "m.log", "requests.db"):
        (folder / name).touch()
        (folder / name).chmod(0o644)
    config = parse_config({"log_path": str(folder), "models": [{"name": "m", "model_path": "x"}]})
    hub_logging(config)
    logs.attach_model(config.models[0], config)
    requests = RequestLog(db_path(folder), days=7, max_rows=1000, bodies=True)
    requests.open()
    requests.close()
    assert {n: mode(folder / n) for n in ("hub.log", "m.log", "requests.db")} == dict.fromkeys(
        ("hub.log", "m.log", "requests.db"), 0o600
    )
    assert mode(folder) == 0o755
