"""Source selection: env overrides YAML, CB_DATASETS selects, demo mode only when nothing is configured."""
import pytest

from cb_core.config import ConfigError, DatasetsConfig, resolve_source_paths


def test_demo_mode_when_nothing_configured():
    sel = DatasetsConfig.load().selection(env={})
    assert sel.demo and len(sel.selected) == 6


def test_env_path_selects_only_configured(tmp_path):
    f = tmp_path / "a.jsonl"
    f.write_text("{}\n")
    sel = DatasetsConfig.load().selection(env={"CB_AGENTDOJO_PATH": str(f)})
    assert not sel.demo and sel.selected == ["agentdojo"]
    assert sel.path_for("agentdojo") == str(f)


def test_selected_without_path_names_the_variable():
    sel = DatasetsConfig.load().selection(env={"CB_DATASETS": "agentdojo,xstest"})
    assert sel.selected == ["agentdojo", "xstest"] and not sel.demo
    with pytest.raises(ConfigError, match="CB_AGENTDOJO_PATH"):
        sel.path_for("agentdojo")


def test_unknown_dataset_rejected():
    with pytest.raises(ConfigError, match="unknown source"):
        DatasetsConfig.load().selection(env={"CB_DATASETS": "agentdojo,nope"})


def test_paths_with_spaces_folders_and_globs(tmp_path):
    d = tmp_path / "runs dir"
    d.mkdir()
    a = d / "agentdojo-x (1).jsonl"
    b = d / "agentdojo-y.jsonl"
    a.write_text("{}\n")
    b.write_text("{}\n")
    (d / ".hidden").write_text("")
    assert resolve_source_paths(a) == [a]  # literal name with space and brackets, no glob mangling
    assert resolve_source_paths(d) == [a, b]
    assert resolve_source_paths(str(d / "*y.jsonl")) == [b]
    assert resolve_source_paths(str(d / "missing*.jsonl")) == []


# ------------------------------------------------------------------ CB_CONFIG_DIR and validated values
import json  # noqa: E402
import shutil  # noqa: E402
from pathlib import Path  # noqa: E402

import cb_core.config as config_mod  # noqa: E402
from cb_core.config import config_dir, config_path, load_yaml  # noqa: E402

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def test_empty_dataset_list_is_a_config_error_naming_the_variable():
    with pytest.raises(ConfigError, match=r"CB_DATASETS=',' names no source"):
        DatasetsConfig.load().selection(env={"CB_DATASETS": ","})
    with pytest.raises(ConfigError, match="CB_DATASETS"):
        DatasetsConfig.load().selection(env={"CB_DATASETS": " , ,"})


@pytest.fixture
def configs_copy(tmp_path, monkeypatch):
    """configs/ copied elsewhere and selected with CB_CONFIG_DIR (set after import: read at call time)."""
    dst = tmp_path / "elsewhere" / "my configs"
    shutil.copytree(PROJECT_ROOT / "configs", dst)
    monkeypatch.setenv("CB_CONFIG_DIR", str(dst))
    return dst


def test_config_dir_is_read_at_call_time_and_moves_paths_inside_configs(configs_copy, monkeypatch):
    assert config_dir() == configs_copy.resolve()
    assert config_mod.CONFIG_DIR == configs_copy.resolve()
    # `configs/...` inside a config file follows CB_CONFIG_DIR; other relative paths stay project-relative
    assert config_path("configs/tool_schemas/b4_standard_v1.json") == configs_copy.resolve() / "tool_schemas" / \
        "b4_standard_v1.json"
    assert config_path("data/agentdojo") == PROJECT_ROOT / "data" / "agentdojo"
    assert config_path("/abs/x.json") == Path("/abs/x.json")
    (configs_copy / "datasets.yaml").write_text("sources: {xstest: {path: data/xs}}\n")
    assert DatasetsConfig.load().selection(env={}).paths["xstest"] == str(PROJECT_ROOT / "data" / "xs")
    monkeypatch.delenv("CB_CONFIG_DIR")
    assert config_dir() == PROJECT_ROOT / "configs"
    assert DatasetsConfig.load().selection(env={}).demo  # the project's own datasets.yaml again


def test_edited_schema_in_copied_configs_is_used(configs_copy):
    from cb_core.sources import fujitsu_b4

    schema_file = configs_copy / "tool_schemas" / "b4_standard_v1.json"
    schema = json.loads(schema_file.read_text())
    schema["system_prompt"] = "EDITED system prompt from the copied configs folder."
    schema["tools"][0]["function"]["description"] = "EDITED tool description."
    schema_file.write_text(json.dumps(schema))
    loaded = fujitsu_b4.load_tool_schema(DatasetsConfig.load().fujitsu_b4)
    assert loaded["system_prompt"] == "EDITED system prompt from the copied configs folder."
    assert loaded["tools"][0]["function"]["description"] == "EDITED tool description."


@pytest.mark.parametrize("value, shown", [("5", "5"), ('"ten percent"', "'ten percent'"), ("-0.1", "-0.1"),
                                          ("true", "True"), ("[0.1]", r"\[0.1\]")])
def test_bad_stop_the_line_fraction_names_file_and_key(configs_copy, value, shown):
    (configs_copy / "datasets.yaml").write_text(f"stop_the_line:\n  max_reject_fraction: {value}\n")
    with pytest.raises(ConfigError, match=rf"my configs/datasets.yaml: stop_the_line.max_reject_fraction must be "
                                          rf"a number in \[0, 1\], got {shown}$"):
        DatasetsConfig.load()


def test_project_config_errors_show_the_relative_file(monkeypatch, tmp_path):
    cfg = DatasetsConfig(stop_the_line={"max_reject_fraction": 5})
    with pytest.raises(ConfigError, match=r"^configs/datasets.yaml: stop_the_line.max_reject_fraction must be a "
                                          r"number in \[0, 1\], got 5$"):
        cfg.max_reject_fraction
    assert DatasetsConfig.load().max_reject_fraction == 0.10


@pytest.mark.parametrize("text, match", [
    ("sources: [a, b]\n", r"datasets.yaml: sources must be a mapping, got list"),
    ("sources: {nope: {path: x}}\n", r"datasets.yaml: sources.nope is not a known source"),
    ("sources: {xstest: {path: 5}}\n", r"datasets.yaml: sources.xstest.path must be a string or null, got 5"),
    ("ultrachat: {max_rows: many}\n", r"datasets.yaml: ultrachat.max_rows must be a positive integer"),
    ("- just a list\n", r"datasets.yaml: must be a mapping of keys, got list"),
    ("a: [unclosed\n", r"datasets.yaml: not valid YAML"),
])
def test_malformed_datasets_yaml_names_file_and_key(configs_copy, text, match):
    (configs_copy / "datasets.yaml").write_text(text)
    with pytest.raises(ConfigError, match=match):
        DatasetsConfig.load()


def test_missing_config_file_names_it(configs_copy):
    (configs_copy / "operations.yaml").unlink()
    with pytest.raises(ConfigError, match=r"operations.yaml not found \(CB_CONFIG_DIR="):
        load_yaml("operations.yaml")
    with pytest.raises(FileNotFoundError):  # callers that treat a config file as optional still work
        load_yaml("operations.yaml")
