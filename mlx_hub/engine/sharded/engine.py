"""Loading and freeing a sharded entry: its rank group is its "handler".

What the MLX engine does for one process (build a handler, measure what it
added) this does for a group: launch the ranks, wait until each has loaded,
and report the memory the ranks on this machine hold, since only that counts
against this machine's budget. Unloading ends every rank.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from mlx_hub.config import ModelConfig
from mlx_hub.engine.base import EngineError, Loaded
from mlx_hub.engine.model_files import model_folder, weight_files_bytes
from mlx_hub.engine.sharded.group import GroupError, RankGroup
from mlx_hub.engine.sharded.hosts import PlacementError, places

log = logging.getLogger(__name__)

#: Entry options and the mlx_lm.server flag each becomes (the rest is refused at config load).
FLAGS: dict[str, str] = {
    "trust_remote_code": "--trust-remote-code",
    "default_max_tokens": "--max-tokens",
    "default_temperature": "--temp",
    "default_top_p": "--top-p",
    "default_top_k": "--top-k",
    "default_min_p": "--min-p",
    "batch_completion_size": "--decode-concurrency",
    "batch_prefill_size": "--prompt-concurrency",
    "batch_prefill_step_size": "--prefill-step-size",
    "prompt_cache_size": "--prompt-cache-size",
    "prompt_cache_max_bytes": "--prompt-cache-bytes",
    "kv_bits": "--kv-bits",
    "kv_group_size": "--kv-group-size",
    "quantized_kv_start": "--quantized-kv-start",
}


def server_args(entry: ModelConfig) -> list[str]:
    """The entry's options as mlx-lm server flags, for every rank alike."""
    args: list[str] = []
    for name, flag in FLAGS.items():
        value = getattr(entry, name)
        if (
            value is None
            or value is False
            or (name not in entry.model_fields_set and name != "prompt_cache_size")
        ):
            continue
        args += [flag] if value is True else [flag, str(value)]
    template = chat_template(entry)
    if template is not None:  # mlx-lm's server takes the template itself, not a file
        args += ["--chat-template", template]
    if entry.disable_batching:  # one request at a time, as upstream's flag means
        args += ["--decode-concurrency", "1", "--prompt-concurrency", "1"]
    return args


def chat_template(entry: ModelConfig) -> str | None:
    """The text of the entry's ``chat_template_file``, or None; ``EngineError`` naming the file's problem."""
    if not entry.chat_template_file:
        return None
    try:
        return Path(entry.chat_template_file).expanduser().read_text()
    except OSError as exc:
        raise EngineError(f"model '{entry.name}': chat_template_file: {exc}") from None


def is_group(handler: object) -> bool:
    return isinstance(handler, RankGroup)


async def load(entry: ModelConfig) -> Loaded:
    """Launch ``entry``'s ranks and wait for all of them; ``EngineError`` naming the rank if one fails."""
    assert entry.distributed is not None
    group = RankGroup(entry.name, entry.model_path, entry.distributed, server_args(entry))
    started = time.perf_counter()
    try:
        await group.start()
    except (GroupError, PlacementError) as exc:
        raise EngineError(str(exc)) from None
    except BaseException:
        await group.stop()
        raise
    log.info(
        "model '%s': %d ranks loaded (%s parallel) in %.1f s",
        entry.name,
        len(group.ranks),
        group.parallel,
        time.perf_counter() - started,
    )
    return Loaded(
        handler=group,
        memory_bytes=group.local_memory(),
        load_seconds=time.perf_counter() - started,
        ended=group.ended,
    )


def estimate(entry: ModelConfig) -> int:
    """This machine's share of the weights: the whole model over the ranks, times the ranks placed here."""
    assert entry.distributed is not None
    folder = model_folder(entry.model_path)
    if folder is None:
        return 0
    try:
        group = places(entry.distributed)
    except PlacementError:
        return 0
    return weight_files_bytes(folder) * sum(p.local for p in group) // len(group)
