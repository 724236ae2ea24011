"""Sweep manifests: expansion counts, keys, shared overrides, the ignored-axis rejection."""
import json

import pytest
import yaml

from cb_core.sweep.manifest import SweepError, final_points, from_dict, load_manifest, point_from_row
from cb_core.train.config import load_train_config


def test_preset_counts_and_settings():
    full = load_manifest("full").expand()
    assert len(full) == 3 * 4 * 5
    assert len({p.key for p in full}) == 60
    assert {tuple(p.overrides["loss.target_layers"]) for p in full} == {(10, 20), (8, 16, 24), (12, 18), (6, 12, 18, 24)}
    assert {p.overrides["data.mask_policy"] for p in full} == {
        "assistant_only", "assistant_and_tool", "cb_full_sequence", "tool_calls_only", "completion_only"}
    assert all(p.overrides["train.steps"] == 200 for p in full)
    quick = load_manifest("quick")
    qp = quick.expand()
    assert [p.overrides["loss.alpha"] for p in qp] == [5, 10]
    assert quick.eval == {"limit": 20} and all(p.overrides["train.steps"] == 50 for p in qp)
    simple = load_manifest("simple").expand()
    assert len(simple) == 3 and {p.overrides["data.mask_policy"] for p in simple} == {"cb_full_sequence"}
    tiny = load_manifest("tiny").expand()
    assert len(tiny) == 2


def test_points_resolve_to_training_configs():
    p = load_manifest("quick").expand()[1]
    cfg, _, _ = load_train_config(p.preset, p.override_strings())
    assert cfg.loss.alpha == 10.0 and cfg.loss.target_layers == [10, 20]
    assert cfg.data.mask_policy == "assistant_only" and cfg.train.steps == 50


def test_keys_readable_stable_and_hash_every_override():
    a = load_manifest("quick").expand()
    b = load_manifest("quick").expand()
    assert [p.key for p in a] == [p.key for p in b]
    assert a[0].key.startswith("quick-a5-L10.20-assistant_only-")
    c = load_manifest("quick", {"train.lr": 1e-4}).expand()  # a shared override changes every key
    assert {p.key for p in a}.isdisjoint({p.key for p in c})
    assert all(p.overrides["train.lr"] == 1e-4 for p in c)
    assert all(len(p.key) <= 120 and all(ch.isalnum() or ch in "_.-" for ch in p.key) for p in a + c)


def test_equal_hyper_parameters_are_one_point():
    """`1` and `1.0`, `1e-3` (a string to YAML 1.1) and `0.001` train the same adapter: one key, one point."""
    m = from_dict({"name": "eq", "preset": "tiny", "grid": {"beta_harmful": [1, 1.0, 2], "train.lr": ["1e-3", 0.001]}})
    pts = m.expand()
    assert len(pts) == 2
    assert {p.key.rsplit("-", 1)[0] for p in pts} == {"eq-bh1-lr0.001", "eq-bh2-lr0.001"}


def test_row_round_trip():
    p = load_manifest("full").expand()[7]
    back = point_from_row(p.row())
    assert back.overrides == p.overrides and back.key == p.key and back.axes == json.loads(p.row()["axes"])


def test_alpha_under_triplet_full_rejected():
    with pytest.raises(SweepError, match=r"triplet_full.*ignores loss.alpha.*alpha_benign / beta_harmful"):
        from_dict({"name": "bad", "preset": "tiny", "grid": {"alpha": [5, 10]}}).expand()
    # the same axis under a loss mode that reads it is fine
    assert len(from_dict({"name": "ok", "preset": "tiny",
                          "grid": {"loss_mode": ["legacy_cb"], "alpha": [5, 10]}}).expand()) == 2
    # a mode axis mixing modes: alpha is ignored by one of them
    with pytest.raises(SweepError, match="triplet_full"):
        from_dict({"name": "mix", "preset": "stage1",
                   "grid": {"loss_mode": ["legacy_cb", "triplet_full"], "alpha": [5]}}).expand()
    # triplet weights under legacy_cb are ignored too
    with pytest.raises(SweepError, match="legacy_cb.*beta_harmful"):
        from_dict({"name": "bad2", "preset": "stage1", "grid": {"beta_harmful": [1, 2]}}).expand()
    # split per loss mode: a list of grids
    m = from_dict({"name": "split", "preset": "stage1", "grid": [
        {"loss_mode": ["legacy_cb"], "alpha": [5, 10]},
        {"loss_mode": ["triplet_full"], "beta_harmful": [1.0, 2.0], "train.batch_size": [16]}]})
    assert len(m.expand()) == 4


def test_bad_manifests_name_the_key(tmp_path):
    with pytest.raises(SweepError, match="unknown keys"):
        from_dict({"name": "x", "preset": "tiny", "grid": {"lr": [1]}, "gird": {}})
    with pytest.raises(SweepError, match=r"grid.lr: expected a non-empty list"):
        from_dict({"name": "x", "preset": "tiny", "grid": {"lr": 1e-4}})
    with pytest.raises(SweepError, match="not a known axis"):
        from_dict({"name": "x", "preset": "tiny", "grid": {"Bogus Axis": [1]}})
    with pytest.raises(SweepError, match="unknown field"):  # a dotted key the trainer does not have
        from_dict({"name": "x", "preset": "tiny", "grid": {"train.bogus": [1]}}).expand()
    with pytest.raises(SweepError, match="unknown loss-mask policy"):
        from_dict({"name": "x", "preset": "tiny", "grid": {"policy": ["nope"]}}).expand()
    with pytest.raises(SweepError, match="final.seeds"):
        from_dict({"name": "x", "preset": "tiny", "grid": {"lr": [1e-3]}, "final": {"seeds": []}})
    p = tmp_path / "m.yaml"
    p.write_text(yaml.safe_dump({"name": "file", "preset": "tiny", "grid": {"lr": [1e-3, 2e-3]}}))
    assert len(load_manifest(str(p)).expand()) == 2


@pytest.mark.parametrize("extra, match", [
    ({"grid": []}, r"grid: an empty list has no point to train"),
    ({"selection": {"metric": "tool_flip_as"}}, r"selection.metric 'tool_flip_as' is not an eval_scores metric .*"
                                                r"\(did you mean 'tool_flip_asr'\?\)"),
    ({"selection": {"gates": ["capability", "nosuch"]}}, r"selection.gates must be a list of"),
    ({"selection": {"gates": ["capabilty"]}}, r"selection.gates must be a list of .* \(did you mean 'capability'\?\)"),
    ({"selection": {"gates": "capability"}}, r"selection.gates must be a list of"),
    ({"selection": {"not_measured": "maybe"}}, r"selection.not_measured must be fail or pass"),
    ({"selection": {"higher_is_better": "no"}}, r"selection.higher_is_better must be true, false or null"),
    ({"continue_on_error": "false"}, r"continue_on_error must be true or false \(unquoted\), got 'false'"),
    ({"eval": {"limt": 4}}, r"m.yaml: eval: unknown key 'limt' \(did you mean 'limit'\?\)"),
    ({"eval": {"limit": "abc"}}, r"m.yaml: eval.limit must be a whole number"),
])
def test_manifest_selection_and_flags_are_checked_at_load(extra, match):
    """A typo here surfaced only when the leaderboard ranked, after every point had trained; a quoted 'false'
    was read as true."""
    with pytest.raises(SweepError, match=match):
        from_dict({"name": "x", "preset": "tiny", "grid": {"lr": [1e-3]}, **extra}, source="m.yaml")


@pytest.mark.parametrize("extra, match", [
    ({"final": {"seeds": [1], "overrides": {"train.stepz": 8}}},
     r"m.yaml: final.overrides: the final seeds of point x-lr0.001-\w+: override 'train.stepz': unknown field"),
    ({"final": {"overrides": {"train.steps": -1}}}, r"final.overrides: .*train.steps must be >= 1, got -1"),
    ({"final": {"seeds": [1, 1]}}, r"final.seeds must be distinct, got \[1, 1\]"),
    ({"final": {"seed": [1]}}, r"final: unknown keys \['seed'\] \(did you mean 'seeds'\?\)"),
    ({"finall": {"seeds": [1]}}, r"unknown keys \['finall'\] \(did you mean 'final'\?\)"),
])
def test_final_settings_are_checked_when_the_sweep_is_registered(extra, match):
    """final.overrides were resolved only when best_config registered the seeds, after every point had trained
    (`--dry-run` listed the points and exited 0); `final: {seed: ...}` left the default seeds in force."""
    with pytest.raises(SweepError, match=match):
        from_dict({"name": "x", "preset": "tiny", "grid": {"lr": [1e-3]}, **extra}, source="m.yaml").expand()


def test_final_points_one_per_seed():
    m = load_manifest("quick")
    best = m.expand()[0]
    fin = final_points(m, best)
    assert [p.overrides["train.seed"] for p in fin] == [101, 555, 888]
    assert [p.key for p in fin] == [f"{best.key}-seed{s}" for s in (101, 555, 888)]
    assert all(p.overrides["train.steps"] == 200 and p.overrides["loss.alpha"] == 5 for p in fin)


def test_mask_policy_axis_swaps_every_sample_mask():
    """A sweep's `policy` axis (data.mask_policy): every sample trains on that policy's lossmask row."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from test_trainer import synthetic_frames

    from cb_core.train.data import build_train_data

    ts, rd, lm = synthetic_frames()
    default = build_train_data(ts, rd, lm, max_length=512)
    swapped = build_train_data(ts, rd, lm, max_length=512, mask_policy="full_sequence")
    full = {r["trace_id"]: [(s["token_start"], s["token_end"]) for s in r["mask_spans"]] for r in lm.iter_rows(named=True)}
    assert all([(a, b) for a, b, _ in s.spans] == full[s.trace_id] for s in swapped.samples)
    assert any(d.spans != s.spans for d, s in zip(default.samples, swapped.samples))
    assert swapped.stats["mask_policy"] == "full_sequence" and swapped.stats["mask_policy_missing_kept_default"] == 0
    with pytest.raises(ValueError, match="needs the lossmasks table"):
        build_train_data(ts, rd, None, max_length=512, mask_policy="full_sequence")


def test_a_shared_override_a_grid_axis_replaces_is_rejected(tmp_path):
    """`overrides: {data.mask_policy: x}` beside `grid: {policy: [...]}`: every point took the axis's value and the
    shared one was silently never used."""
    p = tmp_path / "sh.yaml"
    p.write_text("name: sh\npreset: stage1\noverrides:\n  data.mask_policy: assistant_only\n"
                 "grid:\n  policy: [assistant_only, cb_full_sequence]\n")
    with pytest.raises(SweepError, match=rf"^{p}:4: overrides.data.mask_policy: data.mask_policy = 'assistant_only' "
                                         rf"is also a grid axis \({p}: grid.policy\)"):
        load_manifest(str(p)).expand()
    # given with the manifest (toggles, sweep_points config), it is named so
    with pytest.raises(SweepError, match=r"^overrides given with .*sh2.yaml: data.mask_policy = 'cb_full_sequence'"):
        p2 = tmp_path / "sh2.yaml"
        p2.write_text("name: sh2\npreset: stage1\ngrid:\n  policy: [assistant_only]\n")
        load_manifest(str(p2), overrides={"data.mask_policy": "cb_full_sequence"}).expand()
    # an override of another key is fine
    assert len(load_manifest(str(p2), overrides={"train.steps": 3}).expand()) == 1
