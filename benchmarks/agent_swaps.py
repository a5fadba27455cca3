"""An agent that swaps: two sessions on two models that do not fit in memory together, taking turns.

Session ``a`` talks to model ``a``, session ``b`` to model ``b`` (two random-weight llamas, different
weights, same shape); the turns go a1, b1, a2, b2, ... so every turn after the first needs the other
model. Each session starts from a long system prompt of its own (about 2,000 and 3,000 tokens: an
agent's instructions and tool descriptions) and every turn resends the whole conversation so far plus
a new user message, as agents do. Each turn's time to first token counts from the moment the agent
sends, so it includes whatever the swap costs. Contenders:

* ``hub``: the hub, ``a`` and ``b`` JIT members of a ``max_loaded: 1`` group, through ``/v1``;
* ``hub_no_disk``: the same with ``prompt_cache_disk_size: 0`` (prompt caches die with the handler);
* ``process_swapper``: what llama-swap does (its Go binary cannot run here): one
  ``mlx-openai-server launch`` at a time, stopped and the other model's started on each swap;
* ``mlx_lm_restart``: ``mlx_lm.server`` stopped and started for the other model on each swap;
* ``mlx_lm_switch``: one ``mlx_lm.server`` told the model in each request, which it loads in place of
  the previous one; its prompt caches stay in its memory (not budgeted, lost with the process).

The contenders take turns at every turn (the first goes one further along each time), so noise on a
shared machine hits them alike; a contender's total is the sum of its turns, request to last token.
``python -m benchmarks.agent_swaps --cache .cache/bench --out x.json [--turns N --tokens N]`` runs it
alone and writes ``x.md`` and ``x.png`` beside the JSON; ``make bench`` runs it in a process of its own.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.harness import HubProcess, LaunchedServer, MlxLmServer, machine_name, stack_line, stream_chat
from mlx_hub.engine.versions import library_versions

#: Small enough that a 4,000-token prompt prefills in seconds on a CPU; the context holds ten turns on top.
SHAPE: dict[str, Any] = {"hidden_size": 128, "num_hidden_layers": 4, "intermediate_size": 384,
                         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 8192}  # fmt: skip
CONTEXT = SHAPE["max_position_embeddings"]
TURN_WORDS = 40
CONTENDERS = ("hub", "hub_no_disk", "process_swapper", "mlx_lm_restart", "mlx_lm_switch")
LABELS = {
    "hub": "hub (`max_loaded: 1` group, caches on disk)",
    "hub_no_disk": "hub, `prompt_cache_disk_size: 0`",
    "process_swapper": "process per model, swapped (`launch`, as llama-swap)",
    "mlx_lm_restart": "`mlx_lm.server` restarted per swap",
    "mlx_lm_switch": "`mlx_lm.server` switching models in place",
}


def words(count: int, start: int) -> str:
    from mlx_hub.testing.tinymodel import _CORPUS

    corpus = _CORPUS.split()
    return " ".join(corpus[(start + i) % len(corpus)] for i in range(count))


def system_prompt(model: Path, tokens: int, session: str) -> str:
    """About ``tokens`` tokens of instructions (counted with the model's tokenizer), one per session."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model))
    per_word = len(tokenizer(words(400, 0), add_special_tokens=False)["input_ids"]) / 400
    return f"You are agent {session}. " + words(int(tokens / per_word), len(session) * 13)


class Swapper:
    """One server process at a time: a request for the other model stops it and starts that model's."""

    def __init__(self, start: Callable[[Path], Any]):
        self.start = start
        self.server: Any = None
        self.path: Path | None = None

    def target(self, path: Path) -> tuple[str, str]:
        if self.path != path:
            self.close()
            self.server, self.path = self.start(path), path
            self.server.wait_ready()
        return f"{self.server.url}/v1", self.server.model_id

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = self.path = None


class Contenders:
    """Every contender's processes, started once; ``target`` gives (url, model) for a session's turn."""

    def __init__(self, models: dict[str, Path], workdir: Path):
        self.models = models
        group = [{"name": "g", "max_loaded": 1}]
        entries = [{"name": n, "model_path": str(p), "jit_enabled": True, "group": "g", "context_length": CONTEXT}
                   for n, p in models.items()]  # fmt: skip
        self.hubs = {
            "hub": HubProcess(workdir / "hub", entries, group, prompt_cache_path=str(workdir / "hub" / "pc")),
            "hub_no_disk": HubProcess(
                workdir / "hub-no-disk",
                entries,
                group,
                prompt_cache_disk_size=0,
                prompt_cache_path=str(workdir / "hub-no-disk" / "pc"),
            ),  # fmt: skip
        }
        self.swappers = {
            "process_swapper": Swapper(
                lambda p: LaunchedServer(p, workdir / "launch", context_length=CONTEXT)
            ),
            "mlx_lm_restart": Swapper(lambda p: MlxLmServer(p, workdir / "mlx-lm")),
        }
        self.switch = MlxLmServer(models["a"], workdir / "mlx-lm-switch")
        self.switch.wait_ready()

    def target(self, contender: str, session: str) -> tuple[str, str]:
        if contender in self.hubs:
            return f"{self.hubs[contender].url}/v1", session
        if contender in self.swappers:
            return self.swappers[contender].target(self.models[session])
        return f"{self.switch.url}/v1", str(self.models[session])

    def close(self) -> None:
        for server in (*self.hubs.values(), *self.swappers.values(), self.switch):
            server.close()


def run(
    cache: Path, workdir: Path, turns: int, tokens: int, prefix: dict[str, int], log: Callable[[str], None]
) -> dict[str, Any]:
    from mlx_hub.testing.tinymodel import make_model, text_only_logit_bias

    models = {
        s: make_model(cache / f"agent-{s}", arch="llama", shape=SHAPE, seed=40 + i)
        for i, s in enumerate("ab")
    }
    bias = text_only_logit_bias(models["a"])
    systems = {s: system_prompt(models[s], prefix[s], s) for s in models}
    shutil.rmtree(workdir, ignore_errors=True)
    log("agent swaps: starting two hubs and mlx_lm.server")
    contenders = Contenders(models, workdir)
    chats = {(c, s): [{"role": "system", "content": systems[s]}] for c in CONTENDERS for s in models}
    results: dict[str, list[dict[str, Any]]] = {c: [] for c in CONTENDERS}
    try:
        for turn in range(turns * 2):
            session = "ab"[turn % 2]
            order = CONTENDERS[turn % len(CONTENDERS) :] + CONTENDERS[: turn % len(CONTENDERS)]
            for contender in order:
                chat = chats[contender, session]
                chat.append(
                    {"role": "user", "content": f"Step {turn // 2 + 1}: " + words(TURN_WORDS, turn * 5)}
                )
                started = time.perf_counter()
                url, model = contenders.target(contender, session)
                reply = stream_chat(url, model, tokens, chat, logit_bias=bias)
                seconds = time.perf_counter() - started
                chat.append({"role": "assistant", "content": reply["text"]})
                results[contender].append({
                    "turn": turn + 1, "session": session, "seconds": seconds,
                    "ttft_s": reply["first_token_s"] + seconds - reply["total_s"],
                    "prompt_tokens": reply["prompt_tokens"], "cached_tokens": reply["cached_tokens"],
                    "tokens": reply["tokens"],
                })  # fmt: skip
            log(f"  turn {turn + 1} ({session}): " + ", ".join(f"{c} {results[c][-1]['ttft_s']:.2f}s" for c in CONTENDERS))  # fmt: skip
    finally:
        contenders.close()
    return {
        "model": {"arch": "llama", **SHAPE},
        "prefix_tokens": prefix,
        "turns_per_session": turns,
        "max_tokens": tokens,
        "turns": results,
        "total_s": {c: sum(t["seconds"] for t in results[c]) for c in CONTENDERS},
        "stack": library_versions(),
        "machine": machine_name(),
    }


def ratios(result: dict[str, Any]) -> dict[str, float]:
    total = result["total_s"]
    return {"agent_swaps_vs_process_swapper": total["hub"] / total["process_swapper"]}


def markdown(result: dict[str, Any]) -> list[str]:
    """The section's table, as the results file and the terminal show it."""
    shape, turns = result["model"], result["turns"]
    first = {c: turns[c][:2] for c in CONTENDERS}
    later = {c: turns[c][2:] or turns[c] for c in CONTENDERS}
    prefixes = result["prefix_tokens"]
    lines = [
        "## An agent that swaps",
        "",
        f"Two sessions on two llamas (hidden {shape['hidden_size']}, {shape['num_hidden_layers']} layers) that"
        f" may not be loaded together, {result['turns_per_session']} turns each, alternating; system prompts of"
        f" about {prefixes['a']} and {prefixes['b']} tokens, each turn resending the conversation plus a new message,"
        f" {result['max_tokens']} tokens greedy. Time to first token counts from the request, swap included.",
        "",
        "| contender | total | first turn of each session (TTFT) | later turns: TTFT median (max) | prompt tokens from a cache, later turns |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for c in CONTENDERS:
        ttfts = [t["ttft_s"] for t in later[c]]
        cached = sum(t["cached_tokens"] for t in later[c])
        prompt = sum(t["prompt_tokens"] or 0 for t in later[c])
        firsts = " / ".join(f"{t['ttft_s']:.2f} s" for t in first[c])
        lines.append(
            f"| {LABELS[c]} | {result['total_s'][c]:.1f} s | {firsts} "
            f"| {statistics.median(ttfts):.2f} s ({max(ttfts):.2f} s) | {cached / max(prompt, 1):.0%} |"
        )
    ratio = ratios(result)["agent_swaps_vs_process_swapper"]
    lines += ["", f"Hub total / process-per-model swapper total: **{ratio:.3f}** (target ≤ 0.2)."]
    return lines


def chart(result: dict[str, Any], path: Path) -> None:
    """Each contender's time to first token, turn by turn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(8, 4))
    for c in CONTENDERS:
        turns = result["turns"][c]
        ax.plot([t["turn"] for t in turns], [t["ttft_s"] for t in turns], marker="o", markersize=3,
                label=LABELS[c].replace("`", ""))  # fmt: skip
    ax.set_yscale("log")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("turn (odd: session a on model a, even: session b on model b)")
    ax.set_ylabel("time to first token, s (log)")
    ax.set_title("An agent alternating between two models that do not fit together")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=Path(".cache/bench"))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--turns", type=int, default=10, help="turns per session (default 10)")
    parser.add_argument("--tokens", type=int, default=32, help="max_tokens of every turn (default 32)")
    parser.add_argument(
        "--prefix", default="2000,3000", help="system prompt tokens of sessions a and b (default 2000,3000)"
    )
    args = parser.parse_args()
    args.cache.mkdir(parents=True, exist_ok=True)

    def log(message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)

    prefix = dict(zip("ab", (int(t) for t in args.prefix.split(",")), strict=True))
    result = run(args.cache.resolve(), args.out.parent / "agent-swaps", args.turns, args.tokens, prefix, log)
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
