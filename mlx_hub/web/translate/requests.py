"""Requests: Anthropic Messages and completions bodies to chat bodies, and the errors they raise (pure)."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

#: HTTP status -> Anthropic's error ``type``.
ERROR_TYPES: dict[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "invalid_request_error",
    413: "request_too_large",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "api_error",
    503: "api_error",
    529: "overloaded_error",
}
#: The hub's own error codes that mean "busy, retry later", which Anthropic calls overloaded.
OVERLOADED_CODES = frozenset({"memory_budget_exceeded", "memory_exhausted"})

#: Chat fields upstream takes that a Messages body may add as hub extensions.
PASSTHROUGH = (
    "seed",
    "min_p",
    "repetition_penalty",
    "repetition_context_size",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
    "xtc_probability",
    "xtc_threshold",
    "chat_template_kwargs",
)


class RequestError(Exception):
    """A request the hub refuses (a 400 unless said otherwise), for either API."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.message = message
        self.status = status


def error_body(status: int, message: str, code: object = None) -> dict[str, Any]:
    """Anthropic's error envelope for an HTTP status (and the hub's error code, where it has one)."""
    error_type = ERROR_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
    if code in OVERLOADED_CODES:
        error_type = "overloaded_error"
    return {"type": "error", "error": {"type": error_type, "message": message}}


# --- request: Messages -> chat ---------------------------------------------------------------


def _text_of(blocks: Any, where: str) -> str:
    """A string, or a list of text blocks, as one string (system prompts, tool results)."""
    if isinstance(blocks, str):
        return blocks
    if not isinstance(blocks, list):
        raise RequestError(f"{where}: expected a string or a list of text blocks")
    parts = []
    for block in blocks:
        if (
            not isinstance(block, dict)
            or block.get("type") != "text"
            or not isinstance(block.get("text"), str)
        ):
            raise RequestError(f"{where}: only text blocks are supported here")
        parts.append(block["text"])
    return "\n".join(parts)


def _image_part(block: dict[str, Any], where: str) -> dict[str, Any]:
    source = block.get("source") or {}
    if source.get("type") == "base64":
        url = f"data:{source.get('media_type', 'image/png')};base64,{source.get('data', '')}"
    elif source.get("type") == "url" and isinstance(source.get("url"), str):
        url = source["url"]
    else:
        raise RequestError(f"{where}: an image source must be base64 or url")
    return {"type": "image_url", "image_url": {"url": url}}


def _content(parts: list[dict[str, Any]]) -> str | list[dict[str, Any]]:
    """Text-only content as one string, as a chat client would send it; a list when images are there."""
    if all(p["type"] == "text" for p in parts):
        return "\n".join(p["text"] for p in parts)
    return parts


def _user_messages(content: Any, where: str) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"role": "user", "content": content}]
    if not isinstance(content, list):
        raise RequestError(f"{where}.content: expected a string or a list of content blocks")
    out: list[dict[str, Any]] = []
    parts: list[dict[str, Any]] = []
    for i, block in enumerate(content):
        kind = block.get("type") if isinstance(block, dict) else None
        at = f"{where}.content.{i}"
        if kind == "text":
            parts.append({"type": "text", "text": str(block.get("text", ""))})
        elif kind == "image":
            parts.append(_image_part(block, at))
        elif kind == "tool_result":
            result = block.get("content", "")
            text = _text_of(result, at) if result else ""
            if block.get("is_error"):
                text = f"Error: {text}"
            out.append({"role": "tool", "tool_call_id": str(block.get("tool_use_id", "")), "content": text})
        else:
            raise RequestError(f"{at}: content block type {kind!r} is not supported in a user turn")
    if parts:
        out.append({"role": "user", "content": _content(parts)})
    return out


def _assistant_message(content: Any, where: str) -> dict[str, Any]:
    if isinstance(content, str):
        return {"role": "assistant", "content": content}
    if not isinstance(content, list):
        raise RequestError(f"{where}.content: expected a string or a list of content blocks")
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    for i, block in enumerate(content):
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text":
            texts.append(str(block.get("text", "")))
        elif kind == "tool_use":
            arguments = json.dumps(block.get("input") or {})
            function = {"name": str(block.get("name", "")), "arguments": arguments}
            calls.append({"id": str(block.get("id", "")), "type": "function", "function": function})
        elif kind in ("thinking", "redacted_thinking"):
            continue  # upstream drops reasoning from replayed history too
        else:
            raise RequestError(f"{where}.content.{i}: content block type {kind!r} is not supported")
    message: dict[str, Any] = {"role": "assistant", "content": "".join(texts) if texts else None}
    if calls:
        message["tool_calls"] = calls
    return message


def _tool_choice(choice: Any) -> Any:
    kind = choice.get("type") if isinstance(choice, dict) else None
    if kind == "auto":
        return "auto"
    if kind == "any":
        return "required"
    if kind == "none":
        return "none"
    if kind == "tool" and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": choice["name"]}}
    raise RequestError("tool_choice: type must be auto, any, tool (with a name) or none")


def _tools(tools: Any) -> list[dict[str, Any]]:
    if not isinstance(tools, list):
        raise RequestError("tools: expected a list")
    out = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or not isinstance(tool.get("name"), str):
            raise RequestError(f"tools.{i}: a tool needs a name")
        function: dict[str, Any] = {"name": tool["name"], "parameters": tool.get("input_schema") or {}}
        if tool.get("description"):
            function["description"] = tool["description"]
        out.append({"type": "function", "function": function})
    return out


def _positive_int(body: dict[str, Any], name: str, *, required: bool) -> int | None:
    value = body.get(name)
    if value is None:
        if required:
            raise RequestError(f"{name}: Field required")
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise RequestError(f"{name}: expected an integer of at least 1")
    return value


def stop_sequences(body: dict[str, Any], name: str) -> list[str]:
    """``stop_sequences`` (Messages) or ``stop`` (completions): a string or a list of strings."""
    value = body.get(name)
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(s, str) and s for s in value):
        raise RequestError(f"{name}: expected a list of non-empty strings")
    return list(value)


def to_chat_request(body: Any, *, count_only: bool = False) -> dict[str, Any]:
    """A Messages body as the chat body upstream's handler takes.

    ``stream`` is always on: the handler's stream feeds both answer forms.
    ``stop_sequences`` become chat's ``stop``, so generation ends on them as a
    chat request's does. ``count_only`` (count_tokens) does not ask for ``max_tokens``.
    """
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages: expected a non-empty list")
    chat: list[dict[str, Any]] = []
    if body.get("system"):
        chat.append({"role": "system", "content": _text_of(body["system"], "system")})
    for i, message in enumerate(messages):
        where = f"messages.{i}"
        role = message.get("role") if isinstance(message, dict) else None
        if role == "user":
            chat.extend(_user_messages(message.get("content"), where))
        elif role == "assistant":
            chat.append(_assistant_message(message.get("content"), where))
        else:
            raise RequestError(f"{where}.role: expected 'user' or 'assistant'")
    if chat[-1]["role"] == "assistant":
        chat[-1]["partial"] = True  # Anthropic's prefill: continue the assistant's text
    request: dict[str, Any] = {"messages": chat, "stream": True, "stream_options": {"include_usage": True}}
    if isinstance(body.get("model"), str):
        request["model"] = body["model"]
    max_tokens = _positive_int(body, "max_tokens", required=not count_only)
    if max_tokens is not None:
        request["max_tokens"] = max_tokens
    for name in ("temperature", "top_p"):
        if body.get(name) is not None:
            if isinstance(body[name], bool) or not isinstance(body[name], int | float):
                raise RequestError(f"{name}: expected a number")
            request[name] = float(body[name])
    top_k = _positive_int(body, "top_k", required=False)
    if top_k is not None:
        request["top_k"] = top_k
    if body.get("tools"):
        request["tools"] = _tools(body["tools"])
        request["tool_choice"] = _tool_choice(body.get("tool_choice") or {"type": "auto"})
    elif body.get("tool_choice") is not None:
        _tool_choice(body["tool_choice"])  # still refuse a malformed one
    metadata = body.get("metadata")
    if isinstance(metadata, dict) and isinstance(metadata.get("user_id"), str):
        request["user"] = metadata["user_id"]
    for name in PASSTHROUGH:
        if name in body:
            request[name] = body[name]
    thinking = body.get("thinking")
    if isinstance(thinking, dict) and thinking.get("type") in ("enabled", "disabled"):
        kwargs = dict(request.get("chat_template_kwargs") or {})
        kwargs["enable_thinking"] = thinking["type"] == "enabled"
        request["chat_template_kwargs"] = kwargs
    stops = stop_sequences(body, "stop_sequences")
    if stops and not count_only:
        request["stop"] = stops  # ends generation as chat's stop does (web.stopping)
    return request


def to_completion_requests(body: Any) -> list[dict[str, Any]]:
    """A ``/v1/completions`` body as one chat body per prompt (the route renders no template).

    Each carries its prompt as the one user message (upstream's request needs
    messages); the route has the handler take that text unrendered.
    """
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    prompt = body.get("prompt")
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise RequestError("prompt: expected a string or a non-empty list of strings")
    if body.get("n", 1) != 1 or body.get("best_of", 1) != 1:
        raise RequestError("n and best_of: only 1 is supported")
    if body.get("echo") or body.get("suffix"):
        raise RequestError("echo and suffix are not supported")
    base: dict[str, Any] = {"stream": True, "stream_options": {"include_usage": True}}
    if isinstance(body.get("model"), str):
        base["model"] = body["model"]
    max_tokens = _positive_int(body, "max_tokens", required=False)
    if max_tokens is not None:  # left out: the entry's default_max_tokens, else OPENAI_MAX_TOKENS
        base["max_tokens"] = max_tokens
    for name in ("temperature", "top_p", "seed", "presence_penalty", "frequency_penalty", "logit_bias"):
        if body.get(name) is not None:
            base[name] = body[name]
    if body.get("user") is not None:
        base["user"] = body["user"]
    stops = stop_sequences(body, "stop")
    if stops:
        base["stop"] = stops
    return [{**base, "messages": [{"role": "user", "content": p}]} for p in prompts]


#: OpenAI's ``max_tokens`` for a completions request that names none (and whose entry sets no default).
OPENAI_MAX_TOKENS = 16


def completion_id() -> str:
    return f"cmpl-{uuid.uuid4().hex[:24]}"


def completion_chunk(cid: str, model: str, index: int, text: str, finish: str | None) -> dict[str, Any]:
    choice = {"text": text, "index": index, "logprobs": None, "finish_reason": finish}
    return {
        "id": cid,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
    }


def finish_reason(completion_tokens: int, max_tokens: int, stopped: bool) -> str:
    return "length" if not stopped and completion_tokens >= max_tokens else "stop"


def usage_dict(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
