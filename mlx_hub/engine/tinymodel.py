"""Make small, random-weight MLX language models on disk, offline.

``make run`` (``mlx_hub/cli/demo.py``) serves two of these, and the hub's tests
and benchmarks build on the same writer (``mlx_hub.testing.tinymodel`` adds
the multimodal, Harmony, embedding and whisper ones), so it lives in the
product rather than in ``testing``. A model is a ``config.json`` for one of the
architectures in tinymodel_archs.py (llama, qwen2, and those only a newer
mlx-lm has), random weights saved from mlx-lm's own model class, and a
byte-level BPE tokenizer trained on a built-in corpus, so every file is exactly
what a downloaded MLX model would contain.
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


def _train_tokenizer(vocab_size: int, specials: list[str], phrases: tuple[str, ...] = ()) -> Any:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

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
        special_tokens=specials,
        initial_alphabet=alphabet,
        limit_alphabet=len(alphabet),
        show_progress=False,
    )
    tokenizer.train_from_iterator([_CORPUS] * 20, trainer=trainer)
    if phrases:
        tokenizer.add_tokens([AddedToken(p, special=False, normalized=False) for p in phrases])
    return tokenizer


@contextmanager
def _building(path: str | os.PathLike[str], weights: str = "model.safetensors") -> Iterator[Path | None]:
    """Yield a temporary sibling folder to fill, renamed to ``path`` when complete.

    A crash never leaves a half-written model that a later run would trust.
    Yields None when a complete model is already there (the ``make run`` cache).
    """
    target = Path(path)
    if (target / "config.json").exists() and (target / weights).exists():
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


def _write_tokenizer(
    folder: Path,
    vocab_size: int,
    max_length: int,
    specials: list[str] = SPECIAL_TOKENS,
    chat_template: str = CHAT_TEMPLATE,
    phrases: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Train and save the tokenizer; return the config.json keys that depend on it."""
    tokenizer = _train_tokenizer(vocab_size, specials, phrases)
    tokenizer.save(str(folder / "tokenizer.json"))
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": max_length,
        "eos_token": "<|im_end|>",
        "bos_token": None,
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "chat_template": chat_template,
        "added_tokens_decoder": {
            **{str(tokenizer.token_to_id(tok)): {"content": tok, "special": True} for tok in specials},
            **{str(tokenizer.token_to_id(p)): {"content": p, "special": False} for p in phrases},
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


def _save(folder: Path, model: Any, config: dict[str, Any]) -> None:
    import mlx.core as mx
    from mlx.utils import tree_flatten

    weights = dict(tree_flatten(model.parameters()))
    mx.eval(weights)
    mx.save_safetensors(str(folder / "model.safetensors"), weights, metadata={"format": "mlx"})
    (folder / "config.json").write_text(json.dumps(config, indent=2))


def _base_config(
    folder: Path, vocab_size: int, shape: dict[str, Any] | None, phrases: tuple[str, ...] = ()
) -> dict[str, Any]:
    config: dict[str, Any] = {
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "torch_dtype": "float16",
        **TINY_SHAPE,
        **(shape or {}),
    }
    config.update(_write_tokenizer(folder, vocab_size, config["max_position_embeddings"], phrases=phrases))
    return config


def make_model(
    path: str | os.PathLike[str],
    *,
    arch: str = "llama",
    shape: dict[str, Any] | None = None,
    vocab_size: int = 512,
    seed: int = 0,
    quantize_bits: int | None = None,
    phrases: tuple[str, ...] = (),
) -> Path:
    """Write a chat model folder (``mlx_lm.load`` accepts it) at ``path`` and return it.

    Each of ``phrases`` becomes one whole token (see :func:`phrase_token`): a
    ``logit_bias`` on it makes the random model say that exact text, which is
    how tests get a real tool call or reasoning block out of a tool or
    reasoning parser. Keep phrases free of spaces and newlines (the byte-level
    detokenizer maps printable ASCII only).
    """
    import mlx.core as mx

    from mlx_hub.engine.tinymodel_archs import arch as find_arch
    from mlx_hub.engine.tinymodel_archs import build

    row = find_arch(arch)
    with _building(path) as work:
        if work is not None:
            config = _base_config(work, vocab_size, {**row.config, **(shape or {})}, phrases)
            config = {k: v for k, v in config.items() if k not in row.drop}
            config["model_type"] = row.module
            config["architectures"] = [row.architecture]
            mx.random.seed(seed)
            model = build(arch, config)
            model.set_dtype(mx.float16)
            if quantize_bits:
                import mlx.nn as nn

                nn.quantize(model, group_size=64, bits=quantize_bits)
                config["quantization"] = {"group_size": 64, "bits": quantize_bits}
            _save(work, model, config)
    return Path(path)
