"""Anthropic Messages and OpenAI legacy completions, as pure translations to and from chat.

Upstream serves only chat (and responses). Rather than a second inference
path, the hub turns a Messages request into the chat request upstream's
handler already takes, runs it through the same handler call the chat route
makes, and turns the handler's stream back into Anthropic's events. Nothing
here does I/O, so every mapping is tested without a server:

* :func:`to_chat_request` maps a Messages body to a chat body (or raises
  :class:`RequestError`, a 400 in Anthropic's envelope), and
  :func:`to_completion_requests` a completions body to one per prompt;
* :func:`pieces` reads one chunk of the handler's stream (text, reasoning,
  a tool call, usage) as typed pieces;
* :class:`MessageStream` is the state machine from pieces to Anthropic's
  event sequence, and :func:`collect` folds those events into the
  non-streamed message, so both forms come from one code path;
* :class:`StopScanner` finds ``stop_sequences`` (and completions' ``stop``)
  in the text. They are also handed to upstream as chat's ``stop`` (its
  batched path ends generation on them, dropping the match's last token; its
  other paths ignore them), so the route (``web.stopping``) ends the generation
  on whichever sees a match first, and a stop_reason still names the sequence.

No library does this without a large runtime dependency (LiteLLM's adapter
pulls all of LiteLLM), so it is written small.
"""

from mlx_hub.web.translate.events import (
    Event,
    MessageStream,
    Piece,
    StopReason,
    StopScanner,
    Text,
    Thinking,
    ToolArguments,
    ToolStart,
    Usage,
    anthropic_usage,
    collect,
    message_id,
    pieces,
    run,
    sse,
    tool_use_id,
)
from mlx_hub.web.translate.requests import (
    ERROR_TYPES,
    OPENAI_MAX_TOKENS,
    OVERLOADED_CODES,
    PASSTHROUGH,
    RequestError,
    completion_chunk,
    completion_id,
    error_body,
    finish_reason,
    stop_sequences,
    to_chat_request,
    to_completion_requests,
    usage_dict,
)

__all__ = [
    "ERROR_TYPES",
    "Event",
    "MessageStream",
    "OPENAI_MAX_TOKENS",
    "OVERLOADED_CODES",
    "PASSTHROUGH",
    "Piece",
    "RequestError",
    "StopReason",
    "StopScanner",
    "Text",
    "Thinking",
    "ToolArguments",
    "ToolStart",
    "Usage",
    "anthropic_usage",
    "collect",
    "completion_chunk",
    "completion_id",
    "error_body",
    "finish_reason",
    "message_id",
    "pieces",
    "run",
    "sse",
    "stop_sequences",
    "to_chat_request",
    "to_completion_requests",
    "tool_use_id",
    "usage_dict",
]
