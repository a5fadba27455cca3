"""The prompt-cache store on its own: identities, atomic files, the cap, LRU, locks, bad files. No MLX."""

from __future__ import annotations

import json
import logging
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mlx_hub.engine.prompt_files import PromptStoreError
from mlx_hub.engine.prompt_identity import model_identity
from mlx_hub.engine.prompt_store import IDENTITY, INDEX, Entry, PromptStore, open_store

KEY = "m-0123"


def put(
    store: PromptStore, key: str, size: int, tokens: list[int], *, last_use: float | None = None
) -> Entry:
    """Write one entry the way the patch does: room first, then the files, then the index."""
    assert store.make_room(key, size)
    (store.root / key).mkdir(exist_ok=True)
    entry_id = store.new_entry_id()
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
    assert store.entries(KEY) == []
    assert not any(p.exists() for p in store.paths(KEY, good.id))
    assert any("unreadable" in r.message for r in caplog.records)


def test_sweep_removes_files_no_index_lists(tmp_path: Path) -> None:
    store = open_store(tmp_path / "pc", 1 << 20)
    keep = put(store, KEY, 10, [1])
    folder = store.root / KEY
    (folder / "evil.pkl").write_bytes(b"x")
    old_tmp = folder / ".abc.safetensors.tmp"
    old_tmp.write_bytes(b"x")
    os.utime(old_tmp, (1, 1))
    fresh_tmp = folder / ".def.safetensors.tmp"  # another hub's write in progress
    fresh_tmp.write_bytes(b"x")
    assert open_store(store.root, 1 << 20).sweep() == 0  # open_store swept already
    assert not (folder / "evil.pkl").exists() and not old_tmp.exists() and fresh_tmp.exists()
    assert all(p.exists() for p in store.paths(KEY, keep.id))


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
    rows = {r.key: r for r in store.listing()}
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
