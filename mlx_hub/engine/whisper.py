"""Whisper weights held per engine, one copy per model folder, and the ffmpeg whisper needs.

mlx_whisper keeps one model for the whole process and loads it inside the first
request (``ModelHolder``). The hub instead loads each folder's weights at load
time, counted in memory like any model's, and frees them with the last entry
that holds them; patches/mlx_whisper.py makes mlx_whisper's holder hand them out.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import tempfile
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlx_hub.engine.base import EngineError
from mlx_hub.engine.memory import materialize

log = logging.getLogger(__name__)


@dataclass
class _Held:
    model: Any
    dtype: Any
    refs: int


#: Every live holder, so mlx_whisper's process-wide lookup can find any engine's weights.
_live: weakref.WeakSet[WhisperWeights] = weakref.WeakSet()


def held_model(model_path: str, dtype: Any) -> Any:
    """The weights some engine holds for ``model_path`` at ``dtype``; None if none does."""
    for holder in list(_live):
        model = holder.get(model_path, dtype)
        if model is not None:
            return model
    return None


class WhisperWeights:
    """The whisper folders one engine holds, with a reference count per folder."""

    def __init__(self) -> None:
        self._held: dict[str, _Held] = {}
        self._lock = threading.Lock()
        _live.add(self)

    def folders(self) -> set[str]:
        """The folders whose weights this engine holds now."""
        with self._lock:
            return set(self._held)

    def get(self, model_path: str, dtype: Any) -> Any:
        held = self._held.get(model_path)
        return held.model if held is not None and held.dtype == dtype else None

    def hold(self, model_path: str) -> None:
        """Load (or take another reference to) a folder's weights, in fp16 as mlx_whisper decodes."""
        import mlx.core as mx
        from mlx_whisper.load_models import load_model

        with self._lock:
            held = self._held.get(model_path)
            if held is not None:
                held.refs += 1
                return
        model = load_model(model_path, dtype=mx.float16)
        materialize(model)
        with self._lock:
            self._held.setdefault(model_path, _Held(model, mx.float16, 0)).refs += 1

    def release(self, model_path: str) -> None:
        """Drop a reference; the last one frees the weights, and with no whisper left anywhere, the audio caches."""
        with self._lock:
            held = self._held.get(model_path)
            if held is not None:
                held.refs -= 1
                if held.refs <= 0:
                    del self._held[model_path]
        if not any(holder._held for holder in list(_live)):
            _clear_audio_caches()


def _clear_audio_caches() -> None:
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

                clear()


def ensure_ffmpeg() -> None:
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
