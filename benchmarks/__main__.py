"""``python -m benchmarks`` (``make bench``): the hub against a process per model and bare mlx-lm.

Every contender runs in its own process and all of them are measured in this
one run, alternating within each repetition, so machine noise hits them alike.
Results: ``benchmarks/results/<machine>-<date>.md``, ``summary.json`` and a chart.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from mlx_hub.engine.versions import library_versions
from mlx_hub.testing.tinymodel import QWEN25_05B_SHAPE, make_model

from .harness import BareWorker, HubProcess, LaunchedServer, machine_name, stream_chat, summary
from .report import write_results

ROOT = Path(__file__).resolve().parent
SMALL_SHAPE = {
    "hidden_size": 512,
    "num_hidden_layers": 8,
    "intermediate_size": 1536,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def accelerated() -> bool:
    """Metal or CUDA present: then every section can use the real model shape."""
    import mlx.core as mx

    try:
        return mx.default_device() == mx.gpu
    except Exception:
        return False


def build_models(cache: Path, profile: str) -> dict[str, Path]:
    log(f"building random-weight models (cached in {cache})")
    models = {
        "qwen05-f16": make_model(cache / "qwen05-f16", arch="qwen2", shape=QWEN25_05B_SHAPE, seed=1),
        "qwen05-q4": make_model(
            cache / "qwen05-q4", arch="qwen2", shape=QWEN25_05B_SHAPE, seed=1, quantize_bits=4
        ),
    }
    models["stream"] = (
        models["qwen05-f16"]
        if profile == "full"
        else make_model(cache / "small", arch="qwen2", shape=SMALL_SHAPE, seed=2)
    )
    return models


def weights_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


# --------------------------------------------------------------------------- sections


def cold_start(hub: HubProcess, bare: BareWorker, workdir: Path, path: Path, reps: int) -> dict[str, Any]:
    """Request to first token for an unloaded model."""
    hub_s, sub_s, floor_s = [], [], []
    # The load alone (no first token): what hosting costs before any compute.
    hub_load, sub_ready, bare_load = [], [], []
    for rep in range(reps):
        order = ["hub", "subprocess", "floor"]
        for contender in order[rep % 3 :] + order[: rep % 3]:
            if contender == "hub":
                hub.act("cold", "unload")
                hub_s.append(stream_chat(hub.port_url("cold"), "cold", 1)["first_token_s"])
                hub_load.append(hub.model("cold").load_seconds)
            elif contender == "subprocess":
                server = LaunchedServer(path, workdir)
                try:
                    server.wait_ready()
                    sub_ready.append(time.perf_counter() - server.started)
                    result = stream_chat(f"{server.url}/v1", server.model_id, 1)
                    sub_s.append(
                        time.perf_counter() - server.started - (result["total_s"] - result["first_token_s"])
                    )
                finally:
                    server.close()
            else:
                result = bare.load_first_token(path)
                floor_s.append(result["first_token_s"])
                bare_load.append(result["load_s"])
        log(
            f"  cold start rep {rep + 1}: hub {hub_s[-1]:.2f}s, subprocess {sub_s[-1]:.2f}s, floor {floor_s[-1]:.2f}s"
        )
    hub.act("cold", "unload")
    return {
        "hub": summary(hub_s),
        "subprocess": summary(sub_s),
        "floor": summary(floor_s),
        "hub_load": summary(hub_load),
        "subprocess_ready": summary(sub_ready),
        "bare_load": summary(bare_load),
    }


def memory(hub: HubProcess, workdir: Path, models: dict[str, Path], cycles: int) -> dict[str, Any]:
    """RSS a hosted model adds beyond its weights, against a subprocess serving it; unload and cycles."""
    out: dict[str, Any] = {}
    # Measured first, on a hub that has loaded nothing yet: RSS added is then
    # RSS with the model loaded minus this baseline. Pages the allocator keeps
    # after an earlier unload count against the hub, so this errs against it.
    baseline_rss = hub.rss()
    for name in ("qwen05-f16", "qwen05-q4"):
        entry = f"mem-{name}"
        before_rss = baseline_rss
        before_active = hub.status().memory.active_bytes
        hub.act(entry, "load")
        time.sleep(1)
        loaded_rss = hub.rss()
        weights = hub.model(entry).memory_bytes
        hub.act(entry, "unload")
        after_active = hub.status().memory.active_bytes
        server = LaunchedServer(models[name], workdir)
        try:
            server.wait_ready()
            time.sleep(1)
            sub_rss = server.rss()
        finally:
            server.close()
        out[name] = {
            "weights_bytes": weights,
            "file_bytes": weights_size(models[name]),
            "hub_added_rss": loaded_rss - before_rss,
            "hub_extra_beyond_weights": max(0, loaded_rss - before_rss - weights),
            "subprocess_rss": sub_rss,
            "subprocess_beyond_weights": max(1, sub_rss - weights),
            "active_before_load": before_active,
            "active_after_unload": after_active,
        }
        log(
            f"  memory {name}: weights {weights / 1e6:.0f} MB, hub adds {(loaded_rss - before_rss) / 1e6:.0f} MB RSS, "
            f"subprocess {sub_rss / 1e6:.0f} MB RSS; active {before_active / 1e6:.1f} -> {after_active / 1e6:.1f} MB"
        )
    rss = []
    for _ in range(cycles):
        hub.act("mem-qwen05-f16", "load")
        hub.act("mem-qwen05-f16", "unload")
        rss.append(hub.rss())
    out["cycles"] = {"count": cycles, "rss_first": rss[0], "rss_last": rss[-1], "rss_all": rss}
    log(f"  {cycles} load/unload cycles: RSS {rss[0] / 1e6:.0f} -> {rss[-1] / 1e6:.0f} MB")
    return out


def streaming(hub: HubProcess, bare: BareWorker, path: Path, tokens: int, reps: int) -> dict[str, Any]:
    """Decode tokens/s: a model port, the controller's /v1, and bare stream_generate."""
    hub.act("stream", "load")
    stream_chat(hub.port_url("stream"), "stream", 8)  # warm both sides once
    bare.stream(path, 8)
    results: dict[str, list[float]] = {"port": [], "controller": [], "bare": []}
    counts: dict[str, list[int]] = {"port": [], "controller": [], "bare": []}
    for rep in range(reps):
        order = list(results)
        for contender in order[rep % 3 :] + order[: rep % 3]:
            if contender == "port":
                r = stream_chat(hub.port_url("stream"), "stream", tokens)
            elif contender == "controller":
                r = stream_chat(f"{hub.url}/v1", "stream", tokens)
            else:
                r = bare.stream(path, tokens)
            results[contender].append(r["tps"])
            counts[contender].append(r["tokens"])
        log(f"  stream rep {rep + 1}: " + ", ".join(f"{k} {v[-1]:.1f} tok/s" for k, v in results.items()))
    bare.unload()
    hub.act("stream", "unload")
    return {k: {**summary(v), "tokens": counts[k]} for k, v in results.items()}


def group_swap(hub: HubProcess, bare: BareWorker, path: Path, reps: int) -> dict[str, Any]:
    """Evict one group member and load another, to first token, against a bare load to first token."""
    stream_chat(hub.port_url("swap-a"), "swap-a", 1)
    swaps, bare_s = [], []
    for rep in range(reps):
        target = "swap-b" if rep % 2 == 0 else "swap-a"
        if rep % 2 == 0:
            swaps.append(stream_chat(hub.port_url(target), target, 1)["first_token_s"])
            bare_s.append(bare.load_first_token(path)["first_token_s"])
        else:
            bare_s.append(bare.load_first_token(path)["first_token_s"])
            swaps.append(stream_chat(hub.port_url(target), target, 1)["first_token_s"])
        log(f"  swap rep {rep + 1}: hub swap {swaps[-1]:.2f}s, bare load {bare_s[-1]:.2f}s")
    hub.act("swap-a", "unload")
    hub.act("swap-b", "unload")
    return {"hub_swap": summary(swaps), "bare_load": summary(bare_s)}


def second_profile(hub: HubProcess, reps: int) -> dict[str, Any]:
    """A second hub.yaml entry of an already loaded model: load seconds and MLX bytes it adds, against the first's."""
    first_s, second_s, first_b, second_b = [], [], [], []
    for rep in range(reps):
        before = hub.status().memory.active_bytes
        hub.act("profile-a", "load")
        middle = hub.status().memory.active_bytes
        hub.act("profile-b", "load")
        after = hub.status().memory.active_bytes
        first_s.append(hub.model("profile-a").load_seconds or 0.0)
        second_s.append(hub.model("profile-b").load_seconds or 0.0)
        first_b.append(middle - before)
        second_b.append(after - middle)
        log(
            f"  profile rep {rep + 1}: first load {first_s[-1]:.2f}s +{first_b[-1] / 1e6:.0f} MB, "
            f"second {second_s[-1]:.2f}s +{second_b[-1] / 1e6:.1f} MB"
        )
        hub.act("profile-b", "unload")
        hub.act("profile-a", "unload")
    return {
        "first_load_s": summary(first_s),
        "second_load_s": summary(second_s),
        "first_bytes": summary(first_b),
        "second_bytes": summary(second_b),
    }


def concurrency(hub: HubProcess, names: list[str], levels: list[int], tokens: int) -> dict[str, Any]:
    """Aggregate tokens/s and latency with N clients spread across three models."""
    for name in names:
        hub.act(name, "load")
    urls = {name: hub.port_url(name) for name in names}

    async def one(client: httpx.AsyncClient, name: str) -> tuple[float, int]:
        started = time.perf_counter()
        response = await client.post(
            f"{urls[name]}/chat/completions",
            json={
                "model": name,
                "messages": [{"role": "user", "content": "Hello"}],
                "max_tokens": tokens,
                "temperature": 0,
            },
        )
        response.raise_for_status()
        return time.perf_counter() - started, response.json()["usage"]["completion_tokens"]

    async def level(n: int) -> dict[str, float]:
        async with httpx.AsyncClient(timeout=900) as client:
            started = time.perf_counter()
            done = await asyncio.gather(*(one(client, names[i % len(names)]) for i in range(n)))
            wall = time.perf_counter() - started
        latencies = [d[0] for d in done]
        return {
            "clients": n,
            "wall_s": wall,
            "tokens": sum(d[1] for d in done),
            "aggregate_tps": sum(d[1] for d in done) / wall,
            "latency_p50_s": statistics.median(latencies),
            "latency_max_s": max(latencies),
        }

    out = []
    for n in levels:
        result = asyncio.run(level(n))
        out.append(result)
        log(
            f"  {n} clients: {result['aggregate_tps']:.1f} tok/s aggregate, p50 latency {result['latency_p50_s']:.2f}s"
        )
    for name in names:
        hub.act(name, "unload")
    return {"levels": out}


def section(module: str, cache: Path, out: Path) -> dict[str, Any]:
    """``python -m benchmarks.<module>`` in a fresh process; its JSON result."""
    import subprocess

    out.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [sys.executable, "-m", f"benchmarks.{module}", "--cache", str(cache), "--out", str(out)],
        check=True,
        cwd=ROOT.parent,
    )
    return json.loads(out.read_text())


# --------------------------------------------------------------------------- main

#: The parts of a run, in order: ``core`` (the sections above, one hub), then each module in a process of its own.
PARTS = ("core", "long_prompts", "prompt_cache", "swaps", "vlm_batching", "load", "agent_swaps", "sharded")
#: What each module measures, for the log line before it runs.
MODULES = {
    "long_prompts": "memory under long prompts (its own hub process, so MLX's peak is this section's)",
    "prompt_cache": "prompt cache after a swap (hubs and launch of their own)",
    "swaps": "swaps across a full group (its own hub process)",
    "vlm_batching": "multimodal batching: concurrent image requests, batched and one at a time (its own hub process)",
    "load": "one model under load: the hub against mlx_lm.server and launch at 1, 4, 16 clients",
    "agent_swaps": "an agent alternating between two models that do not fit together: hub against process swappers",
    "sharded": "one model over two local ranks (tensor parallel, ring over loopback) against one process",
}


def parts(text: str) -> list[str]:
    """``--parts`` as a list in run order; a name that is not a part is an error that lists them."""
    chosen = [p.strip().replace("-", "_") for p in text.split(",") if p.strip()]
    unknown = [p for p in chosen if p not in PARTS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown part {', '.join(unknown)}; choose from {', '.join(PARTS)}")
    return [p for p in PARTS if p in chosen]


def core(args: argparse.Namespace, profile: str) -> dict[str, Any]:
    """Cold start, memory, streaming, group swap, second profile and concurrency, on one hub."""
    models = build_models(args.cache, profile)
    workdir = args.cache / "run"
    f16 = str(models["qwen05-f16"])
    small = str(models["stream"])
    entries = [
        {"name": "cold", "model_path": f16, "jit_enabled": True, "default": True, "context_length": 4096},
        {
            "name": "mem-qwen05-f16",
            "model_path": f16,
            "jit_enabled": True,
            "default": True,
            "context_length": 4096,
        },
        {
            "name": "mem-qwen05-q4",
            "model_path": str(models["qwen05-q4"]),
            "jit_enabled": True,
            "default": True,
            "context_length": 4096,
        },
        {"name": "stream", "model_path": small, "jit_enabled": True, "default": True, "context_length": 4096},
        *(
            {
                "name": f"swap-{s}",
                "model_path": f16,
                "jit_enabled": True,
                "default": True,
                "group": "swap",
                "context_length": 4096,
            }
            for s in ("a", "b")
        ),  # fmt: skip
        *(
            {
                "name": f"profile-{p}",
                "model_path": f16,
                "jit_enabled": True,
                "default": True,
                "served_model_name": f"qwen-{p}",
            }
            for p in ("a", "b")
        ),  # fmt: skip
        *(
            {
                "name": f"many-{i}",
                "model_path": small,
                "jit_enabled": True,
                "default": True,
                "context_length": 4096,
            }
            for i in range(3)
        ),  # fmt: skip
    ]
    log(f"profile {profile}: starting the hub and a warm bare mlx-lm process")
    hub = HubProcess(workdir / "hub", entries, groups=[{"name": "swap", "max_loaded": 1}])
    bare = BareWorker()
    results: dict[str, Any] = {}
    try:
        log("memory")
        results["memory"] = memory(hub, workdir / "launch", models, args.cycles)
        log("cold start (Qwen2.5-0.5B shape, 16-bit)")
        results["cold_start"] = cold_start(hub, bare, workdir / "launch", models["qwen05-f16"], args.reps)
        log(f"streaming {args.tokens} tokens ({Path(small).name})")
        results["streaming"] = streaming(hub, bare, models["stream"], args.tokens, args.reps)
        log("group swap (Qwen2.5-0.5B shape, 16-bit)")
        results["swap"] = group_swap(hub, bare, models["qwen05-f16"], max(args.reps, 2))
        log("second profile of a loaded model (Qwen2.5-0.5B shape, 16-bit)")
        results["second_profile"] = second_profile(hub, max(args.reps, 2))
        log("concurrency (3 models)")
        results["concurrency"] = concurrency(
            hub, ["many-0", "many-1", "many-2"], [1, 4, 16], max(8, args.tokens // 4)
        )
    finally:
        bare.close()
        hub.close()
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--profile",
        choices=["auto", "cpu", "full"],
        default="auto",
        help="cpu: throughput on a small model (CPU MLX is slow); full: Qwen2.5-0.5B shape throughout",
    )
    parser.add_argument("--reps", type=int, default=5, help="repetitions per measurement (default 5)")
    parser.add_argument(
        "--tokens", type=int, default=128, help="tokens per streaming measurement (default 128)"
    )
    parser.add_argument(
        "--cycles", type=int, default=20, help="load/unload cycles for RSS growth (default 20)"
    )
    parser.add_argument(
        "--parts",
        type=parts,
        default=list(PARTS),
        help=f"comma-separated parts to run (default all: {','.join(PARTS)})",
    )
    parser.add_argument(
        "--cache", type=Path, default=ROOT.parent / ".cache" / "bench", help="where models are built"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "results", help="where results are written")
    args = parser.parse_args(argv)
    profile = args.profile if args.profile != "auto" else ("full" if accelerated() else "cpu")
    started = time.time()
    workdir = args.cache / "run"
    shutil.rmtree(workdir, ignore_errors=True)
    results: dict[str, Any] = {
        "profile": profile,
        "reps": args.reps,
        "tokens": args.tokens,
        "machine": machine_name(),
        "stack": library_versions(),
        **({"parts": args.parts} if args.parts != list(PARTS) else {}),  # a run of some parts only
    }
    if "core" in args.parts:
        results.update(core(args, profile))
    for module in args.parts[1:] if args.parts[0] == "core" else args.parts:
        log(MODULES[module])
        results[module] = section(module, args.cache, workdir / f"{module.replace('_', '-')}.json")
    results["seconds"] = time.time() - started
    results["date"] = dt.date.today().isoformat()
    paths = write_results(results, args.out)
    log(f"done in {results['seconds'] / 60:.1f} min: " + ", ".join(str(p) for p in paths))
    print(json.dumps(json.loads(paths[1].read_text()), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
