"""configs/curation.yaml: one profile (profiles `extends:` others) as typed dataclasses."""
from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass, field
from typing import Any


from cb_core.config import ConfigError, load_yaml
from cb_core.schemas import CATEGORIES, DATASETS, DEFAULT_TRAINING_POLICY, PRIORITY_CLASSES

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
    eval_fraction: float = 0.1
    gates: GateConfig = field(default_factory=GateConfig)
    eval_attacks: EvalAttackConfig = field(default_factory=EvalAttackConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], profile: str = "custom") -> "CurationConfig":
        raw = dict(raw)
        raw.pop("extends", None)
        known = set(cls.__dataclass_fields__) - {"profile", "gates", "eval_attacks", "training"}
        unknown = set(raw) - known - {"gates", "eval_attacks", "training"}
        if unknown:
            raise ConfigError(f"curation profile '{profile}': unknown key(s) {sorted(unknown)}")
        kw = {k: raw[k] for k in known if k in raw}
        try:
            cfg = cls(
                profile=profile,
                gates=GateConfig(**(raw.get("gates") or {})),
                eval_attacks=EvalAttackConfig(**(raw.get("eval_attacks") or {})),
                training=TrainingConfig(**_with_training_default(raw.get("training") or {})),
                **kw,
            )
        except TypeError as err:
            raise ConfigError(f"curation profile '{profile}': {err}") from err
        cfg.validate()
        return cfg

    def validate(self) -> None:
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ConfigError(f"curation: eval_fraction must be in [0, 1), got {self.eval_fraction}")
        for cat in ("harmful", "retain"):
            if cat not in self.targets:
                raise ConfigError(f"curation: targets.{cat} is missing")
            if cat not in self.training.lossmask_policy:
                raise ConfigError(f"curation: training.lossmask_policy.{cat} is missing")
        if self.eval_attacks.min_per_stratum > self.eval_attacks.max_per_stratum:
            raise ConfigError("curation: eval_attacks.min_per_stratum > max_per_stratum")
        unknown = set(self.classes) - set(PRIORITY_CLASSES)
        if unknown:
            raise ConfigError(f"curation: classes {sorted(unknown)} are not priority classes {list(PRIORITY_CLASSES)}")
        bad = set(self.retain_requires_task_success or []) - set(DATASETS)
        if bad:
            raise ConfigError(f"curation: retain_requires_task_success names unknown dataset(s) {sorted(bad)}")

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
    """Load one profile of configs/curation.yaml (profiles may `extends:` another)."""
    profile = profile or resolve_profile(demo, env)
    profiles = (load_yaml(name) or {}).get("profiles") or {}
    if profile not in profiles:
        raise ConfigError(
            f"curation profile '{profile}' not in configs/{name} (known: {', '.join(sorted(profiles))}); "
            f"set {PROFILE_ENV} to one of them"
        )
    chain, seen, cur = [], set(), profile
    while cur is not None:
        if cur in seen:
            raise ConfigError(f"curation profile '{profile}': circular `extends`")
        if cur not in profiles:
            raise ConfigError(f"curation profile '{cur}' (extended) not found")
        seen.add(cur)
        chain.append(profiles[cur] or {})
        cur = (profiles[cur] or {}).get("extends")
    merged: dict = {}
    for part in reversed(chain):
        merged = _deep_merge(merged, part)
    return CurationConfig.from_dict(merged, profile)
