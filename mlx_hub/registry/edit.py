"""hub.yaml's one writer: entries and ports added in place, comments, order and mode kept.

The running hub never writes hub.yaml; these are the CLI's edits, on the user's request."""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from mlx_hub.config import load_config
from mlx_hub.fsutil import atomic_write_text
from mlx_hub.registry.scan import entry_name


@contextmanager
def editing(path: Path) -> Iterator[Any]:
    """Edit hub.yaml as a ruamel document, keeping its comments, order and list style.

    The one place the hub writes hub.yaml (``scan --add``, ``ensure --add``,
    ``load``, ``assign-team``): the body edits the yielded document; if it
    changed anything, the original is copied to ``hub.yaml.bak``, the new text
    is checked by loading it (never a hub.yaml the hub would refuse), and it
    replaces the file atomically.
    """
    from io import StringIO

    from ruamel.yaml import YAML

    yaml = YAML(typ="rt")
    yaml.preserve_quotes = True
    original = path.read_text(encoding="utf-8")
    # Keep the file's own list style: "models:\n  - name:" (indented dashes) or "- name:" flush.
    dash = re.search(r"^( *)- ", original, re.MULTILINE)
    offset = len(dash.group(1)) if dash else 2
    yaml.indent(mapping=2, sequence=offset + 2, offset=offset)
    document = yaml.load(original)
    yield document
    out = StringIO()
    yaml.dump(document, out)
    text = out.getvalue()
    if text == original:
        return
    staged = path.with_name(f".{path.name}.check")
    try:
        staged.write_text(text, encoding="utf-8")
        load_config(staged)
    finally:
        staged.unlink(missing_ok=True)
    shutil.copy2(path, path.with_name(path.name + ".bak"))
    atomic_write_text(path, text)


def add_entries(path: Path, entries: list[dict[str, Any]]) -> list[str]:
    """Append model entries (``model_path`` required; ``name`` made from it when absent) to hub.yaml.

    An entry whose ``model_path`` hub.yaml already serves is skipped. In a file that
    never writes ``default`` the new entries do not either, so which models
    ``start`` brings up stays as it was. Returns the names added.
    """
    from ruamel.yaml.comments import CommentedMap

    added: list[str] = []
    with editing(path) as document:
        models = document.setdefault("models", [])
        taken = {m.get("name") for m in models if isinstance(m, dict)}
        present = {m.get("model_path") for m in models if isinstance(m, dict)}
        # A file that never writes `default` starts every non-JIT model; an added
        # `default: true` would switch that rule off for the models already there.
        keeps_rule = not any(isinstance(m, dict) and "default" in m for m in models)
        for fields in entries:
            if keeps_rule:
                fields = {k: v for k, v in fields.items() if k != "default"}
            if fields["model_path"] in present:
                continue
            name = fields.get("name") or entry_name(fields["model_path"], taken)
            if name in taken:
                raise ValueError(f"hub.yaml already has a model named '{name}'; choose another --name")
            taken.add(name)
            present.add(fields["model_path"])
            entry = CommentedMap()
            entry["name"] = name
            for key, value in fields.items():
                if key != "name":
                    entry[key] = value
            models.append(entry)
            added.append(name)
    return added


def add_to_config(path: Path, repo_ids: list[str]) -> list[str]:
    """Append JIT entries for ``repo_ids`` (``scan --add``, ``ensure --add``). Returns the names added."""
    defaults = {"default": True, "jit_enabled": True, "auto_unload_minutes": 30}
    return add_entries(path, [{"model_path": r, **defaults} for r in repo_ids])


def set_ports(path: Path, ports: dict[str, int]) -> None:
    """Write ``port: N`` into the named entries of hub.yaml (``assign-team``)."""
    with editing(path) as document:
        for entry in document.get("models") or []:
            if isinstance(entry, dict) and entry.get("name") in ports:
                entry["port"] = ports[entry["name"]]
