"""The prompt-cache store on its own: identities, atomic files, the cap, LRU, locks, bad files, hits. No MLX."""

from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import os
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from mlx_hub.engine import prompt_store
from mlx_hub.engine.base import PromptStoreError
from mlx_hub.engine.prompt_files import temp_path
from mlx_hub.engine.prompt_identity import model_identity
from mlx_hub.engine.prompt_listing import describe, listing
from mlx_hub.engine.prompt_locks import StoreLock
from mlx_hub.engine.prompt_store import IDENTITY, INDEX, Entry, PromptStore, open_store
from mlx_hub.testing.fake_engine import fake
from mlx_hub.web.controller import build_controller_app

from .helpers import meta

KEY = "m-0123"


def put(
    store: PromptStore, key: str, size: int, tokens: list[int], *, last_use: float | None = None
) -> Entry:
    """Write one entry the way the patch does: room first, then the files (owned), then the index."""
    assert store.make_room(key, size)
    with store.writing(key) as entry_id:
        payload, _ = store.paths(key, entry_id)
        payload.write_bytes(os.urandom(size))
        token_size, digest = store.write_tokens(key, entry_id, tokens)
        entry = Entry(
            id=entry_id,
            tokens=len(tokens),
            digest=digest,
            bytes=size + token_size,
            nbytes=size,
            last_use=time.time() if last_use is None else last_use,
        )
        store.commit(key, entry)
    return entry


def on_disk(root: Path) -> int:
    """Bytes of every entry file under ``root`` (indexes and descriptions are a few hundred bytes)."""
    return sum(
        p.stat().st_size for p in root.rglob("*") if p.is_file() and p.suffix in (".safetensors", ".tokens")
    )


def test_identity_changes_with_what_the_kv_holds(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"w" * 10)
    base = model_identity(str(model), model)
    assert base == model_identity(str(model), model)  # stable: two profiles of one model share it
    assert base.key.startswith("model-")
    assert model_identity(str(model), model, kv_bits=4).key != base.key
    assert model_identity(str(model), model, kv_bits=4, kv_group_size=32).key != (
        model_identity(str(model), model, kv_bits=4).key
    )
    assert model_identity(str(model), model, context_length=512).key != base.key
    assert model_identity(str(model), model, draft_path="d", draft_folder=None).key != base.key
    assert model_identity(str(model), model, library="mlx-lm 9").key != base.key
    # kv_group_size without kv_bits changes nothing: the KV is not quantized
    assert model_identity(str(model), model, kv_group_size=32).key == base.key
    os.utime(model / "model.safetensors", ns=(1, 1))  # new weights with the same size
    assert model_identity(str(model), model).key != base.key


def test_identity_changes_with_config_json_and_trusted_code(tmp_path: Path) -> None:
    """config.json (rope_theta, rope_scaling, sliding_window...) shapes the KV, and so does the code
    trust_remote_code runs; an untrusted folder's .py files never run, and a re-indent changes nothing."""
    from mlx_hub.config import ModelConfig
    from mlx_hub.engine.prompt_identity import entry_identity

    model = tmp_path / "model"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"w" * 10)
    config = {"model_type": "llama", "rope_theta": 10000.0, "model_file": "custom.py"}
    (model / "config.json").write_text(json.dumps(config))
    (model / "custom.py").write_text("class Model: pass\n")
    untrusted = model_identity(str(model), model)
    trusted = model_identity(str(model), model, trust_remote_code=True)
    assert trusted.key != untrusted.key and "custom.py" in trusted.description["code"]

    (model / "config.json").write_text(json.dumps(config, indent=4))  # the same content, laid out anew
    assert model_identity(str(model), model).key == untrusted.key
    (model / "config.json").write_text(json.dumps({**config, "rope_theta": 500000.0}))
    edited = model_identity(str(model), model)
    assert edited.key != untrusted.key
    assert model_identity(str(model), model, trust_remote_code=True).key != trusted.key

    trusted = model_identity(str(model), model, trust_remote_code=True)
    (model / "custom.py").write_text("class Model:\n    scale = 2\n")
    assert model_identity(str(model), model, trust_remote_code=True).key != trusted.key
    assert model_identity(str(model), model).key == edited.key  # untrusted: the code does not run

    draft = tmp_path / "draft"
    draft.mkdir()
    (draft / "config.json").write_text(json.dumps(config))
    with_draft = model_identity(str(model), model, draft_path=str(draft), draft_folder=draft)
    (draft / "config.json").write_text(json.dumps({**config, "sliding_window": 128}))
    assert model_identity(str(model), model, draft_path=str(draft), draft_folder=draft).key != with_draft.key

    entry = ModelConfig(name="m", model_path=str(model))  # hub.yaml's trust_remote_code reaches the identity
    assert (
        entry_identity(entry).key != entry_identity(entry.model_copy(update={"trust_remote_code": True})).key
    )


def test_entries_tokens_and_touch_round_trip(tmp_path: Path) -> None:
    store = open_store(tmp_path / "pc", 1 << 20)
    entry = put(store, KEY, 100, [1, 2, 3, 70000])
    (listed,) = store.entries(KEY)
    assert listed == entry
    assert store.read_tokens(KEY, listed) == [1, 2, 3, 70000]
    before = listed.last_use
    time.sleep(0.01)
    store.touch(KEY, entry.id)
    assert store.entries(KEY)[0].last_use > before
    assert store.model_bytes("x") == 0
    store.known = {"x": KEY}
    assert store.model_bytes("x") == entry.bytes == store.total_bytes()


def test_the_cap_holds_after_every_write_of_several_times_the_cap(tmp_path: Path) -> None:
    cap = 10_000
    store = open_store(tmp_path / "pc", cap)
    written = 0
    for i in range(60):
        size = 500 + (i * 337) % 2500
        put(store, f"m{i % 3}-0", size, list(range(i, i + 20)))
        written += size
        assert on_disk(store.root) <= cap
        assert store.total_bytes() <= cap
    assert written > 8 * cap
    # what survived is the most recent: the last entry written is always there
    assert any(
        e.tokens == 20 and store.read_tokens("m2-0", e) == list(range(59, 79)) for e in store.entries("m2-0")
    )


def test_an_entry_larger_than_the_cap_is_not_written(tmp_path: Path) -> None:
    store = open_store(tmp_path / "pc", 1000)
    put(store, KEY, 400, [1])
    assert store.make_room(KEY, 5000) is False
    assert len(store.entries(KEY)) == 1  # and nothing was evicted for it


def test_least_recently_used_goes_first_and_unknown_identities_before_that(tmp_path: Path) -> None:
    store = open_store(tmp_path / "pc", 3_000)
    store.known = {"a": "a-1", "b": "b-1"}
    old_a = put(store, "a-1", 900, [1], last_use=100.0)
    stale = put(
        store, "gone-1", 900, [2], last_use=500.0
    )  # an identity hub.yaml no longer has: newer, still first
    b = put(store, "b-1", 900, [3], last_use=200.0)
    put(store, "a-1", 900, [4])  # needs room for one: the unknown identity's entry goes
    assert [e.id for e in store.entries("gone-1")] == []
    assert not (store.root / "gone-1").exists()  # its folder too
    store.touch("a-1", old_a.id)
    put(store, "b-1", 900, [5])  # next: b's old entry, older than a's touched one
    assert b.id not in {e.id for e in store.entries("b-1")}
    assert old_a.id in {e.id for e in store.entries("a-1")}
    assert stale.id not in {e.id for e in store.entries("gone-1")}


def test_corrupt_index_and_token_files_are_skipped_once_and_deleted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = open_store(tmp_path / "pc", 1 << 20)
    good = put(store, KEY, 50, [1, 2])
    bad = put(store, KEY, 50, [3, 4])
    _, tokens = store.paths(KEY, bad.id)
    tokens.write_bytes(b"\x00\x01")  # truncated
    caplog.set_level(logging.WARNING, logger="mlx_hub.engine.prompt_store")
    assert store.read_tokens(KEY, bad) is None
    assert store.read_tokens(KEY, bad) is None
    assert [e.id for e in store.entries(KEY)] == [good.id]
    assert not any(p.exists() for p in store.paths(KEY, bad.id))
    assert len([r for r in caplog.records if "does not match" in r.message]) == 1

    (store.root / KEY / INDEX).write_text("{not json")
    assert store.entries(KEY) == []  # read, and malformed: that file alone goes
    assert not (store.root / KEY / INDEX).exists() and (store.root / KEY).is_dir()
    assert any("malformed" in r.message for r in caplog.records)
    assert store.sweep() == 2  # the entry it listed is nobody's now
    assert not any(p.exists() for p in store.paths(KEY, good.id))


def test_sweep_removes_files_nobody_owns_and_spares_a_write_in_progress(tmp_path: Path) -> None:
    store = open_store(tmp_path / "pc", 1 << 20)
    keep = put(store, KEY, 10, [1])
    folder = store.root / KEY
    crashed = "c" * 32  # a writer that died: its lock file is there, nobody holds it
    leftovers = [folder / name for name in ("evil.pkl", ".index.json.x1.tmp", f".{crashed}.writing")]
    leftovers += [folder / f"{crashed}.safetensors", folder / f".{crashed}.tmp.tokens"]
    for path in leftovers:
        path.write_bytes(b"x")
    with store.writing(KEY) as live:
        payload, tokens = store.paths(KEY, live)
        in_flight = [temp_path(payload), payload, temp_path(tokens)]  # published but not yet listed, too
        for path in in_flight:
            path.write_bytes(b"x")
        other = open_store(store.root, 1 << 20)  # another hub starting: it sweeps
        assert other.sweep() == 0
        assert not any(p.exists() for p in leftovers)
        assert all(p.exists() for p in in_flight + list(store.paths(KEY, keep.id)))
        assert other.clear() == [KEY]  # a clear takes what is listed, never what is being written
        assert all(p.exists() for p in in_flight) and not any(p.exists() for p in store.paths(KEY, keep.id))
    assert store.sweep() == 3  # the writer gave up without listing them: now they are nobody's


def test_folder_is_private_and_a_shared_one_is_refused(tmp_path: Path) -> None:
    store = open_store(tmp_path / "deep" / "pc", 100)
    assert stat.S_IMODE(store.root.stat().st_mode) == 0o700
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(PromptStoreError) as err:
        open_store(shared, 100)
    assert str(shared) in str(err.value) and f"chmod 700 {shared}" in str(err.value)
    (tmp_path / "file").write_text("")
    with pytest.raises(PromptStoreError, match="not a folder"):
        open_store(tmp_path / "file", 100)


def test_clear_by_name_and_listeners_hear_of_it(tmp_path: Path) -> None:
    class Ear:
        def __init__(self) -> None:
            self.forgot: list[str] = []
            self.learnt: list[str] = []

        def forget(self, ids: list[str]) -> None:
            self.forgot += ids

        def learn(self, entry: Entry) -> None:
            self.learnt.append(entry.id)

    store = open_store(tmp_path / "pc", 1 << 20)
    for key, name in (("a-1", "a"), ("b-1", "b")):
        (store.root / key).mkdir()
        (store.root / key / IDENTITY).write_text(json.dumps({"names": [name], "model": "/m"}))
    ear = Ear()
    store.subscribe("a-1", ear)
    entry = put(store, "a-1", 10, [1])
    assert ear.learnt == [entry.id]  # another cache of the same identity wrote it
    put(store, "b-1", 10, [2])
    assert store.clear(["a"]) == ["a-1"]
    assert ear.forgot == ["*"]
    assert store.entries("a-1") == [] and len(store.entries("b-1")) == 1
    assert (store.root / "a-1" / IDENTITY).exists()  # a live cache still uses the folder
    rows = {r.key: r for r in listing(store)}
    assert rows["b-1"].names == ["b"] and rows["b-1"].entries == 1 and rows["b-1"].bytes > 10
    store.unsubscribe("a-1", ear)
    assert store.clear() == ["a-1", "b-1"]
    assert store.total_bytes() == 0


WRITER = """
import sys, time
sys.path.insert(0, {root!r})
from tests.test_prompt_store import put
from mlx_hub.engine.prompt_store import PromptStore
store = PromptStore({folder!r}, {cap})
for i in range(40):
    put(store, "m{who}-0", 700 + i * 13, list(range(i + {who} * 1000, i + {who} * 1000 + 50)))
"""


def test_two_hubs_on_one_folder_do_not_corrupt_it(tmp_path: Path) -> None:
    folder, cap = tmp_path / "pc", 8_000
    open_store(folder, cap)
    root = str(Path(__file__).resolve().parents[1])
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER.format(root=root, folder=str(folder), cap=cap, who=who)],
            stderr=subprocess.PIPE,
        )
        for who in (1, 2)
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err.decode()
    store = PromptStore(folder, cap)
    assert store.sweep() == 0  # no file outside an index
    assert on_disk(folder) <= cap
    for key in ("m1-0", "m2-0"):
        for entry in store.entries(key):
            tokens = store.read_tokens(key, entry)
            assert tokens is not None and len(tokens) == 50
    assert store.entries("m1-0") or store.entries("m2-0")


def test_an_index_or_token_file_that_cannot_be_read_keeps_everything(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = open_store(tmp_path / "pc", 1 << 20)
    first = put(store, KEY, 50, [1, 2])
    caplog.set_level(logging.WARNING, logger="mlx_hub.engine.prompt_store")
    index = store.root / KEY / INDEX
    saved = index.read_bytes()
    index.unlink()
    index.mkdir()  # reading it fails with an OSError now (EISDIR), as EMFILE or EIO would
    assert store.entries(KEY) == []  # nothing concluded from it: this lookup runs cold
    assert store.sweep() == 0  # what it lists is unknown, so nothing there is deleted
    late = put(store, KEY, 50, [3])  # cannot be listed without losing the rest: it alone is given up
    assert not any(p.exists() for p in store.paths(KEY, late.id))
    assert all(p.exists() for p in store.paths(KEY, first.id))
    assert any("cannot be read" in r.message for r in caplog.records)
    index.rmdir()
    index.write_bytes(saved)  # readable again: everything is there
    assert [e.id for e in store.entries(KEY)] == [first.id]

    _, tokens = store.paths(KEY, first.id)
    raw = tokens.read_bytes()
    tokens.unlink()
    tokens.mkdir()
    assert store.read_tokens(KEY, first) is None  # this use runs cold; the entry stays
    assert [e.id for e in store.entries(KEY)] == [first.id]
    tokens.rmdir()
    tokens.write_bytes(raw)
    assert store.read_tokens(KEY, first) == [1, 2]


BAD_FIELDS = ({"last_use": None}, {"bytes": "12"}, {"tokens": True}, {"digest": 5}, {"extra": 1})


def test_a_malformed_index_entry_is_dropped_alone(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = open_store(tmp_path / "pc", 1 << 20)
    good = put(store, KEY, 50, [1])
    index = store.root / KEY / INDEX
    data = json.loads(index.read_text())
    for n, change in enumerate(BAD_FIELDS):
        entry_id = f"{n:032x}"
        data["entries"][entry_id] = {**data["entries"][good.id], "id": entry_id, **change}
    data["entries"]["f" * 32] = "not an entry"
    index.write_text(json.dumps(data))
    caplog.set_level(logging.WARNING, logger="mlx_hub.engine.prompt_store")
    later = put(store, KEY, 50, [2])  # every insert sorts every entry to evict: none may fail it
    assert {e.id for e in store.entries(KEY)} == {good.id, later.id}
    (row,) = describe(store)["identities"]  # what GET /hub/prompt-cache answers
    assert row["entries"] == 2 and row["last_use"] >= later.last_use
    assert set(json.loads(index.read_text())["entries"]) == {
        good.id,
        later.id,
    }  # the next write left them out
    dropped = [r for r in caplog.records if "dropping entry" in r.message]
    assert len(dropped) == len(BAD_FIELDS) + 1  # one warning each, however often the index is read


def record_store_work(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """(what, thread name) for every store lock taken and every index written from now on."""
    seen: list[tuple[str, str]] = []
    hold, write = StoreLock.hold, prompt_store.atomic_write_json

    def recorded_hold(self: StoreLock, *args: Any, **kwargs: Any) -> Any:
        seen.append(("lock", threading.current_thread().name))
        return hold(self, *args, **kwargs)

    def recorded_write(path: Path, data: Any) -> None:
        seen.append(("write", threading.current_thread().name))
        write(path, data)

    monkeypatch.setattr(StoreLock, "hold", recorded_hold)
    monkeypatch.setattr(prompt_store, "atomic_write_json", recorded_write)
    return seen


def wait_until(check: Callable[[], bool], seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, "not within the deadline"
        time.sleep(0.01)


def test_hits_are_noted_in_memory_and_written_later_in_one_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = PromptStore(tmp_path / "pc", 1 << 20, flush_seconds=3600)  # written when asked, or on close
    a, b = put(store, KEY, 10, [1], last_use=100.0), put(store, KEY, 10, [2], last_use=200.0)
    reader = PromptStore(store.root, 1 << 20)  # another hub: sees only what is on disk
    seen = record_store_work(monkeypatch)

    async def hits() -> None:  # on an event loop, as upstream's single-request lookups are
        for _ in range(20):
            store.touch(KEY, a.id)
            store.touch(KEY, b.id)

    asyncio.run(hits())
    assert seen == []  # no lock and no write on the loop's thread, nor anywhere yet
    assert [e.last_use for e in store.entries(KEY)] != [100.0, 200.0]  # this store counts them already
    assert [e.last_use for e in reader.entries(KEY)] == [100.0, 200.0]
    seen.clear()
    store.flush()
    wait_until(lambda: all(e.last_use > 1000 for e in reader.entries(KEY)))
    writes = [name for what, name in seen if what == "write"]
    assert writes == ["prompt-store:pc"]  # forty uses, one index write, on the store's own thread

    touched = time.time()
    store.touch(KEY, a.id)
    store.close()  # a shutdown or unload: nothing still in memory is lost
    assert {e.id: e.last_use for e in reader.entries(KEY)}[a.id] >= touched


def test_closing_waits_for_a_busy_store_lock_only_so_long(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = PromptStore(tmp_path / "pc", 1 << 20, flush_seconds=3600)
    entry = put(store, KEY, 10, [1])
    fd = os.open(store.root / ".lock", os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)  # another hub holds the store lock and does not let go
    try:
        store.touch(KEY, entry.id)
        store.close(timeout=0.2)  # returns: the use is given up, and says so
    finally:
        os.close(fd)
    assert any("not written" in r.message for r in caplog.records)


async def test_status_builds_read_no_index_and_the_listing_survives_a_bad_entry(
    fast: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    hub = await fast([fake("m")])
    store = hub.prompt_store
    key = store.known["m"]
    entry = await asyncio.to_thread(put, store, key, 10, [1])  # written where upstream writes: a worker
    index = store.root / key / INDEX
    reads: list[str] = []
    read_bytes, read_text = Path.read_bytes, Path.read_text

    def counted(real: Callable[..., Any]) -> Callable[..., Any]:
        def read(path: Path, *args: Any, **kwargs: Any) -> Any:
            if path.name == INDEX and threading.current_thread() is threading.main_thread():
                reads.append(str(path))
            return real(path, *args, **kwargs)

        return read

    monkeypatch.setattr(Path, "read_bytes", counted(read_bytes))
    monkeypatch.setattr(Path, "read_text", counted(read_text))
    for _ in range(3):
        status = hub.status()
        store.touch(key, entry.id)  # a hit between two builds
    assert reads == []  # the loop's thread read no index for any build
    assert status["prompt_cache"]["disk_bytes"] == entry.bytes
    assert meta(hub, "m")["prompt_cache_disk_bytes"] == entry.bytes

    data = json.loads(read_text(index))
    data["entries"]["0" * 32] = {**data["entries"][entry.id], "id": "0" * 32, "last_use": None}
    index.write_text(json.dumps(data))
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=build_controller_app(hub, request_shutdown=lambda: None)),
        base_url="http://127.0.0.1",
    ) as http:
        listed = await http.get("/hub/prompt-cache")
    assert listed.status_code == 200, listed.text
    assert [row["entries"] for row in listed.json()["identities"]] == [1]
