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

Each engine owns one ``WeightRegistry``: two hubs in one process share nothing.
The loaders installed in upstream's modules (engine/patches) are process-wide,
so a build names its registry and entry for the thread it runs on (``holding``).
"""

from __future__ import annotations

import contextlib
import inspect
import json
import threading
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from mlx_hub.engine.base import SharedWeights
from mlx_hub.engine.memory import active_memory

Key = tuple[str, str | None, str]

_current = threading.local()  # (registry, entry name) whose handler this thread is building


class WeightRegistry:
    """The weights copies one engine's entries hold, by folder and load options."""

    def __init__(self) -> None:
        self.groups: dict[Key, SharedWeights] = {}
        self.lock = threading.Lock()

    @contextlib.contextmanager
    def holding(self, name: str) -> Iterator[None]:
        """Weights loaded on this thread inside the block belong to entry ``name`` of this registry."""
        _current.holder = (self, name)
        try:
            yield
        finally:
            _current.holder = None

    def find(self, key: Key) -> tuple[SharedWeights | None, Any]:
        """The copy under ``key`` and its model, if that model is still alive."""
        with self.lock:
            group = self.groups.get(key)
            return group, (group.model() if group is not None else None)

    def add(self, key: Key, group: SharedWeights) -> None:
        with self.lock:
            self.groups[key] = group

    def hold(self, group: SharedWeights, holder: str) -> None:
        with self.lock:
            if holder not in group.holders:
                group.holders.append(holder)

    def release(self, name: str) -> None:
        """Entry ``name`` holds no weights now; a copy nobody holds is forgotten (and freed with its model)."""
        with self.lock:
            for key, group in list(self.groups.items()):
                if name in group.holders:
                    group.holders.remove(name)
                if not group.holders or group.model() is None:
                    del self.groups[key]

    def held_by(self, name: str) -> list[SharedWeights]:
        """The copies entry ``name`` holds (a snapshot)."""
        with self.lock:
            return [
                SharedWeights(g.folder, g.bytes, list(g.holders), g.model, g.config)
                for g in self.groups.values()
                if name in g.holders
            ]

    def loaded_bytes(self, folder: str) -> int | None:
        """The bytes of ``folder``'s weights if some entry holds them now (plain load options), else None."""
        key = _key(folder, None, None)
        with self.lock:
            group = self.groups.get(key)
            alive = group is not None and group.holders and group.model() is not None
            return group.bytes if alive else None


def _holder() -> tuple[WeightRegistry, str] | None:
    return getattr(_current, "holder", None)


def _key(
    folder: str, adapter_path: str | None, model_config: dict[str, Any] | None
) -> tuple[str, str | None, str]:
    return (str(Path(folder).resolve()), adapter_path, json.dumps(model_config or {}, sort_keys=True))


def sharing_load(original: Callable[..., Any]) -> Callable[..., Any]:
    """A drop-in for ``mlx_lm.utils.load`` that reads each folder's weights once while they are held."""
    from mlx_lm.utils import _download, load_adapters, load_model, load_tokenizer

    def load(
        path_or_hf_repo: str,
        tokenizer_config: dict[str, Any] | None = None,
        model_config: dict[str, Any] | None = None,
        adapter_path: str | None = None,
        lazy: bool = False,
        return_config: bool = False,
        revision: str | None = None,
        **newer: Any,  # mlx-lm 0.32: trust_remote_code
    ) -> Any:
        current = _holder()
        if current is None or lazy:  # not a hub load (or a lazy one): upstream's own behaviour
            return original(
                path_or_hf_repo,
                tokenizer_config=tokenizer_config,
                model_config=model_config,
                adapter_path=adapter_path,
                lazy=lazy,
                return_config=return_config,
                revision=revision,
                **newer,
            )
        registry, holder = current
        model_path = _download(path_or_hf_repo, revision=revision)
        key = _key(str(model_path), adapter_path, model_config)
        group, model = registry.find(key)
        if model is None:
            before = active_memory()
            model, config = load_model(
                model_path,
                lazy,
                model_config=model_config,
                **_remote_code(load_model, tokenizer_config, newer),
            )
            if adapter_path is not None:
                model = load_adapters(model, adapter_path)
                model.eval()
            group = SharedWeights(
                key[0], max(active_memory() - before, 0), [], weakref.ref(model), dict(config)
            )
            registry.add(key, group)
        assert group is not None
        registry.hold(group, holder)
        config = json.loads(json.dumps(group.config))  # each handler gets its own copy
        tokenizer = load_tokenizer(
            model_path, tokenizer_config, eos_token_ids=config.get("eos_token_id", None)
        )
        return (model, tokenizer, config) if return_config else (model, tokenizer)

    load._mlx_hub_sharing = True  # type: ignore[attr-defined]
    return load


def _remote_code(
    load_model: Callable[..., Any], tokenizer_config: dict[str, Any] | None, newer: dict[str, Any]
) -> dict[str, Any]:
    """``trust_remote_code`` for mlx-lm 0.32's ``load_model`` (a config's own ``model_file``).

    Upstream hands hub.yaml's ``trust_remote_code`` to ``load`` only inside
    ``tokenizer_config``; a model whose architecture is its own Python file needs
    it at ``load_model`` too, as ``mlx_lm.load(trust_remote_code=True)`` passes it.
    """
    if "trust_remote_code" not in inspect.signature(load_model).parameters:
        return {}
    trusted = newer.get("trust_remote_code") or (tokenizer_config or {}).get("trust_remote_code")
    return {"trust_remote_code": bool(trusted)}


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

    def load(path_or_hf_repo: str, *args: Any, **kwargs: Any) -> Any:
        current = _holder()
        folder = Path(str(path_or_hf_repo)).expanduser()
        if current is None or kwargs.get("lazy") or args or not folder.is_dir():
            return original(path_or_hf_repo, *args, **kwargs)
        registry, holder = current
        key = (str(folder.resolve()), kind, json.dumps(kwargs, sort_keys=True, default=str))
        group, model = registry.find(key)
        if model is None:
            before = active_memory()
            model, partner = original(path_or_hf_repo, **kwargs)
            group = SharedWeights(
                key[0], max(active_memory() - before, 0), [], weakref.ref(model), {"companion": partner}
            )
            registry.add(key, group)
            result = (model, partner)
        else:
            assert group is not None
            fresh = companion(folder, model, kwargs)
            result = (model, group.config["companion"] if fresh is None else fresh)
        registry.hold(group, holder)
        return result

    load._mlx_hub_sharing = True  # type: ignore[attr-defined]
    return load
