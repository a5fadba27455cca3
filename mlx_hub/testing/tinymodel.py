"""Small, random-weight models for tests: multimodal, Harmony, embedding and whisper, offline.

The language-model writer the product's demo needs, ``make_model``, is
``mlx_hub.engine.tinymodel``; it is re-exported here with its helpers so tests
import every generated model from one place. Nothing here downloads.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from mlx_hub.engine.tinymodel import _CORPUS as _CORPUS
from mlx_hub.engine.tinymodel import CHAT_TEMPLATE as CHAT_TEMPLATE
from mlx_hub.engine.tinymodel import SPECIAL_TOKENS as SPECIAL_TOKENS
from mlx_hub.engine.tinymodel import TINY_SHAPE as TINY_SHAPE
from mlx_hub.engine.tinymodel import _base_config, _building, _save, _train_tokenizer, _write_tokenizer
from mlx_hub.engine.tinymodel import make_model as make_model

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


def text_only_logit_bias(path: str | os.PathLike[str]) -> dict[str, int]:
    """An OpenAI ``logit_bias`` that keeps a generated model from sampling its special tokens.

    Random weights make ``<|im_end|>`` as likely as any other token, so a reply
    can legitimately end after one token with no text. Requests that need text
    back (a test asserting on content, a stream expected to have several chunks)
    send this bias and get exactly ``max_tokens`` tokens of plain text.
    """
    config = json.loads((Path(path) / "tokenizer_config.json").read_text())
    return {token_id: -100 for token_id in config["added_tokens_decoder"]}


def phrase_token(path: str | os.PathLike[str], phrase: str) -> int:
    """The id of a whole-phrase token a model was made with (``make_model(phrases=...)``)."""
    added = json.loads((Path(path) / "tokenizer.json").read_text())["added_tokens"]
    for token in added:
        if token["content"] == phrase:
            return int(token["id"])
    raise KeyError(phrase)


#: gpt-oss's Harmony tokens: headers, channels and the two ends of an assistant turn.
HARMONY_TOKENS = [
    "<|endoftext|>",
    "<|start|>",
    "<|end|>",
    "<|message|>",
    "<|channel|>",
    "<|return|>",
    "<|call|>",
]

#: A Harmony chat template in gpt-oss's shape: a system header that carries the reasoning
#: effort, one header per message, and the assistant header as the generation prompt.
HARMONY_CHAT_TEMPLATE = (
    "<|start|>system<|message|>You are a tiny test model.\n"
    "Reasoning: {{ reasoning_effort | default('medium') }}\n"
    "# Valid channels: analysis, commentary, final.<|end|>"
    "{% for message in messages %}<|start|>{{ message['role'] }}<|message|>{{ message['content'] }}<|end|>"
    "{% endfor %}{% if add_generation_prompt %}<|start|>assistant{% endif %}"
)

#: What :func:`make_harmony_model` says: a gpt-oss tool call, one token per piece.
HARMONY_TOOL_CALL = [
    "<|channel|>",
    "commentary to=functions.get_weather",
    "<|message|>",
    '{"city": "Paris"}',
    "<|call|>",
]


def make_harmony_model(
    path: str | os.PathLike[str], script: list[str] = HARMONY_TOOL_CALL, *, vocab_size: int = 512
) -> Path:
    """Write a model that answers every Harmony chat prompt with ``script``, token by token.

    A random model's text is not Harmony, and the Harmony parser rightly
    refuses it; this one is built to speak it. Every layer's output projection
    is zero, so the last hidden state is the last token's embedding, and the
    ``script`` tokens (each piece one token, after the prompt's final
    ``assistant``) have orthogonal embeddings that the output head maps to
    the next piece. Sampling at any temperature then follows the script, so a
    test sees what gpt-oss's parsers make of a real gpt-oss answer. Pieces
    must not repeat: the next token depends on the current one only.
    """
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_unflatten
    from mlx_lm.models.llama import Model, ModelArgs
    from tokenizers import AddedToken

    chain = ["assistant", *script]
    if len(set(chain)) != len(chain):
        raise ValueError("script pieces must be unique (and not 'assistant'): the model is a bigram chain")
    with _building(path) as work:
        if work is not None:
            config = {"rms_norm_eps": 1e-6, "rope_theta": 10000.0, "torch_dtype": "float16", **TINY_SHAPE}
            config["tie_word_embeddings"] = False
            if len(chain) > config["hidden_size"]:
                raise ValueError(f"a script of at most {config['hidden_size'] - 1} pieces")
            tokenizer = _train_tokenizer(vocab_size, HARMONY_TOKENS)
            specials = set(HARMONY_TOKENS)
            tokenizer.add_tokens(
                [
                    AddedToken(piece, special=False, normalized=False)
                    for piece in chain
                    if piece not in specials
                ]
            )
            tokenizer.save(str(work / "tokenizer.json"))
            ids = [tokenizer.token_to_id(piece) for piece in chain]
            ends = [tokenizer.token_to_id("<|return|>"), tokenizer.token_to_id("<|call|>")]
            decoder = {str(tokenizer.token_to_id(t)): {"content": t, "special": True} for t in HARMONY_TOKENS}
            (work / "tokenizer_config.json").write_text(
                json.dumps(
                    {
                        "tokenizer_class": "PreTrainedTokenizerFast",
                        "model_max_length": config["max_position_embeddings"],
                        "eos_token": "<|return|>",
                        "pad_token": "<|endoftext|>",
                        "chat_template": HARMONY_CHAT_TEMPLATE,
                        "added_tokens_decoder": decoder,
                    },
                    indent=2,
                )
            )
            config.update(
                model_type="llama",
                architectures=["LlamaForCausalLM"],
                vocab_size=tokenizer.get_vocab_size(),
                eos_token_id=ends,
                bos_token_id=tokenizer.token_to_id("<|endoftext|>"),
            )
            mx.random.seed(0)
            model = Model(ModelArgs.from_dict(config))
            weights = dict(tree_flatten(model.parameters()))
            hidden = config["hidden_size"]
            embed = mx.random.normal((config["vocab_size"], hidden)) * 0.02
            head = mx.zeros((config["vocab_size"], hidden))
            for i, token in enumerate(ids):
                one_hot = mx.zeros((hidden,)).at[i].add(1.0)
                embed[token] = one_hot
                if i + 1 < len(ids):
                    head[ids[i + 1]] = one_hot * 4.0  # after the norm a one-hot reads 8: logit 32
            weights["model.embed_tokens.weight"] = embed
            weights["lm_head.weight"] = head
            for name, value in weights.items():
                if name.endswith(("o_proj.weight", "down_proj.weight")):
                    weights[name] = mx.zeros_like(value)
            model.update(tree_unflatten(list(weights.items())))
            model.set_dtype(mx.float16)
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


#: A llava-style chat template: image parts become the processor's ``<image>`` token.
VLM_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
IMAGE_SIZE = 28  # pixels a side: 2 x 2 patches of 14


#: A vision tower over ``IMAGE_SIZE`` pixels: 2 x 2 patches of 14 (each VLM adds its model_type).
TINY_VISION: dict[str, Any] = {
    "num_hidden_layers": 2,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_attention_heads": 2,
    "image_size": IMAGE_SIZE,
    "patch_size": 14,
}


def image_processor(
    kind: str, processor: str, *, mean: list[float], std: list[float], **rest: Any
) -> dict[str, Any]:
    """A preprocessor_config.json for a generated VLM: resize, rescale to [0, 1], normalize, RGB."""
    return {
        "image_processor_type": kind,
        "processor_class": processor,
        "do_resize": True,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": mean,
        "image_std": std,
        "do_convert_rgb": True,
        **rest,
    }


def write_processor_files(work: Path, image: dict[str, Any], processor: dict[str, Any]) -> None:
    """The three files mlx-vlm's processor loading reads beside a generated VLM's weights."""
    (work / "preprocessor_config.json").write_text(json.dumps(image, indent=2))
    (work / "processor_config.json").write_text(json.dumps(processor, indent=2))
    (work / "chat_template.json").write_text(json.dumps({"chat_template": VLM_CHAT_TEMPLATE}))


def make_vlm_model(
    path: str | os.PathLike[str], *, vocab_size: int = 512, seed: int = 0, shape: dict[str, Any] | None = None
) -> Path:
    """Write a tiny llava folder (a CLIP vision tower and a llama) that ``mlx_vlm.load`` accepts.

    ``shape`` overrides the llama's ``TINY_SHAPE`` (benchmarks/vlm_batching.py decodes with a larger one).

    The processor files are transformers' own ``LlavaProcessor`` and
    ``CLIPImageProcessor`` configs, which need no torchvision; the tokenizer
    carries llava's ``<image>`` token.
    """
    import mlx.core as mx
    from mlx_vlm.models.llava import config as llava_config
    from mlx_vlm.models.llava import llava

    with _building(path) as work:
        if work is not None:
            text = {
                "model_type": "llama",
                **TINY_SHAPE,
                **(shape or {}),
                "rms_norm_eps": 1e-6,
                "rope_theta": 10000.0,
            }
            ids = _write_tokenizer(
                work,
                vocab_size,
                text["max_position_embeddings"],
                [*SPECIAL_TOKENS, "<image>"],
                VLM_CHAT_TEMPLATE,
            )
            image_token = json.loads((work / "tokenizer.json").read_text())["added_tokens"][-1]["id"]
            text["vocab_size"] = ids["vocab_size"]
            vision = {
                **TINY_VISION,
                "model_type": "clip_vision_model",
                "projection_dim": 32,
                "layer_norm_eps": 1e-5,
            }
            config = {
                "model_type": "llava",
                "architectures": ["LlavaForConditionalGeneration"],
                "text_config": text,
                "vision_config": vision,
                "image_token_index": image_token,
                "vision_feature_select_strategy": "default",
                "vision_feature_layer": -2,
                "projector_hidden_act": "gelu",
                "torch_dtype": "float16",
                **ids,
            }
            mx.random.seed(seed)
            model_config = llava_config.ModelConfig.from_dict(config)
            model_config.text_config = llava_config.TextConfig.from_dict(text)
            model_config.vision_config = llava_config.VisionConfig.from_dict(vision)
            model = llava.Model(model_config)
            model.set_dtype(mx.float16)
            _save(work, model, config)
            clip = {"height": IMAGE_SIZE, "width": IMAGE_SIZE}
            image = image_processor(
                "CLIPImageProcessor",
                "LlavaProcessor",
                mean=[0.48145466, 0.4578275, 0.40821073],
                std=[0.26862954, 0.26130258, 0.27577711],
                size={"shortest_edge": IMAGE_SIZE},
                do_center_crop=True,
                crop_size=clip,
            )
            processor = {
                "processor_class": "LlavaProcessor",
                "patch_size": 14,
                "vision_feature_select_strategy": "default",
                "image_token": "<image>",
                "num_additional_image_tokens": 1,
            }
            write_processor_files(work, image, processor)
    return Path(path)


def make_whisper_model(path: str | os.PathLike[str], *, seed: int = 0) -> Path:
    """Write a tiny random whisper folder (``mlx_whisper`` loads it) with the bundled multilingual tokenizer.

    ``n_vocab`` 51865 picks mlx_whisper's own multilingual tokenizer and
    ``n_audio_ctx`` 1500 matches its 30 s mel window; everything else is tiny.
    The weights are fp16, the dtype mlx_whisper decodes in by default.
    """
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_whisper.whisper import ModelDimensions, Whisper

    dims = {
        "n_mels": 80,
        "n_audio_ctx": 1500,
        "n_audio_state": 32,
        "n_audio_head": 2,
        "n_audio_layer": 1,
        "n_vocab": 51865,
        "n_text_ctx": 64,
        "n_text_state": 32,
        "n_text_head": 2,
        "n_text_layer": 1,
    }
    with _building(path, weights="weights.safetensors") as work:
        if work is not None:
            mx.random.seed(seed)
            model = Whisper(ModelDimensions(**dims), mx.float16)
            weights = {k: v.astype(mx.float16) for k, v in tree_flatten(model.parameters())}
            mx.save_safetensors(str(work / "weights.safetensors"), weights)
            (work / "config.json").write_text(json.dumps({"model_type": "whisper", **dims}, indent=2))
    return Path(path)


def make_speech(path: str | os.PathLike[str], seconds: float = 1.5) -> Path:
    """A short 16 kHz mono WAV (a tone), enough for a transcription request."""
    import math
    import struct
    import wave

    rate = 16000
    frames = b"".join(
        struct.pack("<h", int(8000 * math.sin(2 * math.pi * 440 * i / rate)))
        for i in range(int(rate * seconds))
    )
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(frames)
    return Path(path)
