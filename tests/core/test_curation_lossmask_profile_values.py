"""configs/curation.yaml, configs/lossmask.yaml and configs/models/*.yaml: every value is checked when the file
is loaded. A bad value, an unknown key or an unknown name is a ConfigError (a ValueError) naming the file and
the key; a bad CB_MODEL / CB_MODEL_PATH names the variable. The shipped files load."""
from __future__ import annotations

import shutil
from dataclasses import fields
from pathlib import Path

import pytest

from cb_core.config import ConfigError, display_path, load_yaml
from cb_core.curate.config import CurationConfig, load_curation_config
from cb_core.lossmask import POLICIES, LossmaskConfig
from cb_core.model import ModelProfile, load_profile, profile_name

SHIPPED = Path(__file__).resolve().parents[2] / "configs"


@pytest.fixture
def cfg_dir(tmp_path, monkeypatch) -> Path:
    """A copy of the files under test in a fresh CB_CONFIG_DIR (no CB_MODEL / CB_MODEL_PATH)."""
    d = tmp_path / "configs"
    d.mkdir()
    for name in ("curation.yaml", "lossmask.yaml"):
        shutil.copy(SHIPPED / name, d / name)
    for sub in ("models", "agentdojo"):
        shutil.copytree(SHIPPED / sub, d / sub)
    monkeypatch.setenv("CB_CONFIG_DIR", str(d))
    for var in ("CB_MODEL", "CB_MODEL_PATH", "CB_CURATION_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    return d


def edit(path: Path, old: str, new: str) -> Path:
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new, 1))
    return path


def refused(call, path: Path, *keys: str) -> str:
    """The ConfigError ``call()`` raises; its message names the file and every one of ``keys``."""
    with pytest.raises(ConfigError) as e:
        call()
    msg = str(e.value)
    assert display_path(path) in msg, msg
    for key in keys:
        assert key in msg, (key, msg)
    return msg


# --------------------------------------------------------------------------------------------- shipped
def test_shipped_files_load(monkeypatch):
    monkeypatch.delenv("CB_CONFIG_DIR", raising=False)
    for var in ("CB_MODEL", "CB_MODEL_PATH", "CB_CURATION_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    for profile in load_yaml("curation.yaml")["profiles"]:
        assert load_curation_config(profile).profile == profile
    assert LossmaskConfig.load().policies == list(POLICIES)
    for p in sorted((SHIPPED / "models").glob("*.yaml")):
        assert load_profile(p.stem).name == p.stem


def test_every_field_has_a_rule():
    """The rule tables follow the dataclasses: a new field without a rule (or a rule without a field) fails."""
    from cb_core.curate.config import RULES, SECTION_RULES, SECTION_TYPES
    from cb_core.model import PROFILE_RULES

    assert set(RULES) | set(SECTION_RULES) == {f.name for f in fields(CurationConfig)} - {"profile"}
    for name, rules in SECTION_RULES.items():
        assert set(rules) == {f.name for f in fields(SECTION_TYPES[name])}
    assert set(PROFILE_RULES) == {f.name for f in fields(ModelProfile)}


# ------------------------------------------------------------------------------------------ curation.yaml
LP = "lossmask_policy: {harmful: null, retain: null}"
HF = "harmful_flip:          {target: 1000, cap: 1000}"
TARGETS = "targets: {harmful: 1000, retain: 4500}"
CURATION = {
    # unknown names
    "unknown policy": (LP, "lossmask_policy: {harmful: nosuch_policy, retain: null}",
                       "training.lossmask_policy.harmful"),
    "unknown category": (LP, "lossmask_policy: {harmfull: assistant_only}", "training.lossmask_policy", "harmfull"),
    "unknown source": ("expected_sources: [fujitsu_b4,", "expected_sources: [fujitsu,", "expected_sources",
                       "'fujitsu'"),
    "unknown generated table": ("generated_tables: [ds_completions,", "generated_tables: [ds_completion,",
                                "generated_tables", "ds_completion"),
    "unknown class": ("refusal:               {target: 150,", "refusals:              {target: 150,",
                      "classes", "refusals"),
    "user tasks not a path": ("configs/agentdojo/user_tasks.json", "[a, b]", "agentdojo_user_tasks", "['a', 'b']"),
    # unknown keys (a typo would silently leave the default in force)
    "class cap typo": (HF, "harmful_flip:          {target: 1000, cpa: 10}", "classes.harmful_flip", "'cpa'"),
    "gate key typo": ("max_duplicate_ids: 0\n      require", "max_duplicate_id: 0\n      require", "gates",
                      "max_duplicate_id"),
    "profile key typo": ("    dr_ratio: 4.5", "    dr_raito: 4.5", "dr_raito"),
    "demo profile key typo": ("    dr_ratio: 4.0", "    dr_ratio: 4.0\n    seeds: 3", "'demo'", "seeds"),
    "top-level key": ("profiles:", "nosuch_top: 1\nprofiles:", "nosuch_top"),
    # types: a quoted value is text; a flag must be a real boolean
    "flag as text": ("require_tool_schemas: true    #", "require_tool_schemas: 'false'    #",
                     "gates.require_tool_schemas"),
    "count as text": (TARGETS, "targets: {harmful: '1000', retain: 4500}", "targets.harmful"),
    "ratio as text": ("dr_ratio: 4.5", "dr_ratio: abc", "dr_ratio"),
    "seed as text": ("seed: 20240611", "seed: abc", "seed"),
    "fraction as text": ("eval_fraction: 0.1", "eval_fraction: '0.1'", "eval_fraction"),
    "stratum count as text": ("min_per_stratum: 20", "min_per_stratum: '20'", "eval_attacks.min_per_stratum"),
    "cap as text": (HF, "harmful_flip:          {target: 1000, cap: abc}", "classes.harmful_flip.cap"),
    "one source, not a list": ("required_sources: []", "required_sources: agentdojo", "required_sources"),
    "class as a list": (HF, "harmful_flip:          [1000, 1000]", "classes.harmful_flip"),
    "section as a list": ("    gates:\n      min_dr_ds_ratio: 1.0\n      min_adversarial_safe: 1\n"
                          "      max_duplicate_ids: 0\n      require_tool_schemas: true", "    gates: [1.0]",
                          "'demo'", "gates must be a mapping"),
    "profiles as a list": (None, "profiles: [default]\n", "profiles must be a mapping"),
    "profile as a list": ("  demo:\n    extends: default", "  demo: [default]\n  old_demo:\n    extends: default",
                          "profiles.demo must be a mapping"),
    # ranges
    "negative target": (TARGETS, "targets: {harmful: -5, retain: 4500}", "targets.harmful", "-5"),
    "NaN gate": ("min_dr_ds_ratio: 4.0", "min_dr_ds_ratio: .nan", "gates.min_dr_ds_ratio", "nan"),
    "fraction above 1": ("max_reserve_fraction: 0.3", "max_reserve_fraction: 7", "eval_attacks.max_reserve_fraction"),
    "eval fraction 1": ("eval_fraction: 0.1", "eval_fraction: 1", "eval_fraction", "[0, 1)"),
    "negative length": ("max_seq_length: 16384", "max_seq_length: -1", "training.max_seq_length", "-1"),
    "zero dr_ratio": ("dr_ratio: 4.5", "dr_ratio: 0", "dr_ratio"),
    "negative cap": (HF, "harmful_flip:          {target: 1000, cap: -1}", "classes.harmful_flip.cap"),
    "required not expected": ("expected_sources: [fujitsu_b4, agentdojo,", "expected_sources: [fujitsu_b4,",
                              "required_sources", "expected_sources"),
}


@pytest.mark.parametrize("case", CURATION)
def test_curation_bad_value_names_file_profile_and_key(cfg_dir, case):
    old, new, *keys = CURATION[case]
    if case == "required not expected":
        edit(cfg_dir / "curation.yaml", "required_sources: []", "required_sources: [agentdojo]")
    path = cfg_dir / "curation.yaml"
    if old is None:
        path.write_text(new)
    else:
        edit(path, old, new)
    profile = "demo" if any("demo" in k for k in keys) else "default"  # the demo profile overrides most of default's values
    msg = refused(lambda: load_curation_config(profile), path, *keys)
    if case not in ("top-level key", "profiles as a list", "profile as a list"):
        assert "profile '" in msg, msg


def test_curation_values_written_in_code_are_checked_too():
    """A dict built in code goes through the same rules (named by profile); only its policy names are free
    (a policy with no masks leaves those traces out, which tests rely on)."""
    base = {"targets": {"harmful": 1, "retain": 2}}
    assert CurationConfig.from_dict({**base, "training": {"lossmask_policy": {"retain": "no_such_policy"}}},
                                    "t").training.lossmask_policy["retain"] == "no_such_policy"
    with pytest.raises(ConfigError, match=r"curation profile 't': targets\.harmful must be a whole number"):
        CurationConfig.from_dict({"targets": {"harmful": "1", "retain": 2}}, "t")
    with pytest.raises(ConfigError, match=r"curation profile 't': targets\.retain is missing"):
        CurationConfig.from_dict({"targets": {"harmful": 1}}, "t")
    with pytest.raises(ConfigError, match=r"curation profile 't': gates\.require_tool_schemas must be true or false"):
        CurationConfig.from_dict({**base, "gates": {"require_tool_schemas": "no"}}, "t")


def test_curation_nulls_that_mean_something_still_load(cfg_dir):
    path = edit(cfg_dir / "curation.yaml", "dr_ratio: 4.5", "dr_ratio: null")
    edit(path, "agentdojo_user_tasks: configs/agentdojo/user_tasks.json", "agentdojo_user_tasks: null")
    edit(path, HF, "harmful_flip:          {target: 1000, cap: null}")
    cfg = load_curation_config("default")
    assert cfg.dr_ratio is None and cfg.agentdojo_user_tasks is None and cfg.class_cap("harmful_flip") == float("inf")
    assert cfg.training.lossmask_policy == LossmaskConfig.load().training_default


# ------------------------------------------------------------------------------------------ lossmask.yaml
TD = "training_default:\n  harmful: cb_from_injection\n  retain: assistant_only"
LOSSMASK = {
    **{f"preview_samples: {v}": ("preview_samples: 3", f"preview_samples: {v}", "preview_samples")
       for v in ("abc", "null", ".nan", "'5'", "2.9", "true", "-4")},
    "policies a number": ("policies: all", "policies: 5", "policies"),
    "policies a mapping": ("policies: all", "policies: {assistant_only: 1, cb_from_injection: 2}", "policies"),
    "one policy, not a list": ("policies: all", "policies: cb_from_injection", "policies"),
    "unknown policy": ("policies: all", "policies: [assistant_only, nope]", "policies", "nope"),
    "training_default a list": (TD, "training_default: [cb_from_injection]", "training_default"),
    "training_default category typo": (TD, "training_default:\n  harmfull: cb_from_injection", "training_default",
                                       "harmfull"),
    "training_default null policy": (TD, "training_default:\n  harmful: null", "training_default.harmful"),
    "training_default unknown policy": (TD, "training_default:\n  harmful: nosuch", "training_default.harmful",
                                        "nosuch"),
    "top-level key typo": ("preview_samples: 3", "preview_sample: 3", "preview_sample"),
}


@pytest.mark.parametrize("case", LOSSMASK)
def test_lossmask_bad_value_names_file_and_key(cfg_dir, case):
    old, new, *keys = LOSSMASK[case]
    path = edit(cfg_dir / "lossmask.yaml", old, new)
    refused(LossmaskConfig.load, path, *keys)


def test_lossmask_bad_value_reaches_curation(cfg_dir):
    """curation.yaml takes the missing categories from lossmask.yaml: that file's error comes through."""
    path = edit(cfg_dir / "lossmask.yaml", "preview_samples: 3", "preview_samples: many")
    refused(lambda: load_curation_config("default"), path, "preview_samples")


def test_lossmask_explicit_missing_file_is_still_a_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        LossmaskConfig.load(tmp_path / "nope.yaml")


# ---------------------------------------------------------------------------------------- model profiles
MODEL = {
    "max_length text": ("max_length: 4096", "max_length: abc", "max_length"),
    "max_length negative": ("max_length: 4096", "max_length: -1", "max_length"),
    "max_length infinite": ("max_length: 4096", "max_length: .inf", "max_length"),
    "seed text": ("seed: 0", "seed: abc", "seed"),
    "flag as text": ("tools_in_user_message: true", "tools_in_user_message: 'false'", "tools_in_user_message"),
    "unquoted date": ('date_string: "26 Jul 2024"', "date_string: 2024-07-26", "date_string"),
    "unknown model": ("model: tiny", "model: huge", "model"),
    "unknown format": ("tool_call_format: python_tag", "tool_call_format: xml  ", "tool_call_format"),
    "key typo": ("max_length: 4096", "max_len: 4096", "max_len"),
    "overrides a list": ("seed: 0", "seed: 0\noverrides: [1]", "overrides"),
    "unknown dtype": ("seed: 0", "seed: 0\ntorch_dtype: bf16", "torch_dtype"),
    "truncation typo": ("steps: [drop_turns, shorten_tool_outputs]", "step: [drop_turns]", "truncation"),
    "local without path": ("model: tiny", "model: local", "path"),
    "top-level list": (None, "- a\n- b\n", "mapping"),
    "bad YAML": ("model: tiny", "model:\ttiny", "not valid YAML"),
}


@pytest.mark.parametrize("case", MODEL)
def test_model_profile_bad_value_names_file_and_key(cfg_dir, case):
    old, new, *keys = MODEL[case]
    path = cfg_dir / "models" / "tiny.yaml"
    if old is None:
        path.write_text(new)
    else:
        edit(path, old, new)
    refused(lambda: load_profile("tiny"), path, *keys)
    refused(lambda: load_profile(str(path)), path, *keys)  # by path: the same checks


def test_model_profile_variables(cfg_dir, monkeypatch):
    monkeypatch.setenv("CB_MODEL", "nosuch")
    with pytest.raises(ConfigError, match=r"CB_MODEL.*'nosuch' not found.*known: \['llama31_8b', 'tiny'") as e:
        load_profile()
    assert isinstance(e.value, FileNotFoundError)  # callers treating a missing profile as optional still work
    with pytest.raises(ConfigError, match="environment variable CB_MODEL"):
        load_profile(profile_name())  # what ModelResource and the training worker do
    monkeypatch.setenv("CB_MODEL", "tiny")
    assert load_profile().name == "tiny"
    with pytest.raises(FileNotFoundError, match="model profile 'nosuch' not found") as e:
        load_profile("nosuch")  # named by the caller, not by CB_MODEL
    assert "CB_MODEL" not in str(e.value)
    monkeypatch.setenv("CB_MODEL_PATH", "   ")
    with pytest.raises(ConfigError, match="environment variable CB_MODEL_PATH must be a non-empty text"):
        load_profile("tiny")
    # a directory that is not there (yet) is looked for when the model is loaded, as for the profile's `path`
    monkeypatch.setenv("CB_MODEL_PATH", str(cfg_dir / "no_model_here"))
    assert load_profile("llama31_8b").path == str(cfg_dir / "no_model_here")
