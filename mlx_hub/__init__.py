"""mlx-openai-server-hub: many MLX models in one process, each on its own OpenAI port."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["Hub", "HubConfig", "ConfigError", "HubError", "load_config", "__version__"]


def __getattr__(name: str):  # keep `import mlx_hub` light: MLX loads only when used
    if name == "Hub":
        from .api import Hub

        return Hub
    if name in ("HubConfig", "ConfigError", "load_config"):
        from . import config

        return getattr(config, name)
    if name == "HubError":
        from .errors import HubError

        return HubError
    raise AttributeError(f"module 'mlx_hub' has no attribute {name!r}")
