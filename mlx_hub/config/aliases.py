"""Model aliases: other names a client may send as ``model`` (``claude-sonnet-4-5``, ``gpt-4o-mini``).

Coding agents and SDK tools hard-code model names the hub does not serve.
An entry's ``aliases`` make each of them mean that entry on ``/v1``,
``/v1/messages`` and the entry's own port, exactly like its name. A name that
routes must mean one entry, so names, explicit ``served_model_name``s and
aliases are checked across the whole file, and an error names both entries.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any


def check_alias(value: Any) -> str:
    """One alias: a non-empty string a client can send as ``model`` (no surrounding spaces)."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"an alias must be a non-empty string, not {value!r}")
    if value != value.strip():
        raise ValueError(f"alias {value!r} has surrounding spaces; a client would not send them")
    return value


def alias_clashes(models: Sequence[Any], line: Callable[[tuple[Any, ...], str], str]) -> list[str]:
    """Every alias that already means another entry (or repeats in its own), as ``line`` writes a problem.

    ``models`` are the entries in file order; ``line((section, index, field), message)``
    names the place. Entry names and explicit ``served_model_name``s are claimed
    first, then aliases in file order.
    """
    owners: dict[str, tuple[int, str]] = {}
    for i, entry in enumerate(models):
        owners.setdefault(entry.name, (i, "name"))
        if entry.served_model_name:
            owners.setdefault(entry.served_model_name, (i, "served_model_name"))
    problems = []
    for i, entry in enumerate(models):
        for alias in entry.aliases:
            owner = owners.get(alias)
            if owner is None:
                owners[alias] = (i, "alias")
                continue
            j, kind = owner
            if j == i and kind != "alias":
                continue  # an alias equal to its own name or served name changes nothing
            other = models[j].name
            what = "an alias of" if kind == "alias" else f"the {kind} of"
            where = "this entry" if j == i else f"model '{other}' (models[{j}])"
            problems.append(line(("models", i, "aliases"), f"'{alias}' is already {what} {where}"))
    return problems
