"""The prompt cache's writer: jobs in order on their own thread, cancellable until they start, waited for."""

from __future__ import annotations

import threading

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
