"""The prompt cache's writer: jobs in order on their own thread, cancellable until they start, waited for."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from mlx_hub.engine.prompt_writer import WriteBehind


def test_jobs_run_in_order_and_a_queued_one_can_be_cancelled() -> None:
    writer = WriteBehind("t")
    gate, ran = threading.Event(), []
    writer.submit(lambda: (gate.wait(30), ran.append("first")))
    writer.submit(lambda: ran.append("written"), "entry")
    writer.submit(lambda: ran.append("deleted"))
    assert writer.busy() and writer.cancel("entry")  # not started: never written
    assert not writer.cancel("entry")
    gate.set()
    assert writer.flush(30)
    assert ran == ["first", "deleted"] and not writer.busy()
    assert writer.close(30)


def test_a_reader_waits_for_one_job_and_a_failed_job_stops_nothing() -> None:
    writer = WriteBehind("t")
    gate, ran = threading.Event(), []

    def fails() -> None:
        gate.wait(30)
        raise OSError("disk full")

    writer.submit(fails, "bad")
    writer.submit(lambda: ran.append("next"), "good")
    assert not writer.wait("good", timeout=0.01)  # still queued behind the held job
    gate.set()
    assert writer.wait("good", timeout=30) and ran == ["next"]
    assert writer.close(30)


def test_queued_bytes_hold_back_the_next_payload() -> None:
    writer = WriteBehind("t", max_bytes=100)
    gate, submitted = threading.Event(), threading.Event()
    writer.submit(lambda: gate.wait(30), nbytes=80)

    def second() -> None:
        writer.submit(lambda: None, nbytes=80)
        submitted.set()

    thread = threading.Thread(target=second)
    thread.start()
    assert not submitted.wait(0.2)  # 160 queued bytes would pass the bound: it waits for the writer
    gate.set()
    assert submitted.wait(30)
    thread.join(30)
    assert writer.close(30)


def test_an_idle_writer_holds_nothing_of_the_job_it_ran() -> None:
    """A job carries a cache's arrays; the thread waiting for the next job must not keep it alive."""
    import gc
    import weakref

    class Payload:
        pass

    writer = WriteBehind("t")
    payload = Payload()
    gone = weakref.ref(payload)
    writer.submit(lambda p=payload: None)
    del payload
    assert writer.flush(30)
    gc.collect()
    assert gone() is None, "the writer thread still holds the last job"
    assert writer.close(30)


def test_a_cache_the_disk_refuses_is_a_warning_and_a_miss(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A full disk while an entry is written behind the batch: one warning naming the model, nothing kept,
    the entry forgotten (a miss, never a file that is not there), and the writer goes on."""
    import logging

    import mlx.core as mx
    from mlx_lm.models.cache import KVCache

    from mlx_hub.engine.base import Identity
    from mlx_hub.engine.patches import prompt_cache
    from mlx_hub.engine.prompt_store import open_store

    def no_space(path: Path, cache: list[Any], key: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(prompt_cache, "save_entry", no_space)
    store = open_store(tmp_path / "pc", 1 << 30)
    identity = Identity(key="k" * 16, description={})
    store.adopt(identity, "m")
    cache = prompt_cache.PersistentPromptCache(store, identity.key, "m", max_size=8, max_bytes=1 << 30)
    kv = KVCache()
    kv.update_and_fetch(mx.zeros((1, 1, 4, 8)), mx.zeros((1, 1, 4, 8)))
    with caplog.at_level(logging.WARNING, logger=prompt_cache.__name__):
        cache.insert_cache([1, 2, 3, 4], [kv])  # one request at a time: waits for its write
    assert "model 'm': a prompt cache could not be written" in caplog.text and "No space left" in caplog.text
    assert cache.fetch_nearest_cache([1, 2, 3, 4])[0] is None
    assert not list((tmp_path / "pc").rglob("*.safetensors"))
    cache.close()
    store.close()
