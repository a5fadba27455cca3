"""Anthropic's count_tokens for a sharded entry, counted in the hub's process.

mlx-lm's server has no route that counts a prompt, and asking rank 0 to
generate would step every rank. The hub reads the model's tokenizer (not its
weights: a few megabytes) from the entry's folder once per load and renders the
chat the way mlx-lm's server does (its own ``process_message_content``, the
entry's chat template, tools, the generation prompt), so the count is what rank
0 will see. Clients such as Claude Code call count_tokens to size their context.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from mlx_hub.engine.sharded.engine import chat_template

#: Attribute on the rank group (the entry's "handler") that holds its tokenizer: it ends with the group.
_ATTRIBUTE = "_mlx_hub_tokenizer"


class NoTokenizer(RuntimeError):
    """The entry's folder is not on this machine (its ranks read it elsewhere)."""


def _load(entry: Any) -> Any:
    from mlx_lm.tokenizer_utils import load

    folder = Path(entry.model_path).expanduser()
    if not (folder / "tokenizer_config.json").is_file() and not (folder / "tokenizer.json").is_file():
        raise NoTokenizer(
            f"count_tokens needs model '{entry.name}''s tokenizer on this machine, and {folder} has none "
            "(its ranks read the model elsewhere); copy the folder's tokenizer files here to count"
        )
    template = chat_template(entry)
    return load(folder, tokenizer_config_extra=None if template is None else {"chat_template": template})


def _count(tokenizer: Any, chat: dict[str, Any]) -> int:
    from mlx_lm.server import process_message_content

    messages = [dict(m) for m in chat["messages"]]
    process_message_content(messages)
    ids = tokenizer.apply_chat_template(
        messages, tools=chat.get("tools"), add_generation_prompt=True, tokenize=True
    )
    return len(ids["input_ids"] if hasattr(ids, "keys") else ids)  # a list, or transformers' BatchEncoding


async def count_prompt(group: Any, entry: Any, chat: dict[str, Any]) -> int:
    """The prompt tokens of ``chat`` (an OpenAI chat body) as rank 0 would render it; off the event loop."""
    tokenizer = getattr(group, _ATTRIBUTE, None)
    if tokenizer is None:
        tokenizer = await asyncio.to_thread(_load, entry)
        setattr(group, _ATTRIBUTE, tokenizer)
    return await asyncio.to_thread(_count, tokenizer, chat)
