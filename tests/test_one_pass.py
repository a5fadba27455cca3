"""One pass per request: what is worked out once (per load, per request) stays worked out once.

Each test here pins one rule of issue 35's item 2 so that a later change that
quietly brings back the repeated work fails: a model's batching judged per
load, not per request; one test of a model name; one route table; one read and
parse of a body; one key check.
"""

from __future__ import annotations

import ast
import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mlx_hub.config import ModelConfig
from mlx_hub.testing.fake_engine import FakeEngine, fake, port

from .helpers import hello

Make = Callable[..., Any]
PACKAGE = Path(__file__).resolve().parents[1] / "mlx_hub"


class JudgingEngine(FakeEngine):
    """A fake engine whose loads batch, counting how often anything asks whether they do."""

    def __init__(self) -> None:
        super().__init__()
        self.judged = 0

    def batches(self, entry: ModelConfig, handler: Any = None) -> bool:
        self.judged += 1
        return True


async def test_batching_is_judged_once_per_load_not_per_request(fast: Make) -> None:
    engine = JudgingEngine()
    hub = await fast([fake("b", jit_enabled=True)], engine)
    async with port(hub, "b") as http:
        replies = await asyncio.gather(
            *(http.post("/v1/chat/completions", json=hello("b", 4)) for _ in range(5))
        )
        assert [r.status_code for r in replies] == [200] * 5
        assert hub.slots["b"].batches and engine.judged == engine.loads["b"] == 1
        await hub.unload("b")
        assert (await http.post("/v1/chat/completions", json=hello("b", 4))).status_code == 200
    assert engine.judged == engine.loads["b"] == 2


def test_one_function_says_whether_a_name_is_an_entry() -> None:
    """Every name test goes through ``ModelConfig.answers_to``: no ``x in entry.names`` elsewhere."""
    entry = ModelConfig(name="e", model_path="org/m", served_model_name="served", aliases=["nick"])
    assert all(entry.answers_to(n) for n in ("e", "org/m", "served", "nick"))
    assert not any(entry.answers_to(n) for n in ("E", "", None, "org"))
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Compare)
                and any(isinstance(op, ast.In | ast.NotIn) for op in node.ops)
                and any(isinstance(c, ast.Attribute) and c.attr == "names" for c in node.comparators)
                and "entry" in ast.unparse(node)
            ):
                offenders.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}: {ast.unparse(node)}")
    assert offenders == [], "match names with ModelConfig.answers_to:\n" + "\n".join(offenders)
