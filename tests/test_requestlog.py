"""The request log: SQLite at <log_path>/requests.db, written off the loop, bounded, and what the gate records."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from mlx_hub.config import ConfigError, parse_config
from mlx_hub.core.requestlog import RequestLog, RequestRecord, db_path, parse_since, query
from mlx_hub.testing.fake_engine import FakeEngine, fake, port
from mlx_hub.web.controller import build_controller_app
from mlx_hub.web.response_watch import ResponseWatch
from mlx_hub.web.tracing import answer_text

from .helpers import hello

Make = Callable[..., Any]


def record(model: str = "a", ts: float | None = None, **kw: Any) -> RequestRecord:
    fields = {"route": "/v1/chat/completions", "api": "openai", "via": "port", "status": 200, "total_s": 0.5}
    return RequestRecord(ts=time.time() if ts is None else ts, model=model, **{**fields, **kw})


def opened(tmp_path: Path, **kw: Any) -> RequestLog:
    options = {"days": 7.0, "max_rows": 100_000, "bodies": False, **kw}
    log = RequestLog(db_path(tmp_path), **options)
    log.open()
    return log


def test_rows_survive_a_restart_newest_first(tmp_path: Path) -> None:
    log = opened(tmp_path)
    for i in range(5):
        log.write(record("a" if i % 2 else "b", completion_tokens=i, request_body="secret prompt"))
    log.close()
    again = opened(tmp_path)  # a second hub on the same log_path
    again.write(record("a", completion_tokens=99))
    assert again.flush()
    rows = query(db_path(tmp_path))
    assert [r.completion_tokens for r in rows] == [99, 4, 3, 2, 1, 0]
    assert [r.completion_tokens for r in query(db_path(tmp_path), model="a", limit=2)] == [99, 3]
    assert all(r.request_body is None for r in rows)  # request_log_bodies is off: no prompt in the file
    assert b"secret prompt" not in db_path(tmp_path).read_bytes()
    older = query(db_path(tmp_path), before_id=rows[1].id)
    assert [r.completion_tokens for r in older] == [3, 2, 1, 0]
    again.close()
    conn = sqlite3.connect(db_path(tmp_path))
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_old_rows_and_rows_past_the_cap_are_pruned(tmp_path: Path) -> None:
    log = opened(tmp_path, days=1.0, max_rows=100)
    log.write(record("old", ts=time.time() - 2 * 86400))
    for i in range(600):  # passes PRUNE_EVERY, so the writer prunes on its own
        log.write(record("new", completion_tokens=i))
    log.close()
    rows = query(db_path(tmp_path), limit=1000)
    assert len(rows) == 100 and {r.model for r in rows} == {"new"}
    assert rows[0].completion_tokens == 599 and rows[-1].completion_tokens == 500


def test_bodies_are_kept_only_when_asked(tmp_path: Path) -> None:
    log = opened(tmp_path, bodies=True)
    log.write(record(request_body='{"messages": []}', response_text="hi there"))
    log.close()
    (row,) = query(db_path(tmp_path))
    assert row.request_body == '{"messages": []}' and row.response_text == "hi there"


def test_an_unreadable_file_is_moved_aside(tmp_path: Path) -> None:
    db_path(tmp_path).write_bytes(b"this is not a database" * 100)
    log = opened(tmp_path)
    log.write(record())
    log.close()
    assert len(query(db_path(tmp_path))) == 1
    assert list(tmp_path.glob("requests.db.unreadable-*"))


def test_no_file_yet_is_no_rows_and_off_writes_nothing(tmp_path: Path) -> None:
    assert query(db_path(tmp_path)) == []
    log = opened(tmp_path, days=0)  # request_log_days: 0 turns the log off
    log.write(record())
    log.close()
    assert not db_path(tmp_path).exists()


def test_since_forms() -> None:
    assert parse_since("1700000000") == 1700000000.0
    assert parse_since("2h", now=10_000.0) == 10_000.0 - 7200
    assert parse_since("15m", now=1000.0) == 100.0
    assert parse_since("2024-01-02T03:04:05+00:00") == 1704164645.0
    with pytest.raises(ValueError, match="15m, 2h or 7d"):
        parse_since("yesterday")


def test_config_options_are_checked() -> None:
    models = [{"name": "a", "model_path": "x"}]
    cfg = parse_config({"models": models})
    assert (cfg.request_log_days, cfg.request_log_max_rows, cfg.request_log_bodies) == (7, 100_000, False)
    with pytest.raises(ConfigError, match="request_log_days"):
        parse_config({"models": models, "request_log_days": -1})
    with pytest.raises(ConfigError, match="request_log_max_rows"):
        parse_config({"models": models, "request_log_max_rows": 5})


async def test_response_watch_reads_usage_first_text_and_errors() -> None:
    sent: list[dict[str, Any]] = []

    async def sink(message: dict[str, Any]) -> None:
        sent.append(message)

    watch = ResponseWatch(sink)
    await watch.send(
        {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]}
    )
    await watch.send({"type": "http.response.body", "body": b'data: {"choices":[{"delta":{"role":"assistant"}}]}\n\n', "more_body": True})  # fmt: skip
    assert watch.first_text_at is None  # a role-only chunk is no generated text
    await watch.send({"type": "http.response.body", "body": b'data: {"choices":[{"delta":{"content":"Hi"}}]}\n\n', "more_body": True})  # fmt: skip
    assert watch.first_text_at is not None and not watch.complete
    await watch.send({"type": "http.response.body", "body": b'data: {"usage":{"prompt_tokens":12,"completion_tokens":3,"prompt_tokens_det', "more_body": True})  # fmt: skip
    await watch.send(
        {"type": "http.response.body", "body": b'ails":{"cached_tokens":8}}}\n\ndata: [DONE]\n\n'}
    )
    assert (watch.prompt_tokens, watch.tokens, watch.cached_tokens, watch.complete) == (12, 3, 8, True)
    assert watch.stream and watch.error_code is None and len(sent) == 5

    error = ResponseWatch(sink)
    await error.send({"type": "http.response.start", "status": 404, "headers": []})
    await error.send({"type": "http.response.body", "body": b'{"error":{"message":"m","type":"invalid_request_error","code":"model_not_found"}}'})  # fmt: skip
    assert error.error_code == "model_not_found"
    anthropic = ResponseWatch(sink)
    await anthropic.send({"type": "http.response.start", "status": 529, "headers": []})
    await anthropic.send({"type": "http.response.body", "body": b'{"type":"error","error":{"type":"overloaded_error","message":"x"}}'})  # fmt: skip
    assert anthropic.error_code == "overloaded_error"


def test_answer_text_joins_a_streams_text() -> None:
    chat = b'data: {"choices":[{"delta":{"content":"Hel"}}]}\n\ndata: {"choices":[{"delta":{"content":"lo"}}]}\n\ndata: [DONE]\n\n'
    assert answer_text(chat, stream=True) == "Hello"
    anthropic = b'event: content_block_delta\ndata: {"type":"content_block_delta","delta":{"type":"text_delta","text":"Yo"}}\n\n'
    assert answer_text(anthropic, stream=True) == "Yo"
    assert answer_text(b'{"id": 1}', stream=False) == '{"id": 1}'


async def test_the_gate_records_every_request(fast: Make, tmp_path: Path) -> None:
    engine = FakeEngine()
    hub = await fast([fake("a"), fake("j", jit_enabled=True)], engine, request_log_bodies=True)
    async with port(hub, "a") as http:
        assert (await http.post("/v1/chat/completions", json=hello("a", 4))).status_code == 200
        assert (await http.post("/v1/chat/completions", json=hello("nope", 4))).status_code == 404
        bad = await http.post("/v1/chat/completions", json=hello("a", 4, keep_alive="soon"))
        assert bad.status_code == 400
    app = build_controller_app(hub, request_shutdown=lambda: None)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1") as http:
        streamed = await http.post("/v1/chat/completions", json=hello("j", 4, stream=True))
        assert "answer" in streamed.text
        listed = (await http.get("/hub/requests")).json()["data"]
        only_j = (await http.get("/hub/requests", params={"model": "j"})).json()["data"]
        none_yet = (await http.get("/hub/requests", params={"since": "0s"})).json()["data"]
        wrong = await http.get("/hub/requests", params={"since": "yesterday"})
    assert [r["model"] for r in listed] == ["j", "a", "a", "a"]
    j, bad_row, missing, ok = listed
    assert j["stream"] and j["status"] == 200 and j["wait_s"] >= 0.0 and j["ttft_s"] is not None
    assert j["response_text"] == "answer from j"  # the stream's text, joined
    assert ok["status"] == 200 and not ok["stream"] and '"Hello"' in ok["request_body"]
    assert missing["status"] == 404 and missing["error"] == "model_not_found"
    assert bad_row["status"] == 400 and bad_row["error"] == "invalid_keep_alive"
    assert all(r["api"] == "openai" and r["route"] == "/v1/chat/completions" for r in listed)
    assert [r["model"] for r in only_j] == ["j"] and none_yet == []
    assert wrong.status_code == 400 and "15m, 2h or 7d" in wrong.json()["error"]["message"]


async def test_the_request_log_is_served_a_page_at_a_time(fast: Make) -> None:
    """At most 1000 rows an answer (each may hold 128 KB of bodies); the CLI pages through more."""
    from mlx_hub.cli.client import HubClient

    from .helpers import LiveController, free_port

    hub = await fast([fake("a")])
    for i in range(1205):
        hub.activity.requests.write(record(completion_tokens=i))
    assert hub.activity.requests.flush(30)
    live = LiveController(hub, free_port())
    await live.server.start()
    try:
        async with httpx.AsyncClient(base_url=live.url) as http:
            too_many = await http.get("/hub/requests", params={"limit": 1001})
            page = (await http.get("/hub/requests", params={"limit": 1000})).json()["data"]
        with HubClient(live.url) as client:
            rows = await asyncio.to_thread(client.requests, limit=1100)
            few = await asyncio.to_thread(client.requests, limit=5, model="a")
            every = await asyncio.to_thread(client.requests, limit=5000)
    finally:
        await live.server.stop()
    assert too_many.status_code == 400
    error = too_many.json()["error"]
    assert error["code"] == "limit_too_large" and error["param"] == "limit" and "before=" in error["message"]
    assert len(page) == 1000
    assert [r["completion_tokens"] for r in rows] == list(range(1204, 104, -1))  # newest first, no repeats
    assert [r["completion_tokens"] for r in few] == [1204, 1203, 1202, 1201, 1200]
    assert len(every) == 1205


async def test_a_client_that_leaves_is_marked_disconnected(fast: Make) -> None:
    engine = FakeEngine()
    hub = await fast([fake("a")], engine)
    engine.block("a")  # the stream opens, then waits for a token that never comes
    url = f"http://127.0.0.1:{hub.slots['a'].port}/v1/chat/completions"
    async with httpx.AsyncClient() as http:
        async with http.stream("POST", url, json=hello("a", 4, stream=True)) as reply:
            async for _ in reply.aiter_bytes():
                break  # the role chunk arrived; hang up
    for _ in range(250):
        rows = query(db_path(hub.config.log_dir))
        if rows:
            break
        await asyncio.sleep(0.02)
    engine.unblock("a")
    assert rows and rows[0].disconnected and rows[0].status == 200 and rows[0].completion_tokens is None
