"""Training presets and overrides: every field is checked by its annotated type and FIELD_RULES when loaded; a
bad value is a TrainConfigError naming the preset file or the override, the field, and what was found."""
from __future__ import annotations

import re
import shutil
from dataclasses import fields

import pytest

from cb_core.train.config import (FIELD_RULES, SECTIONS, TrainConfigError, _HINTS, _unnull, from_dict, load_train_config,
                                  presets_dir)

PRESETS = sorted(p.stem for p in presets_dir().glob("*.yaml"))


def refused(override: str) -> str:
    """The message ``load_train_config("tiny", [override])`` fails with (it must name the preset file, the
    override and the field)."""
    field = override.split("=", 1)[0]
    with pytest.raises(TrainConfigError) as e:
        load_train_config("tiny", [override])
    msg = str(e.value)
    assert "tiny.yaml" in msg and f"overrides ['{field}']" in msg, msg
    assert re.search(rf"{re.escape(field)}(\[\d+\])? must be", msg), msg
    return msg


@pytest.mark.parametrize("name", PRESETS)
def test_every_shipped_preset_loads(name):
    cfg, _, _ = load_train_config(name)
    assert cfg.train.lr > 0 and not isinstance(cfg.train.lr, bool)


@pytest.mark.parametrize("override", ["train.lr=true", "train.max_grad_norm=false", "loss.gamma_kl=true",
                                      "lora.alpha=true", "train.steps=true", "loss.target_layers=[true, 2]",
                                      "lora.layers_to_transform=[0, false]"])
def test_a_boolean_is_not_a_number(override):
    assert "(bool)" in refused(override)


def test_a_boolean_number_in_a_preset_file_names_the_file(tmp_path, monkeypatch):
    cfg_dir = tmp_path / "configs"
    shutil.copytree(presets_dir().parent, cfg_dir)
    p = cfg_dir / "train" / "tiny.yaml"
    p.write_text(p.read_text().replace("lr: 1.0e-3", "lr: true"))
    monkeypatch.setenv("CB_CONFIG_DIR", str(cfg_dir))
    line = next(i for i, text in enumerate(p.read_text().splitlines(), 1) if "lr: true" in text)
    with pytest.raises(TrainConfigError, match=rf"train/tiny\.yaml:{line}: train\.lr must be a finite number, got True \(bool\)"):
        load_train_config("tiny")


@pytest.mark.parametrize("override, found", [
    ("train.lr=nan", "nan"), ("train.lr=inf", "inf"), ("train.lr=-1e-3", "-0.001"), ("train.lr=0", "0"),
    ("train.max_grad_norm=nan", "nan"), ("train.max_grad_norm=0", "0"), ("train.warmup_steps=-10", "-10"),
    ("train.keep_checkpoints=0", "0"), ("train.throttle_s=-1", "-1"), ("train.seed=-1", "-1"),
    ("train.weight_decay=-0.1", "-0.1"), ("log.every=0", "0"), ("log.generation_tokens=-5", "-5"),
    ("model.max_length=0", "0"), ("lora.r=0", "0"), ("lora.dropout=5", "5"), ("lora.dropout=1", "1"),
    ("lora.alpha=nan", "nan"), ("loss.gamma_kl=nan", "nan"), ("loss.kl_temperature=inf", "inf"),
    ("loss.kl_temperature=0", "0"), ("loss.margin_scale=-2", "-2"), ("loss.alpha_benign=-1", "-1"),
    ("loss.centroid_decay=1", "1"), ("train.harmful_fraction=1", "1"), ("lora.layers_to_transform=[-3]", "-3"),
    ("loss.target_layers=[0, 2]", "0"), ("lora.target_modules=[]", "[]"), ("loss.target_layers=[]", "[]"),
])
def test_non_finite_and_out_of_range_values_are_refused(override, found):
    assert f"got {found}" in refused(override)


@pytest.mark.parametrize("override, found", [
    ("model.profile=5", "5 (int)"), ("model.profile=null", "None"), ("model.profile=[a]", "['a'] (list)"),
    ("model.dtype=null", "None"), ("data.mwcs_schedule={a: 1}", "{'a': 1} (dict)"),
    ("data.mask_policy=5", "5 (int)"), ("train.selection_metric=null", "None"),
    ("train.selection_metric=5", "5 (int)"), ("log.wandb_project=1e3", "1000.0 (float)"),
    ("log.wandb_project=[a]", "['a'] (list)"), ("lora.layers_to_transform=5", "5 (int)"),
    ("lora.layers_to_transform=[a]", "'a' (str)"), ("lora.target_modules={q_proj: 1}", "{'q_proj': 1} (dict)"),
    ("lora.target_modules=q_proj", "'q_proj' (str)"), ("loss.target_layers=5", "5 (int)"),
    ("loss.mode=null", "None"), ("log.wandb=null", "None"), ("train.steps=2.5", "2.5 (float)"),
    ("lora.target_modules=[q_proj, nope]", "'nope'"), ("loss.centroid=nope", "'nope'"),
])
def test_text_null_and_list_fields_are_checked_by_their_annotation(override, found):
    assert f"got {found}" in refused(override)


@pytest.mark.parametrize("override, value", [
    ("data.mwcs_schedule=null", None), ("data.mask_policy=null", None), ("loss.margin_scale=null", None),
    ("lora.layers_to_transform=null", None), ("train.lr=3e-5", 3e-5), ("train.lr=1", 1.0),
    ("train.steps=1e3", 1000), ("loss.gamma_kl=0", 0.0), ("train.warmup_steps=0", 0), ("lora.dropout=0.0", 0.0),
    ("loss.target_layers=[1,2]", [1, 2]), ("lora.layers_to_transform=[0,1,2,3]", [0, 1, 2, 3]),
])
def test_values_in_range_and_null_where_annotated_still_load(override, value):
    cfg, _, _ = load_train_config("tiny", [override])
    sec, name = override.split("=")[0].split(".")
    got = getattr(getattr(cfg, sec), name)
    assert got == value and type(got) is type(value)


def test_a_dict_built_config_names_its_source_and_field():
    with pytest.raises(TrainConfigError, match=r"^<dict>: lora\.r must be >= 1, got 0$"):
        from_dict({"lora": {"r": 0}})


def test_every_number_field_has_a_range():
    """A numeric field added without a FIELD_RULES entry would take any finite value (e.g. a negative count)."""
    numeric = {f"{sec}.{f.name}" for sec, cls in SECTIONS.items() for f in fields(cls)
               if _unnull(_HINTS[sec][f.name])[0] in (int, float)}
    assert numeric - set(FIELD_RULES) == set()
    assert set(FIELD_RULES) <= {f"{sec}.{f.name}" for sec, cls in SECTIONS.items() for f in fields(cls)}


@pytest.mark.parametrize("override, match", [
    ("model.profile=nosuch", r"model.profile: model profile 'nosuch' not found .*known: \[.*'tiny'"),
    ("data.mwcs_schedule=nosuch", r"data.mwcs_schedule: MWCS schedule 'nosuch' not found"),
])
def test_a_profile_or_schedule_that_does_not_exist_is_refused_at_load(override, match):
    """Found when the config loads, not when the worker starts: a sweep expands (and checks) every point before
    launching any."""
    with pytest.raises(TrainConfigError, match=match):
        load_train_config("tiny", [override])
    for ok in ("data.mwcs_schedule=curriculum_example", "data.mwcs_schedule=configs/mwcs/default.yaml",
               "model.profile=tiny_agent"):
        load_train_config("tiny", [ok])


def test_target_layers_deeper_than_the_profile_are_refused_at_load(tmp_path):
    """`LAYER_CONFIGS=1,200` on the tiny sweep passed its dry run and registration; every point then failed when
    its worker had loaded the model. The depth comes from the profile without loading weights."""
    from cb_core.model import profile_depth

    with pytest.raises(TrainConfigError, match=r"loss.target_layers: \[1, 3\]: model profile 'tiny_agent' has 2 "
                                               r"layers \(hidden_states\[0..2\]\)"):
        load_train_config("tiny", ["loss.target_layers=[1,3]"])
    load_train_config("tiny", ["loss.target_layers=[1,2]"])
    load_train_config("tiny", ["model.profile=tiny", "loss.target_layers=[2,4]"])  # the random tiny model: 4
    with pytest.raises(TrainConfigError, match="model profile 'tiny' has 4 layers"):
        load_train_config("tiny", ["model.profile=tiny", "loss.target_layers=[5]"])
    # a local directory: its config.json; not on this machine: not known, not checked
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text('{"num_hidden_layers": 32}')
    prof = tmp_path / "local.yaml"
    prof.write_text(f"name: local\nmodel: local\npath: {tmp_path / 'm'}\ntokenizer: llama3\n")
    assert profile_depth(str(prof)) == 32
    prof.write_text(f"name: local\nmodel: local\npath: {tmp_path / 'absent'}\ntokenizer: llama3\n")
    assert profile_depth(str(prof)) is None


def test_one_key_overridden_twice_with_two_values_is_refused():
    """`--override train.lr=1e-3 --override train.lr=2e-3` trained at 2e-3 without a word, where a preset file
    with the key twice is refused."""
    with pytest.raises(TrainConfigError, match=r"override 'train.lr=2e-3': train.lr is also given as "
                                               r"'train.lr=1e-3'; give each key once"):
        load_train_config("tiny", ["train.lr=1e-3", "train.lr=2e-3"])
    cfg, _, _ = load_train_config("tiny", ["train.lr=1e-3", "train.lr=0.001"])  # one value, written twice
    assert cfg.train.lr == 1e-3
