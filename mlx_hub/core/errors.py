"""Errors the hub raises to its callers, each knowing its HTTP status and OpenAI error type.

The web layers render every one of these the same way (an OpenAI-style
``{"error": {...}}`` envelope), so the Python API and HTTP speak one language.
"""

from __future__ import annotations

from collections.abc import Iterable


class HubError(RuntimeError):
    status: int = 500
    error_type: str = "server_error"
    code: str = "hub_error"
    retry_after: float | None = None

    def __init__(self, message: str, *, model: str | None = None):
        super().__init__(message)
        self.message = message
        self.model = model


class UnknownModelError(HubError, KeyError):
    status, error_type, code = 404, "invalid_request_error", "model_not_found"

    def __str__(self) -> str:  # KeyError would quote the message
        return self.message

    @classmethod
    def among(cls, name: str, known: Iterable[str]) -> UnknownModelError:
        """``name`` is none of ``known``: the error that lists them."""
        return cls(f"no model named '{name}' (models: {', '.join(known) or 'none'})", model=name)


class InvalidKeepAliveError(HubError):
    status, error_type, code = 400, "invalid_request_error", "invalid_keep_alive"


class NotRunningError(HubError):
    status, error_type, code = 409, "invalid_request_error", "model_not_started"


class NotLoadedError(HubError):
    status, error_type, code = 503, "service_unavailable", "model_not_loaded"


class StoppedError(HubError):
    """A request the model could not finish because the model was stopped under it."""

    status, error_type, code = 503, "service_unavailable", "model_stopped"


class ModelLoadError(HubError):
    status, error_type, code = 503, "service_unavailable", "model_load_failed"


class PortStartError(HubError):
    status, error_type, code = 409, "server_error", "port_unavailable"


class CapacityError(HubError):
    status, error_type, code = 429, "rate_limit_exceeded", "group_at_capacity"
    retry_after = 5.0


class NoConfigFileError(HubError):
    status, error_type, code = 409, "invalid_request_error", "no_config_file"


class BudgetError(HubError):
    status, error_type, code = 503, "service_unavailable", "memory_budget_exceeded"
    retry_after = 5.0


class RequestTooLargeError(HubError):
    """A request whose KV cache and prefill would not fit the memory budget even beside its model alone."""

    status, error_type, code = 400, "invalid_request_error", "request_exceeds_memory_budget"


class MemoryExhaustedError(HubError):
    """MLX could not allocate memory for this one request; the hub and every other request go on."""

    status, error_type, code = 503, "service_unavailable", "memory_exhausted"
    retry_after = 5.0
