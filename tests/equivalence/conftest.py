"""Upstream's servers and one hub for the differential suite (they take a minute to start)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mlx_hub.testing.tinymodel import HARMONY_CHAT_TEMPLATE

from ..helpers import free_port, free_range
from .servers import Pair, serve_pair

#: A template that renders tools and tool calls, so a request's tools change the prompt.
TOOLS_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nTools: {{ tools | tojson }}<|im_end|>\n{% endif %}"
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] %}{{ message['content'] }}{% endif %}"
    "{% if message.tool_calls %}{{ message.tool_calls | tojson }}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

#: The flag-launched case, and its options written both ways.
FLAG_CASE = "defaults"
FLAGS = ["--max-tokens", "5", "--temperature", "0", "--top-p", "0.9", "--prompt-cache-size", "1"]
FLAG_FIELDS = {
    "default_max_tokens": 5,
    "default_temperature": 0.0,
    "default_top_p": 0.9,
    "prompt_cache_size": 1,
}


@pytest.fixture(scope="session")
def draft_llama(models_dir: Path) -> Path:
    """A second random llama with the same tokenizer: a draft model for speculative decoding."""
    from mlx_hub.testing.tinymodel import make_model

    return make_model(models_dir / "tiny-draft", arch="llama", seed=5)


@pytest.fixture(scope="session")
def kv_llama(models_dir: Path) -> Path:
    """Heads of 32 dims, so 8-bit KV quantization in groups of 32 applies."""
    from mlx_hub.testing.tinymodel import make_model

    shape = {"hidden_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 256}
    return make_model(models_dir / "tiny-kv", arch="llama", shape=shape, seed=6)


@pytest.fixture(scope="session")
def cases(
    tiny_llama: Path,
    draft_llama: Path,
    kv_llama: Path,
    tiny_embedder: Path,
    tiny_whisper: Path,
    tiny_vlm: Path,
    mute_vlm: Path,
    harmony_model: Path,
    models_dir: Path,
) -> dict[str, dict[str, Any]]:
    """Served name -> the options both sides get (upstream's field names, which hub.yaml shares).

    ``see-batched`` only where the installed mlx-vlm can batch: on mlx-vlm 0.4
    upstream's batched multimodal request hangs (patches ``vlm_batching_capability``).
    """
    from mlx_hub.engine.patches import switch

    template = models_dir / "tools.jinja"
    template.write_text(TOOLS_TEMPLATE)
    harmony_template = models_dir / "harmony.jinja"
    harmony_template.write_text(HARMONY_CHAT_TEMPLATE)
    llama = str(tiny_llama)
    return {
        "chat": {"model_path": llama},
        "tools": {
            "model_path": llama,
            "tool_call_parser": "hermes",
            "reasoning_parser": "qwen3_moe",
            "enable_auto_tool_choice": True,
            "chat_template_file": str(template),
        },
        "harmony": {  # gpt-oss's parsers and template, on a model that speaks Harmony
            "model_path": str(harmony_model),
            "tool_call_parser": "harmony",
            "reasoning_parser": "harmony",
            "enable_auto_tool_choice": True,
            "chat_template_file": str(harmony_template),
        },
        "seeded": {"model_path": llama, "disable_batching": True},
        "spec": {"model_path": llama, "draft_model_path": str(draft_llama), "num_draft_tokens": 3},
        "kvq": {"model_path": str(kv_llama), "kv_bits": 8, "kv_group_size": 32},
        "embed": {"model_path": str(tiny_embedder), "model_type": "embeddings"},
        "ears": {"model_path": str(tiny_whisper), "model_type": "whisper"},
        "see": {"model_path": str(tiny_vlm), "model_type": "multimodal", "disable_batching": True},
        **(
            {}
            if switch.needed_here("vlm_batching_capability")
            else {"see-batched": {"model_path": str(tiny_vlm), "model_type": "multimodal"}}
        ),
        "mute": {"model_path": str(mute_vlm), "model_type": "multimodal", "disable_batching": True},
        FLAG_CASE: {"model_path": llama, **FLAG_FIELDS},
    }


@pytest.fixture(scope="module")  # module: the servers are gone before the rest of the suite runs
def pair(tmp_path_factory: pytest.TempPathFactory, cases: dict[str, dict[str, Any]]) -> Iterator[Pair]:
    work = tmp_path_factory.mktemp("equivalence")
    start = free_range(len(cases) + 1)
    ports = [free_port(), free_port(), start, *range(start + 1, start + 1 + len(cases))]
    with serve_pair(work, cases, FLAG_CASE, FLAGS, ports) as both:
        yield both
