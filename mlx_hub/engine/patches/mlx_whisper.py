"""mlx-whisper 0.4.x: ``ModelHolder`` hands out the weights each hub engine loaded, per folder
(``whisper_per_folder``).

mlx_whisper's ``ModelHolder`` keeps one model for the whole process, loaded on
first use. Two whisper entries would swap it back and forth, an unload would
free nothing, and the weights would load inside the first request, uncounted.
The hub loads each folder's weights at load time (``engine.whisper``) and the
holder hands them out; a folder no hub loaded falls through to mlx_whisper's own.

Proof: tests/test_model_types.py::test_two_whisper_entries_hold_their_own_weights
and ::test_whisper_transcribes_streams_and_frees (weights counted at load, freed at unload).
"""

from __future__ import annotations

import sys
from typing import Any

from mlx_hub.engine.patches.switch import enabled
from mlx_hub.engine.whisper import held_model


def apply() -> None:
    module = sys.modules.get("mlx_whisper.transcribe")
    holder = getattr(module, "ModelHolder", None)
    if not enabled("whisper_per_folder") or holder is None or getattr(holder, "_mlx_hub_per_folder", False):
        return
    original = holder.get_model

    def get_model(cls: type, model_path: str, dtype: Any) -> Any:
        model = held_model(model_path, dtype)
        return model if model is not None else original(model_path, dtype)

    holder.get_model = classmethod(get_model)
    holder._mlx_hub_per_folder = True
