"""One copy of a model's weights for every hub entry that uses them.

Two entries of one model (a "thinking" and a "fast" profile: other sampling
defaults, templates, context lengths or ports) would each read the weights with
``mlx_lm.load``. ``sharing_load`` stands in for the ``load`` that upstream's
``MLX_LM`` calls: the first load of a folder reads the weights as usual; a later
one gets the same model object and only a fresh tokenizer of its own (upstream
changes the tokenizer per handler: chat template, EOS ids). A draft model that
another entry serves is shared the same way, since its load goes through here too.

The registry holds the model only weakly: the weights live exactly as long as
some handler holds them, and go with the last one. ``holders`` records which
entries use each copy, in load order; the first still holding it carries its
bytes in the hub's accounting, so every copy is counted once.
"""

from __future__ import annotations

import contextlib
import json
import threading
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class SharedWeights:
    folder: str
    bytes: int  # what reading them added to MLX's active memory
    holders: list[str] = field(default_factory=list)  # entry names, in load order
    model: Callable[[], Any] = lambda: None  # a weak reference to the model
    config: dict[str, Any] = field(default_factory=dict)


_groups: dict[tuple[str, str | None, str], SharedWeights] = {}
_lock = threading.Lock()
_current = threading.local()  # the entry whose handler this thread is building


@contextlib.contextmanager
def holding(name: str) -> Iterator[None]:
    """Weights loaded on this thread inside the block belong to entry ``name``."""
    _current.name = name
    try:
        yield
    finally:
        _current.name = None


def _key(
    folder: str, adapter_path: str | None, model_config: dict[str, Any] | None
) -> tuple[str, str | None, str]:
    return (str(Path(folder).resolve()), adapter_path, json.dumps(model_config or {}, sort_keys=True))


def sharing_load(original: Callable[..., Any]) -> Callable[..., Any]:
    """A drop-in for ``mlx_lm.utils.load`` that reads each folder's weights once while they are held."""
    from mlx_lm.utils import _download, load_adapters, load_model, load_tokenizer

    from .engine import active_memory

    def load(
        path_or_hf_repo: str,
        tokenizer_config: dict[str, Any] | None = None,
        model_config: dict[str, Any] | None = None,
        adapter_path: str | None = None,
        lazy: bool = False,
        return_config: bool = False,
        revision: str | None = None,
    ) -> Any:
        holder = getattr(_current, "name", None)
        if holder is None or lazy:  # not a hub load (or a lazy one): upstream's own behaviour
            return original(
                path_or_hf_repo,
                tokenizer_config=tokenizer_config,
                model_config=model_config,
                adapter_path=adapter_path,
                lazy=lazy,
                return_config=return_config,
                revision=revision,
            )
        model_path = _download(path_or_hf_repo, revision=revision)
        key = _key(str(model_path), adapter_path, model_config)
        with _lock:
            group = _groups.get(key)
            model = group.model() if group is not None else None
        if model is None:
            before = active_memory()
            model, config = load_model(model_path, lazy, model_config=model_config)
            if adapter_path is not None:
                model = load_adapters(model, adapter_path)
                model.eval()
            group = SharedWeights(
                key[0], max(active_memory() - before, 0), [], weakref.ref(model), dict(config)
            )
            with _lock:
                _groups[key] = group
        assert group is not None
        with _lock:
            if holder not in group.holders:
                group.holders.append(holder)
        config = json.loads(json.dumps(group.config))  # each handler gets its own copy
        tokenizer = load_tokenizer(
            model_path, tokenizer_config, eos_token_ids=config.get("eos_token_id", None)
        )
        return (model, tokenizer, config) if return_config else (model, tokenizer)

    load._mlx_hub_sharing = True  # type: ignore[attr-defined]
    return load


def release(name: str) -> None:
    """Entry ``name`` no longer holds any weights; a copy nobody holds is forgotten (and freed with its model)."""
    with _lock:
        for key, group in list(_groups.items()):
            if name in group.holders:
                group.holders.remove(name)
            if not group.holders or group.model() is None:
                del _groups[key]


def held_by(name: str) -> list[SharedWeights]:
    """The copies entry ``name`` holds (a snapshot)."""
    with _lock:
        return [
            SharedWeights(g.folder, g.bytes, list(g.holders), g.model, g.config)
            for g in _groups.values()
            if name in g.holders
        ]


def loaded_bytes(folder: str) -> int | None:
    """The bytes of ``folder``'s weights if some entry holds them now (plain load options), else None."""
    key = _key(folder, None, None)
    with _lock:
        group = _groups.get(key)
        return group.bytes if group is not None and group.holders and group.model() is not None else None


def vlm_processor(model_path: Path, model: Any, kwargs: dict[str, Any]) -> Any:
    """A fresh processor for a loaded VLM, built as ``mlx_vlm.load`` builds it (its own, since
    upstream sets a chat template on it per handler)."""
    from mlx_vlm.utils import load_image_processor, load_processor

    options = {k: v for k, v in kwargs.items() if k not in ("lazy", "adapter_path", "revision")}
    image_processor = load_image_processor(model_path, **options)
    processor = load_processor(
        model_path, True, eos_token_ids=getattr(model.config, "eos_token_id", None), **options
    )
    if image_processor is not None:
        processor.image_processor = image_processor
    return processor


def same_companion(model_path: Path, model: Any, kwargs: dict[str, Any]) -> None:
    """Embeddings handlers never change their tokenizer: the first load's serves every entry."""
    return None


def sharing_pair_load(
    original: Callable[..., Any], kind: str, companion: Callable[[Path, Any, dict[str, Any]], Any]
) -> Callable[..., Any]:
    """A drop-in for mlx-vlm's and mlx-embeddings' ``load(path, ...) -> (model, processor)``.

    The first hub load of a folder reads it; a later one gets the same model and
    ``companion``'s processor (None: the first load's). ``kind`` keeps a
    folder's VLM and embeddings loads apart.
    """
    from .engine import active_memory

    def load(path_or_hf_repo: str, *args: Any, **kwargs: Any) -> Any:
        holder = getattr(_current, "name", None)
        folder = Path(str(path_or_hf_repo)).expanduser()
        if holder is None or kwargs.get("lazy") or args or not folder.is_dir():
            return original(path_or_hf_repo, *args, **kwargs)
        key = (str(folder.resolve()), kind, json.dumps(kwargs, sort_keys=True, default=str))
        with _lock:
            group = _groups.get(key)
            model = group.model() if group is not None else None
        if model is None:
            before = active_memory()
            model, partner = original(path_or_hf_repo, **kwargs)
            group = SharedWeights(
                key[0], max(active_memory() - before, 0), [], weakref.ref(model), {"companion": partner}
            )
            with _lock:
                _groups[key] = group
            result = (model, partner)
        else:
            fresh = companion(folder, model, kwargs)
            result = (model, group.config["companion"] if fresh is None else fresh)
        with _lock:
            if holder not in group.holders:
                group.holders.append(holder)
        return result

    load._mlx_hub_sharing = True  # type: ignore[attr-defined]
    return load
