"""transformers 5.x: in a hub whose models need no torch tensors, transformers is told torch and
scikit-learn are absent (``transformers_without_torch``).

mlx-lm and mlx-embeddings use transformers for tokenizers, configs and image
processors that hand back numpy or MLX arrays; mlx-whisper does not use it at
all. Yet with torch installed (mlx-whisper and outlines require it), importing
transformers pulls in torch's compiler, distributed and meta-tensor modules
for its generation and tensor-parallel helpers, and scikit-learn with scipy
for assisted decoding's metrics. Measured on the 2-core CPU machine, importing
upstream's lm and embeddings handlers took 12.9 s and left the process at
560 MB resident before any model loaded; with transformers seeing no torch,
6.4 s and 351 MB. The suite starts some sixty hub processes.

transformers decides at import time, asking ``is_torch_available`` and
``is_sklearn_available`` in ``transformers.utils.import_utils``. An import hook
replaces both right after that module runs, before any other transformers
module has asked. torch itself is still imported where a library imports it
directly (outlines' guides do), but only its core.

Only for the model types whose stack asks transformers for no torch tensor
(``TORCH_FREE_TYPES``): upstream's multimodal handler asks its processors for
``return_tensors="pt"``, and image generation runs on torch-based pipelines.
A hub whose hub.yaml names one of those at start keeps transformers as it is.
One that did not, asked later to load one (a reload added it), refuses that
load by name and says to restart: what transformers decided at import cannot
be undone in a running process.

Only the daemon, the demo and a sharded model's ranks (mlx-lm's server) install
it: they know their models before anything imports transformers. A Python
program that embeds the hub keeps its imports.

Proof: tests/test_lean_process.py::test_a_text_hub_leaves_torch_to_its_core
(scikit-learn and scipy are not mapped into the hub process; chat, a
json_schema answer, embeddings and a transcription work; a multimodal entry
added by reload is refused, naming the restart).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import logging
import sys
from collections.abc import Iterable, Sequence
from types import ModuleType

from mlx_hub.engine.base import EngineError
from mlx_hub.engine.patches.switch import enabled

log = logging.getLogger(__name__)

#: Model types whose stack never asks transformers for a torch tensor.
TORCH_FREE_TYPES = frozenset({"lm", "embeddings", "whisper"})
#: The module whose answers transformers' other modules read once, as they are imported.
IMPORT_UTILS = "transformers.utils.import_utils"
#: What transformers is told is not installed.
HIDDEN = ("is_torch_available", "is_sklearn_available")

_installed = False


def torch_free(model_types: Iterable[str]) -> bool:
    """Whether every one of these model types runs with a transformers that sees no torch."""
    return set(model_types) <= TORCH_FREE_TYPES


def _absent() -> bool:
    return False


def _hide(module: ModuleType) -> None:
    for name in HIDDEN:
        setattr(module, name, _absent)


class _TellTransformers(importlib.abc.MetaPathFinder):
    """Finds ``transformers.utils.import_utils`` as usual, and hides torch in it as soon as it has run."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != IMPORT_UTILS:
            return None
        sys.meta_path.remove(self)  # once: the search below must not find this finder again
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        loader, run = spec.loader, spec.loader.exec_module

        def exec_module(module: ModuleType) -> None:
            run(module)
            _hide(module)

        loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def transformers_without_torch(model_types: Iterable[str]) -> bool:
    """Tell transformers, before its import, that torch is absent when no model type here needs it.

    Whether it is in force. Too late once transformers is imported: then nothing changes.
    """
    global _installed
    types = set(model_types)
    if _installed or not enabled("transformers_without_torch") or not torch_free(types):
        return _installed
    if "transformers" in sys.modules:
        log.debug("transformers keeps torch: it was imported before the hub read its models")
        return False
    sys.meta_path.insert(0, _TellTransformers())
    _installed = True
    log.info(
        "transformers runs without torch in this process: its models (%s) need none",
        ", ".join(sorted(types)) or "none",
    )
    return True


def check_can_serve(model_type: str) -> None:
    """Refuse a model type that needs torch tensors in a process whose transformers has none."""
    if _installed and model_type not in TORCH_FREE_TYPES:
        raise EngineError(
            f"model_type '{model_type}' needs torch in transformers, which this hub process went "
            "without because no model in hub.yaml needed it when the hub started (it saves memory and "
            "start time); restart the hub (`mlx-openai-server-hub shutdown`, then `start`) to serve it"
        )
