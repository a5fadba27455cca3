"""The floor: a warm Python process with mlx-lm imported, driven over stdin/stdout.

Each line in is a JSON command; each line out is a JSON result. Keeping the
process alive between commands means its figures exclude interpreter start
and imports, as a model already hosted by a long-running server would.
"""

from __future__ import annotations

import gc
import json
import sys
import time


def main() -> None:
    import mlx.core as mx
    import mlx_lm
    from mlx_lm import stream_generate
    from mlx_lm.sample_utils import make_sampler

    greedy = make_sampler(0.0)
    model = tokenizer = None
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        out: dict = {}
        if cmd["cmd"] in ("load_first_token", "stream"):
            started = time.perf_counter()
            if cmd["cmd"] == "load_first_token" or model is None:
                model, tokenizer = mlx_lm.load(cmd["path"])
            loaded = time.perf_counter()
            prompt = tokenizer.apply_chat_template(cmd["messages"], add_generation_prompt=True)
            first = last = final = None
            count = 0
            t0 = time.perf_counter()
            for response in stream_generate(
                model, tokenizer, prompt, max_tokens=cmd["max_tokens"], sampler=greedy
            ):
                final = response
                now = time.perf_counter()
                first = first or now
                last = now
                count += 1
            out = {
                "load_s": loaded - started,
                "first_token_s": (first or t0) - started,
                "tokens": count,
                "tps": (count - 1) / (last - first) if count > 1 and last > first else None,
                "finish": getattr(final, "finish_reason", None),
            }
        elif cmd["cmd"] == "unload":
            model = tokenizer = None
            gc.collect()
            mx.clear_cache()
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
