"""A model entry's ``distributed:`` block: one model sharded over an MLX distributed group.

The ranks are processes the hub starts (engine/sharded/); this module only
says what hub.yaml may ask for, so a mistake is named at config load rather
than at the first request. Which architecture supports which mode is only known
once the model is read, and is checked at load.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

#: Entry options the sharded serving code (mlx-lm's distributed server) cannot honour, with the reason.
NOT_SHARDED: dict[str, str] = {
    "draft_model_path": "speculative decoding is not supported across ranks",
    "lora_paths": "adapters are not supported across ranks",
    "lora_scales": "adapters are not supported across ranks",
    "prompt_cache_dir": "each rank keeps its prompt cache in memory",
    "message_converter": "the sharded server renders messages with the model's own chat template",
    "tool_call_parser": "the sharded server parses tool calls with the model's own tokenizer",
    "reasoning_parser": "the sharded server has no reasoning parsers",
    "enable_auto_tool_choice": "the sharded server parses tool calls with the model's own tokenizer",
    "config_name": "only lm models can be sharded",
    "quantize": "only lm models can be sharded",
    "disable_auto_resize": "only multimodal models resize images, and they cannot be sharded",
    "num_draft_tokens": "speculative decoding is not supported across ranks",
    "context_length": "the sharded server sizes each request's cache itself",
    "max_concurrency": "the sharded server batches on its own: set batch_completion_size and batch_prefill_size",
    "queue_size": "the sharded server queues on its own; queue_timeout still bounds the wait for the model",
}

Backend = Literal["ring", "jaccl", "mpi"]
Parallel = Literal["tensor", "pipeline"]


class DistributedConfig(BaseModel):
    """Where the ranks run and how the model is split among them.

    ``hosts`` lists one rank per item, rank 0 first (the same host may appear
    twice: two ranks on one machine); ``hostfile`` is mlx.launch's JSON hostfile
    instead. ``parallel`` unset picks tensor parallelism where the architecture
    has it, else pipeline.
    """

    model_config = ConfigDict(extra="forbid")

    hosts: list[str] | None = None
    hostfile: str | None = None
    backend: Backend = "ring"
    parallel: Parallel | None = None
    python: str | None = None  # unset: this hub's interpreter path, on every host
    # A rank whose serving loop makes no step for this long is stalled (a ring collective can
    # deadlock: mlx#4475); the group is ended and the requests in flight get an error naming it.
    stall_seconds: Annotated[float, Field(gt=0)] = 20.0
    # How long the ranks may take to find each other before the launch fails, naming who did not.
    join_seconds: Annotated[float, Field(gt=0)] = 60.0
    # The first ring port; rank r listens on ring_port + r (set it where that range is taken).
    ring_port: Annotated[int, Field(strict=True, ge=1024, le=65000)] | None = None

    @field_validator("hosts")
    @classmethod
    def _hosts(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return None
        if len(value) < 2:
            raise ValueError("hosts needs at least two items (one rank each, rank 0 first)")
        if any(not isinstance(h, str) or not h.strip() for h in value):
            raise ValueError("hosts must be host names or addresses, none empty")
        return [h.strip() for h in value]

    @field_validator("hostfile")
    @classmethod
    def _hostfile(cls, value: str | None) -> str | None:
        if value is not None and not Path(value).expanduser().is_file():
            raise ValueError(
                f"hostfile {value} does not exist; write one with `mlx.distributed_config` or list hosts instead"
            )
        return value

    @field_validator("backend")
    @classmethod
    def _backend(cls, value: str) -> str:
        if value == "mpi":
            raise ValueError(
                "backend mpi needs mpirun to start the ranks, and the hub starts each rank itself so it can "
                "watch and end it; use ring (any TCP or Thunderbolt link) or jaccl (Thunderbolt 5 RDMA)"
            )
        return value

    @model_validator(mode="after")
    def _one_source(self) -> DistributedConfig:
        if (self.hosts is None) == (self.hostfile is None):
            raise ValueError("give either hosts (a list, rank 0 first) or hostfile, not both and not neither")
        return self


def sharded_refusals(entry: Any) -> list[tuple[str, str]]:
    """The entry's options that cannot work sharded, as (field, why); empty when none is set.

    Only options the entry (or hub.yaml's defaults) set count: one that merely
    has a default value is not the user's choice.
    """
    found = [
        (name, why)
        for name, why in NOT_SHARDED.items()
        if name in entry.model_fields_set and getattr(entry, name) not in (None, False, [])
    ]
    if entry.model_type != "lm":
        found.insert(0, ("model_type", f"{entry.model_type} models cannot be sharded, only lm"))
    return found
