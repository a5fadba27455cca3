"""The docs stay true to the repository: a short README, links that lead somewhere, an architecture
page that names the modules as they are, and a configuration reference with every hub.yaml field.

Pure file reading, no servers: a rename in the code, a deleted page or a new schema field that nobody
documented fails here, with the name to fix.
"""

from __future__ import annotations

import re
import types
import typing
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import BaseModel

from mlx_hub.config.distributed import DistributedConfig
from mlx_hub.config.schema import GroupConfig, HubConfig, ModelConfig

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "mlx_hub"
README = REPO / "README.md"
DOCS = REPO / "docs"
PAGES = [README, *sorted(DOCS.glob("*.md"))]

#: The README is what a newcomer reads; the rest lives in docs/.
README_MAX_LINES = 350

#: Where docs/configuration.md documents each schema object: the ``## `` heading of its section.
#: A new nested object in the schema needs a section (and a row here).
CONFIG_SECTIONS: dict[type[BaseModel], str] = {
    HubConfig: "Hub level",
    ModelConfig: "Model entry",
    GroupConfig: "Group entry",
    DistributedConfig: "Distributed",
}

#: Top-level folders whose paths the docs name in backticks (`mlx_hub/core/slot.py`, `tests/reliability/`).
REPO_FOLDERS = ("mlx_hub", "tests", "tools", "benchmarks", "static", "examples", "docs")

FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
CODE_SPAN = re.compile(r"`([^`\n]+)`")
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def prose_lines(text: str) -> Iterator[str]:
    """The lines of a Markdown file outside fenced code blocks (a ``# comment`` in a shell block
    is not a heading, and a link in an example is not a link)."""
    fenced = False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            yield line


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = CODE_SPAN.sub(r"\1", heading).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Every heading anchor of a page, numbered as GitHub numbers repeats (``-1``, ``-2``)."""
    seen: dict[str, int] = {}
    out = set()
    for line in prose_lines(page.read_text(encoding="utf-8")):
        match = HEADING.match(line)
        if not match:
            continue
        base = slug(match.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        out.add(base if count == 0 else f"{base}-{count}")
    return out


def links(page: Path) -> Iterator[str]:
    """Every link target of a page's prose, code spans removed first."""
    for line in prose_lines(page.read_text(encoding="utf-8")):
        yield from LINK.findall(CODE_SPAN.sub("", line))


def section(text: str, heading: str) -> str:
    """The text under ``## heading`` up to the next ``## `` heading (subsections included)."""
    lines = list(prose_lines(text))
    starts = [i for i, line in enumerate(lines) if line.strip() == f"## {heading}"]
    assert starts, f"docs/configuration.md has no '## {heading}' section"
    body = []
    for line in lines[starts[0] + 1 :]:
        if line.startswith("## "):
            break
        body.append(line)
    return "\n".join(body)


def documented_fields(text: str) -> set[str]:
    """The names in backticks in the first cell of each table row (``| `a`, `b` | ... |``)."""
    names: set[str] = set()
    for line in text.splitlines():
        cells = line.strip().split("|")
        if line.lstrip().startswith("|") and len(cells) > 2 and not set(cells[1].strip()) <= set("-: "):
            names.update(CODE_SPAN.findall(cells[1]))
    return names


def schema_objects(root: type[BaseModel]) -> list[type[BaseModel]]:
    """``root`` and every pydantic model reachable through its fields' annotations, in order."""
    found: list[type[BaseModel]] = []

    def visit(annotation: object) -> None:
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            if annotation not in found:
                found.append(annotation)
                for field in annotation.model_fields.values():
                    visit(field.annotation)
            return
        for arg in typing.get_args(annotation):
            visit(arg)
        if isinstance(annotation, types.UnionType):
            for arg in annotation.__args__:
                visit(arg)

    visit(root)
    return found


def test_the_readme_is_short() -> None:
    lines = README.read_text(encoding="utf-8").count("\n")
    assert lines <= README_MAX_LINES, (
        f"README.md has {lines} lines, more than {README_MAX_LINES}: move the detail to a page in docs/ "
        "and link it"
    )


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_leads_somewhere(page: Path) -> None:
    broken = []
    for target in links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto: ...
            continue
        path_part, _, anchor = target.partition("#")
        file = (page.parent / path_part).resolve() if path_part else page
        if not file.exists():
            broken.append(
                f"{target}: no file {file.relative_to(REPO) if file.is_relative_to(REPO) else file}"
            )
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(f"{target}: {file.name} has no heading with anchor #{anchor}")
    assert not broken, f"{page.relative_to(REPO)} has broken links:\n" + "\n".join(broken)


def named_paths(page: Path) -> set[str]:
    """Every repository path a page names in backticks (``mlx_hub/core/slot.py``, ``tests/reliability/``)."""
    pattern = re.compile(rf"^(?:{'|'.join(REPO_FOLDERS)})/[\w./-]*$")
    found = set()
    for line in prose_lines(page.read_text(encoding="utf-8")):
        found.update(span for span in CODE_SPAN.findall(line) if pattern.match(span))
    return found


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_path_the_docs_name_exists(page: Path) -> None:
    missing = sorted(p for p in named_paths(page) if not (REPO / p).exists())
    assert not missing, f"{page.relative_to(REPO)} names paths that do not exist: {', '.join(missing)}"


def test_the_architecture_page_names_every_subpackage() -> None:
    page = DOCS / "architecture.md"
    named = {p.rstrip("/") for p in named_paths(page)}
    subpackages = sorted(
        str(init.parent.relative_to(REPO)) for init in PACKAGE.rglob("__init__.py") if init.parent != PACKAGE
    )
    unnamed = [p for p in subpackages if p not in named]
    assert not unnamed, f"docs/architecture.md does not name these subpackages: {', '.join(unnamed)}"
    modules = [p for p in named if p.startswith("mlx_hub/") and p.endswith(".py")]
    assert modules, "docs/architecture.md names no module as `mlx_hub/<path>.py`; the checks would be empty"


def test_the_configuration_reference_has_every_field() -> None:
    text = (DOCS / "configuration.md").read_text(encoding="utf-8")
    objects = schema_objects(HubConfig)
    unplaced = [cls.__name__ for cls in objects if cls not in CONFIG_SECTIONS]
    assert not unplaced, f"give these schema objects a section in docs/configuration.md: {unplaced}"
    problems = []
    for cls in objects:
        heading = CONFIG_SECTIONS[cls]
        documented = documented_fields(section(text, heading))
        fields = set(cls.model_fields)
        for name in sorted(fields - documented):
            problems.append(f"'## {heading}' has no table row for {cls.__name__}.{name}")
        for name in sorted(documented - fields):
            problems.append(f"'## {heading}' documents {name!r}, which {cls.__name__} does not have")
    assert not problems, "docs/configuration.md is out of step with mlx_hub/config/schema.py:\n" + "\n".join(
        problems
    )
