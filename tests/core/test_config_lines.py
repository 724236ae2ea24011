"""Config errors name the line of the key they are about (``file:line: key ...``), for every kind of config
file: datasets/operations (load_yaml), training presets, sweep manifests, MWCS schedules."""
import pytest

from cb_core.config import ConfigError, load_yaml, located, read_config
from cb_core.mixture import MixtureError, MixtureSchedule
from cb_core.sweep.manifest import SweepError, load_manifest
from cb_core.train.config import TrainConfigError, load_train_config, presets_dir

PRESET = (presets_dir() / "tiny.yaml").read_text()


def _line(path, needle: str) -> int:
    return next(i for i, text in enumerate(path.read_text().splitlines(), 1) if needle in text)


def test_a_bad_value_deep_in_a_block_preset_names_its_line(tmp_path):
    p = tmp_path / "p.yaml"
    flow = next(t for t in PRESET.splitlines() if t.startswith("train: {"))
    block = "train:\n  steps: 40\n  batch_size: 4\n\n  grad_accum: 1\n  lr: fast\n  max_grad_norm: 1.0"
    p.write_text("# a preset in block style\n" + PRESET.replace(flow, block))
    with pytest.raises(TrainConfigError, match=rf"^{p}:{_line(p, 'lr: fast')}: train\.lr must be a finite number"):
        load_train_config(str(p))


def test_an_unknown_key_names_its_own_line_not_its_sections(tmp_path):
    d = tmp_path / "datasets.yaml"
    d.write_text("# sources\nsources:\n  xstest:\n    path: null\n\n  agentdojo:\n    path: null\n    paht: x\n")
    with pytest.raises(ConfigError, match=rf"^{d}:8: sources\.agentdojo: unknown key 'paht' \(did you mean 'path'\?\)"):
        from cb_core.config import DatasetsConfig
        DatasetsConfig.load(d)


def test_a_sweep_axis_and_an_unknown_top_key_name_their_lines(tmp_path):
    m = tmp_path / "m.yaml"
    m.write_text("name: t\npreset: tiny\ngrid:\n  lr: [1e-4]\n  bogus_axis: [1, 2]\n")
    with pytest.raises(SweepError, match=rf"^{m}:5: grid: grid axis 'bogus_axis'"):
        load_manifest(str(m))
    m.write_text("name: t\n\npreset: tiny\nbase: x\ngrid: {lr: [1e-4]}\n")
    with pytest.raises(SweepError, match=rf"^{m}:4: unknown keys \['base'\]"):
        load_manifest(str(m))


def test_a_key_the_file_lacks_gets_no_invented_line(tmp_path):
    m = tmp_path / "m.yaml"
    m.write_text("name: t\ngrid: {lr: [1e-4]}\n")
    with pytest.raises(SweepError, match=rf"^{m}: preset: required"):
        load_manifest(str(m))


def test_an_mwcs_schedule_error_names_its_line(tmp_path):
    s = tmp_path / "s.yaml"
    s.write_text("name: x\nclass_weights:\n  adversarial_safe: 2.0\n  harmful_flip: -1\n")
    with pytest.raises(MixtureError, match=rf"^{s}:4: class_weights\.harmful_flip: weight must be"):
        MixtureSchedule.load(s)
    s.write_text("name: x\ncurriculum:\n  type: step\n  phases:\n    - {name: a, start_step: 0, end_step: 5}\n"
                 "    - {name: b, start_step: 0, end_step: 5, colour: red}\n")
    with pytest.raises(MixtureError, match=rf"^{s}:6: curriculum\.phases\[1\]: unknown keys \['colour'\]"):
        MixtureSchedule.load(s)


def test_the_line_follows_the_file_as_it_is_read_again(tmp_path):
    f = tmp_path / "o.yaml"
    f.write_text("renders:\n  num_workers: -1\n")
    load_yaml(f)
    assert located(f"{f}: renders.num_workers must be >= 0") == f"{f}:2: renders.num_workers must be >= 0"
    f.write_text("\n\nrenders:\n\n  num_workers: -1\n")
    read_config(f)
    assert located(f"{f}: renders.num_workers must be >= 0") == f"{f}:5: renders.num_workers must be >= 0"


def test_messages_about_no_file_read_here_are_unchanged(tmp_path):
    assert located("<dict>: train.lr must be a finite number") == "<dict>: train.lr must be a finite number"
    assert located(f"{tmp_path / 'never.yaml'}: train.lr bad") == f"{tmp_path / 'never.yaml'}: train.lr bad"
    f = tmp_path / "o.yaml"
    f.write_text("renders: {num_workers: 2}\n")
    read_config(f)
    # a message that starts with no key of the file, and a key path that is not there at all
    assert located(f"{f}: must be a mapping of keys") == f"{f}: must be a mapping of keys"
    assert located(f"{f}: training.preset: unknown") == f"{f}: training.preset: unknown"
    assert located(f"{f}: renders.nope must be") == f"{f}:1: renders.nope must be"  # its section's line


def test_a_curation_profile_value_names_its_line_or_its_profiles(tmp_path, monkeypatch):
    from cb_core.curate.config import load_curation_config

    cfg = tmp_path / "configs"
    cfg.mkdir()
    monkeypatch.setenv("CB_CONFIG_DIR", str(cfg))
    (cfg / "curation.yaml").write_text(
        "profiles:\n"
        "  base:\n"
        "    gates:\n"
        "      min_adversarial_safe: many\n"
        "  child:\n"
        "    extends: base\n"
        "    eval_fraction: 0.2\n")
    with pytest.raises(ConfigError, match=r"curation\.yaml:4: profile 'base': gates\.min_adversarial_safe must be"):
        load_curation_config("base")
    # inherited from `base`: the message names the child profile and the line where the value is written
    with pytest.raises(ConfigError, match=r"curation\.yaml:4: profile 'child' \(inherited from profile 'base'\): "
                                          r"gates\.min_adversarial_safe must be"):
        load_curation_config("child")


# --- found by the line audit: each names the key's own line (or none where the file does not hold the value)
def test_a_preset_unknown_top_level_key_or_field_names_its_own_line(tmp_path):
    p = tmp_path / "p.yaml"
    p.write_text(PRESET + "\nlogg: {every: 1}\n")
    with pytest.raises(TrainConfigError, match=rf"^{p}:{_line(p, 'logg:')}: unknown top-level keys \['logg'\]"):
        load_train_config(str(p))
    p.write_text(PRESET.replace("  centroid: ema\n", "  centroid: ema\n  centriod_decay: 0.5\n"))
    with pytest.raises(TrainConfigError, match=rf"^{p}:{_line(p, 'centriod_decay')}: loss: unknown fields"):
        load_train_config(str(p))


def test_a_preset_value_no_override_touches_keeps_its_line(tmp_path):
    p = tmp_path / "p.yaml"
    p.write_text(PRESET.replace("lr: 1.0e-3", "lr: fast"))
    with pytest.raises(TrainConfigError, match=rf"^{p}:{_line(p, 'lr: fast')}: train\.lr must be"):
        load_train_config(str(p), ["train.steps=5"])
    with pytest.raises(TrainConfigError, match=rf"^{p} \+ overrides \['train\.lr'\]: train\.lr must be"):
        load_train_config(str(p), ["train.lr=slow"])  # the override's value: no line of the file


def test_an_mwcs_block_phase_and_an_unknown_class_name_their_lines(tmp_path):
    s = tmp_path / "s.yaml"
    s.write_text("name: x\nclass_weights:\n  benign_twin: 1.0\n  harmfull_flip: 1.0\n")
    with pytest.raises(MixtureError, match=rf"^{s}:4: class_weights: unknown class 'harmfull_flip'"):
        MixtureSchedule.load(s)
    s.write_text("name: x\ncurriculum:\n  type: step\n  phases:\n    - name: a\n      start_step: 0\n"
                 "      end_step: -5\n")
    with pytest.raises(MixtureError, match=rf"^{s}:7: curriculum\.phases\[0\] \(a\)\.end_step"):
        MixtureSchedule.load(s)


def test_a_curation_profile_unknown_key_names_its_own_line(tmp_path, monkeypatch):
    from cb_core.curate.config import load_curation_config

    monkeypatch.setenv("CB_CONFIG_DIR", str(tmp_path))
    (tmp_path / "curation.yaml").write_text("profiles:\n  default:\n    seed: 1\n    # c\n\n    sed: 2\n")
    with pytest.raises(ConfigError, match=r"curation\.yaml:6: profile 'default': unknown key 'sed'"):
        load_curation_config("default")


def test_merges_and_aliases(tmp_path):
    f = tmp_path / "o.yaml"
    f.write_text("a: &g\n  x: 1\nb:\n  <<: *g\n  x: 2\n")  # b.x overrides the merged x: its own line
    read_config(f)
    assert located(f"{f}: b.x bad") == f"{f}:5: b.x bad"
    f.write_text("renders: &a\n  num_workers: [*a]\n")  # a recursive alias is read, not a RecursionError
    data = read_config(f)
    assert data["renders"]["num_workers"][0] is data["renders"]
    rows = ["a: &a [x, x, x, x, x, x, x, x]"] + [f"{n}: &{n} [" + ", ".join([f"*{p}"] * 8) + "]"
                                                  for p, n in zip("abcdefgh", "bcdefghi")]
    f.write_text("\n".join(rows) + "\n")  # 8^9 paths through the aliases: each node is walked once
    read_config(f)
    assert located(f"{f}: i[3][1] bad") == f"{f}:8: i[3][1] bad"  # the alias item's node: where `h` is written


def test_a_sweep_points_values_name_the_manifest_line(tmp_path):
    m = tmp_path / "m.yaml"
    m.write_text("name: t\npreset: stage1\noverrides:\n  train.steps: many\ngrid:\n  alpha: [5]\n")
    with pytest.raises(SweepError, match=rf"^{m}:4: overrides\.train\.steps: point "):
        load_manifest(str(m)).expand()
    m.write_text("name: t\npreset: stage1\ngrid:\n  alpha: [5]\n  train.lr:\n    - 1.0e-4\n    - fast\n")
    with pytest.raises(SweepError, match=rf"^{m}:7: grid\.train\.lr\[1\]: point "):
        load_manifest(str(m)).expand()
    m.write_text("name: t\npreset: stge1\ngrid: {alpha: [5]}\n")
    with pytest.raises(SweepError, match=rf"^{m}:2: preset: training preset 'stge1' not found"):
        load_manifest(str(m))
    m.write_text("name: t\npreset: stage1\noverrides: {train.steps: 5}\ngrid: {alpha: [5]}\n")
    with pytest.raises(SweepError, match=rf"^overrides given with {m}: grid axis 'Bogus'"):  # not the file's
        load_manifest(str(m), {"Bogus": 1})


def test_a_model_profile_truncation_value_names_its_line(tmp_path):
    from cb_core.model import load_profile

    p = tmp_path / "m.yaml"
    p.write_text("name: m\nmodel: tiny\ntruncation:\n  steps: [drop_turns, cutt]\n")
    with pytest.raises(ConfigError, match=rf"^{p}:4: truncation\.steps: unknown \['cutt'\]"):
        load_profile(str(p))
