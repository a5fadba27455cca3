"""Hubs that share one prompt-cache folder: leases, eviction across hubs, writes in progress. No MLX.

The other hub is a real process holding real ``fcntl`` locks: killing it must
free its identities and its half-written files, with nothing to clean up by hand.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from mlx_hub.engine.base import Identity
from mlx_hub.engine.prompt_listing import listing
from mlx_hub.engine.prompt_store import IDENTITY, PromptStore, open_store

from .test_prompt_cache import cli
from .test_prompt_store import put

ROOT = str(Path(__file__).resolve().parents[1])

#: Another hub on the folder: hub.yaml has identity c-1, it wrote one entry there (last used at 2000)
#: and is writing a second one (published, not yet listed) when it prints both ids.
OTHER_HUB = """
import sys, time
sys.path.insert(0, {root!r})
from tests.test_prompt_store import put
from mlx_hub.engine.base import Identity
from mlx_hub.engine.prompt_store import PromptStore
store = PromptStore({folder!r}, {cap})
store.known = {{"c": "c-1"}}
store.adopt(Identity(key="c-1", description={{"model": "/models/c"}}), "c")
entry = put(store, "c-1", 900, [7], last_use=2000.0)
with store.writing("c-1") as writing:
    payload, _ = store.paths("c-1", writing)
    payload.with_name("." + writing + ".tmp.safetensors").write_bytes(b"x" * 10)
    payload.write_bytes(b"x" * 10)
    print(entry.id, writing, flush=True)
    time.sleep(600)
"""


def other_hub(folder: Path, cap: int) -> tuple[subprocess.Popen[str], str, str]:
    """Start the other hub; its process, its listed entry's id and the id it is writing."""
    script = OTHER_HUB.format(root=ROOT, folder=str(folder), cap=cap)
    proc = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    line = proc.stdout.readline() if proc.stdout else ""  # the script prints once it holds everything
    if not line:
        proc.kill()
        raise AssertionError(f"the other hub did not start: {proc.communicate()[1]}")
    listed, writing = line.split()
    return proc, listed, writing


def ids(store: PromptStore, key: str) -> list[str]:
    return [e.id for e in store.entries(key)]


def stop(proc: subprocess.Popen[str]) -> None:
    proc.kill()  # SIGKILL: no clean-up of its own; the kernel drops its locks
    proc.communicate()


def test_a_live_hubs_identity_stays_and_a_killed_hubs_becomes_evictable(tmp_path: Path) -> None:
    folder, cap = tmp_path / "pc", 2500
    mine = open_store(folder, cap)
    mine.known = {"b": "b-1"}
    old_b = put(mine, "b-1", 900, [1], last_use=1000.0)
    proc, theirs, writing = other_hub(folder, cap)
    in_flight = [folder / "c-1" / f".{writing}.tmp.safetensors", folder / "c-1" / f"{writing}.safetensors"]
    try:
        # Their identity is not in my hub.yaml, yet a live hub leases it: my next write evicts the
        # oldest entry of all (my own), neither theirs first nor their folder.
        new_b = put(mine, "b-1", 900, [2], last_use=1500.0)
        assert ids(mine, "b-1") == [new_b.id] and old_b.id not in ids(mine, "b-1")
        assert ids(mine, "c-1") == [theirs]
        assert (folder / "c-1" / IDENTITY).exists()
        row = {r.key: r for r in listing(mine)}["c-1"]
        assert row.in_use and not row.known
        # A hub starting on the folder sweeps it: their write in progress is theirs still.
        assert open_store(folder, cap).sweep() == 0
        assert all(p.exists() for p in in_flight)
    finally:
        stop(proc)
    # Killed, its lease and writer lock went with it: its entry goes before my older one, and
    # its folder, half-written files included, with it.
    last = put(mine, "b-1", 900, [3], last_use=1200.0)
    assert sorted(ids(mine, "b-1")) == sorted([new_b.id, last.id])
    assert not (folder / "c-1").exists()


def test_cache_clear_spares_another_hubs_write_in_progress(tmp_path: Path) -> None:
    folder, cap = tmp_path / "pc", 1 << 20
    open_store(folder, cap)
    config = tmp_path / "hub.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "prompt_cache_path": str(folder),
                "log_path": str(tmp_path / "logs"),
                "models": [{"name": "b", "model_path": str(tmp_path / "nowhere")}],
            }
        )
    )
    proc, theirs, writing = other_hub(folder, cap)
    in_flight = [folder / "c-1" / f".{writing}.tmp.safetensors", folder / "c-1" / f"{writing}.safetensors"]
    try:
        cleared = cli(config, "clear")  # no hub runs for this config: the CLI clears the folder itself
        assert cleared.returncode == 0 and "cleared 1" in cleared.stdout, cleared.stderr
        store = PromptStore(folder, cap)
        assert ids(store, "c-1") == []  # what was listed is gone
        assert all(p.exists() for p in in_flight)  # what is being written is not
        assert (folder / "c-1" / IDENTITY).exists()  # nor the description of an identity a hub uses
    finally:
        stop(proc)
    assert store.sweep() == 3  # now nobody's: the lock file, the temporary and the published payload
    assert not any(p.exists() for p in in_flight)


def test_a_save_into_a_folder_that_vanished_makes_it_again(tmp_path: Path) -> None:
    store = open_store(tmp_path / "pc", 1 << 20)
    store.known = {"a": "a-1"}
    store.adopt(Identity(key="a-1", description={"model": "/models/a"}), "a")
    put(store, "a-1", 10, [1])
    shutil.rmtree(store.root)  # a person, or an older hub's clear
    entry = put(store, "a-1", 10, [2])
    assert ids(store, "a-1") == [entry.id]
    description = json.loads((store.root / "a-1" / IDENTITY).read_text())
    assert description == {"names": ["a"], "model": "/models/a"}
    assert os.stat(store.root).st_mode & 0o777 == 0o700
    assert PromptStore(store.root, 1 << 20).in_use("a-1")  # leased again: another hub sees it in use
