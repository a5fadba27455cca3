"""hub.yaml: its schema, where it is found, and errors a user can act on.

Every rejection names the file, the entry (model or group name, else its index)
and the field, because a hub.yaml with a dozen models is unreadable from a bare
pydantic traceback. The hub never writes this file; it only reads it.
"""

from __future__ import annotations

import difflib
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .aliases import alias_clashes, check_alias

DEFAULT_HOME = Path("~/mlx-openai-server-hub")
DEFAULT_CONFIG_NAME = "hub.yaml"
CONFIG_ENV = "MLX_HUB_CONFIG"
KEY_ENV = "MLX_HUB_API_KEY"
ORCH_CONFIG_ENV = "MLXSERVER_MODELS_PATH"  # mlx-server-orch's variable, read after the hub's own names
ORCH_CONFIG_NAME = "models.yaml"

log = logging.getLogger(__name__)

SLUG_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")

# strict: YAML's "8000" (a string) is a mistake worth naming, not something to coerce.
Port = Annotated[int, Field(strict=True, ge=1, le=65535)]
LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


#: ``max_memory`` words: ``auto`` (the engine's safe working set) and ``none`` (no budget).
BUDGET_WORDS = ("auto", "none")


def is_budget_word(value: object) -> bool:
    """``max_memory: auto`` or ``max_memory: none`` (any case)."""
    return isinstance(value, str) and value.strip().lower() in BUDGET_WORDS


def memory_bytes(value: int | float | str, total: int | None) -> int:
    """``max_memory`` in bytes: an integer of bytes, a size like ``"48GB"``, or a fraction of ``total``.

    Units are binary whatever their spelling (``48GB`` is 48 GiB), as macOS
    and every memory gauge count memory. A fraction (``0.75`` or ``"0.75"``)
    needs the machine's physical memory, ``total``.
    """
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError("max_memory must be a size like '48GB', a fraction like 0.75, or bytes")
    if isinstance(value, str):
        text = value.strip()
        try:
            value = float(text) if "." in text else int(text)
        except ValueError:
            match = _SIZE.match(text)
            if not match:
                raise ValueError(
                    f"{value!r} is not a size like '48GB', a fraction like 0.75, or bytes"
                ) from None
            unit = (match.group(2) or "").lower().rstrip("b").rstrip("i")
            return int(float(match.group(1)) * _UNITS[unit])
    if isinstance(value, float):
        if not 0 < value <= 1:
            raise ValueError(f"a fraction of physical memory must be between 0 and 1, not {value}")
        if total is None:
            raise ValueError("a fractional max_memory needs the machine's memory size, which is unknown here")
        return int(value * total)
    if value <= 0:
        raise ValueError(f"max_memory must be positive, not {value}")
    return int(value)


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
    aliases: list[str] = Field(default_factory=list)  # more names requests may use (aliases.py)
    loading_progress: bool | None = None  # unset: the hub's; stream "loading ..." lines as reasoning
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
    offload_path: str | None = None  # backroom folder: base weights move here after a conversion
    max_memory: int | float | str | None = "auto"  # "auto": engine.working_set(); "none" or null: no budget
    api_keys: list[str] = Field(default_factory=list)
    loading_progress: bool = False  # streams say what they wait for in the reasoning field (waiting.py)
    port_ranges: dict[str, tuple[Port, Port]] = Field(default_factory=dict)
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


# --------------------------------------------------------------------------- discovery


def default_config_path() -> Path:
    return (DEFAULT_HOME / DEFAULT_CONFIG_NAME).expanduser()


def _named(source: str, value: str) -> Path:
    path = Path(value).expanduser()
    if not path.is_file():
        raise ConfigError([f"{path}: config file named by {source} does not exist"])
    return path.resolve()


def find_config(explicit: str | os.PathLike[str] | None = None) -> Path:
    """Resolve the config path: ``--config``, ``$MLX_HUB_CONFIG``, ``./hub.yaml``, home, then orch's.

    mlx-server-orch's ``$MLXSERVER_MODELS_PATH``, ``./models.yaml`` and
    ``~/mlx-openai-server-hub/models.yaml`` come after the hub's own names, so a
    user moving over keeps working until a hub.yaml exists. A path named by a
    flag or variable that does not exist is an error rather than a silent
    fall-through, so a typo never starts a different hub.
    """
    for source, value in (("--config", explicit), (f"${CONFIG_ENV}", os.environ.get(CONFIG_ENV))):
        if value:
            return _named(source, str(value))
    searched = [Path.cwd() / DEFAULT_CONFIG_NAME, default_config_path()]
    for path in searched:
        if path.is_file():
            return path.resolve()
    orch = os.environ.get(ORCH_CONFIG_ENV)
    if orch:
        return _named(f"${ORCH_CONFIG_ENV}", orch)
    fallback = [Path.cwd() / ORCH_CONFIG_NAME, (DEFAULT_HOME / ORCH_CONFIG_NAME).expanduser()]
    for path in fallback:
        if path.is_file():
            return path.resolve()
    raise ConfigError(
        [
            "no hub.yaml found; looked in "
            + ", ".join(str(p) for p in searched + fallback)
            + f". Pass --config PATH, set ${CONFIG_ENV}, or copy hub.yaml.example there."
        ]
    )


# --------------------------------------------------------------------------- loading


@dataclass(frozen=True)
class _Where:
    """Names the place an error sits, as a person reads hub.yaml."""

    file: str
    raw: dict[str, Any]

    def entry(self, loc: tuple[Any, ...]) -> tuple[str, tuple[Any, ...]]:
        if len(loc) >= 2 and loc[0] in ("models", "groups") and isinstance(loc[1], int):
            section, index = loc[0], loc[1]
            items = self.raw.get(section) or []
            label = f"{section}[{index}]"
            if index < len(items) and isinstance(items[index], dict) and items[index].get("name"):
                label = f"{section[:-1]} {items[index]['name']!r} ({label})"
            return label, loc[2:]
        return "hub", loc

    def line(self, loc: tuple[Any, ...], message: str) -> str:
        """One problem, as ``file: entry: field 'name': message``.

        Names are written with ``repr`` so a key such as ``'`` or an empty one
        still reads unambiguously.
        """
        entry, rest = self.entry(loc)
        field = ".".join(str(p) for p in rest) or "(entry)"
        return f"{self.file}: {entry}: field {field!r}: {message}"


def _known_fields(loc: tuple[Any, ...]) -> list[str]:
    if len(loc) >= 3 and loc[0] == "models":
        return list(ModelConfig.model_fields)
    if len(loc) >= 3 and loc[0] == "groups":
        return list(GroupConfig.model_fields)
    return list(HubConfig.model_fields)


def _describe(error: dict[str, Any]) -> str:
    loc = tuple(error["loc"])
    kind = error["type"]
    if kind == "extra_forbidden":
        key = str(loc[-1])
        hint = difflib.get_close_matches(key, _known_fields(loc), n=1, cutoff=0.6)
        suffix = f"; did you mean '{hint[0]}'?" if hint else ""
        return f"unknown option{suffix}"
    if kind == "missing":
        return "is required"
    message = error["msg"]
    if message.startswith("Value error, "):
        message = message[len("Value error, ") :]
    if "input" in error and kind not in ("model_type", "list_type", "dict_type"):
        message += f" (got {error['input']!r})"
    return message


def _cross_checks(cfg: HubConfig, where: _Where) -> list[str]:
    """Rules that span entries: unique names, group references, port collisions."""
    problems: list[str] = []

    def seen_twice(section: str, names: list[str]) -> None:
        counts: dict[str, list[int]] = {}
        for i, name in enumerate(names):
            counts.setdefault(name, []).append(i)
        for name, idxs in counts.items():
            for i in idxs[1:]:
                problems.append(
                    where.line((section, i, "name"), f"duplicate name '{name}' (first at index {idxs[0]})")
                )

    seen_twice("models", [m.name for m in cfg.models])
    seen_twice("groups", [g.name for g in cfg.groups])

    # An explicit served_model_name is a routing name: it may not stand for two entries.
    owners = {m.name: m.name for m in cfg.models}
    for i, entry in enumerate(cfg.models):
        served = entry.served_model_name
        if served is None:
            continue
        other = owners.get(served)
        if other is not None and other != entry.name:
            problems.append(
                where.line(
                    ("models", i, "served_model_name"), f"'{served}' is already the name of model '{other}'"
                )
            )
        else:
            owners[served] = entry.name
    problems.extend(alias_clashes(cfg.models, where.line))
    problems.extend(_choice_problems(cfg, where))

    group_names = {g.name for g in cfg.groups}
    for i, entry in enumerate(cfg.models):
        if entry.group is not None and entry.group not in group_names:
            known = ", ".join(sorted(group_names)) or "none defined"
            problems.append(
                where.line(("models", i, "group"), f"unknown group '{entry.group}' (groups: {known})")
            )

    claimed: dict[int, str] = {cfg.port: "the hub controller (port)"}
    for i, entry in enumerate(cfg.models):
        if entry.port_range is not None and entry.port_range not in cfg.port_ranges:
            known = ", ".join(sorted(cfg.port_ranges)) or "none defined"
            problems.append(
                where.line(
                    ("models", i, "port"), f"unknown port range '{entry.port_range}' (port_ranges: {known})"
                )
            )
        port = entry.fixed_port
        if port is None:
            continue
        if port in claimed:
            problems.append(
                where.line(("models", i, "port"), f"port {port} is already used by {claimed[port]}")
            )
        else:
            claimed[port] = f"model '{entry.name}'"

    for i, group in enumerate(cfg.groups):
        if group.idle_unload_trigger_min is None:
            continue
        if group.max_loaded is None:
            problems.append(
                where.line(("groups", i, "idle_unload_trigger_min"), "needs max_loaded on the same group")
            )
        not_jit = [m.name for m in cfg.models if m.group == group.name and not m.jit_enabled]
        if not_jit:
            problems.append(
                where.line(
                    ("groups", i, "idle_unload_trigger_min"),
                    "needs every member to set jit_enabled: true; not set on " + ", ".join(not_jit),
                )
            )
    return problems


#: Fields whose value must be one of the names the installed upstream release knows.
CHOICE_FIELDS = ("tool_call_parser", "reasoning_parser", "message_converter")


def _choice_problems(cfg: HubConfig, where: _Where) -> list[str]:
    """Parser and converter names upstream would not recognise, with the names it would.

    Upstream itself lets a misspelt parser through to a model that silently
    never parses tool calls; here it is a config error. The names come from the
    installed release (engine.option_choices), imported only when an entry sets one.
    """
    wanted = [(i, f, getattr(m, f)) for i, m in enumerate(cfg.models) for f in CHOICE_FIELDS if getattr(m, f)]
    if not wanted:
        return []
    from .engine import option_choices  # lazy: the parser tables cost 0.3 s of imports

    choices = option_choices()
    problems = []
    for i, field, value in wanted:
        valid = choices.get(field)
        if valid is not None and value.lower() not in valid:
            problems.append(
                where.line(
                    ("models", i, field), f"unknown name {value!r}; valid names: {', '.join(sorted(valid))}"
                )
            )
    return problems


def _resolve(value: str, base: Path) -> str:
    path = Path(value).expanduser()
    return str(path if path.is_absolute() else (base / path).resolve())


def _looks_local(value: str, base: Path) -> bool:
    """A model_path is a local folder when it is written as one or exists as one.

    Anything else (``mlx-community/Qwen3-4B``) is a Hugging Face repo id and is
    passed through untouched for mlx-lm to resolve from its cache.
    """
    if value.startswith(("~", "/", "./", "../")) or value in (".", ".."):
        return True
    return (base / value).exists()


def _resolve_paths(cfg: HubConfig, base: Path) -> HubConfig:
    models = []
    for entry in cfg.models:
        updates: dict[str, Any] = {}
        for key in ("model_path", "draft_model_path"):
            value = getattr(entry, key)
            if value and _looks_local(value, base):
                updates[key] = _resolve(value, base)
        for key in ("log_file", "chat_template_file", "prompt_cache_dir"):
            value = getattr(entry, key)
            if value:
                updates[key] = _resolve(value, base)
        if entry.lora_paths:
            updates["lora_paths"] = [_resolve(p, base) for p in entry.lora_paths]
        # model_copy(update=) keeps model_fields_set, which the engine reads to
        # tell options a user wrote from defaults.
        models.append(entry.model_copy(update=updates))
    updates: dict[str, Any] = {"models": models, "log_path": _resolve(cfg.log_path, base)}
    if cfg.offload_path:
        updates["offload_path"] = _resolve(cfg.offload_path, base)
    return cfg.model_copy(update=updates)


def parse_config(data: Any, *, source: str = "hub.yaml", base_dir: Path | None = None) -> HubConfig:
    """Validate an already-parsed document; relative paths resolve against ``base_dir``."""
    if data is None:
        raise ConfigError([f"{source}: the file is empty; it needs at least a 'models' list"])
    if not isinstance(data, dict):
        raise ConfigError(
            [f"{source}: the top level must be a mapping of options, not {type(data).__name__}"]
        )
    where = _Where(source, data)
    try:
        cfg = HubConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError([where.line(tuple(e["loc"]), _describe(e)) for e in exc.errors()]) from None
    problems = _cross_checks(cfg, where)
    if problems:
        raise ConfigError(problems)
    return _resolve_paths(cfg, base_dir or Path.cwd())


def log_dir_of(path: str | os.PathLike[str]) -> Path:
    """The ``log_path`` a hub.yaml names, read leniently: the rest of the file may be broken.

    The CLI finds a running hub through its runtime file in ``log_path``; a
    typo elsewhere in hub.yaml must not cut the user off from that hub.
    """
    file = Path(path).expanduser().resolve()
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        data = None
    value = data.get("log_path") if isinstance(data, dict) else None
    if not isinstance(value, str) or not value:
        value = HubConfig.model_fields["log_path"].default
    return Path(_resolve(value, file.parent))


def load_config(path: str | os.PathLike[str]) -> HubConfig:
    """Read, validate and resolve one hub.yaml file."""
    file = Path(path).expanduser()
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{file}: cannot read config file: {exc.strerror or exc}"]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError([f"{file}{where}: not valid YAML: {problem}"]) from None
    return parse_config(data, source=str(file), base_dir=file.resolve().parent)
