"""What each configured model occupies on disk and where it came from (``list``), and port teams."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from mlx_hub.engine.model_files import hf_cache_repo, model_folder
from mlx_hub.registry.convert import SOURCE_FILE


@dataclass(frozen=True)
class OnDisk:
    """Where one configured model's files are and where they came from (``list``)."""

    size: int | None  # bytes on disk; None when the files are not here
    repo: str | None  # the Hugging Face repo it is, or was converted from
    source: str  # hf-cache, local, converted, or missing
    origin: str | None  # for a conversion: what it was made from


def folder_size(folder: Path) -> int:
    """Bytes of the files under ``folder``, each counted once (the cache's snapshots are symlinks to blobs)."""
    seen: set[Path] = set()
    total = 0
    for file in folder.rglob("*"):
        try:
            real = file.resolve()
            if real in seen or not real.is_file():
                continue
            seen.add(real)
            total += real.stat().st_size
        except OSError:
            continue
    return total


def on_disk(model_path: str) -> OnDisk:
    """Size, repo, source and conversion origin of one ``model_path``."""
    folder = model_folder(model_path)
    if folder is None:
        repo = (
            model_path if model_path.count("/") == 1 and not model_path.startswith(("/", "~", ".")) else None
        )
        return OnDisk(None, repo, "missing", None)
    record = folder / SOURCE_FILE
    if record.is_file():
        try:
            data = json.loads(record.read_text())
        except (OSError, ValueError):
            data = {}
        bits = data.get("quantize_bits")
        origin = f"{data.get('source_repo', '?')}" + (f" ({bits}-bit)" if bits else "")
        return OnDisk(folder_size(folder), data.get("source_repo"), "converted", origin)
    if Path(model_path).expanduser().is_dir():
        return OnDisk(folder_size(folder), None, "local", None)
    return OnDisk(folder_size(hf_cache_repo(model_path)), model_path, "hf-cache", None)


def team_ports(
    members: list[str],
    span: tuple[int, int],
    *,
    sizes: dict[str, int | None],
    priority: list[str],
    reserved: set[int],
) -> dict[str, int]:
    """mlxctl's team order: the ``priority`` names first (in their order), then largest on disk first.

    Ports go out from the low end of ``span``, skipping ``reserved`` (the
    controller, ports pinned outside the team). Pure, for tests.
    """
    ranked = [n for n in priority if n in members]
    rest = sorted((n for n in members if n not in ranked), key=lambda n: (-(sizes.get(n) or 0), n))
    order = ranked + rest
    free = [p for p in range(span[0], span[1] + 1) if p not in reserved]
    if len(free) < len(order):
        raise ValueError(
            f"range {span[0]}-{span[1]} has {len(free)} free port(s) for {len(order)} model(s); widen it"
        )
    return dict(zip(order, free, strict=False))
