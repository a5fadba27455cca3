"""Every change the hub makes at run time to another library's objects, one module per library.

Site-packages stay as installed. Each patch is idempotent, applies only once
its library is imported (``apply`` runs after each handler module import), and
its docstring names the library version it was written against, what goes
wrong without it, and the test that fails without it.
"""

from __future__ import annotations

from mlx_hub.engine.patches import mlx_openai_server, mlx_vlm, mlx_whisper


def apply() -> None:
    """Apply every patch whose library is imported by now; safe to call often."""
    mlx_vlm.apply()
    mlx_whisper.apply()
    mlx_openai_server.apply()
