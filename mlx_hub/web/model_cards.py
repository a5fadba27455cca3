"""Model cards: what ``GET /v1/models`` and ``GET /v1/models/{id}`` tell a client, loading nothing.

Clients size their requests and pick features from these: ``context_length``
and ``max_output_tokens`` (read from hub.yaml, else the model's config.json),
``capabilities`` (which APIs and inputs the entry serves), ``aliases`` (other
names it answers to) and the load state. The same card is served on a model's
own port (its ``id`` the served name, as upstream lists it) and on the
controller's ``/v1`` (its ``id`` the entry's name, as ``/v1`` routes it).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from mlx_hub.core.states import MemoryState
from mlx_hub.engine.model_files import token_limits
from mlx_hub.web.responses import error_json

if TYPE_CHECKING:
    from starlette.responses import Response

    from mlx_hub.config import ModelConfig
    from mlx_hub.core.slot import ModelSlot

#: The capability names a card always carries, true or false.
CAPABILITIES = ("chat", "completions", "messages", "tools", "vision", "embeddings", "audio", "images")


def capabilities(entry: ModelConfig) -> dict[str, bool]:
    """What the entry serves, by its ``model_type`` and parsers.

    ``tools``: the model's tool calls come back as tool calls only with a
    ``tool_call_parser`` (or upstream's auto tool choice) set.
    """
    kind = entry.model_type
    chats = kind in ("lm", "multimodal")
    serves = {
        "chat": chats,
        "completions": chats,
        "messages": chats,
        "tools": chats and bool(entry.tool_call_parser or entry.enable_auto_tool_choice),
        "vision": kind == "multimodal",
        "embeddings": kind == "embeddings",
        "audio": kind == "whisper",
        "images": kind in ("image-generation", "image-edit"),
    }
    return {name: serves[name] for name in CAPABILITIES}


def model_card(slot: ModelSlot, model_id: str, owned_by: str) -> dict[str, Any]:
    """One ``/v1/models`` entry: OpenAI's fields, then what the hub knows about the model."""
    entry = slot.entry
    limits = token_limits(entry)  # reads config.json at most: never the weights
    return {
        "id": model_id,
        "object": "model",
        "created": int(slot.memory_changed_at or slot.port_changed_at or time.time()),
        "owned_by": owned_by,
        "metadata": None,
        "hub_name": slot.name,
        "model_path": entry.model_path,
        "model_type": entry.model_type,
        "aliases": list(entry.aliases),
        "context_length": limits.get("max_input_tokens"),
        "capabilities": capabilities(entry),
        "loaded": slot.memory_state is MemoryState.LOADED,
        "process_state": slot.port_state.value,
        "memory_state": slot.memory_state.value,
        **limits,  # max_input_tokens, max_output_tokens: what a gateway (export litellm --hub) is told
        "request_params": entry.request_params,
    }


def unknown_model(model_id: str, available: str) -> Response:
    """404 for a model id nobody here answers to, in OpenAI's envelope (the SDK raises NotFoundError)."""
    message = f"model '{model_id}' not found; available models: {available}"
    return error_json(404, message, "invalid_request_error", "model_not_found")


def names_another(requested: object, entry: ModelConfig) -> bool:
    """A request's ``model`` names some model other than ``entry``, which a port serving ``entry`` refuses.

    An omitted or empty ``model`` means the port's own model, as upstream reads it.
    """
    return isinstance(requested, str) and bool(requested) and not entry.answers_to(requested)
