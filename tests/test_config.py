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
