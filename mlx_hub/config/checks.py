"""Rules that span hub.yaml's entries, and the words that place each problem in the file."""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from mlx_hub.config.aliases import alias_clashes
from mlx_hub.config.distributed import DistributedConfig, sharded_refusals
from mlx_hub.config.schema import GroupConfig, HubConfig, ModelConfig


@dataclass(frozen=True)
class Where:
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
    if len(loc) >= 4 and loc[0] == "models" and loc[2] == "distributed":
        return list(DistributedConfig.model_fields)
    if len(loc) >= 3 and loc[0] == "models":
        return list(ModelConfig.model_fields)
    if len(loc) >= 3 and loc[0] == "groups":
        return list(GroupConfig.model_fields)
    return list(HubConfig.model_fields)


def describe(error: dict[str, Any]) -> str:
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


def cross_checks(
    cfg: HubConfig, where: Where, choices: Mapping[str, frozenset[str]] | None = None
) -> list[str]:
    """Rules that span entries: unique names, group references, port collisions; and upstream's names
    where ``choices`` (the installed release's) are given."""
    return [
        *_unique_names(cfg, where),
        *_served_names(cfg, where),
        *alias_clashes(cfg.models, where.line),
        *_choice_problems(cfg, where, choices or {}),
        *_group_references(cfg, where),
        *_ports(cfg, where),
        *_group_triggers(cfg, where),
        *_sharded_options(cfg, where),
    ]


def _unique_names(cfg: HubConfig, where: Where) -> list[str]:
    problems = []
    for section, names in (
        ("models", [m.name for m in cfg.models]),
        ("groups", [g.name for g in cfg.groups]),
    ):
        first: dict[str, int] = {}
        for i, name in enumerate(names):
            if name in first:
                problems.append(
                    where.line(
                        (section, i, "name"), f"duplicate name '{name}' (first at index {first[name]})"
                    )
                )
            else:
                first[name] = i
    return problems


def _served_names(cfg: HubConfig, where: Where) -> list[str]:
    """An explicit served_model_name is a routing name: it may not stand for two entries."""
    problems = []
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
    return problems


def _group_references(cfg: HubConfig, where: Where) -> list[str]:
    group_names = {g.name for g in cfg.groups}
    known = ", ".join(sorted(group_names)) or "none defined"
    return [
        where.line(("models", i, "group"), f"unknown group '{entry.group}' (groups: {known})")
        for i, entry in enumerate(cfg.models)
        if entry.group is not None and entry.group not in group_names
    ]


def _ports(cfg: HubConfig, where: Where) -> list[str]:
    problems = []
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
    return problems


def _group_triggers(cfg: HubConfig, where: Where) -> list[str]:
    problems = []
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


def _choice_problems(cfg: HubConfig, where: Where, choices: Mapping[str, frozenset[str]]) -> list[str]:
    """Parser and converter names upstream would not recognise, with the names it would.

    Upstream itself lets a misspelt parser through to a model that silently
    never parses tool calls; here it is a config error. The names are handed in
    by whoever knows the installed release (the engine); config imports none of it.
    """
    wanted = [(i, f, getattr(m, f)) for i, m in enumerate(cfg.models) for f in CHOICE_FIELDS if getattr(m, f)]
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


def _sharded_options(cfg: HubConfig, where: Where) -> list[str]:
    """Options a sharded entry cannot honour, refused now rather than at its first request."""
    problems = []
    for i, model in enumerate(cfg.models):
        if model.distributed is not None:
            for field, why in sharded_refusals(model):
                problems.append(where.line(("models", i, field), f"cannot be used with distributed: {why}"))
    return problems
