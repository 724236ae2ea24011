"""MWCS: class weights per step for every curriculum type, and clear errors on bad schedules."""
from __future__ import annotations

import math
from pathlib import Path

import pytest

from cb_core.mixture import DEFAULT_CLASS_WEIGHTS, MixtureError, MixtureSchedule

ROOT = Path(__file__).resolve().parents[2]


def _sched(tmp_path: Path, ctype: str, extra: str = "") -> MixtureSchedule:
    p = tmp_path / f"{ctype}.yaml"
    p.write_text(
        f"""
name: t_{ctype}
class_weights: {{harmful_flip: 1.0, general_conversation: 0.8}}
curriculum:
  type: {ctype}
  phases:
    - name: a
      start_step: 100
      end_step: 200
      class_weights: {{harmful_flip: 3.0}}
      lmp_overrides: {{harmful_flip: action_commitment}}
    - name: b
      start_step: 300
      end_step: 400
      class_weights: {{harmful_flip: 2.0, general_conversation: 0.4}}
{extra}"""
    )
    return MixtureSchedule.load(p)


def test_defaults_and_shipped_configs():
    d = MixtureSchedule.load()  # configs/mwcs/default.yaml
    assert d.class_weights == DEFAULT_CLASS_WEIGHTS
    assert d.curriculum_type == "none"
    assert all(d.class_weight(c, s) == w for c, w in DEFAULT_CLASS_WEIGHTS.items() for s in (0, 10**6))
    assert DEFAULT_CLASS_WEIGHTS["adversarial_safe"] == 2.0 and DEFAULT_CLASS_WEIGHTS["general_conversation"] == 0.8
    ex = MixtureSchedule.load(ROOT / "configs/mwcs/curriculum_example.yaml")
    assert ex.curriculum_type == "cosine" and len(ex.phases) == 3
    assert ex.class_weight("harmful_flip", 0) == 1.0
    assert ex.class_weight("harmful_flip", 200) == pytest.approx(0.25)
    assert ex.class_weight("harmful_flip", 10**6) == pytest.approx(1.0)
    assert ex.lmp_overrides(500) == {"harmful_flip": "action_commitment"}
    # unchanged classes carry the base weight through every phase
    assert ex.class_weight("tool_capability", 555) == 1.0


def test_step(tmp_path):
    s = _sched(tmp_path, "step")
    w = lambda step: s.class_weight("harmful_flip", step)  # noqa: E731
    assert [w(x) for x in (0, 99, 100, 150, 199, 200, 250, 299, 300, 399, 400, 10**6)] == [
        1.0, 1.0, 3.0, 3.0, 3.0, 3.0, 3.0, 3.0, 2.0, 2.0, 2.0, 2.0
    ]
    g = lambda step: s.class_weight("general_conversation", step)  # noqa: E731
    assert [g(0), g(150), g(350), g(500)] == [0.8, 0.8, 0.4, 0.4]
    assert s.multiplier("harmful_flip", 150) == 3.0
    assert s.multiplier("general_conversation", 350) == pytest.approx(0.5)


def test_linear(tmp_path):
    s = _sched(tmp_path, "linear")
    w = lambda step: s.class_weight("harmful_flip", step)  # noqa: E731
    assert w(0) == 1.0 and w(100) == 1.0
    assert w(150) == pytest.approx(2.0)
    assert w(175) == pytest.approx(2.5)
    assert w(200) == 3.0 and w(250) == 3.0  # held between phases
    assert w(350) == pytest.approx(2.5)  # 3.0 -> 2.0
    assert w(400) == 2.0 and w(10**6) == 2.0
    g = lambda step: s.class_weight("general_conversation", step)  # noqa: E731
    assert g(150) == pytest.approx(0.8) and g(350) == pytest.approx(0.6)


def test_cosine(tmp_path):
    s = _sched(tmp_path, "cosine")
    w = lambda step: s.class_weight("harmful_flip", step)  # noqa: E731
    assert w(100) == pytest.approx(1.0)
    assert w(150) == pytest.approx(2.0)  # midpoint equals linear
    t = 0.25
    assert w(125) == pytest.approx(1.0 + 2.0 * (1 - math.cos(math.pi * t)) / 2)
    assert w(125) < 1.5  # eases in (slower than linear at the start)
    assert w(200) == 3.0 and w(299) == 3.0 and w(500) == 2.0


def test_none_ignores_phase_weights_but_keeps_overrides(tmp_path):
    s = _sched(tmp_path, "none")
    assert all(s.class_weight("harmful_flip", x) == 1.0 for x in (0, 150, 350, 10**6))
    assert s.lmp_overrides(150) == {"harmful_flip": "action_commitment"}
    assert s.lmp_overrides(250) == {} and s.lmp_overrides(350) == {}


def test_pure_and_weights_at(tmp_path):
    s = _sched(tmp_path, "linear")
    assert s.class_weight("harmful_flip", 150) == s.class_weight("harmful_flip", 150)
    assert s.weights_at(175)["harmful_flip"] == pytest.approx(2.5)
    assert set(s.weights_at(0)) == set(DEFAULT_CLASS_WEIGHTS)
    assert s.base_weight("adversarial_safe") == 2.0  # missing from the file: default


@pytest.mark.parametrize(
    "body, field, msg",
    [
        ("curriculum: {type: exponential}", "curriculum.type", "unknown curriculum type"),
        (
            "curriculum: {type: step, phases: [{name: x, start_step: 10, end_step: 5}]}",
            "curriculum.phases[0] (x).end_step",
            "end_step 5 < start_step 10",
        ),
        ("class_weights: {villain: 2.0}", "class_weights", "unknown class 'villain'"),
        (
            "curriculum: {type: linear, phases: [{name: x, start_step: 0, end_step: 5, class_weights: {nope: 1}}]}",
            "curriculum.phases[0] (x).class_weights",
            "unknown class 'nope'",
        ),
        ("class_weights: {harmful_flip: -1}", "class_weights.harmful_flip", "finite number >= 0"),
        (
            "curriculum: {type: step, phases: [{start_step: 0, end_step: 10}, {start_step: 5, end_step: 20}]}",
            "curriculum.phases[1] (phase1).start_step",
            "before the previous phase",
        ),
        (
            "curriculum: {type: step, phases: [{start_step: 0, end_step: 10, lmp_overrides: {harmful_flip: magic}}]}",
            "lmp_overrides.harmful_flip",
            "unknown loss-mask policy 'magic'",
        ),
        ("curriculum: {type: step, phases: [{start_step: a, end_step: 10}]}", "start_step", "non-negative integer"),
        ("weights: {}", "<root>", "unknown keys"),
        ("name: [unclosed", "invalid YAML", ""),
    ],
)
def test_bad_yaml_errors_name_file_and_field(tmp_path, body, field, msg):
    p = tmp_path / "bad_schedule.yaml"
    p.write_text(body + "\n")
    with pytest.raises(MixtureError) as ei:
        MixtureSchedule.load(p)
    text = str(ei.value)
    assert str(p) in text and field in text and msg in text


def test_every_priority_class_has_a_weight_and_a_phase_may_move_it():
    """`refusal` (XSTest refusals) once had no base weight: a phase naming it was ignored by the trainer's
    multipliers (taken over the base classes) and `class_weight("refusal", step)` raised."""
    from cb_core.schemas import PRIORITY_CLASSES

    assert set(DEFAULT_CLASS_WEIGHTS) == set(PRIORITY_CLASSES)
    assert set(MixtureSchedule.load().class_weights) == set(PRIORITY_CLASSES)
    s = MixtureSchedule.from_dict({"curriculum": {"type": "step", "phases": [
        {"start_step": 10, "end_step": 20, "class_weights": {"refusal": 0.25}}]}})
    assert s.class_weight("refusal", 0) == 1.0 and s.class_weight("refusal", 15) == 0.25
    assert {pc: s.multiplier(pc, 15) for pc in s.class_weights}["refusal"] == 0.25


def test_missing_file_and_unknown_class_query(tmp_path):
    with pytest.raises(MixtureError, match="cannot read"):
        MixtureSchedule.load(tmp_path / "absent.yaml")
    with pytest.raises(KeyError, match="unknown priority class"):
        MixtureSchedule.load().class_weight("villain", 0)
