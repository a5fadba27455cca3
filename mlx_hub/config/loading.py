"""Finding hub.yaml, reading it, and turning every problem into a line a user can act on.

Every rejection names the file, the entry (model or group name, else its index)
and the field, because a hub.yaml with a dozen models is unreadable from a bare
pydantic traceback. The hub never writes this file; it only reads it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from mlx_hub.config.checks import Where, cross_checks, describe
from mlx_hub.config.schema import (
    CONFIG_ENV,
    DEFAULT_CONFIG_NAME,
    DEFAULT_HOME,
    ORCH_CONFIG_ENV,
    ORCH_CONFIG_NAME,
    ConfigError,
    HubConfig,
)

#: What the installed upstream release accepts for its name options (``engine.option_choices``).
Choices = Mapping[str, frozenset[str]]


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
    for key in ("offload_path", "prompt_cache_path"):
        if getattr(cfg, key):
            updates[key] = _resolve(getattr(cfg, key), base)
    return cfg.model_copy(update=updates)


def parse_config(
    data: Any, *, source: str = "hub.yaml", base_dir: Path | None = None, choices: Choices | None = None
) -> HubConfig:
    """Validate an already-parsed document; relative paths resolve against ``base_dir``.

    ``choices``: the names the installed upstream release accepts for its parser
    and converter options (``Engine.option_choices``); without them those names
    are checked when the engine builds the model.
    """
    if data is None:
        raise ConfigError([f"{source}: the file is empty; it needs at least a 'models' list"])
    if not isinstance(data, dict):
        raise ConfigError(
            [f"{source}: the top level must be a mapping of options, not {type(data).__name__}"]
        )
    where = Where(source, data)
    try:
        cfg = HubConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError([where.line(tuple(e["loc"]), describe(e)) for e in exc.errors()]) from None
    problems = cross_checks(cfg, where, choices)
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


def load_config(path: str | os.PathLike[str], *, choices: Choices | None = None) -> HubConfig:
    """Read, validate and resolve one hub.yaml file (``choices`` as for ``parse_config``)."""
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
    return parse_config(data, source=str(file), base_dir=file.resolve().parent, choices=choices)


ConfigSource = HubConfig | dict[str, Any] | str | os.PathLike[str]


def read_config(source: ConfigSource, choices: Choices | None = None) -> tuple[HubConfig, Path | None]:
    """A ``HubConfig`` from any source a hub takes (an object, a hub.yaml-shaped dict, a path), with the
    path it was read from (None for objects)."""
    if isinstance(source, HubConfig):
        return source, None
    if isinstance(source, dict):
        return parse_config(source, source="<dict>", choices=choices), None
    path = Path(source).expanduser().resolve()
    return load_config(path, choices=choices), path
