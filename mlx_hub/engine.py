"""The one bridge to mlx-openai-server and MLX: build, start, stop and free handlers.

Everything release-specific lives here. A handler is built the way upstream's
own ``launch`` builds it: the entry becomes the installed release's
``ModelEntryConfig`` and goes through its ``create_handler_from_config``, so
1.6.x (``max_concurrency``, ``model_id``) and 1.8.x (batching, KV, draft and
sampling defaults) each get exactly the options they know.

Threads. MLX (>= 0.31.2) ties a stream to the thread that made it, and a lazy
array to the stream it was built on; Metal punishes a stream used on another
thread, CPU MLX reports it ("There is no Stream(cpu, N) in current thread").
Which thread does what, for every model:

- **Import**: a worker thread of the loop's default executor imports the
  handler modules (``preload``, ``handler_class``); module-level streams made
  then belong to that thread, so ``adapt_libraries`` replaces them.
- **Build**: one load thread at a time (``asyncio.to_thread`` under the hub's
  memory lock) runs the constructor, which reads and evaluates the weights.
  Anything the hub itself builds there is evaluated before the thread ends
  (``materialize``), so no lazy graph of the load thread is left for others.
- **Run**: upstream's own threads. Each handler's ``InferenceWorker`` thread
  (one request at a time, embeddings, whisper) and its batch scheduler thread
  (continuous batching) make their own thread-local stream and evaluate
  everything under it. The event loop thread never evaluates an array; it only
  reads memory counters.
- **Free**: on the loop thread, ``handler.cleanup()`` stops and joins those
  threads first; then the hub drops its references and ``free_memory`` runs
  ``gc.collect()`` and ``mx.clear_cache()``, neither of which uses a stream.

Library state that would break this, adapted here at run time (site-packages
stay as installed): mlx-vlm's import-time ``generation_stream`` (made
thread-local), mlx_whisper's process-wide ``ModelHolder`` (one model per
folder, loaded by the hub's load and freed by its unload), and upstream's VLM
batching switch on an mlx-vlm too old for its scheduler.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import functools
import gc
import importlib
import importlib.util
import inspect
import json
import logging
import os
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from . import weights
from .config import ModelConfig
from .generation_watch import watch_generation_steps
from .reservation import RequestNeed, estimate_request

log = logging.getLogger(__name__)

#: model_type -> (module, class) in the upstream ``app.handler`` package.
HANDLER_CLASSES: dict[str, tuple[str, str]] = {
    "lm": ("app.handler.mlx_lm", "MLXLMHandler"),
    "multimodal": ("app.handler.mlx_vlm", "MLXVLMHandler"),
    "embeddings": ("app.handler.mlx_embeddings", "MLXEmbeddingsHandler"),
    "whisper": ("app.handler.mlx_whisper", "MLXWhisperHandler"),
    "image-generation": ("app.handler.mflux", "MLXFluxHandler"),
    "image-edit": ("app.handler.mflux", "MLXFluxHandler"),
}
IMAGE_TYPES = ("image-generation", "image-edit")

#: hub.yaml fields that are the hub's own business. Every other ModelConfig
#: field is one of upstream's per-model options and goes to its ModelEntryConfig.
HUB_FIELDS = frozenset(
    {
        "name",
        "port",
        "host",
        "jit_enabled",
        "auto_unload_minutes",
        "group",
        "default",
        "log_file",
        "no_log_file",
        "log_level",
        "pinned",
        "aliases",
        "loading_progress",
    }
)
#: hub.yaml fields that older releases call something else.
OLD_NAMES = {"served_model_name": "model_id"}  # 1.6.x

_warned: set[str] = set()


class EngineError(RuntimeError):
    """A model cannot be built or loaded; the message says why and what to do."""


@dataclass
class Loaded:
    """A live handler and what its load cost."""

    handler: Any
    memory_bytes: int  # what the load added to MLX's active memory
    load_seconds: float
    created_bytes: int = 0  # of that, the weights copies this load read first (weights.py shares them)


def upstream_version() -> str | None:
    return _version("mlx-openai-server")


def active_memory() -> int:
    """MLX's active (allocated, non-cache) memory in bytes, the figure unloads must return."""
    import mlx.core as mx

    return int(mx.get_active_memory())


def system_memory() -> int | None:
    """Physical memory of this machine in bytes (unified memory on Apple silicon)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def peak_memory() -> int:
    """MLX's highest active memory since the last ``reset_peak_memory`` (the hub resets it at start)."""
    import mlx.core as mx

    return int(mx.get_peak_memory())


def reset_peak_memory() -> None:
    import mlx.core as mx

    mx.reset_peak_memory()


#: ``max_memory: auto`` on Metal: the recommended working set less this fraction of it, and at least
#: ``AUTO_MARGIN_MIN`` (what the OS, the hub's Python and other apps need beside MLX's buffers).
AUTO_MARGIN_FRACTION = 0.10
AUTO_MARGIN_MIN = 1 << 30
#: ``max_memory: auto`` without Metal (Linux, CPU MLX): this fraction of physical memory.
AUTO_SYSTEM_FRACTION = 0.75


def recommended_working_set() -> int | None:
    """What Metal recommends MLX keep resident (``mx.device_info()``); None where MLX reports none (CPU)."""
    import mlx.core as mx

    try:
        info = mx.device_info()
    except Exception:
        return None
    value = info.get("max_recommended_working_set_size") if isinstance(info, dict) else None
    return int(value) if isinstance(value, int | float) and value > 0 else None


def working_set() -> int | None:
    """``max_memory: auto``: Metal's recommended working set less a margin, else 0.75 of physical memory."""
    recommended = recommended_working_set()
    if recommended is not None:
        return max(recommended - max(int(recommended * AUTO_MARGIN_FRACTION), AUTO_MARGIN_MIN), 0) or None
    total = system_memory()
    return None if total is None else int(total * AUTO_SYSTEM_FRACTION)


_default_limits: dict[str, int] = {}


def set_memory_limit(budget: int | None) -> None:
    """Tell MLX the budget (``mx.set_memory_limit``, and the wired limit on Metal); None restores MLX's own.

    The limit is MLX's guideline for when to free its buffer cache and wait for
    running work before allocating more; on CPU an allocation past it still
    succeeds. The hub's own admission is what keeps requests under the budget;
    this is the second line where the estimate was wrong.
    """
    import mlx.core as mx

    default = _default_limits.setdefault("memory", int(mx.get_memory_limit()))  # MLX's own, before any
    mx.set_memory_limit(budget or default)
    recommended = recommended_working_set()
    wired = getattr(mx, "set_wired_limit", None)
    if recommended is not None and wired is not None:
        with contextlib.suppress(Exception):
            wired(min(budget, recommended) if budget else 0)


def cache_memory() -> int:
    import mlx.core as mx

    return int(mx.get_cache_memory())


def free_memory() -> None:
    """Return dropped arrays to the system: collect cycles, empty MLX's buffer cache, trim the heap.

    On Linux (CPU MLX), glibc keeps freed multi-megabyte tensors in the
    arenas of the threads that allocated them, so RSS stays up by a whole
    model after its unload; ``malloc_trim`` hands those pages back. macOS has
    no such call, and MLX's Metal buffers are returned by ``clear_cache``.
    """
    import mlx.core as mx

    gc.collect()
    mx.clear_cache()
    _trim_heap()


@functools.cache
def _libc_trim() -> Any:
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def _trim_heap() -> None:
    trim = _libc_trim()
    if trim is not None:
        trim(0)


#: Weight files MLX itself reads; a folder's loadable weights are these and nothing else.
WEIGHT_SUFFIXES = (".safetensors", ".npz", ".gguf")


def hf_cache_repo(repo_id: str) -> Path:
    """The Hugging Face cache's folder for a model repo (``models--org--name``)."""
    from huggingface_hub.constants import HF_HUB_CACHE

    return Path(HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}"


def model_folder(model_path: str) -> Path | None:
    """The folder holding a model's files: the path itself, or its Hugging Face cache snapshot."""
    path = Path(model_path).expanduser()
    if path.is_dir():
        return path
    if path.is_absolute() or model_path.count("/") != 1:
        return None
    try:
        snapshots = hf_cache_repo(model_path) / "snapshots"
    except ImportError:
        return None
    candidates = (
        sorted(snapshots.glob("*"), key=lambda p: p.stat().st_mtime, reverse=True)
        if snapshots.is_dir()
        else []
    )
    return candidates[0] if candidates else None


#: config.json keys that hold a model's trained context, in the order architectures use them.
CONTEXT_KEYS = ("max_position_embeddings", "max_sequence_length", "seq_length", "n_positions", "n_ctx")


def config_json(model_path: str) -> dict[str, Any] | None:
    """The model's config.json as a mapping; None where there is no readable one."""
    folder = model_folder(model_path)
    if folder is None:
        return None
    try:
        data = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def native_context_length(model_path: str) -> int | None:
    """The context the model was built for, from its config.json (a VLM's text_config too); None if unknown.

    This is what upstream uses when ``context_length`` is unset, so it is what a
    gateway should be told the model takes.
    """
    data = config_json(model_path)
    if data is None:
        return None
    for section in (data, data.get("text_config") or {}):
        for key in CONTEXT_KEYS:
            value = section.get(key) if isinstance(section, dict) else None
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


def estimate_bytes(entry: ModelConfig) -> int:
    """What loading ``entry`` will add, from the size of its weight files (0 if unknown).

    Weights are memory-mapped and materialised at their stored precision, so
    their size on disk is a close estimate of what the load adds; the hub
    replaces it with the measured figure once the model has loaded. Weights
    another entry already holds add nothing (weights.py shares them).
    """
    total = 0
    for path in (entry.model_path, entry.draft_model_path):
        folder = model_folder(path) if path else None
        if folder is None or weights.loaded_bytes(str(folder)) is not None:
            continue
        for file in folder.rglob("*"):
            if file.suffix in WEIGHT_SUFFIXES:
                try:
                    total += file.stat().st_size  # follows the cache's symlinks to the blobs
                except OSError:
                    continue
    return total


# ------------------------------------------------------------ request memory
#
# What one request costs is reckoned in reservation.py; the handler-side pieces stay here.

#: Text of the errors MLX raises when an allocation fails (CPU ``[malloc]``, Metal ``[metal::malloc]``).
ALLOCATION_ERRORS = ("[malloc] Unable to allocate", "[metal::malloc]", "Unable to allocate", "Resource limit")


#: Under a budget, upstream's in-memory prompt cache of one model may hold at most this share of it.
PROMPT_CACHE_SHARE = 0.25


def bound_prompt_cache(handler: Any, budget: int | None) -> None:
    """Cap upstream's prompt cache at ``PROMPT_CACHE_SHARE`` of the budget (or its own smaller
    ``prompt_cache_max_bytes``): its default is unbounded, and what it keeps counts as the model's bytes.

    Upstream's ``LRUPromptCache`` evicts down to ``max_bytes`` on its next insert,
    on its own thread; the hub only lowers the bound.
    """
    cache = getattr(handler, "prompt_cache", None)
    current = getattr(cache, "max_bytes", None)
    if budget is not None and isinstance(current, int):
        cache.max_bytes = min(current, int(budget * PROMPT_CACHE_SHARE))


def batches(entry: ModelConfig) -> bool:
    """Whether upstream serves this entry's requests as one batch (1.8's ``BatchScheduler`` for lm).

    Upstream batches language models unless ``disable_batching`` is set or a
    draft model is attached; its multimodal batching is off here
    (``_vlm_batching_capability``), and 1.6.x has no batching at all.
    """
    if entry.model_type != "lm" or entry.disable_batching or entry.draft_model_path:
        return False
    return importlib.util.find_spec("app.core.batch_scheduler") is not None


def is_allocation_error(text: str) -> bool:
    """Whether an error's text is MLX failing to allocate memory."""
    return any(marker in text for marker in ALLOCATION_ERRORS)


def prompt_cache_bytes(handler: Any) -> int:
    """Bytes upstream's in-memory prompt cache holds for a handler (its ``LRUPromptCache.nbytes``)."""
    cache = getattr(handler, "prompt_cache", None)
    value = getattr(cache, "nbytes", 0)
    return int(value) if isinstance(value, int) else 0


def handler_class(model_type: str) -> type:
    """The upstream class for ``model_type``; image types need the optional mflux package."""
    if model_type not in HANDLER_CLASSES:
        raise EngineError(f"unknown model_type {model_type!r}")
    if model_type in IMAGE_TYPES and importlib.util.find_spec("mflux") is None:
        raise EngineError(
            f"model_type '{model_type}' needs the mflux package, which is not installed; "
            "install it with `pip install mflux` (macOS) or choose another model_type"
        )
    module_name, class_name = HANDLER_CLASSES[model_type]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise EngineError(f"cannot import the {model_type} handler from mlx-openai-server: {exc}") from exc
    adapt_libraries()
    return getattr(module, class_name)


# ------------------------------------------------------------------ threads
#
# Libraries that keep MLX state at module level, made safe for a process that
# builds, runs and frees models on different threads. Each adaptation replaces
# a module attribute at run time (site-packages stay as installed), is
# idempotent, and runs once the library is imported (from handler_class).


def adapt_libraries() -> None:
    """Apply every adaptation whose library is imported by now; safe to call often."""
    _thread_local_vlm_stream()
    _vlm_batching_capability()
    _whisper_weights_per_folder()
    _share_weights()
    _batch_failure_frees_its_sequences()
    watch_generation_steps()


def _batch_failure_frees_its_sequences() -> None:
    """Upstream's batch scheduler fails a batch's requests on an error but leaves their sequences in mlx-lm's
    ``BatchGenerator``: their KV caches stay allocated, and the generator goes on decoding them.

    After an allocation error that is the worst thing to keep. The failed uids
    are removed from the generator first (on the scheduler's own thread, where
    ``_fail_all_active`` runs), as upstream itself does for cancelled requests.
    """
    module = sys.modules.get("app.core.batch_scheduler")
    scheduler = getattr(module, "BatchScheduler", None)
    if scheduler is None or getattr(scheduler._fail_all_active, "_mlx_hub_frees", False):
        return
    original = scheduler._fail_all_active

    def fail_all_active(self: Any, exc: BaseException) -> None:
        generator = getattr(self, "_batch_generator", None)
        uids = list(getattr(self, "_active", {}))
        if generator is not None and uids:
            try:
                generator.remove(uids)
            except Exception:  # the requests still fail; only the memory stays until the generator ends
                log.exception("could not drop the failed batch's sequences")
        original(self, exc)

    fail_all_active._mlx_hub_frees = True  # type: ignore[attr-defined]
    scheduler._fail_all_active = fail_all_active


def _share_weights() -> None:
    """Upstream's model classes read weights with their library's ``load``: one copy per folder instead.

    ``MLX_LM`` (and its draft models) through ``mlx_lm.load``, ``MLX_VLM`` through
    ``mlx_vlm.load``, ``MLX_Embeddings`` through ``mlx_embeddings``' ``load``;
    weights.py shares each folder's weights between the entries that load it.
    """
    for handler_module, model_module, wrap in (
        ("app.handler.mlx_lm", "app.models.mlx_lm", weights.sharing_load),
        (
            "app.handler.mlx_vlm",
            "app.models.mlx_vlm",
            lambda f: weights.sharing_pair_load(f, "vlm", weights.vlm_processor),
        ),
        (
            "app.handler.mlx_embeddings",
            "app.models.mlx_embeddings",
            lambda f: weights.sharing_pair_load(f, "embed", weights.same_companion),
        ),
    ):
        if handler_module not in sys.modules:
            continue
        module = importlib.import_module(model_module)  # handlers may import it only when they build
        if not getattr(module.load, "_mlx_hub_sharing", False):
            module.load = wrap(module.load)


def _thread_local_vlm_stream() -> None:
    """mlx-vlm 0.4 makes ``generation_stream`` with ``mx.new_stream`` at import.

    Since MLX 0.31.2 such a stream exists only on the thread that made it: the
    thread that imported mlx-vlm. Every generation runs on a handler's worker
    thread, which then fails with "There is no Stream(cpu, 0) in current
    thread" (upstream issue #290 on Apple silicon). A thread-local stream, as
    mlx-lm has used since 0.31, is one stream per thread that uses it.
    """
    module = sys.modules.get("mlx_vlm.generate")
    if module is None or getattr(module, "_mlx_hub_thread_local", False):
        return
    import mlx.core as mx

    make = getattr(mx, "new_thread_local_stream", None)
    if make is None:  # MLX before 0.31.2: streams were not tied to threads
        return
    module.generation_stream = make(mx.default_device())
    module._mlx_hub_thread_local = True


def _vlm_batching_capability() -> None:
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
    generator = getattr(sys.modules.get("app.core.vlm_batch_scheduler"), "BatchGenerator", None)
    if generator is not None and "prompt_kwargs" in inspect.signature(generator.insert).parameters:
        return
    handler_module.VLM_BATCHING_AVAILABLE = False
    log.warning(
        "mlx-vlm %s cannot run mlx-openai-server's batched multimodal generation; "
        "multimodal requests are served one at a time",
        _version("mlx-vlm") or "?",
    )


@dataclass
class _HeldWhisper:
    model: Any
    dtype: Any
    refs: int


#: Whisper weights the hub loaded, by model folder (mlx_whisper itself keeps one model for the process).
_whispers: dict[str, _HeldWhisper] = {}
_whispers_lock = threading.Lock()


def _whisper_weights_per_folder() -> None:
    """mlx_whisper's ``ModelHolder`` keeps one model for the whole process, loaded on first use.

    Two whisper entries would swap it back and forth, an unload would free
    nothing, and the weights would load inside the first request, uncounted.
    The hub loads each folder's weights at load time (``_hold_whisper``) and
    the holder hands them out; a folder the hub did not load falls through to
    mlx_whisper's own holder.
    """
    module = sys.modules.get("mlx_whisper.transcribe")
    holder = getattr(module, "ModelHolder", None)
    if holder is None or getattr(holder, "_mlx_hub_per_folder", False):
        return
    original = holder.get_model

    def get_model(cls: type, model_path: str, dtype: Any) -> Any:
        held = _whispers.get(model_path)
        if held is not None and held.dtype == dtype:
            return held.model
        return original(model_path, dtype)

    holder.get_model = classmethod(get_model)
    holder._mlx_hub_per_folder = True


def _hold_whisper(model_path: str) -> None:
    """Load (or take another reference to) a whisper folder's weights, in fp16 as mlx_whisper decodes."""
    import mlx.core as mx
    from mlx_whisper.load_models import load_model

    with _whispers_lock:
        held = _whispers.get(model_path)
        if held is not None:
            held.refs += 1
            return
    model = load_model(model_path, dtype=mx.float16)
    materialize(model)
    with _whispers_lock:
        _whispers.setdefault(model_path, _HeldWhisper(model, mx.float16, 0)).refs += 1


def materialize(model: Any) -> None:
    """Evaluate every array a model holds, parameters and private buffers alike, on this thread.

    An MLX array that is still a lazy graph remembers the stream of the thread
    that built it, and evaluating it on another thread fails ("There is no
    Stream(cpu, 2) in current thread"). A model built on the hub's load thread
    must therefore leave it fully computed. ``parameters()`` misses buffers kept
    under underscore names, such as whisper's sinusoidal position table.
    """
    import mlx.core as mx
    import mlx.nn as nn

    arrays: list[Any] = [model.parameters()]
    for module in model.modules() if isinstance(model, nn.Module) else ():
        # A Module is a dict: underscore keys live there too, but parameters() skips them.
        arrays.extend(v for v in (*module.values(), *vars(module).values()) if isinstance(v, mx.array))
    mx.eval(arrays)


def _release_whisper(model_path: str) -> None:
    """Drop a reference; the last one frees the weights, and with no whisper left, the audio caches too."""
    with _whispers_lock:
        held = _whispers.get(model_path)
        if held is not None:
            held.refs -= 1
            if held.refs <= 0:
                del _whispers[model_path]
        if _whispers:
            return
    # mlx_whisper keeps its mel filter bank and window (MLX arrays) and upstream
    # the decoded audio of recent uploads in lru_caches; none of it outlives the models.
    for module_name, names in (
        ("mlx_whisper.audio", ("mel_filters", "hanning")),
        ("app.models.mlx_whisper", ("load_audio", "calculate_audio_duration")),
    ):
        module = sys.modules.get(module_name)
        for name in names:
            clear = getattr(getattr(module, name, None), "cache_clear", None)
            if clear is not None:
                clear()


def _ensure_ffmpeg() -> None:
    """mlx_whisper decodes every upload by running ``ffmpeg``; without it each request would fail.

    Where the program is missing but the ``imageio-ffmpeg`` wheel (a static
    build) is installed, its binary is put on this process's PATH as ``ffmpeg``.
    """
    if shutil.which("ffmpeg"):
        return
    try:
        import imageio_ffmpeg

        binary = Path(imageio_ffmpeg.get_ffmpeg_exe())
    except (ImportError, RuntimeError):
        raise EngineError(
            "whisper models need the ffmpeg program to read audio, and it is not on PATH; "
            "install it (macOS: `brew install ffmpeg`; Debian: `apt install ffmpeg`) or `pip install imageio-ffmpeg`"
        ) from None
    folder = Path(tempfile.gettempdir()) / f"mlx-hub-ffmpeg-{os.getuid()}"
    folder.mkdir(exist_ok=True)
    link = folder / "ffmpeg"
    if not link.exists():
        with contextlib.suppress(FileExistsError):
            link.symlink_to(binary)
    os.environ["PATH"] = f"{folder}{os.pathsep}{os.environ.get('PATH', '')}"
    log.info("using imageio-ffmpeg's %s as ffmpeg for whisper models", binary)


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


def _version(package: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(package)
    except Exception:
        return None


def preload(model_types: set[str]) -> None:
    """Import the handler modules these model types need, ahead of the first load.

    Run in a thread at hub start: a JIT model's first request then pays for
    its weights, not for importing mlx-lm and transformers (several seconds).
    Types that cannot load here (image types without mflux) are skipped;
    their own load reports why.
    """
    with contextlib.suppress(ImportError):
        importlib.import_module("app.server")  # the factory every load goes through
    for model_type in sorted(model_types):
        try:
            handler_class(model_type)
        except EngineError:
            continue


def upstream_options() -> list[str]:
    """The hub.yaml fields that are upstream options, in hub.yaml's order."""
    # queue_timeout is both: upstream's queue wait, and how long the hub lets a
    # request wait for a group place or the memory budget.
    return [f for f in ModelConfig.model_fields if f not in HUB_FIELDS]


def upstream_entry(entry: ModelConfig) -> Any:
    """The entry as the installed release's own ``ModelEntryConfig``, ready for its factory.

    Upstream's ``launch`` (flags or ``--config`` YAML) builds exactly this object
    and hands it to ``create_handler_from_config``; building it here means its
    ``__post_init__`` applies upstream's rules (message converter from the
    parser names, KV and draft options only where the model type takes them)
    and the factory decides which argument reaches which handler. An option the
    user wrote that this release lacks is dropped with one warning per option:
    hub.yaml files move between Macs with different upstream releases.
    """
    from app.config import ModelEntryConfig

    accepted = {f.name for f in dataclasses.fields(ModelEntryConfig) if f.init}
    kwargs: dict[str, Any] = {}
    for option in upstream_options():
        target = option if option in accepted else OLD_NAMES.get(option)
        value = entry.served_name if option == "served_model_name" else getattr(entry, option)
        if target in accepted:
            kwargs[target] = value
        elif option in entry.model_fields_set:
            _warn_ignored(entry.name, option)
    return ModelEntryConfig(**kwargs)


def _warn_ignored(name: str, option: str) -> None:
    if option in _warned:
        return
    _warned.add(option)
    log.warning(
        "model '%s': option %s does not exist in mlx-openai-server %s; ignored",
        name,
        option,
        upstream_version() or "?",
    )


def build_handler(entry: ModelConfig) -> Any:
    """Construct (not yet initialize) the handler as upstream's launch does. Reads the weights: call off the loop.

    Upstream's ``HandlerProcessProxy`` exposes ``served_model_name``; its
    endpoints read it to name omitted-model replies, so the bare handler gets it too.
    """
    from app.server import create_handler_from_config

    handler = create_handler_from_config(upstream_entry(entry))
    handler.served_model_name = entry.served_name
    if getattr(handler, "handler_type", None) == "whisper":
        _ensure_ffmpeg()
        _serve_like_launch(handler)
        _hold_whisper(handler.model_path)  # nothing to undo if this fails: no threads run before initialize
    return handler


@functools.cache
def option_choices() -> dict[str, frozenset[str]]:
    """The names the installed release knows for its parser and converter options ({} without upstream)."""
    try:
        import app.message_converters as converters
        import app.parsers as parsers
    except ImportError:
        return {}
    unified = set(getattr(parsers, "UNIFIED_PARSER_MAP", {}))
    return {
        "tool_call_parser": frozenset(set(parsers.TOOL_PARSER_MAP) | unified),
        "reasoning_parser": frozenset(set(parsers.REASONING_PARSER_MAP) | unified),
        "message_converter": frozenset(converters.MESSAGE_CONVERTER_MAP),
    }


def queue_config(entry: ModelConfig) -> dict[str, Any]:
    return {
        "timeout": entry.queue_timeout,
        "queue_size": entry.queue_size,
        "max_concurrency": entry.max_concurrency,
    }


async def load(entry: ModelConfig, *, lock: asyncio.Lock | None = None) -> Loaded:
    """Build and initialize the handler for ``entry`` off the event loop.

    The constructor reads the weights synchronously, so it runs in a worker
    thread; the hub's other ports keep answering meanwhile. On failure every
    partial allocation is freed before the error is raised.

    Pass the hub's ``lock`` to run one load at a time: a load's memory is
    measured as the change in MLX's active memory, which two overlapping loads
    would blur, and on a machine's few cores two loads at once finish no sooner.
    """
    _check_local_path(entry)
    # The first import of a handler module pulls in mlx-lm and transformers
    # (seconds); in a thread it does not stall every other port on the loop.
    await asyncio.to_thread(handler_class, entry.model_type)
    async with lock or contextlib.nullcontext():
        before = active_memory()  # excludes MLX's buffer cache: no collection needed first
        started = time.perf_counter()
        handler = None
        try:
            handler = await _construct(entry)
            await handler.initialize(queue_config(entry))
        except BaseException as exc:
            if handler is not None:
                await _cleanup(handler, entry.name)
            handler = None
            free_memory()
            if isinstance(exc, Exception):
                raise EngineError(_explain(exc, entry)) from exc
            raise
        seconds = time.perf_counter() - started
        used = active_memory() - before
    created = sum(g.bytes for g in weights.held_by(entry.name) if g.holders[0] == entry.name)
    return Loaded(handler=handler, memory_bytes=max(used, 0), load_seconds=seconds, created_bytes=created)


async def _construct(entry: ModelConfig) -> Any:
    """Run the constructor in a thread without the handler passing through a future.

    A finished ``asyncio.to_thread`` future keeps its result, and asyncio can
    keep that future reachable after the await; the handler, and with it every
    weight, would then survive ``unload``. The thread puts the handler in a box
    that this function empties, so the only reference is the one returned.
    """
    box: dict[str, Any] = {}

    def build() -> None:
        with weights.holding(entry.name):
            box["handler"] = build_handler(entry)

    await asyncio.to_thread(build)
    return box.pop("handler")


def _check_local_path(entry: ModelConfig) -> None:
    """A folder path that does not exist fails here, named, instead of as a repo-id download."""
    path = Path(entry.model_path)
    if path.is_absolute() and not path.exists():
        raise EngineError(
            f"model_path {entry.model_path} does not exist; fix model_path for model '{entry.name}' in hub.yaml"
        )


def _explain(exc: Exception, entry: ModelConfig) -> str:
    text = str(exc).strip() or type(exc).__name__
    if isinstance(exc, (FileNotFoundError, OSError)) and "model_path" not in text:
        text = f"{text} (model_path: {entry.model_path})"
    return f"{type(exc).__name__}: {text}"


async def _cleanup(handler: Any, name: str) -> None:
    cleanup = getattr(handler, "cleanup", None)
    try:
        if cleanup is not None:
            result = cleanup()
            if inspect.isawaitable(result):
                await result
    except Exception:
        log.exception("model '%s': handler cleanup failed; freeing its memory anyway", name)
    finally:
        weights.release(name)
        if getattr(handler, "handler_type", None) == "whisper":
            _release_whisper(handler.model_path)


async def unload(handler: Any, name: str) -> None:
    """Stop the handler's workers. The caller must drop its own references, then ``free_memory``."""
    await _cleanup(handler, name)


# ------------------------------------------------------------------- the seam


class Engine(Protocol):
    """What the hub needs from a model runtime. ``MLXEngine`` is the real one; tests bring a fake."""

    async def load(self, entry: ModelConfig, *, lock: asyncio.Lock | None = None) -> Loaded: ...
    async def unload(self, handler: Any, name: str) -> None: ...
    def estimate(self, entry: ModelConfig) -> int: ...
    def preload(self, model_types: set[str]) -> None: ...
    def free_memory(self) -> None: ...
    def active_memory(self) -> int: ...
    def cache_memory(self) -> int: ...
    def system_memory(self) -> int | None: ...
    def upstream_version(self) -> str | None: ...
    def shared(self, name: str) -> list[weights.SharedWeights]: ...
    def estimate_request(self, entry: ModelConfig, body: dict[str, Any] | None) -> RequestNeed: ...
    def prompt_cache_bytes(self, handler: Any) -> int: ...
    def batches(self, entry: ModelConfig) -> bool: ...
    def bound_prompt_cache(self, handler: Any, budget: int | None) -> None: ...
    def peak_memory(self) -> int: ...
    def reset_peak_memory(self) -> None: ...
    def working_set(self) -> int | None: ...
    def set_memory_limit(self, budget: int | None) -> None: ...


class MLXEngine:
    """mlx-openai-server's handlers on MLX: this module's functions, as an ``Engine``."""

    load = staticmethod(load)
    unload = staticmethod(unload)
    estimate = staticmethod(estimate_bytes)
    preload = staticmethod(preload)
    free_memory = staticmethod(free_memory)
    active_memory = staticmethod(active_memory)
    cache_memory = staticmethod(cache_memory)
    system_memory = staticmethod(system_memory)
    upstream_version = staticmethod(upstream_version)
    shared = staticmethod(weights.held_by)
    estimate_request = staticmethod(estimate_request)
    prompt_cache_bytes = staticmethod(prompt_cache_bytes)
    batches = staticmethod(batches)
    bound_prompt_cache = staticmethod(bound_prompt_cache)
    peak_memory = staticmethod(peak_memory)
    reset_peak_memory = staticmethod(reset_peak_memory)
    working_set = staticmethod(working_set)
    set_memory_limit = staticmethod(set_memory_limit)
