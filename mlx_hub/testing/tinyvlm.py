"""Tiny vision-language models of the architectures only a newer mlx-vlm has, offline.

``tinymodel.make_vlm_model`` writes llava, which every mlx-vlm the hub runs on
knows. ``VLM_ARCHS`` lists the others (one row per architecture: mlx-vlm's
model package, ``architectures``, the first mlx-vlm with it) and
``make_new_vlm_model`` writes one: a qwen2 text model, a SigLIP vision tower of
2 x 2 patches, random weights saved from mlx-vlm's own classes, the tokenizer
from tinymodel with the image token added, and the processor files the
architecture's own processor reads (mlx-vlm's PIL-backed one: no torchvision).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlx_hub.testing.tinymodel import (
    IMAGE_SIZE,
    SPECIAL_TOKENS,
    TINY_SHAPE,
    TINY_VISION,
    VLM_CHAT_TEMPLATE,
    _building,
    _save,
    _write_tokenizer,
    image_processor,
    write_processor_files,
)


@dataclass(frozen=True)
class VLMArch:
    """A vision-language architecture a tiny model can be written in."""

    package: str  # mlx_vlm.models.<package>, also the config's model_type
    architecture: str
    since: str  # the first mlx-vlm version with this package

    def available(self) -> bool:
        """Whether the installed mlx-vlm has this architecture."""
        return importlib.util.find_spec(f"mlx_vlm.models.{self.package}") is not None


VLM_ARCHS: dict[str, VLMArch] = {
    "llava_onevision": VLMArch("llava_onevision", "LlavaOnevisionForConditionalGeneration", "0.7"),
}

#: A SigLIP tower over ``IMAGE_SIZE`` pixels.
_VISION = {**TINY_VISION, "model_type": "siglip_vision_model", "layer_norm_eps": 1e-6}


def _processor_files(work: Path) -> None:
    """The PIL image processor's config (one tile size, no AnyRes upscaling) and the processor's."""
    tile = {"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    image = image_processor(
        "LlavaOnevisionImageProcessor",
        "LlavaOnevisionProcessor",
        mean=[0.5, 0.5, 0.5],
        std=[0.5, 0.5, 0.5],
        size=tile,
        do_pad=True,
        image_grid_pinpoints=[[IMAGE_SIZE, IMAGE_SIZE]],
    )
    processor = {
        "processor_class": "LlavaOnevisionProcessor",
        "num_image_tokens": (IMAGE_SIZE // 14) ** 2,
        "vision_feature_select_strategy": "full",
        "image_token": "<image>",
        "video_token": "<video>",
    }
    write_processor_files(work, image, processor)


def make_new_vlm_model(
    path: str | os.PathLike[str], arch: str = "llava_onevision", *, vocab_size: int = 512, seed: int = 0
) -> Path:
    """Write a tiny ``arch`` folder (see ``VLM_ARCHS``) that ``mlx_vlm.load`` accepts, and return it."""
    import mlx.core as mx

    row = VLM_ARCHS[arch]
    package = importlib.import_module(f"mlx_vlm.models.{row.package}")
    with _building(path) as work:
        if work is not None:
            text: dict[str, Any] = {"model_type": "qwen2", **TINY_SHAPE, "rms_norm_eps": 1e-6}
            specials = [*SPECIAL_TOKENS, "<image>", "<video>"]
            ids = _write_tokenizer(
                work, vocab_size, text["max_position_embeddings"], specials, VLM_CHAT_TEMPLATE
            )
            added = {
                t["content"]: t["id"]
                for t in json.loads((work / "tokenizer.json").read_text())["added_tokens"]
            }
            text["vocab_size"] = ids["vocab_size"]
            config: dict[str, Any] = {
                "model_type": row.package,
                "architectures": [row.architecture],
                "text_config": text,
                "vision_config": _VISION,
                "image_token_index": added["<image>"],
                "video_token_index": added["<video>"],
                "image_grid_pinpoints": [[IMAGE_SIZE, IMAGE_SIZE]],
                "vision_aspect_ratio": "anyres_max_9",
                "vision_feature_select_strategy": "full",
                "vision_feature_layer": -1,
                "torch_dtype": "float16",
                **ids,
            }
            model_config = package.ModelConfig.from_dict(config)
            model_config.text_config = package.TextConfig.from_dict(text)
            model_config.vision_config = package.VisionConfig.from_dict(_VISION)
            mx.random.seed(seed)
            model = package.Model(model_config)
            model.set_dtype(mx.float16)
            _save(work, model, config)
            _processor_files(work)
    return Path(path)
