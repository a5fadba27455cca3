"""mlx-lm 0.31.x: each sequence in a batch keeps its own sampler and logits processors
(``processors_follow_sequences``).

mlx-lm 0.31.3's ``GenerationBatch.filter`` drops finished sequences from its
``samplers`` and ``logits_processors`` lists only ``if any(...)`` of them is
set. A batch whose sequences all had none (every plain chat request) keeps
its old entries when they finish; the next sequence ``extend`` adds lands
after them, and ``_step`` reads entry ``e`` for the ``e``-th sequence: the
stale, empty one. So on upstream's batched path (mlx-openai-server 1.8's
default) a ``response_format: json_schema`` request that follows a plain
request is generated without its constraint (``{ Paris Paris ...``), and a
seeded or per-request sampler can be lost the same way. mlx-lm 0.32 filters
both lists unconditionally; this applies only where ``filter`` still has the
condition.

Proof: tests/test_structured_answers.py::test_a_schema_after_a_plain_request_is_still_constrained
(on mlx-lm 0.31.3).
"""

from __future__ import annotations

import inspect
import sys
from typing import Any

from mlx_hub.engine.patches.switch import enabled

_LANES = ("samplers", "logits_processors")


def apply() -> None:
    """Patch ``GenerationBatch.filter`` once mlx-lm's generate module is imported, where it needs it."""
    batch = getattr(sys.modules.get("mlx_lm.generate"), "GenerationBatch", None)
    original = getattr(batch, "filter", None)
    if (
        not enabled("processors_follow_sequences")
        or original is None
        or getattr(original, "_mlx_hub_follows", False)
        or not _filters_lanes_conditionally(original)
    ):
        return

    def filter(self: Any, keep: list[int]) -> None:
        count = len(self.uids)
        kept = {
            lane: [getattr(self, lane)[i] for i in keep]
            for lane in _LANES
            if len(getattr(self, lane) or ()) == count
        }
        original(self, keep)
        for lane, values in kept.items():
            setattr(self, lane, values)

    filter._mlx_hub_follows = True  # type: ignore[attr-defined]
    batch.filter = filter


def _filters_lanes_conditionally(method: Any) -> bool:
    """Whether ``filter`` keeps the lanes as they are when none is set (mlx-lm 0.31's defect)."""
    try:
        source = inspect.getsource(method)
    except (OSError, TypeError):
        return False
    return "if any(self.logits_processors)" in source
