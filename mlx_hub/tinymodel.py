"""Make small, random-weight MLX language models on disk, offline.

The hub's tests, its ``make run`` demo and its benchmarks all need real model
folders that ``mlx_lm.load`` accepts, and no model hub is reachable. A model is
a ``config.json`` for a llama or qwen2 architecture, random weights saved from
mlx-lm's own model class, and a byte-level BPE tokenizer trained on a built-in
corpus, so every file is exactly what a downloaded MLX model would contain.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

#: A tiny shape: loads in well under a second and answers in milliseconds.
TINY_SHAPE: dict[str, Any] = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": True,
}

#: Qwen2.5-0.5B's published shape, for realistic load times, memory and tokens/s.
QWEN25_05B_SHAPE: dict[str, Any] = {
    "hidden_size": 896,
    "num_hidden_layers": 24,
    "intermediate_size": 4864,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "max_position_embeddings": 32768,
    "rope_theta": 1000000.0,
    "tie_word_embeddings": True,
}

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

_CORPUS = (
    "The hub keeps several models in one process and serves each on its own port. "
    "Hello world! How are you today? I am fine, thank you. "
    "Models load just in time and unload when idle to free memory. "
    "user assistant system: what is the capital of France? Paris is the capital. "
    "0123456789 + - * / = ( ) [ ] { } , . ; : ' \" ? ! "
)


def _train_tokenizer(vocab_size: int) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    # Printable ASCII, space and newline only (in byte-level BPE's spelling:
    # bytes 33-126 stand for themselves, space is U+0120, newline U+010A).
    # A random model then only ever emits tokens that decode to text; with
    # the full 256-byte alphabet it emits stray UTF-8 continuation bytes,
    # which a streaming detokenizer rightly holds back until the end.
    alphabet = [chr(b) for b in range(33, 127)] + [chr(256 + 32), chr(256 + 10)]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=alphabet,
        limit_alphabet=len(alphabet),
        show_progress=False,
    )
    tokenizer.train_from_iterator([_CORPUS] * 20, trainer=trainer)
    return tokenizer


@contextmanager
def _building(path: str | os.PathLike[str]) -> Iterator[Path | None]:
    """Yield a temporary sibling folder to fill, renamed to ``path`` when complete.

    A crash never leaves a half-written model that a later run would trust.
    Yields None when a complete model is already there (the ``make run`` cache).
    """
    target = Path(path)
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        yield None
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield work
        work.chmod(0o755)
        if target.exists():
            shutil.rmtree(target)
        os.replace(work, target)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise


def _write_tokenizer(folder: Path, vocab_size: int, max_length: int) -> dict[str, Any]:
    """Train and save the tokenizer; return the config.json keys that depend on it."""
    tokenizer = _train_tokenizer(vocab_size)
    tokenizer.save(str(folder / "tokenizer.json"))
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": max_length,
        "eos_token": "<|im_end|>",
        "bos_token": None,
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "chat_template": CHAT_TEMPLATE,
        "added_tokens_decoder": {
            str(tokenizer.token_to_id(tok)): {"content": tok, "special": True} for tok in SPECIAL_TOKENS
        },
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    (folder / "special_tokens_map.json").write_text(
        json.dumps({"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"})
    )
    return {
        "vocab_size": tokenizer.get_vocab_size(),
        "eos_token_id": tokenizer.token_to_id("<|im_end|>"),
        "bos_token_id": tokenizer.token_to_id("<|endoftext|>"),
    }


def text_only_logit_bias(path: str | os.PathLike[str]) -> dict[str, int]:
    """An OpenAI ``logit_bias`` that keeps a generated model from sampling its special tokens.

    Random weights make ``<|im_end|>`` as likely as any other token, so a reply
    can legitimately end after one token with no text. Requests that need text
    back (a test asserting on content, a stream expected to have several chunks)
    send this bias and get exactly ``max_tokens`` tokens of plain text.
    """
    config = json.loads((Path(path) / "tokenizer_config.json").read_text())
    return {token_id: -100 for token_id in config["added_tokens_decoder"]}


def _save(folder: Path, model: Any, config: dict[str, Any]) -> None:
    import mlx.core as mx
    from mlx.utils import tree_flatten

    weights = dict(tree_flatten(model.parameters()))
    mx.eval(weights)
    mx.save_safetensors(str(folder / "model.safetensors"), weights, metadata={"format": "mlx"})
    (folder / "config.json").write_text(json.dumps(config, indent=2))


def _base_config(folder: Path, vocab_size: int, shape: dict[str, Any] | None) -> dict[str, Any]:
    config: dict[str, Any] = {
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "torch_dtype": "float16",
        **TINY_SHAPE,
        **(shape or {}),
    }
    config.update(_write_tokenizer(folder, vocab_size, config["max_position_embeddings"]))
    return config


def make_model(
    path: str | os.PathLike[str],
    *,
    arch: str = "llama",
    shape: dict[str, Any] | None = None,
    vocab_size: int = 512,
    seed: int = 0,
    quantize_bits: int | None = None,
) -> Path:
    """Write a chat model folder (``mlx_lm.load`` accepts it) at ``path`` and return it."""
    import mlx.core as mx

    if arch not in ("llama", "qwen2"):
        raise ValueError(f"arch must be 'llama' or 'qwen2', not {arch!r}")
    with _building(path) as work:
        if work is not None:
            config = _base_config(work, vocab_size, shape)
            config["model_type"] = arch
            config["architectures"] = ["Qwen2ForCausalLM" if arch == "qwen2" else "LlamaForCausalLM"]
            if arch == "qwen2":
                from mlx_lm.models.qwen2 import Model, ModelArgs
            else:
                from mlx_lm.models.llama import Model, ModelArgs
            mx.random.seed(seed)
            model = Model(ModelArgs.from_dict(config))
            model.set_dtype(mx.float16)
            if quantize_bits:
                import mlx.nn as nn

                nn.quantize(model, group_size=64, bits=quantize_bits)
                config["quantization"] = {"group_size": 64, "bits": quantize_bits}
            _save(work, model, config)
    return Path(path)


def make_embedding_model(
    path: str | os.PathLike[str], *, vocab_size: int = 512, seed: int = 0, shape: dict[str, Any] | None = None
) -> Path:
    """Write a qwen3 embeddings model folder (``mlx_embeddings.load`` accepts it)."""
    import mlx.core as mx
    from mlx_embeddings.models.qwen3 import Model, ModelArgs

    with _building(path) as work:
        if work is not None:
            config = _base_config(work, vocab_size, shape)
            config.update(model_type="qwen3", architectures=["Qwen3Model"])
            config.setdefault("head_dim", config["hidden_size"] // config["num_attention_heads"])
            mx.random.seed(seed)
            model = Model(ModelArgs.from_dict(config))
            _save(work, model, config)
    return Path(path)
