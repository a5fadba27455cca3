"""Every verb of the three tools this hub replaces, run as their users run them: the real CLI,
real daemons, generated models and a generated Hugging Face cache.

One section per tool (the reference Create-hub, mlx-server-orch, mlxctl), one test per item
of the issue that listed them; docs/migrating.md's "From mlxctl, ..." tables map the same verbs.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml

from mlx_hub.registry.disk import team_ports

from .helpers import Drain, cache_repo, free_port, free_range, hf_checkpoint, text_only

BASE_ENV = {**os.environ, "COLUMNS": "250", "NO_COLOR": "1", "HF_HUB_OFFLINE": "1"}
for _name in ("MLX_HUB_CONFIG", "MLXSERVER_MODELS_PATH", "MLX_CONVERT_CMD", "MLX_PRECONVERTED_ORGS"):
    BASE_ENV.pop(_name, None)


def run(
    *args: str, config: Path | None = None, cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """The CLI as a user types it: ``--config`` only when the test names one."""
    command = [sys.executable, "-m", "mlx_hub.cli", *args]
    if config is not None:
        command += ["--config", str(config)]
    return subprocess.run(
        command, capture_output=True, text=True, timeout=300, env={**BASE_ENV, **(env or {})}, cwd=cwd
    )


def hub_status(port: int) -> dict[str, Any]:
    return httpx.get(f"http://127.0.0.1:{port}/hub/status", timeout=10).json()


def model_row(status: dict[str, Any], name: str) -> dict[str, Any]:
    return next(m["metadata"] for m in status["models"] if m["id"] == name)


def wait_for(check: Any, timeout: float = 30.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def shutdown(config: Path | None = None, **kwargs: Any) -> None:
    done = run("shutdown", config=config, **kwargs)
    assert done.returncode == 0, done.stderr


# ============================================================================ Create-hub


@pytest.fixture(scope="module")
def create_hub(tmp_path_factory: pytest.TempPathFactory, tiny_llama: Path) -> Iterator[dict[str, Any]]:
    """A hub.yaml with no ``default`` anywhere, a group with an idle trigger, and the page off."""
    work = tmp_path_factory.mktemp("create-hub")
    port = free_port()
    doc = {
        "host": "127.0.0.1",
        "port": port,
        "model_starting_port": free_range(),
        "log_path": str(work / "logs"),
        "enable_status_page": False,
        "groups": [{"name": "g", "max_loaded": 2, "idle_unload_trigger_min": 0.03}],
        "models": [
            {"name": "always", "model_path": str(tiny_llama)},
            {"name": "lazy", "model_path": str(tiny_llama), "jit_enabled": True, "group": "g"},
            {
                "name": "sticky",
                "model_path": str(tiny_llama),
                "jit_enabled": True,
                "group": "g",
                "auto_unload_minutes": 30,
            },
        ],
    }
    path = work / "hub.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    started = run("start", config=path)
    try:
        yield {"path": path, "port": port, "work": work, "started": started}
    finally:
        run("shutdown", config=path)


def test_start_without_defaults_starts_every_non_jit_model_and_start_brings_them_back(
    create_hub: dict[str, Any],
) -> None:
    started, path, port = create_hub["started"], create_hub["path"], create_hub["port"]
    assert started.returncode == 0, started.stderr
    status = hub_status(port)
    assert model_row(status, "always")["memory_state"] == "loaded"
    assert {model_row(status, n)["process_state"] for n in ("lazy", "sticky")} == {"inactive"}
    # The page is off, so the banner offers no dashboard URL.
    assert "/hub/" not in started.stdout and "dashboard off" in started.stdout

    assert run("stop", config=path).returncode == 0
    assert model_row(hub_status(port), "always")["process_state"] != "running"
    again = run("start", config=path)
    assert again.returncode == 0, again.stderr
    assert "always: started" in again.stdout
    assert model_row(hub_status(port), "always")["memory_state"] == "loaded"
    assert "every startup model is already running" in run("start", config=path).stdout

    # The dashboard's Start button is the same service action.
    assert run("stop", config=path).returncode == 0
    answer = httpx.post(f"http://127.0.0.1:{port}/hub/service/start", timeout=120).json()
    assert answer["models"] == ["always"] and answer["failed"] == {}


def test_load_model_opens_a_jit_port_and_the_group_trigger_unloads_idle_members(
    create_hub: dict[str, Any],
) -> None:
    path, port = create_hub["path"], create_hub["port"]
    loaded = run("load-model", "lazy", "sticky", config=path)
    assert loaded.returncode == 0, loaded.stdout + loaded.stderr
    status = hub_status(port)
    for name in ("lazy", "sticky"):
        assert model_row(status, name)["process_state"] == "running"
        assert model_row(status, name)["memory_state"] == "loaded"
    # idle_unload_trigger_min (1.8 s) unloads the idle member; sticky's own auto_unload_minutes wins.
    wait_for(
        lambda: model_row(hub_status(port), "lazy")["memory_state"] == "unloaded",
        what="the group's idle trigger",
    )
    assert model_row(hub_status(port), "sticky")["memory_state"] == "loaded"
    shown = run("status", config=path)
    assert shown.returncode == 0, shown.stderr
    assert "group g: 1/2 loaded · idle unload after 0.03 min · lazy, sticky" in shown.stdout


def test_reload_names_new_models_that_did_not_start_and_fails(create_hub: dict[str, Any]) -> None:
    path, work = create_hub["path"], create_hub["work"]
    empty = work / "not-a-model"
    empty.mkdir(exist_ok=True)
    doc = yaml.safe_load(path.read_text())
    doc["models"].append({"name": "broken", "model_path": str(empty)})
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    try:
        done = run("reload", config=path)
        assert done.returncode == 1, done.stdout + done.stderr
        assert "broken did not start:" in done.stderr and "1 model(s) did not start: broken" in done.stderr
    finally:
        doc["models"].pop()
        path.write_text(yaml.safe_dump(doc, sort_keys=False))
        assert run("reload", config=path).returncode == 0


def test_watch_keeps_printing_into_a_pipe(create_hub: dict[str, Any]) -> None:
    command = [sys.executable, "-m", "mlx_hub.cli", "watch", "--interval", "0.5", "--config"]
    proc = subprocess.Popen(
        [*command, str(create_hub["path"])], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=BASE_ENV
    )
    assert proc.stdout is not None
    seen = Drain(proc.stdout)  # read on a thread: a blocking readline would outlast any deadline
    try:
        assert seen.wait_for("every 0.5s", 60, times=3), seen.text
        assert "always" in seen.text
    finally:
        proc.kill()
        proc.wait(timeout=30)


# ============================================================================ mlx-server-orch


def test_an_orch_models_yaml_runs_as_it_did(tmp_path: Path, tiny_llama: Path, tiny_qwen: Path) -> None:
    """base_path/starting_port, $MLXSERVER_MODELS_PATH and ./models.yaml, stop NAME..., help."""
    home, orch, elsewhere = tmp_path / "home", tmp_path / "orch", tmp_path / "elsewhere"
    for folder in (home, orch, elsewhere):
        folder.mkdir()
    port, first = free_port(), free_range()
    (orch / "models.yaml").write_text(
        "# an mlx-server-orch file, unchanged but for host/port\n"
        f"base_path: ./state\nstarting_port: {first}\nhost: 127.0.0.1\nport: {port}\n"
        f"models:\n  - name: one\n    model_path: {tiny_llama}\n    default: true\n"
        f"  - name: two\n    model_path: {tiny_qwen}\n    default: true\n"
    )
    env = {"HOME": str(home)}
    listed = run("models", cwd=orch, env=env)  # ./models.yaml, after ./hub.yaml and ~/…/hub.yaml
    assert listed.returncode == 0, listed.stderr
    assert "one" in listed.stdout and "two" in listed.stdout and str(orch / "models.yaml") in listed.stdout
    assert "'base_path' is mlx-server-orch's" in listed.stderr and "log_path" in listed.stderr

    env["MLXSERVER_MODELS_PATH"] = str(orch / "models.yaml")
    started = run("start", cwd=elsewhere, env=env)
    assert started.returncode == 0, started.stdout + started.stderr
    try:
        logs = orch / "state" / "logs"
        assert (logs / "hub_runtime.json").is_file()  # base_path/logs is the log_path
        status = hub_status(port)
        assert sorted(model_row(status, n)["port"] for n in ("one", "two")) == [first, first + 1]
        assert "this hub reads it as model_starting_port" in (logs / "hub.log").read_text()

        stopped = run("stop", "two", cwd=elsewhere, env=env)
        assert stopped.returncode == 0 and "two: stopped" in stopped.stdout, stopped.stderr
        status = hub_status(port)
        assert model_row(status, "one")["process_state"] == "running"
        assert model_row(status, "two")["process_state"] != "running"
    finally:
        shutdown(cwd=elsewhere, env=env)

    usage = run("help", cwd=elsewhere, env=env)
    assert usage.returncode == 0 and "Commands:" in usage.stdout and "assign-team" in usage.stdout
    one = run("help", "stop", cwd=elsewhere, env=env)
    assert one.returncode == 0 and "Stop NAMES (no NAMES: every model)" in one.stdout
    nested = run("help", "export", "litellm", cwd=elsewhere, env=env)
    assert nested.returncode == 0 and "--via" in nested.stdout
    unknown = run("help", "nope", cwd=elsewhere, env=env)
    assert unknown.returncode == 2 and "no command 'nope'" in unknown.stderr


# ============================================================================ mlxctl


@pytest.fixture(scope="module")
def hf_home(tmp_path_factory: pytest.TempPathFactory, tiny_llama: Path) -> dict[str, Any]:
    """A Hugging Face cache with one MLX model and Hugging Face checkpoints of several orgs."""
    work = tmp_path_factory.mktemp("hf-cache")
    cache = work / "hub"
    checkpoint = hf_checkpoint(tiny_llama, work / "src-hf")
    cache_repo(cache, "acme/tiny-chat", tiny_llama)  # MLX safetensors metadata: ready
    for repo in ("acme/tiny-hf", "acme/other-hf", "mlx-community/tiny-ported"):
        cache_repo(cache, repo, checkpoint)
    return {"cache": cache, "work": work}


def test_load_serves_a_repo_or_folder_in_one_step_and_unload_stops_by_port(
    tmp_path: Path, tiny_llama: Path, tiny_qwen: Path, hf_home: dict[str, Any]
) -> None:
    port, first, team = free_port(), free_range(), free_range(6)
    path = tmp_path / "hub.yaml"
    path.write_text(
        "# my models\n"
        f"host: 127.0.0.1\nport: {port}\nmodel_starting_port: {first}\nlog_path: {tmp_path / 'logs'}\n"
        f"port_ranges:\n  team: {team}-{team + 5}\n"
        f"models:\n  - name: base  # keep me\n    model_path: {tiny_llama}\n    jit_enabled: true\n"
    )
    env = {"HF_HUB_CACHE": str(hf_home["cache"])}
    # No hub yet: `load` starts one serving the new model.
    first_load = run("load", str(tiny_qwen), "auto", "--name", "qwen", config=path, env=env)
    assert first_load.returncode == 0, first_load.stdout + first_load.stderr
    listener = None
    try:
        assert "added 'qwen'" in first_load.stdout and "# keep me" in path.read_text()
        assert model_row(hub_status(port), "qwen")["memory_state"] == "loaded"

        second = run("load", "acme/tiny-chat", "auto:team", config=path, env=env)
        assert second.returncode == 0, second.stdout + second.stderr
        assert "MLX-ready in the Hugging Face cache" in second.stdout
        row = model_row(hub_status(port), "tiny-chat")
        assert row["memory_state"] == "loaded" and team <= row["port"] <= team + 5
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{row['port']}/v1", api_key="none")
        reply = client.chat.completions.create(
            model="tiny-chat",
            messages=[{"role": "user", "content": "Hello"}],
            max_tokens=3,
            extra_body=text_only(tiny_llama),
        )
        assert reply.choices[0].message.content
        again = run("load", "acme/tiny-chat", config=path, env=env)
        assert again.returncode == 0 and "tiny-chat: already loaded" in again.stdout, again.stderr
        by_name = run("load", "tiny-chat", config=path, env=env)  # an entry's name is enough
        assert by_name.returncode == 0 and "tiny-chat: already loaded" in by_name.stdout, by_name.stderr
        assert [m["name"] for m in yaml.safe_load(path.read_text())["models"]] == [
            "base",
            "qwen",
            "tiny-chat",
        ]

        listed = run("list", config=path, env=env)
        assert listed.returncode == 0, listed.stderr
        rows = {line.split()[0]: line for line in listed.stdout.splitlines()[1:] if line.strip()}
        assert "ports from the running hub" in listed.stdout
        assert str(row["port"]) in rows["tiny-chat"] and "acme/tiny-chat" in rows["tiny-chat"]
        assert "hf-cache" in rows["tiny-chat"] and " MB" in rows["tiny-chat"]
        assert "local" in rows["qwen"] and "local" in rows["base"]

        # A stranger on a team port shows up in status.
        listener = socket.socket()
        listener.bind(("127.0.0.1", team + 5))
        listener.listen()
        shown = run("status", config=path)
        assert f"port {team + 5} (range team) is in use by another process" in shown.stdout, shown.stdout

        by_port = run("unload", str(row["port"]), config=path)
        assert by_port.returncode == 0 and "tiny-chat: stopped" in by_port.stdout, by_port.stderr
        nobody = run("unload", "1", config=path)
        assert nobody.returncode == 1 and "no model of this hub is on port 1" in nobody.stderr
        assert run("unload", "qwen", config=path).returncode == 0
        assert run("load-model", "base", config=path).returncode == 0
        everything = run("unload-all", config=path)
        assert everything.returncode == 0 and "stopped base" in everything.stdout, everything.stdout
        status = hub_status(port)
        assert all(m["metadata"]["process_state"] != "running" for m in status["models"])
    finally:
        if listener is not None:
            listener.close()
        shutdown(path)


def test_reconcile_releases_ports_of_removed_models_and_stale_runtime_files(
    tmp_path: Path, tiny_llama: Path
) -> None:
    logs = tmp_path / "logs"
    path = tmp_path / "hub.yaml"
    doc = {
        "host": "127.0.0.1",
        "port": free_port(),
        "model_starting_port": free_range(),
        "log_path": str(logs),
        "models": [
            {"name": "stay", "model_path": str(tiny_llama), "jit_enabled": True, "default": True},
            {"name": "leave", "model_path": str(tiny_llama), "jit_enabled": True, "default": True},
        ],
    }
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    assert run("start", config=path).returncode == 0
    try:
        doc["models"].pop()
        path.write_text(yaml.safe_dump(doc, sort_keys=False))
        assert run("reload", config=path).returncode == 0
        assert "leave" in json.loads((logs / "ports.json").read_text())  # remembered, as before
        done = run("reconcile", config=path)
        assert done.returncode == 0 and "model 'leave' is no longer in hub.yaml" in done.stdout, done.stderr
        assert set(json.loads((logs / "ports.json").read_text())) == {"stay"}
    finally:
        shutdown(path)
    offline = run("list", config=path)  # no hub: the ports come from the port book
    assert offline.returncode == 0 and "ports from the port book" in offline.stdout, offline.stderr
    remembered = json.loads((logs / "ports.json").read_text())["stay"]
    assert any(line.split()[:2] == ["stay", str(remembered)] for line in offline.stdout.splitlines())
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    runtime = {"pid": gone.pid, "host": "127.0.0.1", "port": 1, "config_path": str(path), "started_at": 0}
    (logs / "hub_runtime.json").write_text(json.dumps(runtime))
    stale = run("reconcile", config=path)
    assert stale.returncode == 0 and f"hub pid {gone.pid}, which is no longer running" in stale.stdout
    assert not (logs / "hub_runtime.json").exists()
    assert "nothing to reconcile" in run("reconcile", config=path).stdout


CONVERTER = """
import pathlib, shutil, sys
repo, src, dest = sys.argv[1:]
shutil.copytree(src, dest, dirs_exist_ok=True)
pathlib.Path(dest, "converted_by.txt").write_text(repo)
"""


def test_conversion_follows_mlxctls_rules(tmp_path: Path, hf_home: dict[str, Any]) -> None:
    cache = tmp_path / "hub"
    shutil.copytree(hf_home["cache"], cache, symlinks=True)
    backroom = tmp_path / "backroom"
    path = tmp_path / "hub.yaml"
    path.write_text(
        f"log_path: {tmp_path / 'logs'}\noffload_path: {backroom}\n"
        "models:\n  - name: chat\n    model_path: acme/tiny-chat\n"
    )
    env = {"HF_HUB_CACHE": str(cache)}

    by_org = run("ensure", "mlx-community/tiny-ported", "--convert", "skip", config=path, env=env)
    assert by_org.returncode == 0 and "MLX-ready" in by_org.stdout, by_org.stderr  # the org says so
    other_orgs = {**env, "MLX_PRECONVERTED_ORGS": "acme"}
    refused = run("ensure", "mlx-community/tiny-ported", "--convert", "skip", config=path, env=other_orgs)
    assert refused.returncode == 1 and "not MLX-ready" in refused.stderr
    hinted = {**env, "MLX_PRECONVERTED_ORGS": "", "MLX_PRECONVERTED_HINTS": "tiny"}
    assert run("ensure", "acme/tiny-hf", "--convert", "skip", config=path, env=hinted).returncode == 0
    forced = run("ensure", "acme/tiny-hf", "--preconverted", "yes", "--convert", "skip", config=path, env=env)
    assert forced.returncode == 0 and "MLX-ready" in forced.stdout, forced.stderr
    denied = run(
        "ensure", "acme/tiny-chat", "--preconverted", "no", "--convert", "skip", config=path, env=env
    )
    assert denied.returncode == 1 and "not MLX-ready" in denied.stderr

    script = tmp_path / "convert.py"
    script.write_text(CONVERTER)
    command = {**env, "MLX_CONVERT_CMD": f"{sys.executable} {script} {{repo}} {{src}} {{dest}}"}
    converted = run("ensure", "acme/tiny-hf", config=path, env=command)
    assert converted.returncode == 0, converted.stdout + converted.stderr
    target = cache / "mlx-hub-converted" / "acme--tiny-hf"
    assert (target / "converted_by.txt").read_text() == "acme/tiny-hf"
    assert json.loads((target / "hub_source.json").read_text())["source_repo"] == "acme/tiny-hf"
    # offload_path is set: the base weights leave the cache after the conversion.
    assert "moved to" in converted.stdout and (backroom / "models--acme--tiny-hf").is_dir()
    assert not (cache / "models--acme--tiny-hf").exists()

    kept = run("ensure", "acme/other-hf", "--no-offload", config=path, env=command)
    assert kept.returncode == 0, kept.stderr
    assert (cache / "models--acme--other-hf").is_dir()
    everything = run("offload", "--all", config=path, env=env)
    assert everything.returncode == 0, everything.stderr
    assert (backroom / "models--acme--other-hf").is_dir() and not (cache / "models--acme--other-hf").exists()

    with_bits = run(
        "ensure",
        "mlx-community/tiny-ported",
        "--preconverted",
        "no",
        "--quantize",
        "4",
        config=path,
        env=command,
    )
    assert with_bits.returncode == 1 and "put the quantization flags in that command" in with_bits.stderr


def test_team_order_is_priority_then_largest() -> None:
    sizes = {"small": 10, "big": 30, "mid": 20}
    assert team_ports(["small", "big", "mid"], (100, 105), sizes=sizes, priority=[], reserved={101}) == {
        "big": 100,
        "mid": 102,
        "small": 103,
    }
    assert list(
        team_ports(["small", "big", "mid"], (100, 105), sizes=sizes, priority=["small"], reserved=set())
    ) == [
        "small",
        "big",
        "mid",
    ]
    with pytest.raises(ValueError, match="has 1 free port"):
        team_ports(["a", "b"], (100, 101), sizes={}, priority=[], reserved={100})


def test_assign_team_writes_ports_into_hub_yaml(tmp_path: Path, tiny_llama: Path, small_llama: Path) -> None:
    team = free_range(4)
    path = tmp_path / "hub.yaml"
    text = (
        f"# team models\nlog_path: {tmp_path / 'logs'}\nport_ranges:\n  team: {team}-{team + 3}\nmodels:\n"
        f"  - name: little  # the small one\n    model_path: {tiny_llama}\n    port: auto:team\n"
        f"  - name: large\n    model_path: {small_llama}\n    port: auto:team\n"
        f"  - name: solo\n    model_path: {tiny_llama}\n"
    )
    path.write_text(text)
    dry = run("assign-team", "team", "--dry-run", config=path)
    assert dry.returncode == 0, dry.stderr
    assert path.read_text() == text and "dry run" in dry.stdout
    # Rows are "<port> <name> ...": keep those whose first field is a port of the team's range (a prefix
    # of its digits is not enough: a range from 40399 to 40402 crosses from 403xx to 404xx).
    span = {str(p) for p in range(team, team + 4)}
    lines = [row for row in (line.split() for line in dry.stdout.splitlines()) if row and row[0] in span]
    assert [(int(row[0]), row[1]) for row in lines] == [(team, "large"), (team + 1, "little")]

    done = run("assign-team", "team", "--priority", "little", config=path)
    assert done.returncode == 0, done.stderr
    written = yaml.safe_load(path.read_text())["models"]
    assert {m["name"]: m.get("port") for m in written} == {"little": team, "large": team + 1, "solo": None}
    assert "# the small one" in path.read_text() and (tmp_path / "hub.yaml.bak").read_text() == text
    # Pinned inside the range now, the same models are the team's on the next run.
    assert run("assign-team", "team", "--dry-run", config=path).returncode == 0
    unknown = run("assign-team", "nope", config=path)
    assert unknown.returncode == 2 and "no port range 'nope'" in unknown.stderr


# ============================================================================ gateway export


async def test_request_params_fill_requests_and_reach_the_litellm_export(
    hub_config, tiny_llama: Path
) -> None:
    from mlx_hub import Hub
    from mlx_hub.registry.export import litellm_from_hubs, litellm_model_list

    from .helpers import LiveController

    port = free_port()
    entry = {
        "name": "chat",
        "model_path": str(tiny_llama),
        "request_params": {"max_tokens": 2, "logit_bias": text_only(tiny_llama)["logit_bias"]},
        "max_output_tokens": 100,
    }
    async with LiveController(Hub.from_config(hub_config([entry], port=port)), port) as live:
        url = f"http://127.0.0.1:{live.hub.slots['chat'].port}/v1"
        client = openai.AsyncOpenAI(base_url=url, api_key="none")
        messages = [{"role": "user", "content": "Hello"}]
        filled = await client.chat.completions.create(model="chat", messages=messages)
        assert filled.usage.completion_tokens == 2  # request_params' max_tokens
        own = await client.chat.completions.create(model="chat", messages=messages, max_tokens=4)
        assert own.usage.completion_tokens == 4  # the request's own value wins
        via_v1 = openai.AsyncOpenAI(base_url=f"{live.url}/v1", api_key="none")
        assert (
            await via_v1.chat.completions.create(model="chat", messages=messages)
        ).usage.completion_tokens == 2

        (exported,) = litellm_model_list(live.hub.config)
        assert exported["litellm_params"]["max_tokens"] == 2
        assert exported["model_info"] == {"mode": "chat", "max_input_tokens": 2048, "max_output_tokens": 100}
        import asyncio

        (from_hub,) = await asyncio.to_thread(litellm_from_hubs, [live.url])
        assert from_hub["model_info"] == exported["model_info"]  # --hub keeps the token limits
        assert from_hub["litellm_params"]["max_tokens"] == 2


async def test_a_gpt_oss_entry_gets_its_reasoning_effort_from_request_params(
    hub_config, harmony_model: Path, tmp_path: Path
) -> None:
    """mlxctl's advice for gpt-oss: ``reasoning_effort: low`` as a default request field."""
    from mlx_hub import Hub
    from mlx_hub.testing.tinymodel import HARMONY_CHAT_TEMPLATE

    template = tmp_path / "harmony.jinja"
    template.write_text(HARMONY_CHAT_TEMPLATE)
    gpt_oss = {
        "model_path": str(harmony_model),
        "tool_call_parser": "harmony",
        "reasoning_parser": "harmony",
        "enable_auto_tool_choice": True,
        "chat_template_file": str(template),
    }
    low = {"chat_template_kwargs": {"reasoning_effort": "low"}}
    models = [{"name": "plain", **gpt_oss}, {"name": "low", **gpt_oss, "request_params": low}]
    async with Hub.from_config(hub_config(models)) as hub:  # no default anywhere: both start

        async def prompt_tokens(name: str, **extra: Any) -> int:
            client = openai.AsyncOpenAI(
                base_url=f"http://127.0.0.1:{hub.slots[name].port}/v1", api_key="none"
            )
            reply = await client.chat.completions.create(
                model=name, messages=[{"role": "user", "content": "Hi"}], max_tokens=8, extra_body=extra
            )
            return reply.usage.prompt_tokens

        medium = await prompt_tokens("plain")  # the template's own default: medium
        assert await prompt_tokens("plain", **low) != medium  # the effort changes the prompt
        assert await prompt_tokens("low") == await prompt_tokens("plain", **low)
        high = {"chat_template_kwargs": {"reasoning_effort": "high"}}
        assert await prompt_tokens("low", **high) == await prompt_tokens("plain", **high)  # the request wins


def test_export_litellm_writes_token_limits_and_request_params(tmp_path: Path, tiny_llama: Path) -> None:
    path = tmp_path / "hub.yaml"
    path.write_text(
        f"port: {free_port()}\nlog_path: {tmp_path / 'logs'}\nmodels:\n"
        f"  - name: chat\n    model_path: {tiny_llama}\n    max_output_tokens: 512\n"
        "    request_params: {reasoning_effort: low}\n"
    )
    done = run("export", "litellm", config=path)
    assert done.returncode == 0, done.stderr
    (entry,) = yaml.safe_load(done.stdout)["model_list"]
    assert entry["litellm_params"]["reasoning_effort"] == "low"
    assert entry["model_info"] == {"mode": "chat", "max_input_tokens": 2048, "max_output_tokens": 512}


def test_the_hub_yaml_writer_keeps_the_files_permissions(tmp_path: Path) -> None:
    from mlx_hub.registry.edit import add_entries

    path = tmp_path / "hub.yaml"
    path.write_text("models:\n  - name: a\n    model_path: org/a\n")
    path.chmod(0o644)
    assert add_entries(path, [{"model_path": "org/b"}]) == ["b"]
    assert path.stat().st_mode & 0o777 == 0o644
    assert "default" not in path.read_text()  # the file never wrote default: the writer does not either
