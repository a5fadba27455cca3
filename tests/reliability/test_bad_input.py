"""Bad input: generated hub.yaml documents and a fuzzed control API.

Every rejection names file, entry and field; a rejected reload changes
nothing; no request to the controller's published API gets a 500.
"""

from __future__ import annotations

import asyncio
import copy
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mlx_hub import Hub
from mlx_hub.config import ConfigError, GroupConfig, HubConfig, ModelConfig, parse_config

from ..helpers import LiveController, free_port, free_range

QUOTED = r"""(?:'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*")"""  # a Python repr of a string
LINE = re.compile(
    r"^hub\.yaml: (the top level must be .+|the file is empty.+|"
    r"(hub|models\[\d+\]|groups\[\d+\]|model .+ \(models\[\d+\]\)|group .+ \(groups\[\d+\]\)): field "
    + QUOTED
    + r": .+)$",
    re.DOTALL,
)
VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 70000),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
    st.lists(st.integers(0, 3), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=1),
)

pytestmark = pytest.mark.reliability  # `make soak` runs these at full length


def entries(known: list[str], required: dict[str, st.SearchStrategy[Any]]) -> st.SearchStrategy[Any]:
    """Entries with real fields, typos and junk values, or not a mapping at all."""
    mapping = st.fixed_dictionaries(
        required, optional={k: VALUES for k in known if k not in required}
    ).flatmap(
        lambda d: st.dictionaries(st.text(min_size=1, max_size=10), VALUES, max_size=2).map(
            lambda extra: {**extra, **d}
        )
    )
    return st.one_of(mapping, VALUES)


MODELS = entries(
    list(ModelConfig.model_fields),
    {
        "name": st.one_of(st.sampled_from(["a", "b", "a", "bad name", ""]), VALUES),
        "model_path": st.sampled_from(["org/x", "./m", ""]),
    },
)
GROUPS = entries(list(GroupConfig.model_fields), {"name": st.sampled_from(["g", "h", "g", "bad name"])})
HUB_KEYS = [k for k in HubConfig.model_fields if k not in ("models", "groups")]
DOCS = st.one_of(
    st.fixed_dictionaries(
        {},
        optional={
            "models": st.one_of(st.lists(MODELS, max_size=3), VALUES),
            "groups": st.lists(GROUPS, max_size=2),
            **{k: VALUES for k in HUB_KEYS},
        },
    ),
    VALUES,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(doc=DOCS)
def test_every_rejection_names_file_entry_and_field(doc: Any) -> None:
    try:
        parse_config(doc, source="hub.yaml", base_dir=Path("/nonexistent-base"))
    except ConfigError as exc:
        assert exc.problems
        for line in exc.problems:
            assert LINE.match(line), line


# ----------------------------------------------------------------- nothing half-applied


@pytest.fixture(scope="module")
def idle_hub(
    tmp_path_factory: pytest.TempPathFactory, tiny_llama: Path
) -> Iterator[tuple[asyncio.AbstractEventLoop, Hub, dict[str, Any]]]:
    logs = tmp_path_factory.mktemp("logs")
    doc = {
        "host": "127.0.0.1",
        "port": free_port(),
        "model_starting_port": free_range(),
        "log_path": str(logs),
        "models": [
            {"name": "a", "model_path": str(tiny_llama), "default": True},
            {"name": "b", "model_path": str(tiny_llama), "jit_enabled": True, "group": "g"},
        ],
        "groups": [{"name": "g", "max_loaded": 1}],
    }
    loop = asyncio.new_event_loop()
    hub = Hub.from_config(doc)
    loop.run_until_complete(hub.start())
    yield loop, hub, doc
    loop.run_until_complete(hub.shutdown())
    loop.close()


FAULTS = st.sampled_from(
    ["unknown key", "port text", "duplicate", "unknown group", "trigger without jit", "slug"]
)


@settings(max_examples=30, deadline=None)
@given(fault=FAULTS, index=st.integers(0, 1))
def test_a_rejected_reload_changes_nothing(idle_hub: Any, fault: str, index: int) -> None:
    loop, hub, doc = idle_hub
    bad = copy.deepcopy(doc)
    model = bad["models"][index]
    if fault == "unknown key":
        model["jit_enabeld"] = True
    elif fault == "port text":
        model["port"] = "47999"
    elif fault == "duplicate":
        bad["models"].append(dict(model))
    elif fault == "unknown group":
        model["group"] = "nope"
    elif fault == "trigger without jit":
        bad["groups"][0]["idle_unload_trigger_min"] = 1
        bad["models"][1]["group"] = "g"
        bad["models"][0]["group"] = "g"
    else:
        model["name"] = "has space"
    config, slots = hub.config, dict(hub.slots)
    handler = hub.slots["a"].handler
    ports = (Path(doc["log_path"]) / "ports.json").read_text()
    with pytest.raises(ConfigError):
        loop.run_until_complete(hub.reload(bad))
    assert hub.config is config and hub.slots == slots and hub.slots["a"].handler is handler
    assert (Path(doc["log_path"]) / "ports.json").read_text() == ports


# ----------------------------------------------------------------- the control API, fuzzed


@pytest.mark.skipif(
    shutil.which("schemathesis", path=os.path.dirname(sys.executable)) is None,
    reason="schemathesis is not installed",
)
async def test_schemathesis_finds_no_server_error(hub_config, tiny_llama: Path) -> None:
    doc = hub_config([{"name": "a", "model_path": str(tiny_llama), "default": True}])
    async with LiveController(Hub.from_config(doc), free_port()) as live:
        process = await asyncio.create_subprocess_exec(
            os.path.join(os.path.dirname(sys.executable), "schemathesis"),
            "run",
            f"{live.url}/openapi.json",
            "--checks",
            "not_a_server_error",
            "--max-examples",
            "15",
            "--exclude-path",
            "/hub/shutdown",
            "--exclude-path",  # streams that stay open by design (tests/test_activity.py covers them)
            "/hub/events",
            "--exclude-path",
            "/hub/logs",
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        out, _ = await asyncio.wait_for(process.communicate(), 600)
    text = out.decode(errors="replace")
    assert process.returncode == 0, text[-3000:]
