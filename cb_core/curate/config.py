"""configs/curation.yaml: one profile (profiles `extends:` others) as typed dataclasses.

Every value is checked where the file is parsed (`CurationConfig.from_dict`, driven by the field -> rule tables
below): a wrong type, a value out of range, an unknown key or an unknown name (source, priority class,
loss-mask policy, generated table) is a `ConfigError` naming the file, the profile and the key.
"""
from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass, field
from typing import Any

from cb_core.config import (
    ConfigError,
    Rule,
    check_bool,
    check_keys,
    check_mapping,
    check_str,
    config_dir,
    display_path,
    load_yaml,
    nullable,
    number,
    section,
    texts,
    whole,
)
from cb_core.schemas import CATEGORIES, DATASETS, DEFAULT_TRAINING_POLICY, POLICY_NAMES, PRIORITY_CLASSES
from cb_core.summary import GENERATED

PROFILE_ENV = "CB_CURATION_PROFILE"
CONFIG_FILE = "curation.yaml"


def _deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in (over or {}).items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


@dataclass
class GateConfig:
    min_dr_ds_ratio: float = 4.0
    min_adversarial_safe: int = 400
    max_duplicate_ids: int = 0
    require_tool_schemas: bool = True


@dataclass
class EvalAttackConfig:
    min_per_stratum: int = 20
    max_per_stratum: int = 200
    max_reserve_fraction: float = 0.3


@dataclass
class TrainingConfig:
    max_seq_length: int = 4096
    tokenizer_id: str | None = None
    # per category; null (or a missing category) = `training_default` of configs/lossmask.yaml, filled in by
    # `CurationConfig.from_dict` (which reads that file and lets its errors through)
    lossmask_policy: dict[str, str] | None = None

    def __post_init__(self) -> None:
        given = {k: v for k, v in (self.lossmask_policy or {}).items() if v}
        self.lossmask_policy = {**DEFAULT_TRAINING_POLICY, **given}


def _with_training_default(training: dict) -> dict:
    """`training.lossmask_policy` with the categories it leaves out taken from configs/lossmask.yaml."""
    given = {k: v for k, v in (training.get("lossmask_policy") or {}).items() if v}
    if set(given) >= set(CATEGORIES):
        return training
    from cb_core.lossmask import LossmaskConfig

    return {**training, "lossmask_policy": {**LossmaskConfig.load().training_default, **given}}


# --- the rules: field -> check(value, where). `where` is "<file>: profile '<name>': <key>"; every check raises
# ConfigError (cb_core.config) naming it and the value found.
_fraction_below_one = number(0, 1, hi_open=True)


def _per_key(keys: tuple[str, ...], rule: Rule, required: bool = False, what: str = "") -> Rule:
    """A mapping whose keys are among ``keys`` (all of them when ``required``; ``what`` they are, for the
    message), each value checked by ``rule``."""
    def check(v: Any, w: str) -> None:
        check_keys(check_mapping(v, w), keys, f"{w} ({what})" if what else w)
        missing = [k for k in keys if required and k not in v]
        if missing:
            raise ConfigError(f"{w}.{missing[0]} is missing (give every one of {list(keys)})")
        for k, x in v.items():
            rule(x, f"{w}.{k}")
    return check


def _user_tasks(v: Any, w: str) -> None:
    """A path or null; a file that is not there is allowed: those attacks fall back to `no_attacker_call`
    (user tasks) or carry no preparatory calls (injection tasks), reported by eval_attacks (configs/curation.yaml
    says so)."""
    if v is not None:
        check_str(v, w)


def _policies(names: tuple[str, ...] | None) -> Rule:
    """training.lossmask_policy: {category: policy name or null (= training_default of configs/lossmask.yaml)}."""
    return nullable(_per_key(CATEGORIES, nullable(lambda v, w: check_str(v, w, names)), what="categories"))


_CLASS = _per_key(("target", "cap"), nullable(whole(0)))  # cap null = unlimited; missing = default_class_cap

SECTION_RULES: dict[str, dict[str, Rule]] = {
    "gates": {
        "min_dr_ds_ratio": number(0),
        "min_adversarial_safe": whole(0),
        "max_duplicate_ids": whole(0),
        "require_tool_schemas": check_bool,
    },
    "eval_attacks": {
        "min_per_stratum": whole(0),
        "max_per_stratum": whole(0),
        "max_reserve_fraction": number(0, 1),
    },
    "training": {
        "max_seq_length": whole(1),
        "tokenizer_id": nullable(check_str),
        "lossmask_policy": _policies(POLICY_NAMES),
    },
}
SECTION_TYPES = {"gates": GateConfig, "eval_attacks": EvalAttackConfig, "training": TrainingConfig}
RULES: dict[str, Rule] = {
    "seed": whole(0),
    "targets": _per_key(CATEGORIES, whole(0), required=True, what="categories"),
    "dr_ratio": nullable(number(0, lo_open=True)),  # null: retain not capped by the harmful count
    "classes": _per_key(PRIORITY_CLASSES, _CLASS, what="priority classes"),
    "default_class_cap": nullable(whole(0)),
    "expected_sources": texts(DATASETS),
    "required_sources": texts(DATASETS),
    "generated_tables": texts(GENERATED),
    "retain_requires_task_success": nullable(texts(DATASETS)),
    "agentdojo_user_tasks": _user_tasks,
    "agentdojo_injection_tasks": _user_tasks,
    "eval_fraction": _fraction_below_one,
}


@dataclass
class CurationConfig:
    profile: str = "default"
    seed: int = 0
    targets: dict[str, int] = field(default_factory=lambda: {"harmful": 1000, "retain": 4500})
    dr_ratio: float | None = 4.5
    classes: dict[str, dict[str, int | None]] = field(default_factory=dict)
    default_class_cap: int | None = None
    expected_sources: list[str] = field(default_factory=lambda: list(DATASETS))
    required_sources: list[str] = field(default_factory=list)
    generated_tables: list[str] = field(default_factory=list)
    # Datasets whose retain traces must have done the user's task: `labels.task_success == False` leaves the
    # mix (counted in the stats); null (unknown) stays. Retain data should teach doing the task.
    retain_requires_task_success: list[str] = field(default_factory=lambda: ["agentdojo"])
    # AgentDojo user tasks' ground truth ({version: {suite: {user_task_id: {prompt, ground_truth_functions}}}}),
    # a path as in every config file (`configs/...` follows CB_CONFIG_DIR): the expected next call of each
    # AgentDojo eval attack.
    agentdojo_user_tasks: str | None = "configs/agentdojo/user_tasks.json"
    # AgentDojo injection tasks' ground-truth calls ({version: {suite: {injection_task_id: {goal,
    # ground_truth_calls}}}}, as the reader's `injection_tasks`): the calls an injection asks for before its
    # attacker call, carried to evaluation (`eval_attacks.preparatory_calls`, outcome `attack_step`).
    agentdojo_injection_tasks: str | None = "configs/agentdojo/injection_tasks.json"
    eval_fraction: float = 0.1
    gates: GateConfig = field(default_factory=GateConfig)
    eval_attacks: EvalAttackConfig = field(default_factory=EvalAttackConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], profile: str = "custom", source: str | None = None) -> "CurationConfig":
        """One (merged) profile. ``source``: the file it came from, named in every message. Loss-mask policy
        names are checked against ``cb_core.schemas.POLICY_NAMES`` for a file; a dict built in code may name
        a policy that has no masks (tests do, to see such traces left out)."""
        where = f"{source}: profile '{profile}'" if source else f"curation profile '{profile}'"
        raw = dict(check_mapping(raw, where))
        raw.pop("extends", None)
        check_keys(raw, [*RULES, *SECTION_RULES], where)
        for key, rule in RULES.items():
            if key in raw:
                rule(raw[key], f"{where}: {key}")
        section_rules = SECTION_RULES if source else {
            **SECTION_RULES, "training": {**SECTION_RULES["training"], "lossmask_policy": _policies(None)}}
        sections = {}
        for name, rules in section_rules.items():
            given = raw.get(name) or {}
            section(rules)(given, f"{where}: {name}")  # checked (a mapping, known keys); values kept as written
            sec = dict(given)
            if name == "training":
                sec = _with_training_default(sec)
            sections[name] = SECTION_TYPES[name](**sec)
        cfg = cls(profile=profile, **sections, **{k: raw[k] for k in RULES if k in raw})
        cfg.validate(where)
        return cfg

    def validate(self, where: str | None = None) -> None:
        """What the per-field rules cannot see: values that must agree with each other."""
        where = where or f"curation profile '{self.profile}'"
        for cat in CATEGORIES:
            if cat not in self.targets:
                raise ConfigError(f"{where}: targets.{cat} is missing")
            if cat not in self.training.lossmask_policy:
                raise ConfigError(f"{where}: training.lossmask_policy.{cat} is missing")
        if self.eval_attacks.min_per_stratum > self.eval_attacks.max_per_stratum:
            raise ConfigError(
                f"{where}: eval_attacks.min_per_stratum ({self.eval_attacks.min_per_stratum}) > "
                f"max_per_stratum ({self.eval_attacks.max_per_stratum})"
            )
        extra = sorted(set(self.required_sources) - set(self.expected_sources))
        if extra:
            raise ConfigError(f"{where}: required_sources {extra} are not in expected_sources")

    def class_target(self, pclass: str) -> int:
        return int((self.classes.get(pclass) or {}).get("target") or 0)

    def class_cap(self, pclass: str) -> float:
        spec = self.classes.get(pclass) or {}
        cap = spec.get("cap", self.default_class_cap) if spec else self.default_class_cap
        return math.inf if cap is None else int(cap)


def resolve_profile(demo: bool, env: dict[str, str] | None = None) -> str:
    """$CB_CURATION_PROFILE, else `demo` on the embedded demo sample, else `default`."""
    env = os.environ if env is None else env
    return (env.get(PROFILE_ENV) or "").strip() or ("demo" if demo else "default")


def load_curation_config(
    profile: str | None = None, *, demo: bool = False, name: str = CONFIG_FILE, env: dict | None = None
) -> CurationConfig:
    """Load one profile of configs/curation.yaml (profiles may `extends:` another); see `CurationConfig.from_dict`
    for the checks."""
    profile = profile or resolve_profile(demo, env)
    path = config_dir() / name
    shown = display_path(path)
    raw = load_yaml(path)
    check_keys(raw, ["profiles"], shown)
    profiles = check_mapping(raw.get("profiles") or {}, f"{shown}: profiles")
    if profile not in profiles:
        raise ConfigError(
            f"curation profile '{profile}' not in {shown} (known: {', '.join(sorted(map(str, profiles)))}); "
            f"set {PROFILE_ENV} to one of them"
        )
    chain, seen, cur, chain_name = [], set(), profile, profile
    while cur is not None:
        if cur in seen:
            raise ConfigError(f"{shown}: profile '{profile}': circular `extends`")
        if cur not in profiles:
            raise ConfigError(f"{shown}: profile '{chain_name}': extends '{cur}', which is not a profile "
                              f"(known: {', '.join(sorted(map(str, profiles)))})")
        seen.add(cur)
        part = check_mapping(profiles[cur] or {}, f"{shown}: profiles.{cur}")
        if "extends" in part and part["extends"] is not None:
            check_str(part["extends"], f"{shown}: profiles.{cur}.extends")
        chain.append((cur, part))
        chain_name, cur = cur, part.get("extends")
    merged: dict = {}
    for _, part in reversed(chain):
        merged = _deep_merge(merged, part)
    try:
        return CurationConfig.from_dict(merged, profile, source=shown)
    except ConfigError as e:
        raise _inherited(e, shown, profile, chain) from None


def _inherited(err: ConfigError, shown: str, profile: str, chain: list[tuple[str, dict]]) -> ConfigError:
    """A value the profile inherits through `extends` is blamed on the line where it is written (the
    ancestor's), naming that profile, instead of the child's `profile:` line where it is not."""
    from cb_core.config import _LEAD_KEY, key_line

    msg = str(err)
    head = f"profile '{profile}': "
    at = msg.find(head)
    m = _LEAD_KEY.match(msg, at + len(head)) if at >= 0 else None
    if not m:
        return err
    parts = m.group(0).split(".")

    def has(d: Any) -> bool:
        for k in parts:
            if not isinstance(d, dict) or k not in d:
                return False
            d = d[k]
        return True

    owner = next((name for name, part in chain if has(part)), None)
    if owner is None or owner == profile:
        return err
    line = key_line(shown, f"profiles.{owner}.{m.group(0)}")
    if line is None:
        return err
    rest = msg[at + len(head):]
    return type(err)(f"{shown}:{line}: profile '{profile}' (inherited from profile '{owner}'): {rest}")
