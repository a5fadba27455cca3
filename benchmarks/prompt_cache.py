"""Prompt cache after a swap: time to first token of a long prompt cold, after an unload and load, and
after a hub restart, against upstream's ``launch`` restarted on the same model.

Each hub is the daemon in its own process (harness.HubProcess); the peer is ``mlx-openai-server launch``.
Also measured: what an unload, a load and a hub start cost with the cache on against the same hub with
``prompt_cache_disk_size: 0``, and the bytes written to disk per request. ``python -m
benchmarks.prompt_cache --cache .cache/bench --out x.json`` runs it alone; ``make bench`` runs it too.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path
from typing import Any

import httpx

from mlx_hub.engine.versions import library_versions

from .harness import HubProcess, LaunchedServer, stack_line

#: A llama small enough to prefill thousands of tokens on a CPU in seconds, with a context that holds them.
SHAPE: dict[str, Any] = {"hidden_size": 256, "num_hidden_layers": 4, "intermediate_size": 768,
                         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 5120}  # fmt: skip
MAX_TOKENS = 8
#: What every contender is given as its context: the model's own.
CONTEXT = SHAPE["max_position_embeddings"]


def long_prompt(model: Path) -> list[dict[str, str]]:
    """The longest chat prompt the model allows with MAX_TOKENS to answer (counted with its tokenizer)."""
    from transformers import AutoTokenizer

    from mlx_hub.testing.tinymodel import _CORPUS

    tokenizer = AutoTokenizer.from_pretrained(str(model))
    corpus = _CORPUS.split()
    words = CONTEXT
    while True:
        messages = [{"role": "user", "content": " ".join(corpus[i % len(corpus)] for i in range(words))}]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        count = len(tokenizer(text, add_special_tokens=False)["input_ids"])
        if count + MAX_TOKENS <= CONTEXT:
            return messages
        words -= max(4, (count + MAX_TOKENS - CONTEXT) // 2)


def first_token(
    base_url: str, model: str, messages: list[dict[str, str]], bias: dict[str, float]
) -> dict[str, Any]:
    """Stream one greedy answer: seconds to its first token, and the prompt tokens upstream took from a cache."""
    body = {"model": model, "messages": messages, "max_tokens": MAX_TOKENS, "temperature": 0.0, "stream": True,
            "stream_options": {"include_usage": True}, "logit_bias": bias}  # fmt: skip
    started = time.perf_counter()
    first, usage, text = None, {}, ""
    with httpx.stream("POST", f"{base_url}/chat/completions", json=body, timeout=1800) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line.strip() == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            usage = chunk.get("usage") or usage
            delta = ((chunk.get("choices") or [{}])[0].get("delta") or {}).get("content")
            if delta:
                first = first or time.perf_counter()
                text += delta
    details = usage.get("prompt_tokens_details") or {}
    return {
        "first_token_s": (first or time.perf_counter()) - started,
        "prompt_tokens": usage.get("prompt_tokens"),
        "cached_tokens": details.get("cached_tokens") or 0,
        "text": text,
    }


def _timed(action: Any) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def hub_run(model: Path, workdir: Path, disk_size: str, ask: Any) -> dict[str, Any]:
    """One hub's story: cold, again, unload and load, then a restart; timings of each move."""
    shutil.rmtree(workdir, ignore_errors=True)
    settings = {"prompt_cache_path": str(workdir / "prompt-cache"), "prompt_cache_disk_size": disk_size}
    entries = [{"name": "long", "model_path": str(model), "jit_enabled": True, "default": True,
                "context_length": CONTEXT}]  # fmt: skip
    out: dict[str, Any] = {}
    started = time.perf_counter()
    hub = HubProcess(workdir, entries, **settings)
    out["start_s"] = time.perf_counter() - started
    try:
        out["first_load_s"] = _timed(lambda: hub.act("long", "load"))
        out["cold"] = ask(hub.port_url("long"), "long")
        cache = hub.status().prompt_cache
        out["bytes_written_first_request"] = cache.bytes_written if cache else 0
        out["again"] = ask(hub.port_url("long"), "long")
        out["unload_s"] = _timed(lambda: hub.act("long", "unload"))
        out["load_s"] = _timed(lambda: hub.act("long", "load"))
        out["after_unload"] = ask(hub.port_url("long"), "long")
        status = hub.status()
        out["status"] = status.model("long").model_dump()
        out["prompt_cache"] = status.prompt_cache.model_dump() if status.prompt_cache else None
    finally:
        out["shutdown_s"] = _timed(hub.close)
    started = time.perf_counter()
    hub = HubProcess(workdir, entries, **settings)
    out["restart_s"] = time.perf_counter() - started
    try:
        out["restart_load_s"] = _timed(lambda: hub.act("long", "load"))
        out["after_restart"] = ask(hub.port_url("long"), "long")
    finally:
        hub.close()
    return out


def launch_run(model: Path, workdir: Path, ask: Any) -> dict[str, Any]:
    """The peer: upstream's own server, asked cold, again, and after a restart of its process."""
    out: dict[str, Any] = {}
    for label in ("first", "restarted"):
        server = LaunchedServer(model, workdir, context_length=CONTEXT)
        try:
            server.wait_ready()
            url = f"{server.url}/v1"
            if label == "first":
                out["cold"] = ask(url, server.model_id)
                out["again"] = ask(url, server.model_id)
            else:
                out["after_restart"] = ask(url, server.model_id)
        finally:
            server.close()
    return out


def run(cache: Path, workdir: Path) -> dict[str, Any]:
    from mlx_hub.testing.tinymodel import make_model, text_only_logit_bias

    model = make_model(cache / "prompt-cache-llama", arch="llama", shape=SHAPE, seed=21)
    messages = long_prompt(model)
    bias = text_only_logit_bias(model)

    def ask(url: str, name: str) -> dict[str, Any]:
        return first_token(url, name, messages, bias)

    result: dict[str, Any] = {"model": {"arch": "llama", **SHAPE}, "max_tokens": MAX_TOKENS}
    result["hub"] = hub_run(model, workdir / "hub", "10GB", ask)
    result["hub_off"] = hub_run(model, workdir / "hub-off", "0", ask)
    result["launch"] = launch_run(model, workdir / "launch", ask)
    result["prompt_tokens"] = result["hub"]["cold"]["prompt_tokens"]
    return result


def ratios(p: dict[str, Any]) -> dict[str, float]:
    hub = p["hub"]
    cold = hub["cold"]["first_token_s"]
    return {
        "prompt_cache_after_unload_vs_cold": hub["after_unload"]["first_token_s"] / cold,
        "prompt_cache_after_restart_vs_cold": hub["after_restart"]["first_token_s"] / cold,
    }


def markdown(p: dict[str, Any]) -> list[str]:
    """The section's lines for the results file."""
    hub, off, peer = p["hub"], p["hub_off"], p["launch"]

    def row(label: str, *runs: dict[str, Any] | None) -> str:
        cells = [f"{r['first_token_s']:.2f} s ({r['cached_tokens']} cached)" if r else "–" for r in runs]
        return f"| {label} | " + " | ".join(cells) + " |"

    ratio = ratios(p)
    written = hub["bytes_written_first_request"]
    kept = (hub["prompt_cache"] or {}).get("disk_bytes", 0)
    return [
        "",
        "## Prompt cache after a swap",
        "",
        f"A {p['prompt_tokens']}-token chat prompt (the longest the model's {CONTEXT}-token context allows) on a",
        f"llama (hidden {SHAPE['hidden_size']}, {SHAPE['num_hidden_layers']} layers), {p['max_tokens']} tokens"
        " greedy; time to first token:",
        "",
        "| moment | hub, caches on disk | hub, `prompt_cache_disk_size: 0` | `mlx-openai-server launch` |",
        "| --- | ---: | ---: | ---: |",
        row("cold (first request)", hub["cold"], off["cold"], peer["cold"]),
        row("again, same process", hub["again"], off["again"], peer["again"]),
        row("after unload + load", hub["after_unload"], off["after_unload"], None),
        row("after a restart", hub["after_restart"], off["after_restart"], peer["after_restart"]),
        "",
        f"Restored / cold: **{ratio['prompt_cache_after_unload_vs_cold']:.3f}** after an unload, "
        f"**{ratio['prompt_cache_after_restart_vs_cold']:.3f}** after a restart (target ≤ 0.1).",
        "",
        "| cost | caches on disk | off | added |",
        "| --- | ---: | ---: | ---: |",
        *(
            f"| {label} | {hub[key]:.2f} s | {off[key]:.2f} s | {hub[key] - off[key]:+.2f} s |"
            for label, key in (
                ("unload", "unload_s"),
                ("load (restores the index)", "load_s"),
                ("hub start to ready", "restart_s"),
                ("load after the restart", "restart_load_s"),
                ("hub shutdown", "shutdown_s"),
            )
        ),  # fmt: skip
        "",
        f"Bytes written to disk by the first request: {written / 1e6:.1f} MB, {written / max(kept, 1):.1f} times"
        f" the {kept / 1e6:.1f} MB entry kept on disk afterwards: upstream inserts a batched request's cache"
        " twice (a checkpoint when the prompt is prefilled, then the whole sequence, which replaces it), and"
        " writes both to its own temporary folder too.",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=Path(".cache/bench"))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument(
        "--report", type=Path, help="print the table of an earlier run's JSON instead of running"
    )
    args = parser.parse_args()
    if args.report:
        print("\n".join(markdown(json.loads(args.report.read_text()))))
        return
    result = {**run(args.cache, args.cache / "run-prompt-cache"), "stack": library_versions()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print("\n".join([stack_line(result["stack"]), "", *markdown(result)]))


if __name__ == "__main__":
    main()
