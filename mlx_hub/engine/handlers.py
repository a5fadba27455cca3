"""Upstream's handlers, built as its own ``launch`` builds them.

The entry becomes the installed release's ``ModelEntryConfig`` and goes through
its ``create_handler_from_config``, so 1.6.x (``max_concurrency``, ``model_id``)
and 1.8.x (batching, KV, draft and sampling defaults) each get exactly the
options they know. Everything that depends on the release is read here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import importlib.util
import logging
import sys
from typing import Any

from mlx_hub.config import ModelConfig
from mlx_hub.engine import patches
from mlx_hub.engine.base import EngineError
from mlx_hub.engine.patches import transformers_imports
from mlx_hub.engine.patches.mlx_openai_server import serve_like_launch
from mlx_hub.engine.versions import package_version, untested_stack, upstream_version
from mlx_hub.engine.whisper import WhisperWeights, ensure_ffmpeg

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


def batches(entry: ModelConfig, handler: Any = None) -> bool:
    """Whether upstream serves this entry's requests as one batch (admission reserves its padding)."""
    return one_at_a_time(entry, handler) is None


def one_at_a_time(entry: ModelConfig, handler: Any = None) -> str | None:
    """Why upstream serves this entry's requests one at a time; None where it batches them.

    Upstream 1.8 batches ``lm`` models unless ``disable_batching`` is set or a
    draft model is attached, and only where its scheduler module imported with
    ``BATCHING_AVAILABLE`` (mlx-lm 0.32 needs patches.mlx_lm first); multimodal
    models as ``multimodal_one_at_a_time`` says; 1.6.x has no batching at all.
    A loaded ``handler`` also tells whether its model's cache layers can be
    merged into one batch (mlx-lm's ``is_batchable``).
    """
    if entry.model_type not in ("lm", "multimodal"):
        return f"upstream does not batch {entry.model_type} models"
    if entry.disable_batching:
        return "disable_batching is set"
    if entry.model_type == "multimodal":
        return multimodal_one_at_a_time()
    if entry.draft_model_path:
        return "a draft model is attached (upstream decodes speculatively one request at a time)"
    if getattr(getattr(handler, "model", None), "cache_is_batchable", True) is False:
        return "the model's cache layers cannot be merged into a batch (mlx-lm's is_batchable)"
    return _scheduler_missing("app.core.batch_scheduler", "BATCHING_AVAILABLE", "mlx-lm")


def _scheduler_missing(module_name: str, flag: str, library: str) -> str | None:
    """Why upstream's scheduler module cannot batch here; None where it can."""
    if importlib.util.find_spec(module_name) is None:
        return f"mlx-openai-server {upstream_version() or '?'} has no batch scheduler"
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        return f"upstream's batch scheduler does not import: {exc}"
    if not getattr(module, flag, False):
        return f"{library} {package_version(library) or '?'} lacks what upstream's batch scheduler needs"
    return None


def multimodal_one_at_a_time() -> str | None:
    """Why upstream's ``VLMBatchScheduler`` cannot serve multimodal requests here; None where it batches them.

    Read from upstream's own switch, ``VLM_BATCHING_AVAILABLE``, once the hub's
    patches have judged the installed mlx-vlm (``vlm_batching_capability`` turns
    it off on mlx-vlm 0.4; patches.upstream_vlm_batch makes it right on 0.7).
    """
    try:
        # Imports upstream's handler (already imported once a model is loaded) and patches it.
        handler_class("multimodal")
    except EngineError as exc:
        return str(exc)
    # 1.6.x has no switch: no batching there.
    if not getattr(sys.modules["app.handler.mlx_vlm"], "VLM_BATCHING_AVAILABLE", False):
        return f"mlx-vlm {package_version('mlx-vlm') or '?'} lacks what upstream's VLM batch scheduler needs"
    return None


def handler_class(model_type: str) -> type:
    """The upstream class for ``model_type``; image types need the optional mflux package."""
    if model_type not in HANDLER_CLASSES:
        raise EngineError(f"unknown model_type {model_type!r}")
    transformers_imports.check_can_serve(model_type)
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
    patches.apply()
    return getattr(module, class_name)


def preload(model_types: set[str]) -> None:
    """Import the handler modules these model types need, ahead of the first load.

    Run in a thread at hub start: a JIT model's first request then pays for
    its weights, not for importing mlx-lm and transformers (several seconds).
    Types that cannot load here (image types without mflux) are skipped;
    their own load reports why.
    """
    if warning := untested_stack():
        log.warning(warning)
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


def build_handler(entry: ModelConfig, whispers: WhisperWeights) -> Any:
    """Construct (not yet initialize) the handler as upstream's launch does. Reads the weights: call off the loop.

    Upstream's ``HandlerProcessProxy`` exposes ``served_model_name``; its
    endpoints read it to name omitted-model replies, so the bare handler gets it too.
    """
    from app.server import create_handler_from_config

    handler = create_handler_from_config(upstream_entry(entry))
    handler.served_model_name = entry.served_name
    if getattr(handler, "handler_type", None) == "whisper":
        ensure_ffmpeg()
        serve_like_launch(handler)
        whispers.hold(handler.model_path)  # nothing to undo if this fails: no threads run before initialize
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


def prompt_cache_bytes(handler: Any) -> int:
    """Bytes of MLX arrays upstream's prompt cache keeps in memory for a handler between requests.

    1.6.3's ``LRUPromptCache`` holds each entry's arrays, so its ``nbytes`` is
    memory. 1.8.1's (and the hub's persistent one) holds a file per entry and
    reads it only on a hit, into that request's own KV, which its reservation
    counts: its ``nbytes`` is what the files would take if loaded, not memory
    held, and counting it let entries restored at a start crowd other models out.
    """
    cache = getattr(handler, "prompt_cache", None)
    if cache is None or entries_on_disk(cache):
        return 0
    value = getattr(cache, "nbytes", 0)
    return int(value) if isinstance(value, int) else 0


def entries_on_disk(cache: Any) -> bool:
    """Whether an upstream prompt cache keeps its entries in files (1.8.1: an entry is a ``file_path``)."""
    entry = getattr(type(cache), "CacheEntry", None)
    return dataclasses.is_dataclass(entry) and any(f.name == "file_path" for f in dataclasses.fields(entry))
