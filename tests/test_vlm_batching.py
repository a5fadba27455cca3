"""Concurrent image requests to a multimodal model are served as one batch (upstream's ``VLMBatchScheduler``).

Upstream 1.8.1 batches multimodal requests where mlx-vlm's ``BatchGenerator``
takes ``prompt_kwargs`` (0.7.10 here). Each test runs a real hub with the
generated tiny llava, on real ports: a batched entry beside the same folder
with ``disable_batching``, whose one-at-a-time answers are the reference. The
batch is seen in upstream's own generator (how many sequences one decode step
carried), never in timings.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from mlx_hub.config import ModelConfig
from mlx_hub.engine.patches.switch import needed_here

from .helpers import base_url
from .test_peer_apis import claude, close_clients  # noqa: F401

pytestmark = pytest.mark.skipif(
    not needed_here("vlm_batch_per_request_sampling"),
    reason="upstream batches multimodal requests only on mlx-vlm 0.5 and newer (vlm_batching_capability)",
)

COLORS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (220, 220, 40)]


def _png(color: tuple[int, int, int]) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), color).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


IMAGES = [_png(c) for c in COLORS]


def entries(path: Path) -> list[dict[str, Any]]:
    """The same folder twice: batched (upstream's default) and one request at a time."""
    common = {"model_path": str(path), "model_type": "multimodal", "default": True}  # both loaded at start
    return [{"name": "batched", **common}, {"name": "alone", **common, "disable_batching": True}]


def image_chat(model: str, image: int = 0, **extra: Any) -> dict[str, Any]:
    content = [
        {"type": "text", "text": "What is in the picture?"},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{IMAGES[image]}"}},
    ]
    return {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 12, **extra}


async def ask(http: httpx.AsyncClient, hub: Any, body: dict[str, Any]) -> tuple[int, str, dict[str, Any]]:
    """(status, text, usage) of one chat request, streamed or not, as a client reads it."""
    url = f"{base_url(hub, body['model'])}/chat/completions"
    if not body.get("stream"):
        reply = await http.post(url, json=body)
        if reply.status_code != 200:
            return reply.status_code, reply.text, {}
        data = reply.json()
        return 200, data["choices"][0]["message"]["content"], data["usage"]
    text, usage = "", {}
    body["stream_options"] = {"include_usage": True}
    async with http.stream("POST", url, json=body) as stream:
        async for line in stream.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                return 500, json.dumps(chunk), {}
            for choice in chunk.get("choices") or []:
                text += choice["delta"].get("content") or ""
            usage = chunk.get("usage") or usage
        return stream.status_code, text, usage


async def scheduler_of(hub: Any, name: str = "batched") -> Any:
    """Upstream's scheduler for the entry (started as its first request would), its widest step noted."""
    scheduler = await hub.slots[name].handler._get_or_start_scheduler()
    scheduler.widest = 0
    step = scheduler._step

    def noting_step() -> None:
        generator = scheduler._batch_generator
        scheduler.widest = max(scheduler.widest, len(generator._generation_batch) if generator else 0)
        step()

    scheduler._step = noting_step
    return scheduler


def live_sequences(scheduler: Any) -> int:
    """Sequences mlx-vlm's BatchGenerator still holds (waiting, prefilling or decoding), each with its KV."""
    generator = scheduler._batch_generator
    if generator is None:
        return 0
    prefilling = generator._prompt_batch
    return (
        len(generator._unprocessed_sequences)
        + (len(prefilling) if prefilling is not None else 0)
        + len(generator._generation_batch)
    )


async def wait_for(check: Any, what: str, timeout: float = 60.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check():
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


async def test_concurrent_image_requests_are_one_batch_answering_as_alone(
    make_hub, hub_config, tiny_vlm: Path
) -> None:
    hub = await make_hub(hub_config(entries(tiny_vlm)))
    assert hub.engine.batches(hub.slots["batched"].entry)  # admission reserves the batch's padding
    assert not hub.engine.batches(hub.slots["alone"].entry)
    scheduler = await scheduler_of(hub)
    async with httpx.AsyncClient(timeout=300) as http:
        alone = [await ask(http, hub, image_chat("alone", i, temperature=0)) for i in range(4)]
        together = await asyncio.gather(
            *(ask(http, hub, image_chat("batched", i, temperature=0, stream=i % 2 == 1)) for i in range(4))
        )
    assert scheduler.widest >= 2, scheduler.widest  # one decode step carried several requests
    for (status, text, usage), (_, want, want_usage) in zip(together, alone, strict=True):
        assert status == 200 and text == want and text
        assert usage["completion_tokens"] == want_usage["completion_tokens"] == 12
        assert usage["prompt_tokens"] == want_usage["prompt_tokens"] > 10  # the image's tokens count
    await wait_for(
        lambda: scheduler.get_stats()["active_requests"] == live_sequences(scheduler) == 0, "an idle batch"
    )


async def test_each_request_samples_as_it_asked(make_hub, hub_config, tiny_vlm: Path) -> None:
    """The first request is hot; greedy requests after and beside it still answer as alone, hot ones vary."""
    hub = await make_hub(hub_config(entries(tiny_vlm)))
    hot = {"temperature": 50.0, "top_p": 1.0}
    async with httpx.AsyncClient(timeout=300) as http:
        first = await ask(http, hub, image_chat("batched", 0, **hot))
        assert first[0] == 200
        want = [await ask(http, hub, image_chat("alone", i, temperature=0)) for i in range(2)]
        replies = await asyncio.gather(
            *(ask(http, hub, image_chat("batched", i % 2, temperature=0)) for i in range(2)),
            *(ask(http, hub, image_chat("batched", 0, **hot)) for _ in range(3)),
        )
    assert [r[1] for r in replies[:2]] == [w[1] for w in want]  # greedy, whatever sampled before or beside
    assert all(r[0] == 200 and r[2]["completion_tokens"] == 12 for r in replies[:2])
    assert all(r[0] == 200 and 1 <= r[2]["completion_tokens"] <= 12 for r in replies[2:])  # may draw an end
    hot_texts = [first[1]] + [r[1] for r in replies[2:]]
    assert len(set(hot_texts)) > 1 and want[0][1] not in hot_texts  # sampled, each with its own draws


class FailingModel:
    """Upstream's model seen through a proxy that raises on its ``fail_at``-th call of ``method``."""

    def __init__(self, inner: Any, method: str = "__call__"):
        self.inner, self.method, self.calls, self.fail_at = inner, method, 0, -1

    def _count(self) -> None:
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("injected failure")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.method == "__call__":
            self._count()
        return self.inner(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        value = getattr(self.inner, name)
        if name != self.method:
            return value

        def counted(*args: Any, **kwargs: Any) -> Any:
            self._count()
            return value(*args, **kwargs)

        return counted


async def test_a_failed_batch_step_frees_its_sequences(make_hub, hub_config, tiny_vlm: Path) -> None:
    hub = await make_hub(hub_config(entries(tiny_vlm)))
    scheduler = await scheduler_of(hub)
    # Before the first request: the scheduler builds its generator around this model.
    scheduler._language_model = failing = FailingModel(scheduler._language_model)
    async with httpx.AsyncClient(timeout=300) as http:
        long = {"temperature": 0, "max_tokens": 1500}
        both = [
            asyncio.create_task(ask(http, hub, image_chat("batched", i, stream=i == 0, **long)))
            for i in range(2)
        ]
        await wait_for(lambda: scheduler.get_stats()["active_requests"] == 2, "both requests in the batch")
        failing.fail_at = failing.calls + 2
        results = await asyncio.gather(*both)
        assert [r[0] for r in results] == [500, 500] and all("injected failure" in r[1] for r in results)
        assert live_sequences(scheduler) == 0  # their KV caches went with them
        again = await ask(http, hub, image_chat("batched", 2, temperature=0))
        want = await ask(http, hub, image_chat("alone", 2, temperature=0))
    assert again == want and again[2]["completion_tokens"] == 12


async def test_a_request_that_fails_alone_fails_alone(make_hub, hub_config, tiny_vlm: Path) -> None:
    """An error building one request's image embedding fails that request; the batch beside it answers."""
    hub = await make_hub(hub_config(entries(tiny_vlm)))
    scheduler = await scheduler_of(hub)
    scheduler._model = failing = FailingModel(scheduler._model, "get_input_embeddings")
    async with httpx.AsyncClient(timeout=300) as http:
        running = asyncio.create_task(
            ask(http, hub, image_chat("batched", 0, temperature=0, max_tokens=1000))
        )
        await wait_for(lambda: scheduler.get_stats()["active_requests"] == 1, "the first request decoding")
        failing.fail_at = failing.calls + 1
        failed = await ask(http, hub, image_chat("batched", 1, temperature=0))
        assert failed[0] == 500 and "injected failure" in failed[1]
        status, _, usage = await running
        assert status == 200 and usage["completion_tokens"] > 12
    assert live_sequences(scheduler) == 0


async def test_a_client_that_leaves_frees_its_sequence(make_hub, hub_config, tiny_vlm: Path) -> None:
    hub = await make_hub(hub_config(entries(tiny_vlm)))
    scheduler = await scheduler_of(hub)
    url = f"{base_url(hub, 'batched')}/chat/completions"
    async with httpx.AsyncClient(timeout=300) as http:
        staying = asyncio.create_task(ask(http, hub, image_chat("batched", 0, temperature=0, max_tokens=300)))
        body = image_chat("batched", 1, temperature=0, max_tokens=1900, stream=True)
        async with http.stream("POST", url, json=body) as stream:
            lines = stream.aiter_lines()
            while not (await anext(lines)).startswith("data: {"):
                pass
            await wait_for(
                lambda: scheduler.get_stats()["active_requests"] == 2, "both requests in the batch"
            )
        # The client has gone: its sequence leaves the batch, the other one carries on to its end.
        await wait_for(lambda: scheduler.get_stats()["active_requests"] <= 1, "the left request's removal")
        status, _, usage = await staying
    assert status == 200 and usage["completion_tokens"] == 300
    await wait_for(lambda: live_sequences(scheduler) == 0, "an empty generator")


async def test_a_stop_sequence_ends_a_batched_image_reply(start, hub_config, tiny_vlm: Path) -> None:
    """Anthropic ``stop_sequences`` on the batched multimodal path: the stop reason and the real usage."""
    live = await start(hub_config(entries(tiny_vlm)))
    assert ModelConfig.model_validate(entries(tiny_vlm)[0]).disable_batching is False
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": IMAGES[0]}}
    messages = [{"role": "user", "content": [{"type": "text", "text": "What is in the picture?"}, image]}]
    client = claude(live.url)
    full = await client.messages.create(
        model="batched", max_tokens=40, messages=messages, extra_body={"temperature": 0}
    )
    text = full.content[0].text
    stop = next(text[i : i + 2] for i in range(1, len(text) - 1) if text.index(text[i : i + 2]) > 0)
    cut = await client.messages.create(
        model="batched",
        max_tokens=1500,
        messages=messages,
        extra_body={"temperature": 0},
        stop_sequences=[stop],
    )
    assert cut.content[0].text == text[: text.index(stop)]
    assert (cut.stop_reason, cut.stop_sequence) == ("stop_sequence", stop)
    assert 1 <= cut.usage.output_tokens <= 40 and cut.usage.input_tokens > 10  # what it cost, not 0
