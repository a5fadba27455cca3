"""Under load: one lm model at 1, 4 and 16 concurrent streaming clients, the hub against the servers a user
would otherwise run.

Contenders, all serving the same model folder in this one run, all warm before anything counts:

* ``port``: the hub's own port for the model;
* ``v1``: the hub's controller ``/v1`` (routing by model name);
* ``mlx_lm_server``: ``mlx_lm.server``, mlx-lm's own server with its continuous batching;
* ``launch``: ``mlx-openai-server launch`` (upstream's batch scheduler, one process for the model).

At each level every client streams ``--requests`` greedy chat completions one after another (prompts of
mixed length, each unique so no server answers from a prompt cache, ``max_tokens`` fixed and the
special tokens biased away so every reply is exactly that long). A level's figures: generated tokens
over the wall time from the first request to the last reply (aggregate tokens/s), and the time to first
token of every request (p50, p99). Contenders take turns within each repetition, starting one further
along each time, so noise on a shared machine hits them alike.

``python -m benchmarks.load --cache .cache/bench --out x.json [--levels 1,4,16 --reps N --requests N
--tokens N]`` runs it alone and writes ``x.md`` beside the JSON; ``make bench`` runs it in a process of
its own.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path
from typing import Any

import httpx

from benchmarks.harness import HubProcess, LaunchedServer, MlxLmServer, machine_name, stack_line
from mlx_hub.engine.versions import library_versions

#: A llama small enough that 16 clients' prefills and decodes finish in minutes on two shared CPU cores
#: (CPU MLX prefills about 500 tokens/s at this shape on a quiet core), large enough that compute, not
#: HTTP, is most of each token.
SHAPE: dict[str, Any] = {"hidden_size": 256, "num_hidden_layers": 4, "intermediate_size": 768,
                         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 4096}  # fmt: skip
CONTEXT = 4096
LEVELS = (1, 4, 16)
#: Prompt lengths in words, cycled over the clients: a chat turn, a paragraph, a page, a long page.
PROMPT_WORDS = (8, 24, 64, 160)
CONTENDERS = ("port", "v1", "mlx_lm_server", "launch")
LABELS = {
    "port": "hub, the model's port",
    "v1": "hub, the controller's `/v1`",
    "mlx_lm_server": "`mlx_lm.server`",
    "launch": "`mlx-openai-server launch`",
}


def prompt(words: int, serial: int, position: int) -> list[dict[str, str]]:
    """A user message of ``words`` corpus words (chosen by the client's ``position``) behind a serial number.

    Each request's serial is unique in the run and of fixed width, so no prompt
    cache has seen its prompt and every contender's prompts are the same lengths.
    """
    from mlx_hub.testing.tinymodel import _CORPUS

    corpus = _CORPUS.split()
    text = " ".join(corpus[(position * 7 + i) % len(corpus)] for i in range(words))
    return [{"role": "user", "content": f"Case {serial:08d}: {text}"}]


async def one_request(
    http: httpx.AsyncClient, url: str, body: dict[str, Any], origin: float, retries: int = 2
) -> dict[str, float]:
    """Stream one completion: seconds to its first token and to its end (from ``origin``), tokens generated.

    A connection the server drops before answering is tried again, up to ``retries`` times, as the
    OpenAI client does (``mlx_lm.server``'s ``ThreadingHTTPServer`` resets some when 16 arrive at
    once); the time lost counts in the request's time to first token, and ``retried`` says how often.
    """
    started = time.perf_counter()
    for attempt in range(retries + 1):
        first, chunks, usage = None, 0, None
        try:
            async with http.stream("POST", f"{url}/chat/completions", json=body) as reply:
                if reply.status_code != 200:
                    raise RuntimeError(f"{url}: HTTP {reply.status_code}: {(await reply.aread())[:300]!r}")
                async for line in reply.aiter_lines():
                    if not line.startswith("data: {"):
                        continue
                    chunk = json.loads(line[6:])
                    usage = chunk.get("usage") or usage
                    choices = chunk.get("choices") or []
                    if choices and (choices[0].get("delta") or {}).get("content"):
                        first = first or time.perf_counter()
                        chunks += 1
            break
        except httpx.TransportError:
            if first is not None or attempt == retries:
                raise
    if first is None:
        raise RuntimeError(f"{url}: no token came back")
    return {
        "ttft_s": first - started,
        "end_s": time.perf_counter() - origin,
        "tokens": (usage or {}).get("completion_tokens") or chunks,
        "prompt_tokens": (usage or {}).get("prompt_tokens") or 0,
        "retried": attempt,
    }


async def level(
    url: str, model: str, clients: int, requests: int, tokens: int, bias: dict[str, int], serial: int
) -> dict[str, Any]:
    """``clients`` clients, each streaming ``requests`` completions back to back; serials from ``serial`` on."""
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=1800, limits=limits) as http:
        origin = time.perf_counter()

        async def client(c: int) -> list[dict[str, float]]:
            done = []
            for k in range(requests):
                words = PROMPT_WORDS[(c + k) % len(PROMPT_WORDS)]
                body = {"model": model, "messages": prompt(words, serial + c * requests + k, c * requests + k), "max_tokens": tokens,
                        "temperature": 0.0, "stream": True, "stream_options": {"include_usage": True},
                        "logit_bias": bias}  # fmt: skip
                done.append(await one_request(http, url, body, origin))
            return done

        results = [r for rs in await asyncio.gather(*(client(c) for c in range(clients))) for r in rs]
    wall = max(r["end_s"] for r in results)
    generated = sum(r["tokens"] for r in results)
    return {
        "clients": clients,
        "wall_s": wall,
        "tokens": generated,
        "prompt_tokens": sum(r["prompt_tokens"] for r in results),
        "tps": generated / wall,
        "ttft_s": [r["ttft_s"] for r in results],
        "retried": sum(r["retried"] for r in results),
    }


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100), linear between the nearest ranks."""
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One contender at one level over the repetitions: median tokens/s, pooled TTFT percentiles."""
    ttfts = [t for r in runs for t in r["ttft_s"]]
    return {
        "tps": statistics.median(r["tps"] for r in runs),
        "tps_min": min(r["tps"] for r in runs),
        "tps_max": max(r["tps"] for r in runs),
        "ttft_p50_s": percentile(ttfts, 50),
        "ttft_p99_s": percentile(ttfts, 99),
        "requests": len(ttfts),
        "retried": sum(r.get("retried", 0) for r in runs),
        "tokens": [r["tokens"] for r in runs],
        "prompt_tokens": [r["prompt_tokens"] for r in runs],
    }


def measure(
    targets: dict[str, tuple[str, str]], bias: dict[str, int], levels: list[int], reps: int,
    requests: int, tokens: int, log: Any,
) -> dict[str, dict[str, Any]]:  # fmt: skip
    """Every level, every repetition, the contenders in turn; ``targets`` maps a contender to (url, model)."""
    names = list(targets)
    serials = iter(range(0, 10**8, 10**4))  # a block of serials per burst
    for url, model in targets.values():  # warm: kernels, the batch scheduler, the first connection
        asyncio.run(level(url, model, 2, 1, 4, bias, next(serials)))
    out: dict[str, dict[str, Any]] = {}
    for clients in levels:
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
        for rep in range(reps):
            order = names[rep % len(names) :] + names[: rep % len(names)]
            for name in order:
                url, model = targets[name]
                burst = level(url, model, clients, requests, tokens, bias, next(serials))
                runs[name].append(asyncio.run(burst))
            log(f"  {clients} clients rep {rep + 1}: " + ", ".join(f"{n} {runs[n][-1]['tps']:.1f} tok/s" for n in names))  # fmt: skip
        out[str(clients)] = {name: {**summarize(rs), "runs": rs} for name, rs in runs.items()}
    return out


def run(
    cache: Path, workdir: Path, levels: list[int], reps: int, requests: int, tokens: int
) -> dict[str, Any]:
    from mlx_hub.testing.tinymodel import make_model, text_only_logit_bias

    def log(message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)

    model = make_model(cache / "load-llama", arch="llama", shape=SHAPE, seed=37)
    bias = text_only_logit_bias(model)
    entry = {"name": "load", "model_path": str(model), "default": True, "context_length": CONTEXT}
    log("load: starting the hub, mlx_lm.server and mlx-openai-server launch on the same model")
    hub = HubProcess(
        workdir / "load-hub", [entry], prompt_cache_path=str(workdir / "load-hub" / "prompt-cache")
    )
    peer = MlxLmServer(model, workdir / "load-peers")
    launch = LaunchedServer(model, workdir / "load-peers", context_length=CONTEXT)
    try:
        peer.wait_ready()
        launch.wait_ready()
        targets = {
            "port": (hub.port_url("load"), "load"),
            "v1": (f"{hub.url}/v1", "load"),
            "mlx_lm_server": (f"{peer.url}/v1", peer.model_id),
            "launch": (f"{launch.url}/v1", launch.model_id),
        }
        levels_out = measure(targets, bias, levels, reps, requests, tokens, log)
    finally:
        for server in (hub, peer, launch):
            server.close()
    return {
        "model": {"arch": "llama", **SHAPE},
        "max_tokens": tokens,
        "requests_per_client": requests,
        "prompt_words": list(PROMPT_WORDS),
        "reps": reps,
        "levels": levels_out,
        "stack": library_versions(),
        "machine": machine_name(),
    }


def ratios(result: dict[str, Any]) -> dict[str, float]:
    """The summary keys: the hub's model port at the highest level against each peer."""
    top = result["levels"].get("16")
    if top is None:
        return {}
    hub = top["port"]
    return {
        "concurrency16_tps_vs_mlx_lm_server": hub["tps"] / top["mlx_lm_server"]["tps"],
        "concurrency16_tps_vs_launch": hub["tps"] / top["launch"]["tps"],
        "concurrency16_p99_ttft_vs_mlx_lm_server": hub["ttft_p99_s"] / top["mlx_lm_server"]["ttft_p99_s"],
    }


def markdown(result: dict[str, Any]) -> list[str]:
    """The section's table, as the results file and the terminal show it."""
    shape = result["model"]
    lines = [
        "## Under load: one model, concurrent streaming clients",
        "",
        f"A llama (hidden {shape['hidden_size']}, {shape['num_hidden_layers']} layers), each client streaming "
        f"{result['requests_per_client']} greedy chat completions of {result['max_tokens']} tokens one after another;",
        f"prompts of {', '.join(map(str, result['prompt_words']))} words in turn; {result['reps']} repetitions, "
        "contenders alternated. Tokens/s: median (min–max); TTFT percentiles over every request of every repetition.",
        "",
        "| clients | server | tokens/s | TTFT p50 | TTFT p99 |",
        "| ---: | --- | ---: | ---: | ---: |",
    ]
    for clients, row in result["levels"].items():
        for name in CONTENDERS:
            s = row[name]
            lines.append(
                f"| {clients} | {LABELS[name]} | {s['tps']:.1f} ({s['tps_min']:.1f}–{s['tps_max']:.1f}) "
                f"| {s['ttft_p50_s']:.2f} s | {s['ttft_p99_s']:.2f} s |"
            )
    if ratio := ratios(result):
        lines += ["", "At 16 clients, the hub's port against each peer: " + ", ".join(f"`{k}` **{v:.2f}**" for k, v in ratio.items()) + "."]  # fmt: skip
    return lines


def chart(result: dict[str, Any], path: Path) -> None:
    """Aggregate tokens/s against clients, one line per server."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = [int(c) for c in result["levels"]]
    fig, ax = plt.subplots(figsize=(7, 4))
    for name in CONTENDERS:
        ax.plot(levels, [result["levels"][str(c)][name]["tps"] for c in levels], marker="o",
                label=LABELS[name].replace("`", ""))  # fmt: skip
    ax.set_xscale("log", base=2)
    ax.set_xticks(levels, [str(c) for c in levels])
    ax.set_xlabel("concurrent streaming clients")
    ax.set_ylim(bottom=0)
    ax.set_ylabel("aggregate generated tokens/s")
    ax.set_title("One model under load (same run, same files)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=Path(".cache/bench"))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--levels", default=",".join(map(str, LEVELS)), help="client counts (default 1,4,16)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--requests", type=int, default=2, help="requests per client per level (default 2)")
    parser.add_argument("--tokens", type=int, default=32, help="max_tokens of every request (default 32)")
    args = parser.parse_args()
    args.cache.mkdir(parents=True, exist_ok=True)
    levels = [int(c) for c in args.levels.split(",")]
    result = run(args.cache.resolve(), args.out.parent, levels, args.reps, args.requests, args.tokens)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    table = "\n".join([*markdown(result), "", stack_line(result["stack"])]) + "\n"
    args.out.with_suffix(".md").write_text(table)
    try:
        chart(result, args.out.with_suffix(".png"))
    except ImportError:
        print("matplotlib is not installed: no chart (pip install matplotlib)")
    print(table, end="")


if __name__ == "__main__":
    main()
