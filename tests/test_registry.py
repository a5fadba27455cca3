"""The Hugging Face cache scan, hub.yaml additions that keep comments, and LiteLLM export."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from mlx_hub import Hub
from mlx_hub.config import load_config
from mlx_hub.registry.export import litellm_from_hubs, litellm_model_list
from mlx_hub.registry.scan import scan
from mlx_hub.testing.tinymodel import make_model

from .helpers import LiveController, cache_repo, free_port, free_range, hf_checkpoint

ENV = {**os.environ, "COLUMNS": "250", "NO_COLOR": "1", "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def hf_cache(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    work = tmp_path_factory.mktemp("hf")
    cache = work / "hub"
    small = {"hidden_size": 64, "intermediate_size": 128}
    mlx = make_model(work / "src-mlx", arch="llama")
    quant = make_model(work / "src-q4", arch="qwen2", shape=small, quantize_bits=4)
    raw = work / "src-raw"  # a Hugging Face checkpoint: no MLX metadata, no quantization block
    shutil.copytree(mlx, raw)
    import numpy as np
    from safetensors.numpy import save_file

    save_file(
        {"model.embed_tokens.weight": np.zeros((4, 4), dtype=np.float16)}, str(raw / "model.safetensors")
    )
    return {
        "cache": cache,
        "snapshots": {
            "acme/tiny-chat": cache_repo(cache, "acme/tiny-chat", mlx),
            "mlx-community/tiny-q4": cache_repo(cache, "mlx-community/tiny-q4", quant),
            "acme/raw-model": cache_repo(cache, "acme/raw-model", raw),
        },
    }


def test_scan_finds_mlx_models_with_their_details(hf_cache: dict[str, Any]) -> None:
    found = {m.repo_id: m for m in scan(hf_cache["cache"])}
    assert set(found) == {"acme/tiny-chat", "mlx-community/tiny-q4", "acme/raw-model"}
    chat, q4, raw = found["acme/tiny-chat"], found["mlx-community/tiny-q4"], found["acme/raw-model"]
    assert chat.mlx_ready and chat.architecture == "LlamaForCausalLM" and chat.quantization_bits is None
    assert q4.mlx_ready and q4.quantization_bits == 4 and q4.architecture == "Qwen2ForCausalLM"
    assert not raw.mlx_ready  # needs mlx_lm.convert first
    assert chat.snapshot == hf_cache["snapshots"]["acme/tiny-chat"] and chat.size_on_disk > 100_000


HUB_YAML = """\
# My hub: keep this comment.
host: 127.0.0.1
port: {port}
log_path: {logs}   # state lives here
models:
  # the one I use every day
  - name: daily
    model_path: acme/tiny-chat
    port: {model_port}
"""


def test_scan_cli_marks_served_models_and_adds_the_rest(hf_cache: dict[str, Any], tmp_path: Path) -> None:
    path = tmp_path / "hub.yaml"
    original = HUB_YAML.format(port=free_port(), logs=tmp_path / "logs", model_port=free_range())
    path.write_text(original)
    run = [
        sys.executable,
        "-m",
        "mlx_hub.cli",
        "scan",
        "--cache",
        str(hf_cache["cache"]),
        "--config",
        str(path),
    ]
    listed = subprocess.run(run, capture_output=True, text=True, env=ENV, timeout=120)
    assert listed.returncode == 0, listed.stderr
    rows = {
        line.split()[0]: line.split()
        for line in listed.stdout.splitlines()
        if line.split() and "/" in line.split()[0]
    }
    assert "daily" in rows["acme/tiny-chat"]  # the ENTRY column names the serving entry
    assert "4-bit" in rows["mlx-community/tiny-q4"] and "daily" not in rows["mlx-community/tiny-q4"]
    assert rows["acme/raw-model"][1] == "no"
    assert "1 MLX-ready model(s) not in" in listed.stdout

    added = subprocess.run([*run, "--add"], capture_output=True, text=True, env=ENV, timeout=120)
    assert added.returncode == 0, added.stderr
    assert "added tiny-q4" in added.stdout
    text = path.read_text()
    assert (tmp_path / "hub.yaml.bak").read_text() == original
    for comment in ("# My hub: keep this comment.", "# state lives here", "# the one I use every day"):
        assert comment in text
    assert text.index("name: daily") < text.index("name: tiny-q4")
    assert "\n  - name: daily\n" in text and "\n  - name: tiny-q4\n" in text  # the file's own list style
    cfg = load_config(path)
    assert [m.name for m in cfg.models] == ["daily", "tiny-q4"]
    assert cfg.models[1].model_path == "mlx-community/tiny-q4" and cfg.models[1].jit_enabled
    again = subprocess.run([*run, "--add"], capture_output=True, text=True, env=ENV, timeout=120)
    assert "nothing to add" in again.stdout and (tmp_path / "hub.yaml.bak").read_text() == original


async def test_litellm_router_reaches_a_live_hub(
    hub_config, tiny_llama: Path, tmp_path: Path, monkeypatch
) -> None:
    litellm = pytest.importorskip("litellm")  # conftest keeps it from fetching its cost map
    port = free_port()  # the controller must listen where the config says: --via controller points there
    doc = hub_config(
        [{"name": "chat", "model_path": str(tiny_llama), "default": True, "context_length": 2048}],
        api_keys=["sekret"],
        port=port,
    )
    async with LiveController(Hub.from_config(doc), port) as live:
        from_config = litellm_model_list(live.hub.config, via="port")
        entry = from_config[0]
        assert entry["model_name"] == "chat" and entry["litellm_params"]["model"] == "openai/chat"
        assert entry["litellm_params"]["api_key"] == "sekret"
        assert entry["model_info"]["max_input_tokens"] == 2048
        # Synchronous (the CLI calls it); in a thread so this loop can serve the hub meanwhile.
        from_hubs = await asyncio.to_thread(litellm_from_hubs, [live.url], "sekret")
        assert [e["litellm_params"]["api_base"] for e in from_hubs] == [f"{live.url}/v1"]
        for model_list in (from_config, litellm_model_list(live.hub.config, via="controller"), from_hubs):
            text = yaml.safe_dump({"model_list": model_list})
            router = litellm.Router(model_list=yaml.safe_load(text)["model_list"])
            reply = await router.acompletion(
                model="chat", messages=[{"role": "user", "content": "Hi"}], max_tokens=4
            )
            assert reply.choices[0].message.content is not None


def test_ensure_converts_offline_and_offload_guards_what_is_served(tmp_path: Path, tiny_llama: Path) -> None:
    cache = tmp_path / "hub"
    cache_repo(cache, "acme/tiny-hf", hf_checkpoint(tiny_llama, tmp_path / "src-hf"))
    cache_repo(cache, "mlx-community/tiny-ready", tiny_llama)
    path = tmp_path / "hub.yaml"
    path.write_text(
        f"# hand-written\nport: {free_port()}\nlog_path: {tmp_path / 'logs'}\nmodels:\n  - name: keep\n    model_path: mlx-community/tiny-ready\n"
    )
    env = {**ENV, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "mlx_hub.cli", *args, "--config", str(path)]
        return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)

    ready = cli("ensure", "mlx-community/tiny-ready")
    assert ready.returncode == 0 and "MLX-ready in the Hugging Face cache" in ready.stdout, ready.stderr
    refused = cli("ensure", "acme/tiny-hf", "--convert", "skip")
    assert refused.returncode == 1 and "not MLX-ready" in refused.stderr
    missing = cli("ensure", "acme/not-cached")
    assert missing.returncode == 1 and "cannot ensure acme/not-cached" in missing.stderr

    converted = cli("ensure", "acme/tiny-hf", "--quantize", "4", "--add")
    assert converted.returncode == 0, converted.stderr
    target = cache / "mlx-hub-converted" / "acme--tiny-hf-4bit"
    record = json.loads((target / "hub_source.json").read_text())
    assert record["source_repo"] == "acme/tiny-hf" and record["quantize_bits"] == 4
    assert json.loads((target / "config.json").read_text())["quantization"]["bits"] == 4
    cfg = load_config(path)
    assert cfg.models[-1].model_path == str(target) and "# hand-written" in path.read_text()
    import mlx_lm

    model, tokenizer = mlx_lm.load(str(target))
    assert mlx_lm.generate(model, tokenizer, "Hello", max_tokens=3) is not None

    # The base checkpoint may go to the backroom only while nothing serves from it.
    with path.open("a") as handle:
        handle.write("  - name: base\n    model_path: acme/tiny-hf\n")
    blocked = cli("offload", "acme/tiny-hf", "--to", str(tmp_path / "backroom"))
    assert blocked.returncode == 1 and "model(s) base serve from it" in blocked.stderr
    path.write_text(path.read_text().replace("  - name: base\n    model_path: acme/tiny-hf\n", ""))
    not_source = cli("offload", "mlx-community/tiny-ready", "--to", str(tmp_path / "backroom"))
    assert not_source.returncode == 1 and "not the recorded source" in not_source.stderr
    moved = cli("offload", "acme/tiny-hf", "--to", str(tmp_path / "backroom"))
    assert moved.returncode == 0, moved.stderr
    assert (tmp_path / "backroom" / "models--acme--tiny-hf" / "refs" / "main").exists()
    assert not (cache / "models--acme--tiny-hf").exists() and (target / "model.safetensors").exists()


def test_add_keeps_a_flush_list_style(tmp_path: Path) -> None:
    from mlx_hub.registry.edit import add_to_config

    path = tmp_path / "hub.yaml"
    path.write_text("models:\n- name: a  # first\n  model_path: org/a\n")
    assert add_to_config(path, ["org/b-model"]) == ["b-model"]
    text = path.read_text()
    assert "- name: a  # first\n" in text and "\n- name: b-model\n" in text
    assert [m.name for m in load_config(path).models] == ["a", "b-model"]


def test_litellm_export_takes_the_models_own_context_when_unset(tmp_path: Path, tiny_llama: Path) -> None:
    """context_length unset means the model's own (as upstream); the export says what that is."""
    from mlx_hub.config import parse_config

    shaped = make_model(tmp_path / "long", arch="llama", shape={"max_position_embeddings": 4096})
    cfg = parse_config(
        {
            "log_path": str(tmp_path / "logs"),
            "models": [
                {"name": "own", "model_path": str(shaped)},
                {"name": "capped", "model_path": str(shaped), "context_length": 1024},
                {"name": "remote", "model_path": "org/not-in-any-cache"},
            ],
        }
    )
    info = {e["model_name"]: e["model_info"] for e in litellm_model_list(cfg, via="controller")}
    assert info["own"]["max_input_tokens"] == 4096
    assert info["capped"]["max_input_tokens"] == 1024
    assert "max_input_tokens" not in info["remote"]  # unknown: better unsaid than made up
