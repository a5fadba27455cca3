"""The hub as a library user gets it: ``mlx_hub.Hub``, its model ports serving upstream's routes.

The core ``hub.Hub`` is told which app to serve on each model port, so it never
imports the web layer; this top-layer subclass supplies the one the daemon uses.
"""

from __future__ import annotations

from typing import Any

from .config import HubConfig
from .hub import Hub as CoreHub
from .web.model_app import build_model_app


class Hub(CoreHub):
    """A ``hub.Hub`` whose model ports serve ``web.model_app`` unless told otherwise."""

    def __init__(self, config: HubConfig, **kwargs: Any):
        kwargs.setdefault("app_factory", build_model_app)
        super().__init__(config, **kwargs)
