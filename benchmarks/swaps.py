"""Swaps stay collated: requests interleaved across the members of a full group are served in runs.

Two JIT members of a ``max_loaded: 1`` group (random weights, hidden 512, 8 layers):

* **collated**: 12 requests alternating a, b, a, b, ... sent at once, against the same 12 sent one
  after another: how many loads each costs and the total time;
* **longest wait**: two clients keep ``a`` busy with back-to-back requests while requests for the
  unloaded ``b`` arrive one at a time: the longest time one of them waits for its first token.

``python -m benchmarks.swaps --cache .cache/bench --out x.json`` (``make bench`` runs it in a process
of its own). Writes one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import time
from pathlib import Path
from typing import Any

import httpx

from benchmarks.harness import HubProcess

SHAPE = {"hidden_size": 512, "num_hidden_layers": 8, "intermediate_size": 1536}
REQUESTS = 12
TOKENS = 16


def body(model: str, stream: bool = False) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": TOKENS,
            "temperature": 0, "stream": stream}  # fmt: skip


def loads(hub: HubProcess) -> int:
    return sum(m["metadata"]["load_count"] for m in hub.http.get("/hub/status").json()["models"])


async def unload_all(hub: HubProcess) -> None:
    for name in ("a", "b"):
        hub.http.post(f"/hub/models/{name}/unload")


async def collated(hub: HubProcess) -> dict[str, Any]:
    names = ["a" if i % 2 == 0 else "b" for i in range(REQUESTS)]
    out: dict[str, Any] = {}
    async with httpx.AsyncClient(base_url=hub.url, timeout=900) as http:
        for mode in ("concurrent", "sequential"):
            await unload_all(hub)
            before = loads(hub)
            started = time.perf_counter()
            if mode == "concurrent":
                replies = await asyncio.gather(
                    *(http.post("/v1/chat/completions", json=body(n)) for n in names)
                )
            else:
                replies = [await http.post("/v1/chat/completions", json=body(n)) for n in names]
            seconds = time.perf_counter() - started
            assert all(r.status_code == 200 for r in replies), [
                r.text for r in replies if r.status_code != 200
            ]
            out[mode] = {"loads": loads(hub) - before, "seconds": round(seconds, 3)}
    return out


async def first_token(http: httpx.AsyncClient, model: str) -> float:
    started = time.perf_counter()
    async with http.stream("POST", "/v1/chat/completions", json=body(model, stream=True)) as reply:
        async for line in reply.aiter_lines():
            if line.startswith("data: {") and '"content"' in line:
                return time.perf_counter() - started
    return time.perf_counter() - started


async def longest_wait(hub: HubProcess, probes: int = 3) -> dict[str, Any]:
    await unload_all(hub)
    done = asyncio.Event()
    async with httpx.AsyncClient(base_url=hub.url, timeout=900) as http:
        await http.post("/v1/chat/completions", json=body("a"))  # a loaded

        async def keep_busy() -> int:
            served = 0
            while not done.is_set():
                await http.post("/v1/chat/completions", json=body("a"))
                served += 1
            return served

        busy = [asyncio.create_task(keep_busy()) for _ in range(2)]
        waits = []
        for _ in range(probes):
            await asyncio.sleep(0.5)
            waits.append(await first_token(http, "b"))
        done.set()
        served = sum(await asyncio.gather(*busy))
    return {
        "waits_s": [round(w, 3) for w in waits],
        "longest_s": round(max(waits), 3),
        "busy_requests": served,
    }


async def run(cache: Path, workdir: Path) -> dict[str, Any]:
    from mlx_hub.testing.tinymodel import make_model

    a = make_model(cache / "swap-a", arch="qwen2", shape=SHAPE, seed=21)
    b = cache / "swap-b"
    if not b.exists():
        shutil.copytree(a, b)  # its own folder: one folder's weights would be shared, not swapped
    models = [
        {"name": n, "model_path": str(p), "jit_enabled": True, "group": "g", "context_length": 2048}
        for n, p in (("a", a), ("b", b))
    ]
    hub = HubProcess(workdir / "swaps", models, [{"name": "g", "max_loaded": 1}])
    try:
        return {"collated": await collated(hub), "longest_wait": await longest_wait(hub)}
    finally:
        hub.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cache", type=Path, default=Path(".cache/bench"))
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.cache.mkdir(parents=True, exist_ok=True)
    result = asyncio.run(run(args.cache, args.out.parent))
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
