"""The language-model architectures ``tinymodel.make_model`` can write, as data.

Each row names the mlx-lm model module that builds it, the ``architectures``
entry a downloaded config.json carries, and what its config needs beyond the
tiny shape (``TINY_SHAPE``): its own key names (gptj's ``n_embd``), its layer
kinds (olmo_hybrid's linear-attention layers, plamo3's sliding windows), and
whatever its ``ModelArgs`` requires. A new architecture is a new row; the
writer (``make_model``) is the same for all of them. ``since`` is the first
mlx-lm that has the module: tests skip an architecture on an older stack.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Arch:
    """One architecture a tiny model can be written in."""

    module: str  # mlx_lm.models.<module>, also the config's model_type
    architecture: str  # config.json's "architectures" entry
    config: dict[str, Any] = field(default_factory=dict)  # keys beyond (and over) the tiny shape
    since: str = "0.0"  # the first mlx-lm version with this module
    kinds: str = "full attention"  # what its layers' caches hold, for test ids and reports
    drop: tuple[str, ...] = ()  # tiny-shape keys its real config.json does not carry

    def available(self) -> bool:
        """Whether the installed mlx-lm has this architecture's module."""
        return importlib.util.find_spec(f"mlx_lm.models.{self.module}") is not None


ARCHS: dict[str, Arch] = {
    "llama": Arch("llama", "LlamaForCausalLM"),
    "qwen2": Arch("qwen2", "Qwen2ForCausalLM"),
    # Hybrid: three gated-delta (linear attention) layers, whose cache is a fixed-size
    # ArraysCache state, around one full-attention layer with a growing KVCache.
    "olmo_hybrid": Arch(
        "olmo_hybrid",
        "OlmoHybridForCausalLM",
        {
            "num_hidden_layers": 4,
            "layer_types": ["linear_attention"] * 3 + ["full_attention"],
            "linear_num_key_heads": 2,
            "linear_num_value_heads": 2,
            "linear_key_head_dim": 16,
            "linear_value_head_dim": 16,
            "linear_conv_kernel_dim": 4,
            "linear_allow_neg_eigval": True,
            "attention_bias": False,
        },
        since="0.32",
        kinds="linear attention + full attention",
    ),
    # Sliding windows: three RotatingKVCache layers of 64 tokens, then one full layer.
    "plamo3": Arch(
        "plamo3",
        "Plamo3ForCausalLM",
        {
            "num_hidden_layers": 4,
            "head_dim": 16,
            "window_size": 64,
            "sliding_window_pattern": 4,
        },
        since="0.32",
        kinds="sliding window + full attention",
    ),
    # GPT-J: its own config names (n_embd, n_head, n_layer) and a partial rotary dim.
    "gptj": Arch(
        "gptj",
        "GPTJForCausalLM",
        {"n_embd": 64, "n_head": 4, "n_layer": 2, "rotary_dim": 8, "n_positions": 2048},
        since="0.32",
        drop=("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads"),
    ),
}


def arch(name: str) -> Arch:
    """The row for ``name``; a ValueError naming the choices otherwise."""
    try:
        return ARCHS[name]
    except KeyError:
        raise ValueError(f"arch must be one of {sorted(ARCHS)}, not {name!r}") from None


def build(name: str, config: dict[str, Any]) -> Any:
    """mlx-lm's model for ``config`` in architecture ``name`` (random weights)."""
    module = importlib.import_module(f"mlx_lm.models.{arch(name).module}")
    return module.Model(module.ModelArgs.from_dict(config))
