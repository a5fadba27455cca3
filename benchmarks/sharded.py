"""One model over two local ranks against the same model in one process (issue: distributed serving).

A random-weight llama (hidden 1024, 8 layers, about 0.2 GB of fp16 weights) served by one hub
twice: as a plain entry, and as a ``distributed:`` entry of two ranks on this machine (ring backend
over loopback, tensor parallel). Measured in one run, the two taking turns in each repetition:

* **memory**: each rank's MLX active memory after load against the plain entry's loaded bytes
  (goal <= 0.6 with two ranks: each holds half the weights plus its own runtime);
* **time to first token** and **decode tokens/s** of a streamed greedy chat (128 tokens).

``python -m benchmarks.sharded --cache .cache/bench --out x.json [--reps N]``; ``make bench`` runs it.
Loopback on a shared CPU shows what sharding costs in collectives and what it saves in memory; it
cannot show Thunderbolt's bandwidth or RDMA latency between Macs (benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path
from typing import Any

from benchmarks.harness import HubProcess, stream_chat, summary

SHAPE = {"hidden_size": 1024, "num_hidden_layers": 8, "intermediate_size": 2816, "num_attention_heads": 16,
         "num_key_value_heads": 4}  # fmt: skip
TOKENS = 128


def _entries(path: Path) -> list[dict[str, Any]]:
    return [
        {"name": "one", "model_path": str(path), "jit_enabled": True},
        {"name": "two", "model_path": str(path), "jit_enabled": True,
         "distributed": {"hosts": ["127.0.0.1", "127.0.0.1"], "parallel": "tensor"}},
    ]  # fmt: skip


def measure(hub: HubProcess, reps: int) -> dict[str, Any]:
    times: dict[str, dict[str, list[float]]] = {n: {"ttft": [], "tps": []} for n in ("one", "two")}
    for name in ("one", "two"):
        hub.act(name, "load")
        stream_chat(hub.url + "/v1", name, 8)  # warm: the first graph of each
    one = hub.model("one")
    ranks = hub.model("two").ranks or []
    for _ in range(reps):
        for name in ("one", "two"):
            run = stream_chat(hub.url + "/v1", name, TOKENS)
            times[name]["ttft"].append(run["first_token_s"])
            if run["tps"]:
                times[name]["tps"].append(run["tps"])
    return {
        "unsharded_bytes": one.memory_bytes,
        "rank_bytes": [r["memory_bytes"] for r in ranks],
        "ttft": {n: summary(t["ttft"]) for n, t in times.items()},
        "tps": {n: summary(t["tps"]) for n, t in times.items()},
    }


def ratios(r: dict[str, Any]) -> dict[str, float]:
    return {
        "sharded_rank_memory_vs_unsharded": max(r["rank_bytes"]) / r["unsharded_bytes"],
        "sharded_ttft_vs_one_process": r["ttft"]["two"]["median"] / r["ttft"]["one"]["median"],
        "sharded_tps_vs_one_process": r["tps"]["two"]["median"] / r["tps"]["one"]["median"],
    }


def table(r: dict[str, Any]) -> str:
    ratio = ratios(r)
    mb = 1e6
    rows = [
        "| | one process | two ranks (tensor, loopback) | ratio |",
        "| --- | --- | --- | --- |",
        f"| memory per process (MB) | {r['unsharded_bytes'] / mb:.1f} | "
        f"{' / '.join(f'{b / mb:.1f}' for b in r['rank_bytes'])} | {ratio['sharded_rank_memory_vs_unsharded']:.2f} |",
        f"| time to first token (s) | {r['ttft']['one']['median']:.3f} | {r['ttft']['two']['median']:.3f} | "
        f"{ratio['sharded_ttft_vs_one_process']:.2f} |",
        f"| decode tokens/s | {r['tps']['one']['median']:.1f} | {r['tps']['two']['median']:.1f} | "
        f"{ratio['sharded_tps_vs_one_process']:.2f} |",
    ]
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=Path(".cache/bench"))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    from mlx_hub.testing.tinymodel import make_model

    path = make_model(args.cache / "sharded-llama", arch="llama", shape=SHAPE, seed=5)
    work = args.cache / "sharded-run"
    shutil.rmtree(work, ignore_errors=True)
    hub = HubProcess(work, _entries(path), prompt_cache_disk_size=0, max_memory="none")
    try:
        started = time.perf_counter()
        result = measure(hub, args.reps)
        result["seconds"] = time.perf_counter() - started
    finally:
        hub.close()
    result["ratios"] = ratios(result)
    result["table"] = table(result)
    args.out.write_text(json.dumps(result, indent=2))
    print(result["table"])
    print(json.dumps(result["ratios"], indent=2))


if __name__ == "__main__":
    main()
