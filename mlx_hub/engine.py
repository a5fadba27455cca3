"""The one bridge to mlx-openai-server and MLX: build, start, stop and free handlers.

Everything release-specific lives here, so the rest of the hub works the same
on 1.6.x (handlers take ``max_concurrency``) and 1.8.x (they take batching and
KV options instead): the constructor's signature decides which options it gets.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import gc
import importlib
import importlib.util
import inspect
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import ModelConfig

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

#: hub.yaml options that are the handler's business (everything else is the hub's).
SERVER_OPTIONS = (
    "context_length",
    "max_concurrency",
    "quantize",
    "config_name",
    "lora_paths",
    "lora_scales",
    "enable_auto_tool_choice",
    "tool_call_parser",
    "reasoning_parser",
    "message_converter",
    "trust_remote_code",
    "chat_template_file",
    "disable_auto_resize",
    "debug",
)

_warned: set[tuple[str, str]] = set()


class EngineError(RuntimeError):
    """A model cannot be built or loaded; the message says why and what to do."""


@dataclass
class Loaded:
    """A live handler and what its load cost."""

    handler: Any
    memory_bytes: int
    load_seconds: float


def upstream_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("mlx-openai-server")
    except Exception:
        return None


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


WEIGHT_SUFFIXES = (".safetensors", ".npz", ".bin", ".gguf", ".pt")


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


def estimate_bytes(entry: ModelConfig) -> int:
    """What loading ``entry`` will add, from the size of its weight files (0 if unknown).

    Weights are memory-mapped and materialised at their stored precision, so
    their size on disk is a close estimate of what the load adds; the hub
    replaces it with the measured figure once the model has loaded.
    """
    folder = model_folder(entry.model_path)
    if folder is None:
        return 0
    total = 0
    for file in folder.rglob("*"):
        if file.suffix in WEIGHT_SUFFIXES:
            try:
                total += file.stat().st_size  # follows the cache's symlinks to the blobs
            except OSError:
                continue
    return total


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
    return getattr(module, class_name)


def preload(model_types: set[str]) -> None:
    """Import the handler modules these model types need, ahead of the first load.

    Run in a thread at hub start: a JIT model's first request then pays for
    its weights, not for importing mlx-lm and transformers (several seconds).
    Types that cannot load here (image types without mflux) are skipped;
    their own load reports why.
    """
    for model_type in sorted(model_types):
        try:
            handler_class(model_type)
        except EngineError:
            continue


def handler_kwargs(entry: ModelConfig, cls: type) -> dict[str, Any]:
    """The constructor arguments ``cls`` accepts, from the entry's server options.

    An option the user wrote that this release's handler does not take is
    dropped with one warning per option and class, not an error: hub.yaml
    files move between Macs with different upstream releases.
    """
    params = inspect.signature(cls.__init__).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    kwargs: dict[str, Any] = {"model_path": entry.model_path}
    for option in SERVER_OPTIONS:
        if option in params or takes_any:
            kwargs[option] = getattr(entry, option)
        elif option in entry.model_fields_set:
            key = (cls.__name__, option)
            if key not in _warned:
                _warned.add(key)
                log.warning(
                    "model '%s': option %s is not used by %s in mlx-openai-server %s; ignored",
                    entry.name,
                    option,
                    cls.__name__,
                    upstream_version() or "?",
                )
    return kwargs


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
    cls = await asyncio.to_thread(handler_class, entry.model_type)
    kwargs = handler_kwargs(entry, cls)
    async with lock or contextlib.nullcontext():
        before = active_memory()  # excludes MLX's buffer cache: no collection needed first
        started = time.perf_counter()
        handler = None
        try:
            handler = await _construct(cls, kwargs)
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
    return Loaded(handler=handler, memory_bytes=max(used, 0), load_seconds=seconds)


async def _construct(cls: type, kwargs: dict[str, Any]) -> Any:
    """Run the constructor in a thread without the handler passing through a future.

    A finished ``asyncio.to_thread`` future keeps its result, and asyncio can
    keep that future reachable after the await; the handler, and with it every
    weight, would then survive ``unload``. The thread puts the handler in a box
    that this function empties, so the only reference is the one returned.
    """
    box: dict[str, Any] = {}

    def build() -> None:
        box["handler"] = cls(**kwargs)

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
    if cleanup is None:
        return
    try:
        result = cleanup()
        if inspect.isawaitable(result):
            await result
    except Exception:
        log.exception("model '%s': handler cleanup failed; freeing its memory anyway", name)


async def unload(handler: Any, name: str) -> None:
    """Stop the handler's workers. The caller must drop its own references, then ``free_memory``."""
    await _cleanup(handler, name)
