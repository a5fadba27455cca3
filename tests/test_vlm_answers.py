"""A multimodal model's answers on every path upstream has: one at a time or batched, streamed or not."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from .helpers import base_url
from .test_model_types import image_chat, vlm_entry


def _usage(reply: dict[str, Any]) -> tuple[int, int, int]:
    usage = reply["usage"]
    return usage["prompt_tokens"], usage["completion_tokens"], usage["total_tokens"]


@pytest.mark.parametrize("batching", ["off", "on"])
async def test_an_empty_answer_is_an_answer(make_hub, hub_config, mute_vlm: Path, batching: str) -> None:
    """The model ends its turn at once: 200 with no text, ``stop`` and the streamed answer's usage.

    Upstream 1.8.1 answers 500 ("'NoneType' object has no attribute 'peak_memory'")
    to the non-streamed request served one at a time (patches ``vlm_last_step_usage``);
    its batched and streamed paths already answer so.
    """
    hub = await make_hub(hub_config([vlm_entry("mute", mute_vlm, disable_batching=batching == "off")]))
    url = base_url(hub, "mute") + "/chat/completions"
    async with httpx.AsyncClient(timeout=120) as client:
        streamed = await client.post(url, json=image_chat("mute", mute_vlm, stream=True, temperature=0.0))
        plain = await client.post(url, json=image_chat("mute", mute_vlm, temperature=0.0))
        image = image_chat("mute", mute_vlm)["messages"][0]["content"][1]["image_url"]["url"]
        content = [{"type": "input_text", "text": "Hi"}, {"type": "input_image", "image_url": image}]
        response = await client.post(
            base_url(hub, "mute") + "/responses",
            json={"model": "mute", "input": [{"role": "user", "content": content}], "max_output_tokens": 6},
        )
    assert plain.status_code == 200, plain.text
    (choice,) = plain.json()["choices"]
    assert choice["message"]["content"] == "" and choice["finish_reason"] == "stop"
    chunks = [line[5:].strip() for line in streamed.text.splitlines() if line.startswith("data:")]
    last = httpx.Response(200, content=chunks[-2]).json()  # the chunk before [DONE] carries the usage
    assert _usage(plain.json()) == _usage(last)
    prompt_tokens, completion_tokens, _ = _usage(plain.json())
    assert prompt_tokens > 10 and completion_tokens == 1  # the image's tokens; the end-of-turn token
    assert response.status_code == 200, response.text  # the Responses API takes the same path
    assert response.json()["output"] == [] and response.json()["usage"]["output_tokens"] == 1
