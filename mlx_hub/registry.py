"""Models on this machine and where they are published: the Hugging Face cache and LiteLLM.

``scan`` finds MLX-ready models in the Hugging Face cache (through
``huggingface_hub.scan_cache_dir``, the cache's own reader); ``add_to_config``
appends the missing ones to hub.yaml, the one place the hub edits that file,
keeping its comments and order; ``litellm_model_list`` publishes a hub (or
several running ones) as a LiteLLM ``model_list``.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import struct
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import HubConfig, ModelConfig, load_config
from .engine import WEIGHT_SUFFIXES, hf_cache_repo, model_folder, native_context_length
from .fsutil import atomic_write_text
from .ports import PortBook, connect_host


@dataclass(frozen=True)
class CachedModel:
    """One repo in the Hugging Face cache, at its newest snapshot."""

    repo_id: str
    snapshot: Path
    size_on_disk: int
    architecture: str | None
    quantization_bits: int | None
    mlx_ready: bool
    entry: str | None = None  # the hub.yaml entry serving it, if any
    port: int | None = None


def _safetensors_format(path: Path) -> str | None:
    """The ``format`` in a safetensors file's header metadata (MLX writes ``mlx``)."""
    try:
        with path.open("rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            if length > 100_000_000:
                return None
            header = json.loads(handle.read(length))
    except (OSError, ValueError, struct.error):
        return None
    metadata = header.get("__metadata__") or {}
    return metadata.get("format") if isinstance(metadata, dict) else None


PRECONVERTED_ORGS_ENV = "MLX_PRECONVERTED_ORGS"
PRECONVERTED_HINTS_ENV = "MLX_PRECONVERTED_HINTS"
CONVERT_CMD_ENV = "MLX_CONVERT_CMD"
DEFAULT_PRECONVERTED_ORGS = ("mlx-community", "mlx", "ml-explore")
DEFAULT_PRECONVERTED_HINTS = ("mlx",)


def _env_list(name: str, default: tuple[str, ...]) -> tuple[str, ...]:
    value = os.environ.get(name)
    if value is None:
        return default
    return tuple(item.strip().lower() for item in value.split(",") if item.strip())


def preconverted_by_name(repo_id: str) -> bool:
    """mlxctl's rule: an org that publishes MLX conversions, or a hint word in the repo name.

    Orgs come from ``$MLX_PRECONVERTED_ORGS`` (default ``mlx-community,mlx,ml-explore``),
    hints from ``$MLX_PRECONVERTED_HINTS`` (default ``mlx``), both comma-separated.
    """
    owner, _, name = repo_id.lower().partition("/")
    orgs = _env_list(PRECONVERTED_ORGS_ENV, DEFAULT_PRECONVERTED_ORGS)
    hints = _env_list(PRECONVERTED_HINTS_ENV, DEFAULT_PRECONVERTED_HINTS)
    return owner in orgs or any(hint in name for hint in hints)


def describe(repo_id: str, snapshot: Path, preconverted: str = "auto") -> tuple[str | None, int | None, bool]:
    """Architecture, quantization bits, and whether mlx-lm can load the snapshot as it is.

    MLX-ready: a config.json with weights beside it, and any sign of MLX
    conversion: a ``quantization`` block, MLX safetensors metadata, or the repo
    name (``preconverted_by_name``). ``preconverted`` ``yes``/``no`` overrides
    the signs, as mlxctl's ``--preconverted`` does.
    """
    try:
        config = json.loads((snapshot / "config.json").read_text())
    except (OSError, ValueError):
        return None, None, False
    architectures = config.get("architectures") or []
    architecture = architectures[0] if architectures else config.get("model_type")
    quantization = config.get("quantization") or config.get("quantization_config") or {}
    bits = quantization.get("bits") if isinstance(quantization, dict) else None
    weights = [f for f in snapshot.iterdir() if f.suffix in WEIGHT_SUFFIXES]
    if not weights:
        return architecture, bits, False
    if preconverted != "auto":
        return architecture, bits, preconverted == "yes"
    signs = (
        "quantization" in config
        or preconverted_by_name(repo_id)
        or any(_safetensors_format(f) == "mlx" for f in weights if f.suffix == ".safetensors")
    )
    return architecture, bits, bool(signs)


def scan(cache_dir: str | Path | None = None, config: HubConfig | None = None) -> list[CachedModel]:
    """Every model repo in the cache, newest snapshot first per repo, marked with its hub.yaml entry."""
    from huggingface_hub import scan_cache_dir

    info = scan_cache_dir(cache_dir)
    served: dict[str, tuple[str, int | None]] = {}
    if config is not None:
        ports = PortBook.for_config(config).load()
        for entry in config.models:
            served[entry.model_path] = (entry.name, entry.fixed_port or ports.get(entry.name))
    found = []
    for repo in sorted(info.repos, key=lambda r: r.repo_id.lower()):
        if repo.repo_type != "model" or not repo.revisions:
            continue
        revision = max(repo.revisions, key=lambda r: r.last_modified)
        snapshot = Path(revision.snapshot_path)
        architecture, bits, ready = describe(repo.repo_id, snapshot)
        entry, port = served.get(repo.repo_id) or served.get(str(snapshot)) or (None, None)
        found.append(
            CachedModel(repo.repo_id, snapshot, repo.size_on_disk, architecture, bits, ready, entry, port)
        )
    return found


def entry_name(repo_id: str, taken: set[str]) -> str:
    """A slug for a new hub.yaml entry from a repo id, unique among ``taken``."""
    base = re.sub(r"[^A-Za-z0-9_-]+", "-", repo_id.rsplit("/", 1)[-1]).strip("-_").lower() or "model"
    name, n = base, 2
    while name in taken:
        name, n = f"{base}-{n}", n + 1
    return name


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


# --------------------------------------------------------------------------- ensure / offload

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


# --------------------------------------------------------------------------- what is on disk


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


# --------------------------------------------------------------------------- team ports


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


# --------------------------------------------------------------------------- LiteLLM


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


def token_limits(entry: ModelConfig) -> dict[str, int]:
    """``max_input_tokens`` (the model's real context) and ``max_output_tokens`` (hub.yaml's, else the context)."""
    context = entry.context_length or native_context_length(entry.model_path)
    limits = {}
    if context is not None:
        limits["max_input_tokens"] = context
    output = entry.max_output_tokens or context
    if output is not None:
        limits["max_output_tokens"] = output
    return limits


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
