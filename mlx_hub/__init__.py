"""mlx-openai-server-hub: many MLX models in one process, each on its own OpenAI port."""

from __future__ import annotations

from mlx_hub.version import __version__

__all__ = ["Hub", "HubConfig", "ConfigError", "HubError", "load_config", "__version__"]


def __getattr__(name: str):  # keep `import mlx_hub` light: MLX loads only when used
    if name == "Hub":
        from mlx_hub.service.api import Hub

        return Hub
    if name in ("HubConfig", "ConfigError", "load_config"):
        from mlx_hub import config

        return getattr(config, name)
    if name == "HubError":
        from mlx_hub.core.errors import HubError

        return HubError
    raise AttributeError(f"module 'mlx_hub' has no attribute {name!r}")
