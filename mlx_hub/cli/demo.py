"""``make run``: a working hub in one command, with no download.

Generates two small random-weight models (a llama and a qwen2; they answer
gibberish, quickly) under a cache folder, writes a hub.yaml beside them, and
serves it in the foreground: one model loaded at start, one loaded just in
time on its first request and unloaded after a minute idle.
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

from mlx_hub.config import load_config
from mlx_hub.fsutil import atomic_write_text

DEMO_YAML = """\
# Demo hub written by `make run`. Copy hub.yaml.example for your own models.
host: 127.0.0.1
port: {port}
model_starting_port: {starting_port}
log_path: ./logs
models:
  - name: demo-llama
    model_path: ./models/demo-llama
    default: true
    context_length: 2048
  - name: demo-qwen
    model_path: ./models/demo-qwen
    default: true
    jit_enabled: true
    auto_unload_minutes: 1
    context_length: 2048
"""


def prepare(cache: Path, port: int = 8000, starting_port: int = 47850) -> Path:
    """Make the demo models (once) and the demo hub.yaml; return the config path."""
    from mlx_hub.engine.tinymodel import make_model

    cache.mkdir(parents=True, exist_ok=True)
    for name, arch in (("demo-llama", "llama"), ("demo-qwen", "qwen2")):
        target = cache / "models" / name
        if not (target / "config.json").exists():
            print(f"generating demo model {name} ({arch}) in {target} ...", flush=True)
        make_model(target, arch=arch, shape={"hidden_size": 128, "intermediate_size": 256})
    config = cache / "hub.yaml"
    atomic_write_text(config, DEMO_YAML.format(port=port, starting_port=starting_port))
    return config


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", default=".cache/demo", help="where the demo models and hub.yaml go")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--starting-port", type=int, default=47850)
    args = parser.parse_args(argv)
    from mlx_hub.engine.patches.transformers_imports import transformers_without_torch

    # The demo's models are text models, and writing them imports transformers: decided first.
    transformers_without_torch({"lm"})
    path = prepare(Path(args.cache).resolve(), args.port, args.starting_port)
    from mlx_hub.cli.terminal import print_status
    from mlx_hub.core import logs
    from mlx_hub.core.ports import connect_host
    from mlx_hub.service.daemon import serve

    cfg = load_config(path)
    logs.setup(cfg, console=True)

    def ready(hub) -> None:
        url = f"http://{connect_host(cfg.host)}:{cfg.port}"
        status = hub.status_document()
        print_status(status, url)
        for row in status.models:
            port = row.metadata.port
            print(
                f"try: curl http://127.0.0.1:{port}/v1/chat/completions -H 'Content-Type: application/json' "
                f'-d \'{{"model": "{row.id}", "messages": [{{"role": "user", "content": "Hello"}}], '
                f'"max_tokens": 16}}\''
            )
        print(
            f'dashboard: {url}/hub/   every model through one endpoint: {url}/v1 ("model": name)', flush=True
        )
        print(f"config: {path}   Ctrl-C stops the hub", flush=True)

    asyncio.run(serve(cfg, config_path=path, on_ready=ready))


if __name__ == "__main__":
    main()
