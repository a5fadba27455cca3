"""mlx-openai-server 1.8.1 (and 1.6.3): what the hub changes on upstream's own objects.

Each item is named as ``MLX_HUB_DISABLE_PATCHES`` takes it (switch.py).

- ``share_weights``: upstream's model classes read weights with their library's
  ``load``; the hub installs loaders that keep one copy per folder (engine.weights).
  Proof: tests/test_shared_weights.py::test_two_profiles_share_one_copy.
- ``batch_failure_frees_its_sequences``: 1.8.1's ``BatchScheduler._fail_all_active``
  fails a batch's requests but leaves their sequences (and KV) in mlx-lm's
  ``BatchGenerator``. Proof: tests/test_memory.py::test_an_allocation_error_fails_that_request_alone.
- ``vlm_batching_capability``: 1.8.1's VLM scheduler needs an mlx-vlm newer than
  the 0.4 it pins (the request hangs). Proof: tests/test_model_types.py::
  test_multimodal_chat_with_an_image[on].
- ``serve_like_launch``: a bare whisper handler lacks the methods upstream's
  transcription route calls on ``launch``'s process proxy. Proof:
  tests/test_model_types.py::test_whisper_transcribes_streams_and_frees.
- ``bound_prompt_cache``: upstream's ``LRUPromptCache`` is unbounded by default.
  Proof: tests/test_engine.py::test_a_budget_bounds_upstreams_prompt_cache.
- ``accept_raw_prompts`` (with ``raw_prompt``) and ``count_prompt_tokens``: /v1/completions sends a prompt as written
  through the chat path, and count_tokens renders a prompt as the handler would,
  with upstream's private ``_prepare_*`` methods. Proof: tests/test_peer_apis.py::
  test_completions_plain_stream_and_several_prompts and ::test_chat_messages_and_completions_answer_the_same.
- ``watch_generation_steps``: ``BatchScheduler.submit_stream``, ``InferenceWorker.submit_stream``
  and ``VLMBatchScheduler.submit_stream`` (batched multimodal) hand their generation steps to
  ``engine.generation_watch``, so a route learns why its generation ended (a stop sequence
  upstream matched on tokens) and what it cost when the route ended it. Proof:
  tests/test_stops.py (usage 0 and ``end_turn`` without it); for multimodal,
  tests/test_vlm_batching.py::test_a_stop_sequence_ends_a_batched_image_reply.
- ``queue_timeout_bounds_waiting``: 1.8.1's ``InferenceWorker.submit`` (every request served
  one at a time and not streamed) wraps the whole generation in ``asyncio.wait_for`` with the
  queue timeout, so a generation longer than ``queue_timeout`` died with 500 "Inference timed
  out". The timeout now bounds the wait for the worker only. Proof: tests/test_engine.py::
  test_queue_timeout_bounds_waiting_not_generating.
- ``vlm_last_step_usage``: 1.8.1's ``MLX_VLM.__call__`` (a multimodal model served one at a
  time, not streamed) takes its usage from the last step that carried text; an answer with no
  text (the model ends its turn at once) has none, and the request died with 500 "'NoneType'
  object has no attribute 'peak_memory'". The last step stands in, as the streamed and batched
  paths already have it. Proof: tests/test_vlm_answers.py::test_an_empty_answer_is_an_answer[off].
- ``idle_workers_hold_no_kv``: 1.8.1's one-at-a-time worker keeps its last work item (whose
  closure holds the request's arguments, its KV cache among them) until the next request, and
  its ``BatchScheduler`` keeps the last step's responses (the finished sequence's KV). Neither
  is counted: the request's reservation has ended and the prompt cache keeps the KV on disk.
  Both now drop the KV once upstream has stored it. Proof: tests/test_memory.py::
  test_a_finished_request_leaves_no_kv_in_memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib
import inspect
import logging
import queue
import sys
import threading
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from typing import Any

from mlx_hub.engine.generation_watch import watched
from mlx_hub.engine.patches.switch import enabled
from mlx_hub.engine.versions import package_version
from mlx_hub.engine.weights import same_companion, sharing_load, sharing_pair_load, vlm_processor

log = logging.getLogger(__name__)

VLM_SCHEDULER = "app.core.vlm_batch_scheduler"


def apply() -> None:
    """Patch what is imported by now; each step is idempotent and can be switched off (switch.py)."""
    for name, patch in (
        ("vlm_batching_capability", vlm_batching_capability),
        ("share_weights", share_weights),
        ("batch_failure_frees_its_sequences", batch_failure_frees_its_sequences),
        ("watch_generation_steps", watch_generation_steps),
        ("queue_timeout_bounds_waiting", queue_timeout_bounds_waiting),
        ("vlm_last_step_usage", vlm_last_step_usage),
        ("idle_workers_hold_no_kv", idle_workers_hold_no_kv),
    ):
        if enabled(name):
            patch()


def watch_generation_steps() -> None:
    """Route each generation stream upstream starts through ``generation_watch.watched`` (idempotent).

    The wrapper yields every step unchanged and closes upstream's generator when
    it is closed, so cancelling a generation works as before.
    """
    for module_name, class_name in (
        ("app.core.batch_scheduler", "BatchScheduler"),
        ("app.core.inference_worker", "InferenceWorker"),
        ("app.core.vlm_batch_scheduler", "VLMBatchScheduler"),
    ):
        cls = getattr(sys.modules.get(module_name), class_name, None)
        original = getattr(cls, "submit_stream", None)
        if original is None or getattr(original, "_mlx_hub_watched", False):
            continue

        def submit_stream(self: Any, *args: Any, _original: Any = original, **kwargs: Any) -> Any:
            return watched(_original(self, *args, **kwargs))

        submit_stream._mlx_hub_watched = True  # type: ignore[attr-defined]
        cls.submit_stream = submit_stream  # type: ignore[union-attr]


def queue_timeout_bounds_waiting() -> None:
    """Upstream's one-at-a-time worker times out a request after ``queue_timeout`` even while it runs.

    ``queue_timeout`` is how long a request may wait for the model; a long answer
    that has started must finish. The replacement ``submit`` takes the same queue
    and bookkeeping as upstream's, and waits with the timeout only until the worker
    thread takes the request; one that timed out waiting is skipped when its turn comes.
    """
    module = sys.modules.get("app.core.inference_worker")
    worker = getattr(module, "InferenceWorker", None)
    if worker is None or getattr(worker.submit, "_mlx_hub_waits_only", False):
        return
    if not hasattr(module, "_resolve_future") or not hasattr(worker, "_record"):
        return  # a release whose worker is built otherwise: leave it as it is
    resolve = module._resolve_future

    async def submit(self: Any, func: Any, *args: Any, **kwargs: Any) -> Any:
        loop = asyncio.get_running_loop()
        started, done = loop.create_future(), loop.create_future()
        abandoned = threading.Event()

        def work() -> None:
            if abandoned.is_set():
                return
            loop.call_soon_threadsafe(resolve, started, None, None)
            try:
                out = func(*args, **kwargs)
            except BaseException as exc:
                loop.call_soon_threadsafe(resolve, done, None, exc)
                self._record(False)
            else:
                loop.call_soon_threadsafe(resolve, done, out, None)
                self._record(True)

        try:
            self._work_queue.put_nowait(work)
        except queue.Full:
            raise asyncio.QueueFull("Inference queue is full") from None
        try:
            await asyncio.wait_for(asyncio.shield(started), timeout=self._timeout)
        except TimeoutError:
            abandoned.set()
            raise TimeoutError(f"waited {self._timeout:g} s (queue_timeout) for the model to start") from None
        return await done

    submit._mlx_hub_waits_only = True  # type: ignore[attr-defined]
    worker.submit = submit


class _RunOnce:
    """A work item that lets go of its work once run: a loop that keeps it in a local keeps nothing."""

    __slots__ = ("_work",)

    def __init__(self, work: Callable[[], None]):
        self._work: Callable[[], None] | None = work

    def __call__(self) -> None:
        work, self._work = self._work, None
        if work is not None:
            work()


class _ForgetfulQueue(queue.Queue):  # type: ignore[type-arg]
    """The worker's queue, handing out each item as a ``_RunOnce``."""

    def get(self, block: bool = True, timeout: float | None = None) -> _RunOnce:
        return _RunOnce(super().get(block, timeout))


def idle_workers_hold_no_kv() -> None:
    """Upstream's threads keep the last request's KV alive while they wait for the next one.

    ``InferenceWorker._run`` holds its last work item in a local while it polls
    its queue; the item's closure holds the request's arguments, with the KV cache
    the request filled. ``BatchScheduler._run`` holds the last step's responses; a
    finished one carries its sequence's KV. By then upstream has stored that KV in
    its prompt cache (on disk), so it is memory nothing counts: up to one whole
    request's KV per model. Workers made from now on get a queue whose items
    forget their work once run, and a handled response forgets its cache.
    """
    worker = getattr(sys.modules.get("app.core.inference_worker"), "InferenceWorker", None)
    if worker is not None and not getattr(worker.__init__, "_mlx_hub_forgets", False):
        made = worker.__init__

        @functools.wraps(made)
        def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
            made(self, *args, **kwargs)
            held = getattr(self, "_work_queue", None)
            if type(held) is queue.Queue and held.empty():
                self._work_queue = _ForgetfulQueue(held.maxsize)

        __init__._mlx_hub_forgets = True  # type: ignore[attr-defined]
        worker.__init__ = __init__
    scheduler = getattr(sys.modules.get("app.core.batch_scheduler"), "BatchScheduler", None)
    handle = getattr(scheduler, "_handle_generation_response", None)
    if handle is not None and not getattr(handle, "_mlx_hub_forgets", False):

        @functools.wraps(handle)
        def handle_generation_response(self: Any, resp: Any) -> None:
            try:
                handle(self, resp)
            finally:
                if getattr(resp, "prompt_cache", None) is not None:
                    resp.prompt_cache = None  # stored by now (or not kept): the scheduler's loop keeps resp

        handle_generation_response._mlx_hub_forgets = True  # type: ignore[attr-defined]
        scheduler._handle_generation_response = handle_generation_response  # type: ignore[union-attr]


def vlm_last_step_usage() -> None:
    """A multimodal answer without text, served one at a time and not streamed, is an answer, not a 500.

    Upstream's non-streamed ``MLX_VLM.__call__`` joins the steps of its own
    streamed call and reads the usage off the last step with text. The
    replacement takes the same steps (upstream's call with ``stream=True``) and
    joins them the same way; only where no step had text does the last step
    give the counts (its prompt tokens, and the end-of-turn token mlx-vlm counts).
    """
    module = sys.modules.get("app.models.mlx_vlm")
    model_class = getattr(module, "MLX_VLM", None)
    response_class = getattr(module, "CompletionResponse", None)
    if model_class is None or response_class is None:
        return
    original = model_class.__call__
    if getattr(original, "_mlx_hub_last_step", False):
        return

    def __call__(self: Any, prompt: str, stream: bool = False, **kwargs: Any) -> Any:
        steps = original(self, prompt, stream=True, **kwargs)
        if stream:
            return steps
        text, tokens, final, last = "", [], None, None
        for step in steps:
            last = step or last
            if step and step.text:
                text += step.text
                tokens.append(step.token)
                final = step
        final = final or last
        if final is None:  # mlx-vlm yields a step even for an empty answer; this one yielded nothing
            raise RuntimeError("the model produced no generation step")
        return response_class(
            text=text,
            tokens=tokens,
            peak_memory=final.peak_memory,
            generation_tps=final.generation_tps,
            prompt_tps=final.prompt_tps,
            prompt_tokens=final.prompt_tokens,
            generation_tokens=final.generation_tokens,
        )

    __call__._mlx_hub_last_step = True  # type: ignore[attr-defined]
    model_class.__call__ = __call__


def vlm_batching_capability() -> None:
    """Turn upstream's VLM batching off where the installed mlx-vlm cannot do what it asks.

    Upstream 1.8.1's VLM scheduler calls ``BatchGenerator(kv_bits=..., stream=...)``
    and ``insert(prompt_kwargs=...)``, which arrived after mlx-vlm 0.4, the
    newest release 1.8.1 allows; on 0.4 the scheduler thread dies and the
    request hangs. Upstream's own switch for "no VLM batching",
    ``VLM_BATCHING_AVAILABLE``, then sends every multimodal request down its
    one-at-a-time path instead.
    """
    handler_module = sys.modules.get("app.handler.mlx_vlm")
    if handler_module is None or not getattr(handler_module, "VLM_BATCHING_AVAILABLE", False):
        return
    if vlm_generator_batches():
        return
    handler_module.VLM_BATCHING_AVAILABLE = False
    log.warning(
        "mlx-vlm %s cannot run mlx-openai-server's batched multimodal generation; "
        "multimodal requests are served one at a time",
        package_version("mlx-vlm") or "?",
    )


def vlm_generator_batches() -> bool:
    """Whether the installed mlx-vlm's ``BatchGenerator`` takes what upstream's VLM scheduler hands it
    (``insert(prompt_kwargs=...)``, from mlx-vlm 0.5)."""
    generator = getattr(sys.modules.get(VLM_SCHEDULER), "BatchGenerator", None)
    return generator is not None and "prompt_kwargs" in inspect.signature(generator.insert).parameters


def share_weights() -> None:
    """Upstream's model classes read weights with their library's ``load``: one copy per folder instead.

    ``MLX_LM`` (and its draft models) through ``mlx_lm.load``, ``MLX_VLM`` through
    ``mlx_vlm.load``, ``MLX_Embeddings`` through ``mlx_embeddings``' ``load``;
    weights.py shares each folder's weights between the entries that load it.
    """
    for handler_module, model_module, wrap in (
        ("app.handler.mlx_lm", "app.models.mlx_lm", sharing_load),
        (
            "app.handler.mlx_vlm",
            "app.models.mlx_vlm",
            lambda f: sharing_pair_load(f, "vlm", vlm_processor),
        ),
        (
            "app.handler.mlx_embeddings",
            "app.models.mlx_embeddings",
            lambda f: sharing_pair_load(f, "embed", same_companion),
        ),
    ):
        if handler_module not in sys.modules:
            continue
        module = importlib.import_module(model_module)  # handlers may import it only when they build
        if not getattr(module.load, "_mlx_hub_sharing", False):
            module.load = wrap(module.load)


def batch_failure_frees_its_sequences() -> None:
    """Upstream's batch scheduler fails a batch's requests on an error but leaves their sequences in mlx-lm's
    ``BatchGenerator``: their KV caches stay allocated, and the generator goes on decoding them.

    After an allocation error that is the worst thing to keep. The failed uids
    are removed from the generator first (on the scheduler's own thread, where
    ``_fail_all_active`` runs), as upstream itself does for cancelled requests.
    """
    scheduler = getattr(sys.modules.get("app.core.batch_scheduler"), "BatchScheduler", None)
    if scheduler is not None:
        free_before_failing(scheduler, _remove_together)


def _remove_together(scheduler: Any, generator: Any, uids: list[int]) -> None:
    """mlx-lm's ``BatchGenerator.remove`` takes the failed uids at once."""
    try:
        generator.remove(uids)
    except Exception:  # the requests still fail; only the memory stays until the generator ends
        log.exception("could not drop the failed batch's sequences")


def free_before_failing(scheduler: type, drop: Callable[[Any, Any, list[int]], None]) -> None:
    """Wrap a scheduler's ``_fail_all_active`` so its active sequences leave the generator first (idempotent).

    Upstream's lm and VLM schedulers both fail a failed step's requests and leave
    their sequences decoding; ``drop(scheduler, generator, uids)`` removes them the
    way that library's generator can, on the scheduler's own thread.
    """
    original = scheduler._fail_all_active
    if getattr(original, "_mlx_hub_frees", False):
        return

    @functools.wraps(original)
    def fail_all_active(self: Any, exc: BaseException) -> None:
        generator = getattr(self, "_batch_generator", None)
        uids = list(getattr(self, "_active", {}))
        if generator is not None and uids:
            drop(self, generator, uids)
        original(self, exc)

    fail_all_active._mlx_hub_frees = True  # type: ignore[attr-defined]
    scheduler._fail_all_active = fail_all_active  # type: ignore[attr-defined]


def serve_like_launch(handler: Any) -> None:
    if enabled("serve_like_launch"):
        _serve_like_launch(handler)


def _serve_like_launch(handler: Any) -> None:
    """Give a bare whisper handler the methods upstream's endpoints call on ``launch``'s proxy.

    ``mlx-openai-server launch`` serves every model through its subprocess
    proxy, and the transcription route calls what the proxy offers:
    ``prepare_transcription_request`` (the bare handler has it only as a private
    method), a one-argument ``generate_transcription_stream_from_data``, and a
    ``generate_transcription_response`` that answers JSON whatever the format.
    Bound here to the handler's own ``*_from_data`` methods, which the proxy calls
    in its child, so a hub port answers exactly as a launch port does.
    """

    async def prepare_transcription_request(request: Any) -> dict[str, Any]:
        return await handler._prepare_transcription_request(request)

    async def generate_transcription_response(request: Any) -> Any:
        return await handler.transcribe_from_data(await prepare_transcription_request(request))

    async def generate_transcription_stream_from_data(
        request_data: dict[str, Any], *_: Any, **__: Any
    ) -> Any:
        async for chunk in handler.transcribe_stream_from_data(request_data):
            yield chunk

    handler.prepare_transcription_request = prepare_transcription_request
    handler.generate_transcription_response = generate_transcription_response
    handler.generate_transcription_stream_from_data = generate_transcription_stream_from_data


PROMPT_CACHE_SHARE = 0.25


def bound_prompt_cache(handler: Any, budget: int | None) -> None:
    """Cap upstream's prompt cache at ``PROMPT_CACHE_SHARE`` of the budget (or its own smaller
    ``prompt_cache_max_bytes``): its default is unbounded, and what an in-memory one keeps (1.6.3)
    counts as the model's bytes; one on disk (1.8.1) loads an entry of at most that size on a hit.

    Upstream's ``LRUPromptCache`` evicts down to ``max_bytes`` on its next insert,
    on its own thread; the hub only lowers the bound.
    """
    cache = getattr(handler, "prompt_cache", None)
    current = getattr(cache, "max_bytes", None)
    if enabled("bound_prompt_cache") and budget is not None and isinstance(current, int):
        cache.max_bytes = min(current, int(budget * PROMPT_CACHE_SHARE))


#: The prompt a completions request sends as written, for the request's own task only.
_RAW_PROMPT: ContextVar[str | None] = ContextVar("hub_raw_prompt", default=None)


def accept_raw_prompts(handler: Any) -> None:
    """Let a completions prompt skip the chat template (once per handler; chat is unaffected).

    The model's ``create_input_prompt`` is the one place both lm and multimodal
    handlers render a template; wrapped, it returns the prompt set by ``raw_prompt``.
    """
    model = getattr(handler, "model", None)
    render = getattr(model, "create_input_prompt", None)
    if not enabled("accept_raw_prompts") or render is None or getattr(render, "_hub_raw", False):
        return

    def create_input_prompt(messages: list[dict[str, Any]], chat_template_kwargs: dict[str, Any]) -> str:
        raw = _RAW_PROMPT.get()
        return raw if raw is not None else render(messages, chat_template_kwargs)

    create_input_prompt._hub_raw = True  # type: ignore[attr-defined]
    model.create_input_prompt = create_input_prompt


@contextlib.contextmanager
def raw_prompt(prompt: str | None) -> Iterator[None]:
    """Inside the block (this task only), a handler prepared by ``accept_raw_prompts`` uses ``prompt``."""
    token = _RAW_PROMPT.set(prompt)
    try:
        yield
    finally:
        _RAW_PROMPT.reset(token)


async def count_prompt_tokens(handler: Any, request: Any) -> int:
    """The prompt's length as the handler would tokenize it: its template, its tokenizer."""
    model = handler.model
    if getattr(handler, "handler_type", "") == "multimodal":
        prepared = await handler._prepare_multimodal_request(request)
        prompt = model.create_input_prompt(prepared["messages"], prepared["chat_template_kwargs"])
        inputs = model.create_model_inputs(prompt, prepared["messages"], prepared.get("audios") or None)
        return int(model.count_prompt_tokens(inputs))
    messages, params = await handler._prepare_text_request(request)
    prompt = model.create_input_prompt(handler.refine_messages(messages), params["chat_template_kwargs"])
    return len(model.encode_prompt(prompt))
