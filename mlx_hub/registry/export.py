"""The LiteLLM export: one ``model_list`` entry per model, from hub.yaml or from running hubs' /v1/models."""

from __future__ import annotations

from typing import Any

from mlx_hub.config import HubConfig
from mlx_hub.core.ports import PortBook, connect_host
from mlx_hub.engine.model_files import token_limits


def litellm_model_list(
    config: HubConfig, *, via: str = "controller", host: str | None = None
) -> list[dict[str, Any]]:
    """One LiteLLM entry per configured model, pointing at the controller's /v1 or the model's port."""
    ports = PortBook.for_config(config).load()
    keys = sorted(config.api_keys)
    out = []
    for entry in config.models:
        server = host or connect_host(config.host_of(entry))
        port = config.port if via == "controller" else (entry.fixed_port or ports.get(entry.name))
        if port is None:
            raise ValueError(
                f"model '{entry.name}' has no port yet; start the hub once or use --via controller"
            )
        params: dict[str, Any] = {"model": f"openai/{entry.name}", "api_base": f"http://{server}:{port}/v1"}
        params["api_key"] = keys[0] if keys else "none"
        params.update(entry.request_params or {})
        info: dict[str, Any] = {"mode": _mode(entry.model_type), **token_limits(entry)}
        out.append({"model_name": entry.name, "litellm_params": params, "model_info": info})
    return out


def litellm_from_hubs(urls: list[str], api_key: str | None = None) -> list[dict[str, Any]]:
    """Entries for every model of several running hubs (their /v1/models), one per hub and model.

    Entries that share a ``model_name`` across hubs are what LiteLLM balances
    between: many Macs behind one gateway.
    """
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    out = []
    for url in urls:
        base = url.rstrip("/")
        listing = httpx.get(f"{base}/v1/models", headers=headers, timeout=10)
        listing.raise_for_status()
        for model in listing.json()["data"]:
            params = {
                "model": f"openai/{model['id']}",
                "api_base": f"{base}/v1",
                "api_key": api_key or "none",
            }
            params.update(model.get("request_params") or {})
            info = {"mode": _mode(model.get("model_type", "lm"))}
            info.update({k: model[k] for k in ("max_input_tokens", "max_output_tokens") if model.get(k)})
            out.append({"model_name": model["id"], "litellm_params": params, "model_info": info})
    return out


def _mode(model_type: str) -> str:
    return {"embeddings": "embedding", "whisper": "audio_transcription"}.get(model_type, "chat")
