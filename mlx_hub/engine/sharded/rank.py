"""One rank of a sharded model: ``python -m mlx_hub.engine.sharded.rank --model PATH ...``.

The hub starts one of these per rank (directly on this machine, through ssh on
another) with MLX's environment contract (``MLX_RANK`` plus ``MLX_HOSTFILE`` for
ring, ``MLX_JACCL_COORDINATOR``/``MLX_IBV_DEVICES`` for jaccl). It joins the
group, picks the split, and runs mlx-lm's distributed server: rank 0 answers
HTTP on ``--port`` and shares each request with the others.

Every half second it prints one status line on stdout, ``MLX_HUB_RANK {json}``
(rank, pid, state, loop steps, MLX memory), which is all the hub knows of it:
the hub never imports this module and never joins the group.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

STATUS_PREFIX = "MLX_HUB_RANK "
#: Exit status of a rank that found the group or the model unusable (its last status line says why).
EXIT_UNUSABLE = 78
#: Test hook: ``R:stall-on-request`` makes rank R's serving loop stop at its first request, its reports going on.
FAULT_ENV = "MLX_HUB_RANK_FAULT"
REPORT_SECONDS = 0.5

_out_lock = threading.Lock()


def say(rank: int, **fields: Any) -> None:
    line = STATUS_PREFIX + json.dumps({"rank": rank, "pid": os.getpid(), "time": time.time(), **fields})
    with _out_lock:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


def split_mode(model_path: Path, asked: str | None) -> str:
    """``tensor`` or ``pipeline``: what was asked if the architecture has it, else what it has."""
    from mlx_lm.utils import _get_classes, load_config

    config = load_config(model_path)
    model_class, _ = _get_classes(config)
    module = sys.modules[model_class.__module__]
    pipelines = any(isinstance(c, type) and hasattr(c, "pipeline") for c in vars(module).values())
    modes = [m for m, ok in (("tensor", hasattr(model_class, "shard")), ("pipeline", pipelines)) if ok]
    kind = config.get("model_type", "?")
    if not modes:
        raise RuntimeError(
            f"model_type {kind} supports neither tensor nor pipeline parallelism in this mlx-lm"
        )
    if asked is not None and asked not in modes:
        raise RuntimeError(
            f"model_type {kind} supports {' and '.join(modes)} parallelism only; set parallel: {modes[0]}"
        )
    return asked or modes[0]


def with_index(model_path: Path) -> Path:
    """``model_path``, or a folder of links to it with ``model.safetensors.index.json`` written in.

    Pipeline ranks read only their layers, found through that index; a model saved as one
    ``model.safetensors`` without it would fail on every rank.
    """
    if (model_path / "model.safetensors.index.json").exists():
        return model_path
    from safetensors import safe_open

    shadow = Path(tempfile.mkdtemp(prefix="mlx-hub-rank-"))
    weight_map: dict[str, str] = {}
    for item in model_path.iterdir():
        (shadow / item.name).symlink_to(item.resolve())
        if item.suffix == ".safetensors":
            with safe_open(str(item), framework="numpy") as f:
                weight_map.update(dict.fromkeys(f.keys(), item.name))
    (shadow / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    return shadow


def _faulty_step(rank: int) -> Any:
    """The loop's step hook: counts, and under ``MLX_HUB_RANK_FAULT=<rank>:stall-on-request`` stops for
    good once this rank has taken a request (the others then wait in their next collective)."""
    stalls = os.environ.get(FAULT_ENV, "") == f"{rank}:stall-on-request"
    steps = [0]

    def step(got_request: bool) -> None:
        steps[0] += 1
        if stalls and got_request:
            threading.Event().wait()  # a collective that never returns, as in mlx#4475

    step.count = steps  # type: ignore[attr-defined]
    return step


def _follow_parent(pid: int) -> None:
    """Exit once the hub that started this rank is gone (killed, crashed): no rank outlives its hub."""
    while os.getppid() == pid:
        time.sleep(REPORT_SECONDS)
    os._exit(EXIT_UNUSABLE)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--backend", default="ring")
    parser.add_argument("--parallel", choices=("tensor", "pipeline"))
    parser.add_argument("--parent-pid", type=int, help="end this rank when that process is gone")
    args, server_args = parser.parse_known_args(argv)
    rank = int(os.environ.get("MLX_RANK", "0"))
    if args.parent_pid:
        threading.Thread(target=_follow_parent, args=(args.parent_pid,), daemon=True).start()
    say(rank, state="joining")
    from mlx_hub.engine.patches.transformers_imports import transformers_without_torch

    transformers_without_torch({"lm"})  # mlx-lm's server asks transformers for no torch tensor
    import mlx.core as mx

    try:
        group = mx.distributed.init(backend=args.backend, strict=True)
        mode = split_mode(Path(args.model), args.parallel)
        model = with_index(Path(args.model)) if mode == "pipeline" else Path(args.model)
    except Exception as exc:
        say(rank, state="failed", error=f"{type(exc).__name__}: {exc}")
        return EXIT_UNUSABLE
    say(rank, state="loading", size=group.size(), parallel=mode)
    step = _faulty_step(rank)

    def report(provider: Any, generator: Any) -> None:
        while True:
            if not generator.generation_available():
                say(
                    rank,
                    state="failed",
                    error="the serving loop ended (see this rank's log)",
                    steps=step.count[0],
                )
                os._exit(EXIT_UNUSABLE)
            state = "loaded" if provider.model is not None else "loading"
            memory = {"active": mx.get_active_memory(), "peak": mx.get_peak_memory()}
            say(rank, state=state, steps=step.count[0], parallel=mode, **memory)
            time.sleep(REPORT_SECONDS)

    from mlx_hub.engine.patches.mlx_lm import rank_steps

    if not rank_steps(report, step):
        say(rank, state="loading", note="rank_steps is switched off: the hub cannot see this rank load")
    from mlx_lm import server

    sys.argv = ["mlx_lm.server", "--model", str(model), "--host", args.host, "--port", str(args.port)]
    sys.argv += (["--pipeline"] if mode == "pipeline" else []) + server_args
    server.main()
    return 0


if __name__ == "__main__":
    sys.exit(main())
