"""hub.yaml's schema: every option, its default, and the rules one entry can check alone.

Rules that span entries (unique names, ports, groups) live in checks.py;
finding and reading the file in loading.py.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from mlx_hub.config.aliases import check_alias
from mlx_hub.config.distributed import DistributedConfig
from mlx_hub.config.hostnames import check_host
from mlx_hub.config.sizes import disk_bytes, is_budget_word, memory_bytes

DEFAULT_HOME = Path("~/mlx-openai-server-hub")
DEFAULT_CONFIG_NAME = "hub.yaml"
CONFIG_ENV = "MLX_HUB_CONFIG"
KEY_ENV = "MLX_HUB_API_KEY"
ORCH_CONFIG_ENV = "MLXSERVER_MODELS_PATH"  # mlx-server-orch's variable, read after the hub's own names
ORCH_CONFIG_NAME = "models.yaml"
PROMPT_CACHE_ENV = "MLX_HUB_PROMPT_CACHE_PATH"  # prompt_cache_path where hub.yaml sets none
DEFAULT_PROMPT_CACHE_SIZE = "10GB"

log = logging.getLogger(__name__)

SLUG_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")

# strict: YAML's "8000" (a string) is a mistake worth naming, not something to coerce.
Port = Annotated[int, Field(strict=True, ge=1, le=65535)]
LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]


class ConfigError(ValueError):
    """hub.yaml is unusable; ``problems`` holds one line per thing to fix."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


def _normalize_level(value: Any) -> Any:
    return value.upper() if isinstance(value, str) else value


def _check_slug(value: str) -> str:
    if not SLUG_RE.fullmatch(value):
        raise ValueError(
            f"{value!r} is not a valid name: use letters, digits, '-' and '_', "
            "starting with a letter or digit"
        )
    return value


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=False)


#: Request fields ``request_params`` may not fill in: what a request is, and the hub's own option.
REQUEST_OWN_FIELDS = frozenset({"model", "messages", "prompt", "input", "stream", "keep_alive", "file"})


class ModelConfig(_Strict):
    """One model entry. Server options are handed to the upstream handler."""

    name: str
    model_path: str
    port: int | str | None = None  # a number, or "auto:<range>" for the lowest free port in a named range
    host: str | None = None
    jit_enabled: bool = False
    auto_unload_minutes: Annotated[float, Field(gt=0)] | None = None
    group: str | None = None
    default: bool = False
    log_file: str | None = None
    no_log_file: bool = False
    log_level: LogLevel | None = None
    pinned: bool = False
    # Server options, handed to mlx-openai-server as its own ModelEntryConfig
    # (see engine.upstream_entry). Names and defaults are upstream's.
    model_type: Literal["lm", "multimodal", "embeddings", "whisper", "image-generation", "image-edit"] = "lm"
    served_model_name: str | None = None  # unset: model_path, as upstream
    aliases: list[str] = Field(default_factory=list)  # more names requests may use (config/aliases.py)
    loading_progress: bool | None = None  # unset: the hub's; streams say what they wait for as reasoning
    context_length: Annotated[int, Field(ge=1)] | None = None  # unset: the model's own, no rotating cache
    max_concurrency: Annotated[int, Field(ge=1)] = 1
    queue_timeout: Annotated[float, Field(gt=0)] = 300
    queue_size: Annotated[int, Field(ge=1)] = 100
    quantize: int | None = None
    config_name: str | None = None
    lora_paths: list[str] | None = None
    lora_scales: list[float] | None = None
    enable_auto_tool_choice: bool = False
    tool_call_parser: str | None = None
    reasoning_parser: str | None = None
    message_converter: str | None = None
    trust_remote_code: bool = False
    chat_template_file: str | None = None
    disable_auto_resize: bool = False
    debug: bool = False
    prompt_cache_size: Annotated[int, Field(ge=0)] = 10
    prompt_cache_max_bytes: Annotated[int, Field(ge=1)] = 1 << 63
    prompt_cache_dir: str | None = None
    draft_model_path: str | None = None
    num_draft_tokens: Annotated[int, Field(ge=1)] = 2
    kv_bits: Literal[2, 3, 4, 5, 6, 8] | None = None
    kv_group_size: Literal[32, 64, 128] = 64
    quantized_kv_start: Annotated[int, Field(ge=0)] = 0
    batch_completion_size: Annotated[int, Field(ge=1)] = 32
    batch_prefill_size: Annotated[int, Field(ge=1)] = 8
    batch_prefill_step_size: Annotated[int, Field(ge=1)] = 2048
    disable_batching: bool = False
    # Sampling defaults: what a request that leaves the field out gets.
    default_max_tokens: Annotated[int, Field(ge=1)] | None = None
    default_temperature: Annotated[float, Field(ge=0)] | None = None
    default_top_p: Annotated[float, Field(ge=0, le=1)] | None = None
    default_top_k: Annotated[int, Field(ge=0)] | None = None
    default_min_p: Annotated[float, Field(ge=0, le=1)] | None = None
    default_repetition_penalty: Annotated[float, Field(gt=0)] | None = None
    default_presence_penalty: float | None = None
    default_xtc_probability: Annotated[float, Field(ge=0, le=1)] | None = None
    default_xtc_threshold: Annotated[float, Field(ge=0, le=1)] | None = None
    default_seed: int | None = None
    default_repetition_context_size: Annotated[int, Field(ge=1)] | None = None
    # Request fields a request that leaves them out gets (``reasoning_effort: low``), as
    # mlxctl's registry has them; the LiteLLM export writes them too.
    request_params: dict[str, Any] | None = None
    max_output_tokens: Annotated[int, Field(ge=1)] | None = None  # what the LiteLLM export advertises
    # One model over several processes or machines (config/distributed.py, engine/sharded/).
    distributed: DistributedConfig | None = None

    _check_name = field_validator("name", "group")(lambda v: None if v is None else _check_slug(v))
    _level = field_validator("log_level", mode="before")(_normalize_level)

    @model_validator(mode="before")
    @classmethod
    def _upstream_aliases(cls, data: Any) -> Any:
        """Accept upstream's multi-model YAML keys for JIT: ``on_demand`` and ``on_demand_idle_timeout``.

        An entry copied from an ``mlx-openai-server launch --config`` file then
        behaves as it did there: on demand, unloaded after 60 idle seconds
        unless it says otherwise.
        """
        if not isinstance(data, dict) or not ({"on_demand", "on_demand_idle_timeout"} & data.keys()):
            return data
        data = dict(data)
        on_demand = data.pop("on_demand", None)
        timeout = data.pop("on_demand_idle_timeout", None)
        if on_demand is not None:
            if "jit_enabled" in data and data["jit_enabled"] != on_demand:
                raise ValueError(
                    "on_demand (upstream's name for jit_enabled) contradicts jit_enabled; keep one"
                )
            data["jit_enabled"] = on_demand
        if data.get("jit_enabled") and "auto_unload_minutes" not in data:
            seconds = 60 if timeout is None else timeout
            if isinstance(seconds, bool) or not isinstance(seconds, int | float) or seconds <= 0:
                raise ValueError(
                    f"on_demand_idle_timeout must be a positive number of seconds, not {seconds!r}"
                )
            data["auto_unload_minutes"] = seconds / 60.0
        return data

    @field_validator("request_params")
    @classmethod
    def _request_defaults(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        """Defaults for sampling and template fields; never what a request is about, or the hub's own."""
        banned = sorted(set(value or {}) & REQUEST_OWN_FIELDS)
        if banned:
            raise ValueError(
                f"{', '.join(banned)} cannot be a default request field (each request sets its own); "
                "keep_alive goes in auto_unload_minutes"
            )
        return value

    @field_validator("aliases", mode="before")
    @classmethod
    def _alias_form(cls, value: Any) -> Any:
        if not isinstance(value, list):
            raise ValueError(f"aliases must be a list of names, not {value!r}")
        return [check_alias(v) for v in value]

    @field_validator("port", mode="before")
    @classmethod
    def _port_form(cls, value: Any) -> Any:
        """One check for every form, so an error is one line rather than pydantic's per-branch noise."""
        if value is None:
            return None
        if isinstance(value, int) and not isinstance(value, bool):
            if not 1 <= value <= 65535:
                raise ValueError(f"port must be between 1 and 65535, not {value}")
            return value
        if isinstance(value, str) and re.fullmatch(r"auto:[A-Za-z0-9][A-Za-z0-9_-]*", value):
            return value
        raise ValueError(f"port must be a number, or auto:<range> naming one of port_ranges, not {value!r}")

    @property
    def fixed_port(self) -> int | None:
        """The port hub.yaml pins, if it is a number."""
        return self.port if isinstance(self.port, int) else None

    @property
    def port_range(self) -> str | None:
        """The named range an ``auto:<range>`` port draws from."""
        return self.port.partition(":")[2] if isinstance(self.port, str) else None

    @field_validator("auto_unload_minutes")
    @classmethod
    def _needs_jit(cls, value: float | None, info: Any) -> float | None:
        if value is not None and not info.data.get("jit_enabled", False):
            raise ValueError("auto_unload_minutes needs jit_enabled: true on the same model")
        return value

    @property
    def served_name(self) -> str:
        """The name upstream serves this model as: ``served_model_name``, else ``model_path``."""
        return self.served_model_name or self.model_path

    @property
    def names(self) -> tuple[str, ...]:
        """Every ``model`` value a request may use for this entry: served name, entry name, path."""
        return tuple(dict.fromkeys((self.served_name, self.name, self.model_path, *self.aliases)))

    def answers_to(self, requested: object) -> bool:
        """Whether a request's ``model`` names this entry: one of ``names``.

        The one test of a name, wherever one is matched (the /v1 router, the port's
        gate, upstream's registry, the hub's own routes), so that a name one layer
        accepts is never refused by the next. Builds nothing: it runs per request.
        """
        return (
            requested == self.served_name
            or requested == self.name
            or requested == self.model_path
            or requested in self.aliases
        )


class GroupConfig(_Strict):
    """Caps how many members hold weights at once."""

    name: str
    max_loaded: Annotated[int, Field(strict=True, ge=1)] | None = None
    idle_unload_trigger_min: Annotated[float, Field(gt=0)] | None = None

    _check_name = field_validator("name")(_check_slug)


class HubConfig(_Strict):
    """The whole hub.yaml."""

    host: str = "0.0.0.0"
    port: Port = 8000
    model_starting_port: Port = 47850
    log_level: LogLevel = "INFO"
    log_path: str = str(DEFAULT_HOME / "logs")
    enable_status_page: bool = True
    drain_timeout: Annotated[float, Field(gt=0)] = 30  # seconds a stop lets running requests finish
    max_restarts: Annotated[int, Field(ge=0)] = 5  # restarts after crashes within 10 minutes before giving up
    offload_path: str | None = None  # backroom folder: base weights move here after a conversion
    max_memory: int | float | str | None = "auto"  # "auto": engine.working_set(); "none" or null: no budget
    api_keys: list[str] = Field(default_factory=list)
    # More names the ports answer to (a LAN name, a reverse proxy's); see web/hosts.py
    allowed_hosts: list[str] = Field(default_factory=list)
    loading_progress: bool = False  # streams that wait say so in the reasoning field (web/waiting.py)
    # The request log (<log_path>/requests.db): days kept (0 turns it off), a row cap, and whether
    # it keeps what was asked and answered (off: prompts stay out of a file that outlives them).
    request_log_days: Annotated[float, Field(ge=0)] = 7
    request_log_max_rows: Annotated[int, Field(strict=True, ge=100)] = 100_000
    request_log_bodies: bool = False
    port_ranges: dict[str, tuple[Port, Port]] = Field(default_factory=dict)
    # unset: $MLX_HUB_PROMPT_CACHE_PATH, else ~/mlx-openai-server-hub/prompt-cache
    prompt_cache_path: str | None = None
    prompt_cache_disk_size: int | str = DEFAULT_PROMPT_CACHE_SIZE  # all models' prompt caches on disk; 0: off
    models: Annotated[list[ModelConfig], Field(min_length=1)]
    groups: list[GroupConfig] = Field(default_factory=list)

    _level = field_validator("log_level", mode="before")(_normalize_level)

    @model_validator(mode="before")
    @classmethod
    def _orchestrator_keys(cls, data: Any) -> Any:
        """Read mlx-server-orch's ``models.yaml`` keys as the hub.yaml keys they stand for.

        ``base_path`` held orch's ``logs/`` folder, so it becomes ``log_path: <base_path>/logs``;
        ``starting_port`` is ``model_starting_port``. The log names the key to write instead.
        """
        if not isinstance(data, dict) or not ({"base_path", "starting_port"} & data.keys()):
            return data
        data = dict(data)
        for old, new in (("base_path", "log_path"), ("starting_port", "model_starting_port")):
            if old not in data:
                continue
            if new in data:
                raise ValueError(f"{old} (mlx-server-orch's name for {new}) contradicts {new}; keep {new}")
            value = data.pop(old)
            if old == "base_path":
                if not isinstance(value, str) or not value:
                    raise ValueError(f"base_path must be a folder, not {value!r}")
                value = str(Path(value) / "logs")
            data[new] = value
            log.warning("hub.yaml key %r is mlx-server-orch's; this hub reads it as %s: %r", old, new, value)
        return data

    @field_validator("max_memory", mode="before")
    @classmethod
    def _memory_size(cls, value: int | float | str | None) -> int | float | str | None:
        if value is not None and not is_budget_word(value):
            memory_bytes(value, total=1)  # the form is checked now; a fraction resolves at start
        return value

    @field_validator("prompt_cache_disk_size", mode="before")
    @classmethod
    def _disk_size(cls, value: Any) -> Any:
        disk_bytes(value)
        return value

    @property
    def prompt_cache_folder(self) -> Path:
        """Where prompt caches persist: ``prompt_cache_path``, ``$MLX_HUB_PROMPT_CACHE_PATH``, or the default."""
        value = (
            self.prompt_cache_path or os.environ.get(PROMPT_CACHE_ENV) or str(DEFAULT_HOME / "prompt-cache")
        )
        return Path(value).expanduser()

    @property
    def prompt_cache_cap(self) -> int:
        """``prompt_cache_disk_size`` in bytes; 0: caches are not kept on disk (upstream's behaviour)."""
        return disk_bytes(self.prompt_cache_disk_size)

    @field_validator("port_ranges", mode="before")
    @classmethod
    def _ranges(cls, value: Any) -> Any:
        """Accept ``team: 47900-47949`` as well as ``team: [47900, 47949]``."""
        if not isinstance(value, dict):
            return value
        out = {}
        for name, span in value.items():
            if isinstance(span, str):
                match = re.fullmatch(r"\s*(\d+)\s*-\s*(\d+)\s*", span)
                if not match:
                    raise ValueError(f"range {name!r} must look like 47900-47949, not {span!r}")
                span = [int(match.group(1)), int(match.group(2))]
            if isinstance(span, list | tuple) and len(span) == 2 and all(type(p) is int for p in span):
                if span[0] > span[1]:
                    raise ValueError(f"range {name!r} starts after it ends ({span[0]} > {span[1]})")
            out[name] = span
        return out

    @field_validator("api_keys")
    @classmethod
    def _keys(cls, value: list[str]) -> list[str]:
        if any(not key.strip() for key in value):
            raise ValueError("api_keys must not contain empty keys")
        return value

    _hosts = field_validator("allowed_hosts")(lambda value: [check_host(v) for v in value])

    @property
    def keys(self) -> frozenset[str]:
        """Every accepted API key: ``api_keys`` plus ``$MLX_HUB_API_KEY`` (comma-separated), read now."""
        keys = {k for k in self.api_keys if k}
        keys.update(k.strip() for k in os.environ.get(KEY_ENV, "").split(",") if k.strip())
        return frozenset(keys)

    def host_of(self, entry: ModelConfig) -> str:
        """The address a model's port listens on: its own ``host``, else the hub's."""
        return entry.host or self.host

    def startup_models(self) -> list[str]:
        """The models ``start`` brings up: the ``default: true`` ones, or every non-JIT one.

        A hub.yaml that never writes ``default`` means "start the daemon and all
        non-JIT models", as the reference hub documents; once any entry writes
        it, ``default`` alone decides.
        """
        if any("default" in m.model_fields_set for m in self.models):
            return [m.name for m in self.models if m.default]
        return [m.name for m in self.models if not m.jit_enabled]

    def group(self, name: str | None) -> GroupConfig | None:
        for group in self.groups:
            if group.name == name:
                return group
        return None

    @property
    def log_dir(self) -> Path:
        return Path(self.log_path)
