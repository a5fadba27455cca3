"""Multimodal batching: N concurrent image requests through the hub, batched against one at a time.

One hub process, one random-weight llava folder (a CLIP tower and a llama at
``SHAPE``) served twice: ``batched`` (upstream's ``VLMBatchScheduler``, the
default) and ``alone`` (``disable_batching: true``). Each repetition sends the
same N image chat requests (each its own picture, temperature 0) to each entry
at once, the two taking turns, and counts the completion tokens the replies
report over the wall time. Greedy answers are the same either way, so both sides
generate the same tokens. Ratio: batched tokens/s over one-at-a-time tokens/s.

``python -m benchmarks.vlm_batching --cache .cache/bench --out x.json`` runs it alone, prints the
table and writes it beside the JSON (``x.md``); ``make bench`` runs it in a process of its own.
Options: ``--clients N`` (8), ``--tokens N`` (64), ``--reps N`` (3).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import statistics
import time
from pathlib import Path
from typing import Any

import httpx

from benchmarks.harness import HubProcess, machine_name, stack_line
from mlx_hub.engine.versions import library_versions

SHAPE = {"hidden_size": 512, "num_hidden_layers": 8, "intermediate_size": 1536, "num_attention_heads": 8}


def picture(i: int) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), ((60 * i) % 256, (110 * i + 40) % 256, (170 * i + 90) % 256)).save(
        buffer, "PNG"
    )
    return base64.b64encode(buffer.getvalue()).decode()


def body(model: str, image: str, tokens: int) -> dict[str, Any]:
    content = [
        {"type": "text", "text": "Describe the picture."},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{image}"}},
    ]
    return {
        "model": model,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": tokens,
        "temperature": 0,
    }


async def burst(http: httpx.AsyncClient, url: str, bodies: list[dict[str, Any]]) -> dict[str, Any]:
    """All requests at once: completion tokens over the wall time until the last reply."""
    started = time.perf_counter()
    replies = await asyncio.gather(*(http.post(url, json=b) for b in bodies))
    seconds = time.perf_counter() - started
    bad = [r.text for r in replies if r.status_code != 200]
    assert not bad, bad
    tokens = sum(r.json()["usage"]["completion_tokens"] for r in replies)
    return {"seconds": seconds, "tokens": tokens, "tps": tokens / seconds}


async def measure(hub: HubProcess, clients: int, tokens: int, reps: int) -> dict[str, Any]:
    images = [picture(i) for i in range(clients)]
    runs: dict[str, list[dict[str, Any]]] = {"batched": [], "alone": []}
    async with httpx.AsyncClient(timeout=1800) as http:
        urls = {name: f"{hub.port_url(name)}/chat/completions" for name in runs}
        for name in runs:  # warm: the scheduler starts and the kernels compile before anything counts
            await burst(http, urls[name], [body(name, images[0], 4)])
        for _ in range(reps):
            for name in runs:
                runs[name].append(await burst(http, urls[name], [body(name, im, tokens) for im in images]))
    medians = {name: statistics.median(r["tps"] for r in rs) for name, rs in runs.items()}
    return {
        "clients": clients,
        "max_tokens": tokens,
        "reps": reps,
        "runs": runs,
        "batched_tps": round(medians["batched"], 2),
        "alone_tps": round(medians["alone"], 2),
        "ratio": round(medians["batched"] / medians["alone"], 2),
    }


def markdown(result: dict[str, Any]) -> list[str]:
    """The section's table, as the results file and the terminal show it."""
    lines = [
        f"### Multimodal batching ({result['clients']} concurrent image requests, {result['max_tokens']} tokens each)",
        "",
        "| mode | tokens/s (median) | seconds per burst (median) |",
        "| --- | --- | --- |",
    ]
    for name, label in (
        ("batched", "batched (VLMBatchScheduler)"),
        ("alone", "one at a time (disable_batching)"),
    ):
        seconds = statistics.median(r["seconds"] for r in result["runs"][name])
        lines.append(f"| {label} | {result[f'{name}_tps']:.1f} | {seconds:.2f} |")
    lines += [
        "",
        f"Ratio batched / one at a time: **{result['ratio']:.2f}x**",
        "",
        stack_line(result["stack"]) if isinstance(result["stack"], dict) else f"Stack: {result['stack']}",
    ]
    return lines


def run(cache: Path, workdir: Path, clients: int, tokens: int, reps: int) -> dict[str, Any]:
    from mlx_hub.testing.tinymodel import make_vlm_model

    folder = make_vlm_model(cache / "vlm-batching", seed=31, shape=SHAPE)
    common = {"model_path": str(folder), "model_type": "multimodal", "default": True, "context_length": 4096}
    models = [{"name": "batched", **common}, {"name": "alone", **common, "disable_batching": True}]
    hub = HubProcess(workdir / "vlm-batching", models)
    try:
        result = asyncio.run(measure(hub, clients, tokens, reps))
    finally:
        hub.close()
    return {**result, "stack": library_versions(), "shape": SHAPE, "machine": machine_name()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cache", type=Path, default=Path(".cache/bench"))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    args.cache.mkdir(parents=True, exist_ok=True)
    result = run(args.cache, args.out.parent, args.clients, args.tokens, args.reps)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    table = "\n".join(markdown(result)) + "\n"
    args.out.with_suffix(".md").write_text(table)  # beside the JSON, as the results folder keeps them
    print(table, end="")


if __name__ == "__main__":
    main()
