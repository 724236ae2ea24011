"""Source selection: env overrides YAML, CB_DATASETS selects, demo mode only when nothing is configured."""
import pytest
import yaml

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
    with pytest.raises(ConfigError, match=rf"my configs/datasets.yaml:2: stop_the_line.max_reject_fraction must be "
                                          rf"a number in \[0, 1\], got {shown}$"):
        DatasetsConfig.load()


def test_project_config_errors_show_the_relative_file(monkeypatch, tmp_path):
    assert DatasetsConfig.load().max_reject_fraction == 0.10
    # the project's own file, read just now: its key's line is named with the relative path
    line = next(i for i, text in enumerate((config_dir() / "datasets.yaml").read_text().splitlines(), 1)
                if text.strip().startswith("max_reject_fraction:"))
    cfg = DatasetsConfig(stop_the_line={"max_reject_fraction": 5})
    with pytest.raises(ConfigError, match=rf"^configs/datasets.yaml:{line}: stop_the_line.max_reject_fraction must "
                                          r"be a number in \[0, 1\], got 5$"):
        cfg.max_reject_fraction


@pytest.mark.parametrize("text, match", [
    ("sources: [a, b]\n", r"datasets.yaml:1: sources must be a mapping, got list"),
    ("sources: {nope: {path: x}}\n", r"datasets.yaml:1: sources.nope is not a known source"),
    ("sources: {xstest: {path: 5}}\n", r"datasets.yaml:1: sources.xstest.path must be a string or null, got 5"),
    ("ultrachat: {max_rows: many}\n", r"datasets.yaml:1: ultrachat.max_rows must be a positive integer"),
    ("- just a list\n", r"datasets.yaml: must be a mapping of keys, got list"),
    ("a: [unclosed\n", r"datasets.yaml: not valid YAML"),
    # a misspelt key would leave its default in force (here: the demo sample instead of the data)
    ("sources: {xstest: {pth: /data/xstest}}\n", r"datasets.yaml:1: sources.xstest: unknown key 'pth' \(did you mean 'path'\?\)"),
    ("stop_the_line: {max_reject_fractoin: 0.5}\n", r"stop_the_line: unknown key 'max_reject_fractoin' \(did you mean"),
    ("ultrachat: {max_row: 5}\n", r"datasets.yaml:1: ultrachat: unknown key 'max_row' \(did you mean 'max_rows'\?\)"),
    ("fujitsu_b4: {tool_shema: x.json}\n", r"fujitsu_b4: unknown key 'tool_shema' \(did you mean 'tool_schema'\?\)"),
    ("tau2s: {}\n", r"datasets.yaml:1: unknown key 'tau2s' \(did you mean 'tau2'\?\)"),
    # one text is not a list: `airline` would be read as its letters
    ("tau2: {domains: airline}\n", r"datasets.yaml:1: tau2.domains must be a list of texts"),
    ("fujitsu_b4: {required_fields: combined_query}\n", r"fujitsu_b4.required_fields must be a list of texts"),
    ("fujitsu_b4: {tool_schema: configs/tool_schemas/nosuch.json}\n", r"fujitsu_b4.tool_schema: file .*nosuch.json not found"),
    ("agentdojo: {tool_schemas_version: 5}\n", r"agentdojo.tool_schemas_version must be a non-empty text"),
    ("llmail_inject: {email_separator: 5}\n", r"llmail_inject.email_separator must be a text, got 5"),
    ("xstest: {path: x}\n", r"datasets.yaml:1: xstest: unknown key 'path'"),
    ("ultrachat: {max_rows: 5}\nultrachat: {max_rows: 6}\n", r"datasets.yaml: not valid YAML: duplicate key 'ultrachat' on line 2 \(first given on line 1\)"),
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


def test_shipped_datasets_yaml_loads_with_every_source_setting_checked():
    cfg = DatasetsConfig.load()
    assert cfg.fujitsu_b4["required_fields"] and cfg.agentdojo["tool_schemas_version"] == "auto"
    assert cfg.max_reject_fraction == 0.10


def test_a_key_given_twice_is_refused_in_every_config_kind(tmp_path):
    """PyYAML keeps the last copy of a repeated key without a word: a second `train:` block replaced the
    first. Every config loader goes through cb_core.config.safe_load, which refuses it with its line."""
    from cb_core.config import safe_load
    from cb_core.sweep.manifest import SweepError, load_manifest
    from cb_core.train.config import TrainConfigError, load_train_config

    with pytest.raises(yaml.YAMLError, match=r"duplicate key 'a' on line 3 \(first given on line 1\)"):
        safe_load("a: 1\nb: {c: 2}\na: 3\n")
    with pytest.raises(yaml.YAMLError, match="duplicate key 'c'"):
        safe_load("b: {c: 2, c: 3}\n")
    assert safe_load("base: &b {x: 1, y: 2}\nd:\n  <<: *b\n  x: 5\n")["d"] == {"x": 5, "y": 2}  # merges may override
    with pytest.raises(yaml.constructor.ConstructorError):
        safe_load("!!python/object/apply:os.system [echo pwned]\n")
    preset = tmp_path / "p.yaml"
    preset.write_text("train: {steps: 40}\nmodel: {profile: tiny}\ntrain: {steps: 5}\n")
    with pytest.raises(TrainConfigError, match=r"p.yaml: invalid YAML: duplicate key 'train'"):
        load_train_config(str(preset))
    manifest = tmp_path / "m.yaml"
    manifest.write_text("preset: tiny\noverrides: {train.steps: 2}\noverrides: {train.steps: 3}\n")
    with pytest.raises(SweepError, match="duplicate key 'overrides'"):
        load_manifest(str(manifest))


@pytest.mark.parametrize("env, value, kind, rules, match", [
    ("CB_X", "abc", int, {}, r"environment variable CB_X must be a whole number, got 'abc'"),
    ("CB_X", "1m", int, {"lo": 1}, r"environment variable CB_X must be a whole number"),
    ("CB_X", "-3", int, {"lo": 0}, r"environment variable CB_X must be >= 0, got -3"),
    ("CB_X", "x", float, {}, r"environment variable CB_X must be a number, got 'x'"),
    ("CB_X", "nan", float, {"lo": 0}, r"environment variable CB_X must be a finite number"),
    ("CB_X", "STOPED", str, {"choices": ("RUNNING", "STOPPED")}, r"CB_X must be one of \['RUNNING', 'STOPPED'\]"),
])
def test_setting_checks_an_environment_value_naming_the_variable(monkeypatch, env, value, kind, rules, match):
    from cb_core.config import setting

    monkeypatch.setenv(env, value)
    with pytest.raises(ConfigError, match=match):
        setting(env, "operations.yaml", "renders", "num_workers", None, kind, **rules)


@pytest.mark.parametrize("text, kind, rules, match", [
    ("renders: {num_workers: -3}\n", int, {"lo": 0}, r"operations.yaml:1: renders.num_workers \(or \$CB_X\) must be >= 0"),
    ("renders: {num_workers: '2'}\n", int, {"lo": 0}, r"renders.num_workers \(or \$CB_X\) must be a whole number, got '2'"),
    ("renders: {num_workers: .nan}\n", float, {}, r"renders.num_workers \(or \$CB_X\) must be a finite number"),
    ("renders: [1]\n", int, {}, r"operations.yaml:1: renders must be a mapping"),
])
def test_setting_checks_a_file_value_naming_file_key_and_variable(configs_copy, monkeypatch, text, kind, rules, match):
    from cb_core.config import setting

    monkeypatch.delenv("CB_X", raising=False)
    (configs_copy / "operations.yaml").write_text(text)
    with pytest.raises(ConfigError, match=match):
        setting("CB_X", "operations.yaml", "renders", "num_workers", None, kind, **rules)


def test_setting_values_that_pass(configs_copy, monkeypatch):
    from cb_core.config import setting

    (configs_copy / "operations.yaml").write_text("renders: {num_workers: null}\nadapter_checks: {kl_eps: 2}\n")
    monkeypatch.delenv("CB_X", raising=False)
    assert setting("CB_X", "operations.yaml", "renders", "num_workers", 7, int, lo=0) == 7  # null: the default
    assert setting("CB_X", "operations.yaml", "adapter_checks", "kl_eps", 1e-4, float, lo=0) == 2.0
    monkeypatch.setenv("CB_X", " 3 ")
    assert setting("CB_X", "operations.yaml", "renders", "num_workers", None, int, lo=0) == 3


@pytest.mark.parametrize("text, match", [
    ("renders: {num_wrokers: 2}\n", r"operations.yaml:1: renders: unknown key 'num_wrokers' \(did you mean 'num_workers'\?\)"),
    ("source_sensor: {default_status: RUNNING}\nrender: {}\n", r"operations.yaml:2: unknown key 'render' \(did you mean 'renders'\?\)"),
])
def test_operations_yaml_refuses_unknown_keys(configs_copy, text, match):
    from cb_assets.automation import check_operations_file

    check_operations_file()  # the shipped file passes
    (configs_copy / "operations.yaml").write_text(text)
    with pytest.raises(ConfigError, match=match):
        check_operations_file()
