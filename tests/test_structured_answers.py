"""A ``json_schema`` answer is constrained whatever came before it on the same model.

Measured before the fix (mlx-lm 0.31.3, upstream's default batched path): a
schema request sent after a plain chat request came back unconstrained
(``{ Paris Paris ...``), while the same request sent first was valid JSON. A
tiny random model under the schema's constraint still writes valid JSON:
outlines masks every token the schema does not allow.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from .test_hub import lm
from .test_peer_apis import HELLO, close_clients, oai  # noqa: F401

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 8}, "rank": {"type": "integer"}},
    "required": ["city", "rank"],
    "additionalProperties": False,
}


async def schema_answer(client: Any) -> str:
    reply = await client.chat.completions.create(
        model="m",
        messages=[{"role": "user", "content": "What is the capital of France? Answer in JSON."}],
        max_tokens=96,
        temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": SCHEMA}},
    )
    return reply.choices[0].message.content or ""


def assert_matches_schema(text: str) -> None:
    answer = json.loads(text)  # raises on the unconstrained text
    assert set(answer) == {"city", "rank"}, answer
    assert isinstance(answer["city"], str) and isinstance(answer["rank"], int), answer


@pytest.mark.parametrize("batching", [True, False], ids=["batched", "single-request"])
async def test_a_schema_after_a_plain_request_is_still_constrained(
    start, hub_config, tiny_qwen: Path, batching: bool
) -> None:
    live = await start(hub_config([lm("m", tiny_qwen, default=True, disable_batching=not batching)]))
    client = oai(live.url)
    plain = await client.chat.completions.create(model="m", messages=HELLO, max_tokens=8, temperature=0)
    assert plain.choices[0].message.content is not None

    assert_matches_schema(await schema_answer(client))
    assert_matches_schema(await schema_answer(client))  # and after another schema request
