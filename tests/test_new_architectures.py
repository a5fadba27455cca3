"""Architectures only the newer MLX stack has, served by a real hub.

Three mlx-lm 0.32 architectures (olmo_hybrid: linear attention beside full
attention; plamo3: sliding windows; gptj) and one mlx-vlm 0.7 architecture
(llava_onevision), each a generated tiny model. Through real upstream handlers
on real ports, each: loads, answers a chat request (the VLM one with an image),
shares one copy of its weights between two hub.yaml entries on the same folder,
reserves its requests by its own cache plan, and gives its memory back when both
entries unload. On the old stack (mlx-lm 0.31.3, mlx-vlm 0.4.4) each skips, naming
the missing module.
"""

from __future__ import annotations

from importlib.metadata import version
from pathlib import Path
from typing import Any

import openai
import pytest

from mlx_hub.engine import memory
from mlx_hub.engine.tinymodel_archs import ARCHS
from mlx_hub.testing.tinyvlm import VLM_ARCHS

from .helpers import base_url, meta, text_only
from .test_hub import lm
from .test_model_types import image_chat, vlm_entry

NEW_LM = ["olmo_hybrid", "plamo3", "gptj"]
NEW_VLM = ["llava_onevision"]


def _folder(models_dir: Path, name: str) -> Path:
    """The tiny model of ``name``, or a skip naming what the installed stack lacks."""
    if name in VLM_ARCHS:
        if not VLM_ARCHS[name].available():
            pytest.skip(f"mlx-vlm {version('mlx-vlm')} has no mlx_vlm.models.{name} (since {VLM_ARCHS[name].since})")  # fmt: skip
        from mlx_hub.testing.tinyvlm import make_new_vlm_model

        return make_new_vlm_model(models_dir / f"new-{name}", name, seed=31)
    if not ARCHS[name].available():
        pytest.skip(f"mlx-lm {version('mlx-lm')} has no mlx_lm.models.{name} (since {ARCHS[name].since})")
    from mlx_hub.testing.tinymodel import make_model

    return make_model(models_dir / f"new-{name}", arch=name, seed=31)


def _entries(name: str, path: Path) -> list[dict[str, Any]]:
    """Two hub.yaml entries on one folder, as two profiles of one model would be."""
    if name in VLM_ARCHS:
        return [vlm_entry(n, path, served_model_name=f"{name}-{n}") for n in ("one", "two")]
    return [lm(n, path, default=True, served_model_name=f"{name}-{n}") for n in ("one", "two")]


async def _chat(hub: Any, entry: str, name: str, path: Path) -> Any:
    client = openai.AsyncOpenAI(base_url=base_url(hub, entry), api_key="x", max_retries=0)
    served = meta(hub, entry)["served_model_name"]
    if name in VLM_ARCHS:
        return await client.chat.completions.create(**image_chat(served, path))
    return await client.chat.completions.create(
        model=served, messages=[{"role": "user", "content": "Hello"}], max_tokens=6, **text_only(path)
    )


@pytest.mark.parametrize("name", NEW_LM + NEW_VLM)
async def test_a_new_architecture_loads_answers_shares_and_unloads(
    make_hub, hub_config, models_dir: Path, name: str
) -> None:
    path = _folder(models_dir, name)
    weights = (path / "model.safetensors").stat().st_size
    memory.free_memory()
    baseline = memory.active_memory()
    hub = await make_hub(hub_config(_entries(name, path)))
    grown = memory.active_memory() - baseline
    assert grown < 1.5 * weights, (grown, weights)  # one copy, not two
    assert meta(hub, "one")["shared_with"] == ["two"] and meta(hub, "two")["shared_with"] == ["one"]
    for entry in ("one", "two"):
        reply = await _chat(hub, entry, name, path)
        assert reply.model == meta(hub, entry)["served_model_name"]
        assert reply.usage.completion_tokens == 6 and reply.choices[0].message.content, reply
    if name in VLM_ARCHS:
        assert reply.usage.prompt_tokens > 10  # the image's tokens were in the prompt
    plan = hub.engine.plans["one"]  # read from the loaded model's caches, one per cache it makes
    assert plan.layers and all(c.token_bytes or c.state_bytes for c in plan.layers)
    for entry in ("one", "two"):
        assert await hub.unload(entry) == "unloaded"
    memory.free_memory()
    assert abs(memory.active_memory() - baseline) <= 0.02 * weights, (memory.active_memory(), baseline)
    assert not hub.engine.plans
