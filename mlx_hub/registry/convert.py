"""Getting a model into MLX form: pre-converted repos as they are, others converted (mlxctl's rules),
and base weights offloaded to another disk once converted."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from mlx_hub.config import HubConfig
from mlx_hub.engine.model_files import hf_cache_repo
from mlx_hub.fsutil import atomic_write_text
from mlx_hub.registry.scan import CONVERT_CMD_ENV, describe

SOURCE_FILE = "hub_source.json"  # written beside converted weights: where they came from


def converted_root() -> Path:
    """Where ``ensure`` keeps conversions: a folder inside the Hugging Face cache."""
    from huggingface_hub.constants import HF_HUB_CACHE

    return Path(HF_HUB_CACHE) / "mlx-hub-converted"


def converted_dir(repo_id: str, bits: int | None) -> Path:
    """One conversion's folder, by repo and bits."""
    suffix = f"-{bits}bit" if bits else ""
    return converted_root() / f"{repo_id.replace('/', '--')}{suffix}"


@dataclass(frozen=True)
class Ensured:
    repo_id: str
    model_path: str  # what hub.yaml should serve: the repo id, or the converted folder
    converted: bool
    source: Path | None = None  # the base weights a conversion was made from


def ensure(
    repo_id: str, *, convert: str = "auto", quantize: int | None = None, preconverted: str = "auto"
) -> Ensured:
    """Make ``repo_id`` servable: download it (or use the cache), convert it to MLX if needed.

    ``convert``: ``auto`` converts only checkpoints that are not MLX-ready,
    ``force`` always converts, ``skip`` never does (and fails for a checkpoint
    that needs it). ``preconverted`` (``auto``/``yes``/``no``) overrides the
    MLX-ready detection. Downloads go through huggingface_hub, so
    ``HF_HUB_OFFLINE=1`` serves from the cache alone. ``$MLX_CONVERT_CMD``
    replaces the in-process ``mlx_lm.convert`` (see ``run_conversion``).
    """
    from huggingface_hub import snapshot_download

    if convert not in ("auto", "force", "skip"):
        raise ValueError("convert must be auto, force or skip")
    if preconverted not in ("auto", "yes", "no"):
        raise ValueError("preconverted must be auto, yes or no")
    snapshot = Path(snapshot_download(repo_id))
    _, _, ready = describe(repo_id, snapshot, preconverted)
    if convert == "skip" or (convert == "auto" and ready and not quantize):
        if not ready:
            raise ValueError(f"{repo_id} is not MLX-ready; run ensure with --convert auto to convert it")
        return Ensured(repo_id, repo_id, converted=False)
    target = converted_dir(repo_id, quantize)
    if not (target / SOURCE_FILE).exists():
        if target.exists():
            shutil.rmtree(target)  # a conversion that did not finish
        target.parent.mkdir(parents=True, exist_ok=True)
        run_conversion(repo_id, snapshot, target, quantize)
        record = {"source_repo": repo_id, "source_snapshot": str(snapshot), "quantize_bits": quantize}
        atomic_write_text(target / SOURCE_FILE, json.dumps(record, indent=2) + "\n")
    return Ensured(repo_id, str(target), converted=True, source=snapshot)


def run_conversion(repo_id: str, source: Path, target: Path, quantize: int | None) -> None:
    """Convert ``source`` into ``target``: ``$MLX_CONVERT_CMD`` when set, else ``mlx_lm.convert``.

    The command is split as a shell would and its ``{repo}``, ``{src}`` and
    ``{dest}`` placeholders filled in (mlxctl's variable, e.g. a pinned
    mlx-lm in another environment). Its own flags decide quantization, so
    ``--quantize`` beside it is refused rather than silently ignored.
    """
    template = os.environ.get(CONVERT_CMD_ENV)
    if not template:
        from mlx_lm import convert as mlx_convert

        mlx_convert(str(source), mlx_path=str(target), quantize=bool(quantize), q_bits=quantize)
        return
    if quantize:
        raise ValueError(
            f"${CONVERT_CMD_ENV} is set: put the quantization flags in that command, not --quantize"
        )
    fields = {"repo": repo_id, "src": str(source), "dest": str(target)}
    try:
        argv = [part.format(**fields) for part in shlex.split(template)]
    except (KeyError, IndexError, ValueError) as exc:
        raise ValueError(
            f"${CONVERT_CMD_ENV} {template!r} is not a command with {{repo}} {{src}} {{dest}} placeholders: {exc}"
        ) from None
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-5:])
        raise ValueError(f"${CONVERT_CMD_ENV} failed (exit code {done.returncode}): {tail}")
    if not (target / "config.json").is_file():
        raise ValueError(f"${CONVERT_CMD_ENV} finished but wrote no config.json into {target}")


def conversion_sources() -> dict[str, list[Path]]:
    """Base repos that conversions were made from, with the converted folders that record them."""
    root = converted_root()
    sources: dict[str, list[Path]] = {}
    for record in sorted(root.glob(f"*/{SOURCE_FILE}")) if root.is_dir() else []:
        try:
            data = json.loads(record.read_text())
        except (OSError, ValueError):
            continue
        sources.setdefault(data.get("source_repo", ""), []).append(record.parent)
    return sources


def offload(repo_or_path: str, to: Path, config: HubConfig) -> Path:
    """Move base weights that no configured model serves from to backroom storage ``to``.

    Only the recorded source of a conversion qualifies, and only while no
    hub.yaml entry points at it (by repo id or into its folder).
    """
    sources = conversion_sources()
    path = Path(repo_or_path).expanduser()
    if path.exists():
        folder = path.resolve()
        repo_id = next((r for r in sources if hf_cache_repo(r).resolve() == folder), None)
    else:
        repo_id = repo_or_path
        folder = hf_cache_repo(repo_or_path).resolve()
    if repo_id is None or repo_id not in sources:
        raise ValueError(
            f"{repo_or_path} is not the recorded source of a converted model; only those are offloaded"
        )
    users = [
        m.name
        for m in config.models
        if m.model_path == repo_id or Path(m.model_path).expanduser().resolve().is_relative_to(folder)
    ]
    if users:
        raise ValueError(f"refusing to move {repo_id}: model(s) {', '.join(users)} serve from it")
    if not folder.is_dir():
        raise ValueError(f"{folder} does not exist (already offloaded?)")
    to.mkdir(parents=True, exist_ok=True)
    destination = to / folder.name
    if destination.exists():
        raise ValueError(f"{destination} already exists; choose another --to")
    shutil.move(str(folder), str(destination))
    return destination


def offload_all(to: Path, config: HubConfig) -> tuple[list[Path], dict[str, str]]:
    """Offload every recorded conversion source still in the cache; returns moved, and skipped with why."""
    moved, skipped = [], {}
    for repo_id in sorted(conversion_sources()):
        if not hf_cache_repo(repo_id).is_dir():
            continue  # offloaded before
        try:
            moved.append(offload(repo_id, to, config))
        except ValueError as exc:
            skipped[repo_id] = str(exc)
    return moved, skipped
