"""Turn one run's measurements into ratios, a markdown table, summary.json and a chart."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from . import agent_swaps, load, prompt_cache, sharded, vlm_batching
from .harness import stack_line

#: key: (what it compares, target test, target text)
TARGETS: dict[str, tuple[str, Any, str]] = {
    "prompt_cache_after_unload_vs_cold": (
        "long prompt's first token after unload+load / cold",
        lambda r: r <= 0.1,
        "≤ 0.1",
    ),
    "vlm_batching_tps_vs_one_at_a_time": (
        "concurrent image requests' tokens/s, batched / one at a time (disable_batching)",
        lambda r: r >= 1.5,
        "≥ 1.5",
    ),
    "prompt_cache_after_restart_vs_cold": (
        "long prompt's first token after a hub restart / cold",
        lambda r: r <= 0.1,
        "≤ 0.1",
    ),
    "cold_start_vs_subprocess": ("hub cold start / subprocess per model", lambda r: r <= 0.2, "≤ 0.2"),
    "cold_start_vs_floor": ("hub cold start / bare mlx_lm.load + first token", lambda r: r <= 1.2, "≤ 1.2"),
    "extra_model_rss_vs_subprocess": (
        "RSS a hub model adds beyond weights / subprocess RSS beyond weights",
        lambda r: r <= 0.1,
        "≤ 0.1",
    ),
    "stream_tps_vs_bare": ("tokens/s via a model port / bare stream_generate", lambda r: r >= 0.95, "≥ 0.95"),
    "routing_tps_vs_port": (
        "tokens/s via the controller's /v1 / via the model port",
        lambda r: r >= 0.97,
        "≥ 0.97",
    ),
    "unload_active_memory_ratio": (
        "abs(active after unload − active before load) / weights",
        lambda r: r <= 0.02,
        "≤ 0.02",
    ),
    "cycle_rss_growth": ("RSS growth over the load/unload cycles", lambda r: r < 0.05, "< 0.05"),
    "swap_vs_bare_load": (
        "group swap to first token / bare load to first token",
        lambda r: r <= 1.2,
        "≤ 1.2",
    ),
    "second_profile_bytes": (
        "MLX bytes a second entry of a loaded model adds / the first load's",
        lambda r: r <= 0.05,
        "≤ 0.05",
    ),
    "second_profile_seconds": (
        "load seconds of that second entry / the first load's",
        lambda r: r <= 0.5,
        "≤ 0.5",
    ),
    "long_prompt_estimate_min": (
        "a long prompt's reservation / MLX memory it took (lowest)",
        lambda r: 0.75 <= r <= 1.25,
        "0.75–1.25",
    ),
    "long_prompt_estimate_max": (
        "a long prompt's reservation / MLX memory it took (highest)",
        lambda r: 0.75 <= r <= 1.25,
        "0.75–1.25",
    ),
    "long_prompt_peak_vs_budget": (
        "MLX peak under concurrent long and short prompts / max_memory",
        lambda r: r <= 1.0,
        "≤ 1.0",
    ),
    "concurrency16_tps_vs_mlx_lm_server": (
        "16 streaming clients, one model: tokens/s via the hub's port / mlx_lm.server",
        lambda r: r >= 1.0,
        "≥ 1.0",
    ),
    "concurrency16_tps_vs_launch": (
        "16 streaming clients, one model: tokens/s via the hub's port / mlx-openai-server launch",
        lambda r: r >= 1.0,
        "≥ 1.0",
    ),
    "concurrency16_p99_ttft_vs_mlx_lm_server": (
        "16 streaming clients, one model: p99 time to first token, hub's port / mlx_lm.server",
        lambda r: r <= 1.0,
        "≤ 1.0",
    ),
    "agent_swaps_vs_process_swapper": (
        "an agent alternating two models that do not fit together: hub total / a process per model, swapped",
        lambda r: r <= 0.2,
        "≤ 0.2",
    ),
    "sharded_rank_memory_vs_unsharded": (
        "one model over two local ranks: each rank's MLX active memory / the unsharded model's",
        lambda r: r <= 0.6,
        "≤ 0.6",
    ),
    # Reported, no target: on one CPU the two ranks share cores and memory bandwidth (benchmarks/README.md).
    "sharded_ttft_vs_one_process": (
        "one model over two local ranks: time to first token / the same model in one process",
        lambda r: True,
        "reported",
    ),
    "sharded_tps_vs_one_process": (
        "one model over two local ranks: decode tokens/s / the same model in one process",
        lambda r: True,
        "reported",
    ),
}


def _long_prompt_ratios(p: dict[str, Any]) -> dict[str, float]:
    return {
        "long_prompt_estimate_min": min(q["ratio"] for q in p["requests"]),
        "long_prompt_estimate_max": max(q["ratio"] for q in p["requests"]),
        "long_prompt_peak_vs_budget": p["load"]["peak_vs_budget"],
    }


def ratios(r: dict[str, Any]) -> dict[str, float]:
    """Every ratio the parts in ``r`` measured (a run may cover only some parts: ``--parts``)."""
    return {
        **(_core_ratios(r) if "cold_start" in r else {}),
        **(_long_prompt_ratios(r["long_prompts"]) if "long_prompts" in r else {}),
        **(prompt_cache.ratios(r["prompt_cache"]) if "prompt_cache" in r else {}),
        **({"vlm_batching_tps_vs_one_at_a_time": r["vlm_batching"]["ratio"]} if "vlm_batching" in r else {}),
        **(load.ratios(r["load"]) if "load" in r else {}),
        **(agent_swaps.ratios(r["agent_swaps"]) if "agent_swaps" in r else {}),
        **(sharded.ratios(r["sharded"]) if "sharded" in r else {}),
    }


def _core_ratios(r: dict[str, Any]) -> dict[str, float]:
    cold, mem, stream, swap = r["cold_start"], r["memory"], r["streaming"], r["swap"]
    f16 = mem["qwen05-f16"]
    return {
        "cold_start_vs_subprocess": cold["hub"]["median"] / cold["subprocess"]["median"],
        "cold_start_vs_floor": cold["hub"]["median"] / cold["floor"]["median"],
        "extra_model_rss_vs_subprocess": f16["hub_extra_beyond_weights"] / f16["subprocess_beyond_weights"],
        "stream_tps_vs_bare": stream["port"]["median"] / stream["bare"]["median"],
        "routing_tps_vs_port": stream["controller"]["median"] / stream["port"]["median"],
        "unload_active_memory_ratio": abs(f16["active_after_unload"] - f16["active_before_load"])
        / f16["weights_bytes"],
        "cycle_rss_growth": (mem["cycles"]["rss_last"] - mem["cycles"]["rss_first"])
        / mem["cycles"]["rss_first"],
        "swap_vs_bare_load": swap["hub_swap"]["median"] / swap["bare_load"]["median"],
        **(_profile_ratios(r["second_profile"]) if "second_profile" in r else {}),
    }


def _profile_ratios(p: dict[str, Any]) -> dict[str, float]:
    return {
        "second_profile_bytes": max(p["second_bytes"]["median"], 0) / max(p["first_bytes"]["median"], 1),
        "second_profile_seconds": p["second_load_s"]["median"] / max(p["first_load_s"]["median"], 1e-9),
    }


def _s(stat: dict[str, float], unit: str = "s", digits: int = 2) -> str:
    return f"{stat['median']:.{digits}f} {unit} ({stat['min']:.{digits}f}–{stat['max']:.{digits}f})"


def _core_markdown(r: dict[str, Any]) -> list[str]:
    """Cold start, memory, streaming, group swap, second profile and concurrency (the ``core`` part)."""
    mb = 1e6
    lines: list[str] = []
    cold = r["cold_start"]
    if "hub_load" in cold:
        load_ratio = cold["hub_load"]["median"] / cold["subprocess_ready"]["median"]
        prefill = cold["floor"]["median"] - cold["bare_load"]["median"]
        lines += [
            "",
            f"Load alone (hub JIT load / subprocess spawn-to-ready): **{load_ratio:.3f}**. Every contender's first",
            f"token then adds the same prefill, {prefill:.2f} s here (CPU MLX, 16-bit); where that is milliseconds",
            "(Metal, CUDA), `cold_start_vs_subprocess` approaches the load-only ratio.",
        ]
    lines += [
        "",
        "## Cold start: request to first token of an unloaded model (Qwen2.5-0.5B shape, 16-bit)",
        "",
        "| contender | time |",
        "| --- | --- |",
        f"| hub (JIT load in the running process) | {_s(cold['hub'])} |",
        f"| `mlx-openai-server launch` started on demand | {_s(cold['subprocess'])} |",
        f"| bare `mlx_lm.load` + first token in a warm process (floor) | {_s(cold['floor'])} |",
        "",
        "The load alone, before any compute (the first token then adds the same prefill to every contender):",
        "",
        "| contender | time |",
        "| --- | --- |",
        f"| hub: JIT load (`load_seconds`) | {_s(cold['hub_load'])} |",
        f"| subprocess: spawn to `/health` ready | {_s(cold['subprocess_ready'])} |",
        f"| bare: `mlx_lm.load` | {_s(cold['bare_load'])} |",
        "",
        "## Memory",
        "",
        "| model | weights | hub: RSS added (vs. before any load) | hub: beyond weights | subprocess RSS | subprocess beyond weights | MLX active before load → after unload |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for name in ("qwen05-f16", "qwen05-q4"):
        m = r["memory"][name]
        lines.append(
            f"| {name} | {m['weights_bytes'] / mb:.0f} MB | {m['hub_added_rss'] / mb:.0f} MB | "
            f"{m['hub_extra_beyond_weights'] / mb:.0f} MB | {m['subprocess_rss'] / mb:.0f} MB | "
            f"{m['subprocess_beyond_weights'] / mb:.0f} MB | {m['active_before_load'] / mb:.2f} → {m['active_after_unload'] / mb:.2f} MB |"
        )
    cyc = r["memory"]["cycles"]
    lines += [
        "",
        f"RSS over {cyc['count']} load/unload cycles of the 16-bit model: {cyc['rss_first'] / mb:.0f} MB after the "
        f"first, {cyc['rss_last'] / mb:.0f} MB after the last.",
        "",
        f"## Streaming {r['tokens']} tokens (decode tokens/s)",
        "",
        "| path | tokens/s | tokens per run |",
        "| --- | --- | --- |",
    ]
    for key, label in (
        ("port", "hub, the model's own port"),
        ("controller", "hub, the controller's `/v1`"),
        ("bare", "bare `stream_generate`"),
    ):
        s = r["streaming"][key]
        lines.append(f"| {label} | {_s(s, 'tok/s', 1)} | {', '.join(str(t) for t in s['tokens'])} |")
    swap = r["swap"]
    lines += [
        "",
        "## Group swap (max_loaded 1): evict one member, load the other, to first token",
        "",
        "| contender | time |",
        "| --- | --- |",
        f"| hub swap | {_s(swap['hub_swap'])} |",
        f"| bare load + first token | {_s(swap['bare_load'])} |",
    ]
    if "second_profile" in r:
        p = r["second_profile"]
        lines += [
            "",
            "## A second profile of a loaded model (another entry, same folder: one copy of the weights)",
            "",
            "| load | time | MLX bytes added |",
            "| --- | --- | --- |",
            f"| first entry | {_s(p['first_load_s'])} | {p['first_bytes']['median'] / mb:,.1f} MB |",
            f"| second entry | {_s(p['second_load_s'])} | {p['second_bytes']['median'] / mb:,.2f} MB |",
        ]
    lines += [
        "",
        "## Concurrency: clients spread across 3 models (non-streaming)",
        "",
        "| clients | aggregate tokens/s | p50 latency | max latency |",
        "| ---: | ---: | ---: | ---: |",
    ]
    for level in r["concurrency"]["levels"]:
        lines.append(
            f"| {level['clients']} | {level['aggregate_tps']:.1f} | {level['latency_p50_s']:.2f} s | {level['latency_max_s']:.2f} s |"
        )
    return lines


def markdown(r: dict[str, Any], ratio: dict[str, float]) -> str:
    mb = 1e6
    lines = [
        f"# Benchmarks: {r['machine']}, {r['date']}",
        "",
        stack_line(r.get("stack")),
        "",
        f"Profile `{r['profile']}`, {r['reps']} repetitions per measurement, contenders alternated within each",
        f"repetition; medians with (min–max). Whole run: {r['seconds'] / 60:.1f} min"
        + (f" (only {', '.join(r['parts'])})" if r.get("parts") else "")
        + ". Models are random weights at",
        "Qwen2.5-0.5B's shape (16-bit, and 4-bit with mlx-lm's quantization) with a small offline tokenizer.",
        "",
        "## Ratios against the targets",
        "",
        "| key | compares | value | target | met |",
        "| --- | --- | ---: | --- | --- |",
    ]
    for key, value in ratio.items():
        what, test, text = TARGETS.get(key, (key, lambda r: True, "reported"))
        met = "–" if text == "reported" else ("yes" if test(value) else "**no**")
        lines.append(f"| `{key}` | {what} | {value:.3f} | {text} | {met} |")
    if "cold_start" in r:
        lines += _core_markdown(r)
    if "long_prompts" in r:
        p = r["long_prompts"]
        lines += [
            "",
            "## Memory under long prompts",
            "",
            "Each request's reservation (KV cache at prompt + max_tokens, plus its worst prefill chunk) against",
            "the rise of MLX's peak memory while it ran, one request at a time:",
            "",
            "| model | prompt tokens (counted) | estimate | measured | estimate / measured |",
            "| --- | ---: | ---: | ---: | ---: |",
        ]
        for q in p["requests"]:
            lines.append(
                f"| {q['model']} | {q['prompt_tokens']} ({q['counted_tokens']}) | {q['estimate_bytes'] / mb:,.1f} MB "
                f"| {q['measured_bytes'] / mb:,.1f} MB | {q['ratio']:.3f} |"
            )
        burst = p["load"]
        lines += [
            "",
            f"Then {burst['requests']} long and short prompts from 4 clients at once, on both models, through",
            f"their ports and /v1, under max_memory {p['budget_bytes'] / mb:,.1f} MB (both models' weights and",
            "one and a half long requests): MLX peak "
            f"{burst['peak_bytes'] / mb:,.1f} MB = {burst['peak_vs_budget']:.3f} of the budget; statuses "
            + ", ".join(f"{k}: {v}" for k, v in burst["outcomes"].items())
            + f"; {burst['seconds']:.0f} s.",
        ]
    if "prompt_cache" in r:
        lines += prompt_cache.markdown(r["prompt_cache"])
    if "vlm_batching" in r:
        lines += ["", *vlm_batching.markdown(r["vlm_batching"])]
    if "load" in r:
        lines += ["", *load.markdown(r["load"])]
    if "agent_swaps" in r:
        lines += ["", *agent_swaps.markdown(r["agent_swaps"])]
    if "sharded" in r:
        lines += ["", "## One model over two local ranks", "", sharded.table(r["sharded"])]
    if r.get("notes"):
        lines += ["", "## Notes", "", *r["notes"]]
    return "\n".join(lines) + "\n"


def chart(ratio: dict[str, float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [
        "cold_start_vs_subprocess",
        "cold_start_vs_floor",
        "extra_model_rss_vs_subprocess",
        "stream_tps_vs_bare",
    ]
    targets = [0.2, 1.2, 0.1, 0.95]
    fig, ax = plt.subplots(figsize=(8, 4))
    bars = ax.bar(range(len(keys)), [ratio[k] for k in keys], color="#4f7cff")
    ax.scatter(
        range(len(keys)), targets, color="#f5a623", marker="_", s=2000, linewidths=3, label="target", zorder=3
    )
    for bar, key in zip(bars, keys, strict=True):
        ax.annotate(
            f"{ratio[key]:.2f}",
            (bar.get_x() + bar.get_width() / 2, bar.get_height()),
            ha="center",
            va="bottom",
        )
    ax.set_xticks(range(len(keys)), [k.replace("_vs_", "\nvs ") for k in keys], fontsize=8)
    ax.set_ylabel("ratio")
    ax.set_title("mlx-openai-server-hub against the alternatives (same run)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


#: The parts whose plots each run also writes under a fixed name, so the README always shows the newest.
PLOTS = {"load": load.chart, "agent_swaps": agent_swaps.chart}


def merged_summary(previous: dict[str, Any], r: dict[str, Any], ratio: dict[str, float]) -> dict[str, Any]:
    """summary.json after this run: its ratios replace those it measured, the others stay with their date.

    A run of some parts only (``--parts``) then leaves the keys of the parts it
    did not run as the last run that measured them left them.
    """
    measured = dict(previous.get("measured") or {})
    kept = {k: v for k, v in previous.items() if k in TARGETS and k not in ratio}
    for key in kept:
        measured.setdefault(key, previous.get("date"))
    measured.update(dict.fromkeys(ratio, r["date"]))
    return {
        **kept,
        **{k: round(v, 4) for k, v in ratio.items()},
        "machine": r["machine"],
        "date": r["date"],
        "profile": r["profile"],
        "stack": r.get("stack"),
        "measured": {k: measured[k] for k in TARGETS if k in measured},
    }


def write_results(r: dict[str, Any], out: Path) -> list[Path]:
    """``<stem>.md``, ``<stem>.json``, summary.json and the charts; ``<stem>`` names the parts of a partial run."""
    out.mkdir(parents=True, exist_ok=True)
    ratio = ratios(r)
    stem = f"{r['machine']}-{r['date']}" + "".join(f"-{p.replace('_', '-')}" for p in r.get("parts") or ())
    md = out / f"{stem}.md"
    md.write_text(markdown(r, ratio))
    summary = out / "summary.json"
    previous = json.loads(summary.read_text()) if summary.exists() else {}
    summary.write_text(json.dumps(merged_summary(previous, r, ratio), indent=2) + "\n")
    (out / f"{stem}.json").write_text(json.dumps(r, indent=2) + "\n")
    paths = [md, summary]
    try:
        if "cold_start" in r:
            chart(ratio, out / f"{stem}.png")
            paths.append(out / f"{stem}.png")
        for part, draw in PLOTS.items():
            if part in r:
                name = part.replace("_", "-")
                draw(r[part], out / f"{stem}-{name}.png")
                shutil.copyfile(out / f"{stem}-{name}.png", out / f"latest-{name}.png")
                paths += [out / f"{stem}-{name}.png", out / f"latest-{name}.png"]
    except ImportError:
        print("matplotlib is not installed: no chart (pip install matplotlib)")
    return paths
