"""hub.yaml validation: defaults, discovery, path resolution, and errors that point somewhere."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from mlx_hub.config import ConfigError, ModelConfig, find_config, load_config, parse_config
from mlx_hub.engine.handlers import option_choices

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str, name: str = "hub.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def problems(tmp_path: Path, text: str) -> list[str]:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path, choices=option_choices())  # the parser names as the hub hands them in
    for line in info.value.problems:
        assert line.startswith(str(path)), line  # every message names the file
    return info.value.problems


def test_defaults_match_the_reference_hub(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, "models:\n  - name: a\n    model_path: org/repo\n"))
    assert (cfg.host, cfg.port, cfg.model_starting_port, cfg.log_level) == ("0.0.0.0", 8000, 47850, "INFO")
    assert cfg.enable_status_page is True and cfg.groups == []
    assert cfg.log_path == str(Path("~/mlx-openai-server-hub/logs").expanduser())
    m = cfg.models[0]
    assert (m.model_type, m.max_concurrency, m.queue_timeout, m.queue_size) == ("lm", 1, 300, 100)
    assert m.jit_enabled is False and m.default is False and m.port is None and m.auto_unload_minutes is None
    assert m.model_path == "org/repo"  # a repo id is not a path: untouched


@pytest.mark.compat
def test_server_option_defaults_are_upstreams() -> None:
    """Every option the installed release takes defaults to what its own ModelEntryConfig defaults to."""
    import dataclasses

    from app.config import ModelEntryConfig

    from mlx_hub.engine import handlers

    fields = dataclasses.fields(ModelEntryConfig)
    upstream = {f.name: f.default for f in fields if f.init and f.default is not dataclasses.MISSING}
    ours = ModelConfig.model_fields
    shared = [o for o in handlers.upstream_options() if o in upstream]
    assert len(shared) >= 15, shared
    for option in shared:
        assert ours[option].default == upstream[option], option
    assert ours["context_length"].default is None  # no rotating KV cache unless asked for


def test_example_config_loads() -> None:
    cfg = load_config(REPO / "hub.yaml.example")
    assert len(cfg.models) >= 3 and cfg.groups


def test_paths_resolve_relative_to_the_config_file(tmp_path: Path) -> None:
    (tmp_path / "weights").mkdir()
    cfg = load_config(
        write(
            tmp_path,
            "log_path: logs\nmodels:\n"
            "  - {name: a, model_path: ./weights, log_file: a.log, chat_template_file: t.jinja}\n"
            "  - {name: b, model_path: weights}\n"
            "  - {name: c, model_path: ~/m}\n",
        )
    )
    assert cfg.log_path == str(tmp_path / "logs")
    a, b, c = cfg.models
    assert a.model_path == str(tmp_path / "weights") == b.model_path
    assert a.log_file == str(tmp_path / "a.log") and a.chat_template_file == str(tmp_path / "t.jinja")
    assert c.model_path == str(Path("~/m").expanduser())


def test_parser_names_list_every_valid_name(tmp_path: Path) -> None:
    (line,) = problems(tmp_path, "models:\n  - {name: a, model_path: x, tool_call_parser: hermez}\n")
    assert all(name in line for name in option_choices()["tool_call_parser"])
    ok = load_config(
        write(tmp_path, "models:\n  - {name: a, model_path: x, tool_call_parser: Hermes}\n"),
        choices=option_choices(),
    )
    assert ok.models[0].tool_call_parser == "Hermes"  # upstream matches parser names case-insensitively


def test_an_upstream_multi_model_entry_loads_with_only_a_name_added(tmp_path: Path) -> None:
    """A model entry of `mlx-openai-server launch --config` YAML, field for field, plus `name`."""
    (tmp_path / "draft").mkdir()
    cfg = load_config(
        write(
            tmp_path,
            "models:\n"
            "  - name: qwen\n"
            "    model_path: mlx-community/Qwen3-4B-4bit\n"
            "    model_type: lm\n"
            "    served_model_name: qwen3\n"
            "    context_length: 8192\n"
            "    tool_call_parser: qwen3\n"
            "    reasoning_parser: qwen3\n"
            "    enable_auto_tool_choice: true\n"
            "    draft_model_path: ./draft\n"
            "    num_draft_tokens: 3\n"
            "    kv_bits: 8\n"
            "    prompt_cache_size: 4\n"
            "    disable_batching: true\n"
            "    default_temperature: 0.6\n"
            "    default_top_p: 0.95\n"
            "    default_max_tokens: 512\n"
            "    default_seed: 7\n"
            "    on_demand: true\n"
            "    on_demand_idle_timeout: 300\n"
            "  - name: embed\n"
            "    model_path: mlx-community/bge-small\n"
            "    model_type: embeddings\n"
            "    on_demand: true\n",
        )
    )
    qwen, embed = cfg.models
    assert qwen.served_name == "qwen3" and qwen.names == ("qwen3", "qwen", "mlx-community/Qwen3-4B-4bit")
    assert qwen.draft_model_path == str(tmp_path / "draft")
    assert (qwen.default_temperature, qwen.default_max_tokens, qwen.kv_bits) == (0.6, 512, 8)
    assert qwen.jit_enabled and qwen.auto_unload_minutes == 5  # on_demand_idle_timeout is in seconds
    assert embed.jit_enabled and embed.auto_unload_minutes == 1  # upstream's 60 s default
    assert embed.served_name == "mlx-community/bge-small"  # unset: the model_path, as upstream


def test_on_demand_must_agree_with_jit_enabled(tmp_path: Path) -> None:
    (line,) = problems(
        tmp_path, "models:\n  - {name: a, model_path: x, on_demand: true, jit_enabled: false}\n"
    )
    assert "model 'a'" in line and "on_demand" in line and "jit_enabled" in line


def test_unknown_keys_get_a_did_you_mean(tmp_path: Path) -> None:
    lines = problems(
        tmp_path, "prot: 9000\nmodels:\n  - name: qwen\n    model_path: x\n    jit_enable: true\n"
    )
    assert any("hub: field 'prot': unknown option; did you mean 'port'?" in l for l in lines)
    assert any("model 'qwen' (models[0]): field 'jit_enable'" in l and "'jit_enabled'" in l for l in lines)


@pytest.mark.parametrize(
    ("text", "entry", "field", "words"),
    [
        ("models:\n  - {name: 'bad name', model_path: x}\n", "models[0]", "name", "letters, digits"),
        ("models:\n  - {name: a, model_path: x, port: '8001'}\n", "model 'a'", "port", "must be a number"),
        ("models:\n  - {name: a, model_path: x, port: 70000}\n", "model 'a'", "port", "65535"),
        (
            "models:\n  - {name: a, model_path: x, auto_unload_minutes: 5}\n",
            "model 'a'",
            "auto_unload_minutes",
            "jit_enabled",
        ),
        ("models:\n  - {name: a, model_path: x, model_type: llm}\n", "model 'a'", "model_type", "'lm'"),
        ("models:\n  - {name: a}\n", "model 'a'", "model_path", "required"),
        (
            "models:\n  - {name: a, model_path: x}\ngroups:\n  - {name: g, max_loaded: 0}\n",
            "group 'g'",
            "max_loaded",
            "1",
        ),
        ("models: []\n", "hub", "models", "at least 1"),
        ("log_level: LOUD\nmodels:\n  - {name: a, model_path: x}\n", "hub", "log_level", "INFO"),
        ("models:\n  - {name: a, model_path: x, kv_bits: 7}\n", "model 'a'", "kv_bits", "8"),
        ("models:\n  - {name: a, model_path: x, kv_group_size: 48}\n", "model 'a'", "kv_group_size", "64"),
        ("models:\n  - {name: a, model_path: x, default_top_p: 1.5}\n", "model 'a'", "default_top_p", "1"),
        (
            "models:\n  - {name: a, model_path: x, num_draft_tokens: 0}\n",
            "model 'a'",
            "num_draft_tokens",
            "1",
        ),
        ("models:\n  - {name: a, model_path: x, context_length: 0}\n", "model 'a'", "context_length", "1"),
        (
            "models:\n  - {name: a, model_path: x, tool_call_parser: hermez}\n",
            "model 'a'",
            "tool_call_parser",
            "unknown name 'hermez'; valid names: ",
        ),
        (
            "models:\n  - {name: a, model_path: x, reasoning_parser: nope}\n",
            "model 'a'",
            "reasoning_parser",
            "qwen3",
        ),
        (
            "models:\n  - {name: a, model_path: x, message_converter: nope}\n",
            "model 'a'",
            "message_converter",
            "glm4_moe",
        ),
        (
            "models:\n  - {name: a, model_path: x, served_model_name: b}\n  - {name: b, model_path: y}\n",
            "model 'a'",
            "served_model_name",
            "already the name of model 'b'",
        ),
    ],
)
def test_field_errors_name_entry_and_field(
    tmp_path: Path, text: str, entry: str, field: str, words: str
) -> None:
    lines = problems(tmp_path, text)
    assert any(entry in l and f"field '{field}'" in l and words in l for l in lines), lines


def test_cross_entry_rules(tmp_path: Path) -> None:
    lines = problems(
        tmp_path,
        "port: 9000\nmodels:\n"
        "  - {name: a, model_path: x, port: 9100}\n"
        "  - {name: a, model_path: y}\n"
        "  - {name: b, model_path: y, port: 9100, group: nope}\n"
        "  - {name: c, model_path: y, port: 9000, group: g}\n"
        "groups:\n  - {name: g, max_loaded: 1, idle_unload_trigger_min: 5}\n",
    )
    text = "\n".join(lines)
    assert "model 'a' (models[1]): field 'name': duplicate name 'a' (first at index 0)" in text
    assert "model 'b' (models[2]): field 'group': unknown group 'nope'" in text
    assert "model 'b' (models[2]): field 'port': port 9100 is already used by model 'a'" in text
    assert "model 'c' (models[3]): field 'port': port 9000 is already used by the hub controller" in text
    assert (
        "group 'g' (groups[0]): field 'idle_unload_trigger_min': needs every member to set jit_enabled"
        in text
    )


def test_idle_trigger_needs_max_loaded(tmp_path: Path) -> None:
    lines = problems(
        tmp_path,
        "models:\n  - {name: a, model_path: x, jit_enabled: true, group: g}\n"
        "groups:\n  - {name: g, idle_unload_trigger_min: 2}\n",
    )
    assert any("field 'idle_unload_trigger_min': needs max_loaded" in l for l in lines)


def test_yaml_syntax_and_shape_errors(tmp_path: Path) -> None:
    assert re.search(
        r"hub.yaml \(line 3, column 1\): not valid YAML", problems(tmp_path, "models:\n  - name: [a\n")[0]
    )
    assert "empty" in problems(tmp_path, "")[0]
    assert "mapping" in problems(tmp_path, "- a\n- b\n")[0]


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="nope.yaml: cannot read"):
        load_config(tmp_path / "nope.yaml")


def test_discovery_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("MLX_HUB_CONFIG", raising=False)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    with pytest.raises(ConfigError, match="no hub.yaml found"):
        find_config()
    home_cfg = home / "mlx-openai-server-hub" / "hub.yaml"
    home_cfg.parent.mkdir(parents=True)
    home_cfg.write_text("x")
    assert find_config() == home_cfg
    (work / "hub.yaml").write_text("x")
    assert find_config() == work / "hub.yaml"
    env_cfg = write(tmp_path, "x", "env.yaml")
    monkeypatch.setenv("MLX_HUB_CONFIG", str(env_cfg))
    assert find_config() == env_cfg
    flag_cfg = write(tmp_path, "x", "flag.yaml")
    assert find_config(str(flag_cfg)) == flag_cfg
    with pytest.raises(ConfigError, match="--config does not exist"):
        find_config(str(tmp_path / "typo.yaml"))
    monkeypatch.setenv("MLX_HUB_CONFIG", str(tmp_path / "gone.yaml"))
    with pytest.raises(ConfigError, match=r"\$MLX_HUB_CONFIG does not exist"):
        find_config()


def test_parse_config_accepts_a_dict() -> None:
    cfg = parse_config({"models": [{"name": "a", "model_path": "org/r", "log_level": "debug"}]})
    assert cfg.models[0].log_level == "DEBUG"


@pytest.mark.parametrize("value", ["48GB", "512MiB", 1073741824, 0.75, "0.5"])
def test_max_memory_forms(value: object) -> None:
    cfg = parse_config(
        {"max_memory": value, "models": [{"name": "a", "model_path": "org/r", "pinned": True}]}
    )
    assert cfg.max_memory == value and cfg.models[0].pinned is True


@pytest.mark.parametrize("value", ["lots", "1.5", 0, -5, True, [1], {"a": 1}])
def test_max_memory_errors_name_the_field(tmp_path: Path, value: object) -> None:
    import yaml

    lines = problems(
        tmp_path, yaml.safe_dump({"max_memory": value, "models": [{"name": "a", "model_path": "x"}]})
    )
    assert any("hub: field 'max_memory'" in line for line in lines), lines


def test_empty_api_key_is_rejected(tmp_path: Path) -> None:
    lines = problems(tmp_path, "api_keys: ['ok', ' ']\nmodels:\n  - {name: a, model_path: x}\n")
    assert any("field 'api_keys'" in line and "empty" in line for line in lines)


def test_port_ranges_and_auto_ports(tmp_path: Path) -> None:
    cfg = parse_config(
        {
            "port_ranges": {"team": "47900-47949", "exp": [48000, 48099]},
            "models": [
                {"name": "a", "model_path": "x", "port": "auto:team"},
                {"name": "b", "model_path": "x", "port": 47860},
            ],
        }
    )
    assert cfg.port_ranges == {"team": (47900, 47949), "exp": (48000, 48099)}
    assert cfg.models[0].port_range == "team" and cfg.models[0].fixed_port is None
    assert cfg.models[1].fixed_port == 47860 and cfg.models[1].port_range is None
    lines = problems(
        tmp_path,
        "port_ranges: {team: 47900-47949, bad: 5-1}\nmodels:\n  - {name: a, model_path: x, port: 'auto:nope'}\n",
    )
    assert any("hub: field 'port_ranges'" in line and "starts after it ends" in line for line in lines), lines
    lines = problems(
        tmp_path,
        "port_ranges: {team: 47900-47949}\nmodels:\n  - {name: a, model_path: x, port: 'auto:nope'}\n",
    )
    assert any("field 'port': unknown port range 'nope' (port_ranges: team)" in line for line in lines), lines
    lines = problems(tmp_path, "models:\n  - {name: a, model_path: x, port: 'later'}\n")
    assert any("field 'port'" in line and "auto:<range>" in line for line in lines), lines
