"""The Anthropic and completions translations, as pure functions: no server, no model."""

from __future__ import annotations

import json
from typing import Any

import pytest

from mlx_hub.web import translate as tr
from mlx_hub.web.translate import requests


def messages_body(**extra: Any) -> dict[str, Any]:
    return {"model": "m", "max_tokens": 8, "messages": [{"role": "user", "content": "Hi"}], **extra}


def test_a_plain_request_maps_field_by_field() -> None:
    chat = tr.to_chat_request(
        messages_body(
            system=[{"type": "text", "text": "Be brief."}, {"type": "text", "text": "Be kind."}],
            temperature=0,
            top_p=0.9,
            top_k=20,
            metadata={"user_id": "u-1"},
            stop_sequences=["END"],
            seed=3,
        )
    )
    assert chat["messages"] == [
        {"role": "system", "content": "Be brief.\nBe kind."},
        {"role": "user", "content": "Hi"},
    ]
    assert (chat["max_tokens"], chat["temperature"], chat["top_p"], chat["top_k"]) == (8, 0.0, 0.9, 20)
    assert chat["user"] == "u-1" and chat["seed"] == 3 and chat["model"] == "m"
    assert chat["stream"] is True and chat["stop"] == ["END"]  # handed to upstream, as chat's stop
    assert "tools" not in chat


def test_text_blocks_join_and_images_become_image_urls() -> None:
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}}
    linked = {"type": "image", "source": {"type": "url", "url": "https://example.com/a.png"}}
    content = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    chat = tr.to_chat_request(messages_body(messages=[{"role": "user", "content": content}]))
    assert chat["messages"] == [{"role": "user", "content": "a\nb"}]
    chat = tr.to_chat_request(
        messages_body(messages=[{"role": "user", "content": [*content, image, linked]}])
    )
    parts = chat["messages"][0]["content"]
    assert parts[2] == {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    assert parts[3]["image_url"]["url"] == "https://example.com/a.png"


def test_tools_tool_choice_and_a_tool_round_trip() -> None:
    tool = {"name": "get_weather", "description": "Weather", "input_schema": {"type": "object"}}
    history = [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": [
                {"type": "thinking", "thinking": "look it up", "signature": ""},
                {"type": "text", "text": "Checking."},
                {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}},
            ],
        },
        {
            "role": "user",
            "content": [
                {
                    "type": "tool_result",
                    "tool_use_id": "toolu_1",
                    "content": [{"type": "text", "text": "sunny"}],
                },
                {"type": "text", "text": "And tomorrow?"},
            ],
        },
    ]
    chat = tr.to_chat_request(messages_body(messages=history, tools=[tool]))
    assert chat["tools"] == [
        {
            "type": "function",
            "function": {"name": "get_weather", "parameters": {"type": "object"}, "description": "Weather"},
        }
    ]
    assert chat["tool_choice"] == "auto"  # Anthropic's default when tools are given
    assistant, result, follow_up = chat["messages"][1:]
    assert assistant["content"] == "Checking."
    assert assistant["tool_calls"] == [
        {
            "id": "toolu_1",
            "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
        }
    ]
    assert result == {"role": "tool", "tool_call_id": "toolu_1", "content": "sunny"}
    assert follow_up == {"role": "user", "content": "And tomorrow?"}
    cases = {
        "any": "required",
        "none": "none",
        "auto": "auto",
    }
    for kind, expected in cases.items():
        assert (
            tr.to_chat_request(messages_body(tools=[tool], tool_choice={"type": kind}))["tool_choice"]
            == expected
        )
    named = tr.to_chat_request(
        messages_body(tools=[tool], tool_choice={"type": "tool", "name": "get_weather"})
    )
    assert named["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    errored = requests._user_messages(
        [{"type": "tool_result", "tool_use_id": "t", "content": "boom", "is_error": True}], "m"
    )
    assert errored[0]["content"] == "Error: boom"


def test_thinking_and_prefill() -> None:
    chat = tr.to_chat_request(messages_body(thinking={"type": "disabled"}))
    assert chat["chat_template_kwargs"] == {"enable_thinking": False}
    prefill = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Well,"}]
    chat = tr.to_chat_request(messages_body(messages=prefill))
    assert chat["messages"][-1] == {"role": "assistant", "content": "Well,", "partial": True}


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"max_tokens": None}, "max_tokens"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "system", "content": "x"}]}, "role"),
        ({"messages": [{"role": "user", "content": [{"type": "document"}]}]}, "document"),
        ({"tools": [{"type": "custom"}]}, "tools.0"),
        ({"tool_choice": {"type": "sometimes"}}, "tool_choice"),
        ({"stop_sequences": [""]}, "stop_sequences"),
        ({"temperature": "hot"}, "temperature"),
    ],
)
def test_bad_requests_are_400_naming_the_field(change: dict[str, Any], words: str) -> None:
    body = {k: v for k, v in {**messages_body(), **change}.items() if v is not None}
    with pytest.raises(tr.RequestError) as info:
        tr.to_chat_request(body)
    assert info.value.status == 400 and words in info.value.message


def test_count_tokens_needs_no_max_tokens() -> None:
    chat = tr.to_chat_request({"messages": [{"role": "user", "content": "x"}]}, count_only=True)
    assert "max_tokens" not in chat and chat["messages"] == [{"role": "user", "content": "x"}]


def test_error_envelope_per_status() -> None:
    assert tr.error_body(401, "no key") == {
        "type": "error",
        "error": {"type": "authentication_error", "message": "no key"},
    }
    assert tr.error_body(404, "x")["error"]["type"] == "not_found_error"
    assert tr.error_body(429, "x")["error"]["type"] == "rate_limit_error"
    assert tr.error_body(503, "x")["error"]["type"] == "api_error"  # a load that failed
    assert tr.error_body(503, "x", "memory_budget_exceeded")["error"]["type"] == "overloaded_error"
    assert tr.error_body(502, "x")["error"]["type"] == "api_error"
    from mlx_hub.web.routes import Api, api_of

    assert api_of("/v1/messages") is Api.ANTHROPIC and api_of("/v1/messages/count_tokens/") is Api.ANTHROPIC
    assert api_of("/v1/chat/completions") is Api.OPENAI


def test_handler_chunks_become_typed_pieces() -> None:
    class UsageInfo:  # upstream hands a pydantic object; only its attributes matter
        prompt_tokens, completion_tokens = 7, 3
        prompt_tokens_details = None

    assert tr.pieces("hi") == [tr.Text("hi")]
    assert tr.pieces("") == []
    assert tr.pieces({"reasoning_content": "hmm"}) == [tr.Thinking("hmm")]
    assert tr.pieces({"name": "f", "arguments": {"a": 1}}) == [tr.ToolStart("f", '{"a": 1}')]
    assert tr.pieces({"arguments": '"b"}'}) == [tr.ToolArguments('"b"}')]
    assert tr.pieces({"content": "x"}) == [tr.Text("x")]
    assert tr.pieces({"__usage__": UsageInfo()}) == [tr.Usage(7, 3)]
    assert tr.pieces({"__usage__": {"prompt_tokens": 2, "completion_tokens": 1}}) == [tr.Usage(2, 1)]


def test_stop_scanner_holds_back_only_a_possible_start() -> None:
    scanner = tr.StopScanner(["END", "##"])
    assert scanner.feed("abc E") == "abc "  # "E" may begin END
    assert scanner.feed("X") == "EX"  # it did not
    assert scanner.feed("yz#") == "yz"
    assert scanner.feed("#tail") == "" and scanner.matched == "##"
    assert scanner.feed("more") == "" and scanner.flush() == ""
    unmatched = tr.StopScanner(["END"])
    assert unmatched.feed("wE") == "w" and unmatched.flush() == "E" and unmatched.matched is None
    first = tr.StopScanner(["b", "abc"])
    assert first.feed("xabc") == "x" and first.matched == "abc"  # the earliest match wins
    assert tr.StopScanner([]).feed("anything") == "anything"


def events_of(chunks: list[Any], **kw: Any) -> list[tr.Event]:
    stream = tr.MessageStream(model="m", max_tokens=kw.pop("max_tokens", 10), **kw)
    return list(tr.run(stream, chunks))


def test_text_stream_events_and_the_message_they_fold_into() -> None:
    events = events_of(["Hel", "lo", {"__usage__": {"prompt_tokens": 5, "completion_tokens": 2}}])
    assert [name for name, _ in events] == [
        "message_start",
        "ping",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert events[2][1]["content_block"] == {"type": "text", "text": ""}
    assert events[3][1]["delta"] == {"type": "text_delta", "text": "Hel"}
    assert events[6][1]["delta"] == {"stop_reason": "end_turn", "stop_sequence": None}
    assert events[6][1]["usage"] == {"input_tokens": 5, "output_tokens": 2}
    cached = tr.anthropic_usage(tr.Usage(prompt_tokens=13, completion_tokens=2, cached_tokens=12))
    assert cached == {"input_tokens": 1, "output_tokens": 2, "cache_read_input_tokens": 12}
    message = tr.collect(events)
    assert message["content"] == [{"type": "text", "text": "Hello"}]
    assert message["stop_reason"] == "end_turn" and message["usage"]["input_tokens"] == 5
    assert (
        message["id"].startswith("msg_") and message["role"] == "assistant" and message["type"] == "message"
    )
    assert tr.sse(events[0]).startswith("event: message_start\ndata: {")


def test_thinking_then_text_then_a_tool_call() -> None:
    chunks = [
        {"reasoning_content": "think "},
        {"reasoning_content": "more"},
        "Let me check.",
        {"name": "get_weather", "arguments": '{"city": '},
        {"arguments": '"Paris"}'},
        {"__usage__": {"prompt_tokens": 9, "completion_tokens": 10}},
    ]
    events = events_of(chunks, max_tokens=10)
    starts = [data["content_block"]["type"] for name, data in events if name == "content_block_start"]
    assert starts == ["thinking", "text", "tool_use"]
    deltas = [data["delta"]["type"] for name, data in events if name == "content_block_delta"]
    assert deltas == [
        "thinking_delta",
        "thinking_delta",
        "text_delta",
        "input_json_delta",
        "input_json_delta",
    ]
    stops = [data["index"] for name, data in events if name == "content_block_stop"]
    assert stops == [0, 1, 2]
    message = tr.collect(events)
    thinking, text, tool = message["content"]
    assert thinking["thinking"] == "think more" and text["text"] == "Let me check."
    assert (
        tool["name"] == "get_weather"
        and tool["input"] == {"city": "Paris"}
        and tool["id"].startswith("toolu_")
    )
    assert message["stop_reason"] == "tool_use"  # a tool call wins over the token limit


def test_stop_reasons_max_tokens_and_stop_sequence() -> None:
    full = events_of(["a", "b", {"__usage__": {"prompt_tokens": 1, "completion_tokens": 2}}], max_tokens=2)
    assert tr.collect(full)["stop_reason"] == "max_tokens"
    usage = {"__usage__": {"prompt_tokens": 4, "completion_tokens": 3}}
    cut = events_of(["one ST", "OP two", "three", usage], stops=["STOP"])
    message = tr.collect(cut)
    assert message["content"] == [{"type": "text", "text": "one "}]
    assert message["usage"] == {"input_tokens": 4, "output_tokens": 3}  # read to the end, still real
    assert (message["stop_reason"], message["stop_sequence"]) == ("stop_sequence", "STOP")
    held = events_of(["x S"], stops=["STOP"])  # the text ended while a possible stop was held back
    assert tr.collect(held)["content"][0]["text"] == "x S"


def test_broken_tool_json_is_kept_not_dropped() -> None:
    message = tr.collect(events_of([{"name": "f", "arguments": "{not json"}]))
    assert message["content"][0]["input"] == {"_raw": "{not json"}


def test_completions_requests() -> None:
    chats = tr.to_completion_requests(
        {"model": "m", "prompt": ["a", "b"], "temperature": 0, "seed": 1, "stop": "x"}
    )
    assert [c["messages"] for c in chats] == [
        [{"role": "user", "content": "a"}],
        [{"role": "user", "content": "b"}],
    ]
    assert "max_tokens" not in chats[0]  # the entry's default, else 16, is the route's to pick
    assert chats[0]["temperature"] == 0 and chats[0]["seed"] == 1
    assert chats[0]["stop"] == ["x"]  # handed to upstream, as chat's stop
    for bad in ({"prompt": 3}, {"prompt": []}, {"prompt": "a", "n": 2}, {"prompt": "a", "echo": True}):
        with pytest.raises(tr.RequestError):
            tr.to_completion_requests(bad)
    assert tr.finish_reason(16, 16, False) == "length" and tr.finish_reason(3, 16, False) == "stop"
    assert tr.finish_reason(16, 16, True) == "stop"
    chunk = tr.completion_chunk("cmpl-1", "m", 0, "hi", None)
    assert chunk["object"] == "text_completion" and chunk["choices"][0]["text"] == "hi"
    assert json.loads(json.dumps(tr.usage_dict(2, 3))) == {
        "prompt_tokens": 2,
        "completion_tokens": 3,
        "total_tokens": 5,
    }
