"""``make bench`` bookkeeping: choosing parts, and a partial run's summary.json keeping the other parts' keys."""

from __future__ import annotations

import argparse

import pytest

from benchmarks.__main__ import PARTS, parts
from benchmarks.report import merged_summary


def test_parts_run_in_their_order_and_an_unknown_one_is_named() -> None:
    assert parts("agent-swaps, load") == ["load", "agent_swaps"]
    assert parts(",".join(reversed(PARTS))) == list(PARTS)
    with pytest.raises(argparse.ArgumentTypeError, match="unknown part nosuch; choose from core,"):
        parts("load,nosuch")


def test_a_partial_run_updates_its_keys_and_keeps_the_others_with_their_date() -> None:
    previous = {
        "cold_start_vs_subprocess": 0.22,
        "concurrency16_tps_vs_launch": 0.9,
        "date": "2026-12-06",
        "machine": "m",
        "not_a_key": 1,
    }
    run = {"date": "2026-12-07", "machine": "m", "profile": "cpu", "stack": None}
    summary = merged_summary(previous, run, {"concurrency16_tps_vs_launch": 2.51234})
    assert summary["cold_start_vs_subprocess"] == 0.22 and summary["concurrency16_tps_vs_launch"] == 2.5123
    assert summary["measured"] == {
        "cold_start_vs_subprocess": "2026-12-06",
        "concurrency16_tps_vs_launch": "2026-12-07",
    }
    assert "not_a_key" not in summary and summary["date"] == "2026-12-07"
    again = merged_summary(summary, {**run, "date": "2026-12-08"}, {"cold_start_vs_subprocess": 0.18})
    assert again["measured"]["concurrency16_tps_vs_launch"] == "2026-12-07"  # its own date stays


def test_every_ratio_a_part_reports_has_a_row_in_the_table() -> None:
    """A ratio without a TARGETS row crashed the report after a whole run (the sharded part's timings)."""
    from benchmarks import sharded
    from benchmarks.report import TARGETS, markdown

    rank = {"median": 1.0, "min": 1.0, "max": 1.0, "n": 1}
    part = {"unsharded_bytes": 2, "rank_bytes": [1, 1], "ttft": {"one": rank, "two": rank},
            "tps": {"one": rank, "two": rank}}  # fmt: skip
    assert set(sharded.ratios(part)) <= set(TARGETS)
    table = markdown(
        {"machine": "m", "date": "d", "profile": "cpu", "reps": 1, "seconds": 60}, {"new_key": 1.5}
    )
    assert "| `new_key` |" in table and "reported" in table  # a key with no row yet is written, not a crash
