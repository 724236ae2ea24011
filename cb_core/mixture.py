"""MWCS: mixture weights per priority class, and a curriculum that moves them over training steps.

A schedule YAML (``configs/mwcs/*.yaml``)::

    name: default
    class_weights: {adversarial_safe: 2.0, ...}      # base weights (missing classes: DEFAULT_CLASS_WEIGHTS)
    curriculum:
      type: step | linear | cosine | none
      phases:
        - {name: warmup, start_step: 0, end_step: 500,
           class_weights: {harmful_flip: 0.5},        # targets for this phase (others carry over)
           lmp_overrides: {harmful_flip: action_commitment}}   # loss-mask policy per class in this phase

Semantics of ``class_weight(cls, step)`` (a pure function; the trainer calls it every step):

* Each phase has *start weights* (the weights in effect when the previous phase ended; the base weights
  for the first phase) and *end weights* (its start weights updated with its own ``class_weights``).
* ``none``: the base weight at every step (phases are ignored for weights; ``lmp_overrides`` still apply).
* ``step``: piecewise constant: inside ``[start_step, end_step)`` a phase's end weights; before the first
  phase the base weights; after a phase ends its end weights hold until the next phase starts.
* ``linear`` / ``cosine``: inside ``[start_step, end_step]`` interpolate from the phase's start weights to
  its end weights (``cosine`` eases with ``(1 - cos(pi * t)) / 2``); outside phases as for ``step``.

``sample_weight`` in ``lossmasks`` is the static base weight; ``multiplier(cls, step)`` =
``class_weight(cls, step) / base`` is the step-dependent factor the trainer applies on top.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cb_core.config import LocatedError, config_dir, config_path, read_config
from cb_core.schemas import DEFAULT_CLASS_WEIGHTS, POLICY_NAMES, PRIORITY_CLASSES  # noqa: F401  (re-exported)

CURRICULUM_TYPES = ("step", "linear", "cosine", "none")


class MixtureError(LocatedError):
    """A bad MWCS schedule: the message names the file and the field."""


@dataclass(frozen=True)
class Phase:
    name: str
    start_step: int
    end_step: int
    class_weights: dict[str, float] = field(default_factory=dict)
    lmp_overrides: dict[str, str] = field(default_factory=dict)


@dataclass
class MixtureSchedule:
    name: str = "default"
    class_weights: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_CLASS_WEIGHTS))
    curriculum_type: str = "none"
    phases: list[Phase] = field(default_factory=list)
    source: str = "<defaults>"

    def __post_init__(self) -> None:
        # start/end weights per phase, precomputed once (the schedule is immutable after load)
        self._bounds: list[tuple[dict[str, float], dict[str, float]]] = []
        cur = dict(self.class_weights)
        for ph in self.phases:
            end = {**cur, **ph.class_weights}
            self._bounds.append((cur, end))
            cur = end

    # ----------------------------------------------------------------------------------------- loading
    @classmethod
    def load(cls, path: str | Path | None = None, *, policies: tuple[str, ...] | None = None) -> "MixtureSchedule":
        """Load a schedule YAML (relative paths: against the project root, then configs/mwcs/).

        ``policies``: the known loss-mask policy names, to validate ``lmp_overrides`` (default: all of
        cb_core.schemas.POLICY_NAMES)."""
        p = schedule_path(path)
        try:
            raw = read_config(p)
        except OSError as e:
            raise MixtureError(f"{p}: cannot read MWCS schedule: {e}") from e
        except yaml.YAMLError as e:
            raise MixtureError(f"{p}: invalid YAML: {e}") from e
        return cls.from_dict(raw or {}, source=str(p), policies=policies)

    @classmethod
    def from_dict(
        cls, raw: Any, *, source: str = "<dict>", policies: tuple[str, ...] | None = None
    ) -> "MixtureSchedule":
        if policies is None:
            policies = POLICY_NAMES

        def err(fieldname: str, msg: str) -> MixtureError:
            return MixtureError(f"{source}: {fieldname}: {msg}")

        if not isinstance(raw, dict):
            raise err("<root>", f"expected a mapping, got {type(raw).__name__}")
        unknown = set(raw) - {"name", "class_weights", "curriculum", "description"}
        if unknown:
            raise err("<root>", f"unknown keys {sorted(unknown)}")
        name = str(raw.get("name") or Path(source).stem)
        base = dict(DEFAULT_CLASS_WEIGHTS)
        base.update(_weights(raw.get("class_weights") or {}, "class_weights", err))

        cur = raw.get("curriculum") or {"type": "none"}
        if not isinstance(cur, dict):
            raise err("curriculum", "expected a mapping {type, phases}")
        unknown = set(cur) - {"type", "phases"}
        if unknown:
            raise err("curriculum", f"unknown keys {sorted(unknown)}")
        ctype = str(cur.get("type", "none"))
        if ctype not in CURRICULUM_TYPES:
            raise err("curriculum.type", f"unknown curriculum type {ctype!r} (expected one of {CURRICULUM_TYPES})")
        raw_phases = cur.get("phases") or []
        if not isinstance(raw_phases, list):
            raise err("curriculum.phases", "expected a list")
        phases: list[Phase] = []
        for i, ph in enumerate(raw_phases):
            where = f"curriculum.phases[{i}]"
            if not isinstance(ph, dict):
                raise err(where, "expected a mapping")
            unknown = set(ph) - {"name", "start_step", "end_step", "class_weights", "lmp_overrides"}
            if unknown:
                raise err(where, f"unknown keys {sorted(unknown)}")
            pname = str(ph.get("name") or f"phase{i}")
            where = f"curriculum.phases[{i}] ({pname})"
            for k in ("start_step", "end_step"):
                v = ph.get(k)
                if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                    raise err(f"{where}.{k}", f"must be a non-negative integer, got {v!r}")
            if ph["end_step"] < ph["start_step"]:
                raise err(f"{where}.end_step", f"end_step {ph['end_step']} < start_step {ph['start_step']}")
            if phases and ph["start_step"] < phases[-1].end_step:
                raise err(
                    f"{where}.start_step",
                    f"phase starts at {ph['start_step']}, before the previous phase "
                    f"({phases[-1].name}) ends at {phases[-1].end_step} (phases must be ordered, no overlap)",
                )
            cw = _weights(ph.get("class_weights") or {}, f"{where}.class_weights", err)
            lmp = ph.get("lmp_overrides") or {}
            if not isinstance(lmp, dict):
                raise err(f"{where}.lmp_overrides", "expected a mapping class -> policy")
            for c, pol in lmp.items():
                if c not in PRIORITY_CLASSES:
                    raise err(f"{where}.lmp_overrides", f"unknown class {c!r} (known: {list(PRIORITY_CLASSES)})")
                if pol not in policies:
                    raise err(f"{where}.lmp_overrides.{c}", f"unknown loss-mask policy {pol!r} (known: {list(policies)})")
            phases.append(Phase(pname, int(ph["start_step"]), int(ph["end_step"]), cw, {str(k): str(v) for k, v in lmp.items()}))
        return cls(name=name, class_weights=base, curriculum_type=ctype, phases=phases, source=source)

    # ------------------------------------------------------------------------------------------ queries
    def base_weight(self, cls: str) -> float:
        """The static (step-independent) weight of a priority class: what ``lossmasks.sample_weight`` holds."""
        try:
            return float(self.class_weights[cls])
        except KeyError:
            raise KeyError(f"{self.source}: unknown priority class {cls!r}") from None

    def base_weights(self) -> dict[str, float]:
        """Every class's base weight: what ``cb_core.lossmask.build_lossmasks`` writes as ``sample_weight``."""
        return {c: self.base_weight(c) for c in self.class_weights}

    def class_weight(self, cls: str, step: int) -> float:
        """Weight of priority class ``cls`` at training ``step`` (see the module docstring)."""
        base = self.base_weight(cls)
        if self.curriculum_type == "none" or not self.phases:
            return base
        value = base
        for ph, (start_w, end_w) in zip(self.phases, self._bounds):
            if step < ph.start_step:
                break  # before this phase: the previous phase's end weights (or the base) hold
            if self.curriculum_type == "step" or step >= ph.end_step:
                value = end_w[cls]
                continue
            t = (step - ph.start_step) / (ph.end_step - ph.start_step)  # in [0, 1)
            if self.curriculum_type == "cosine":
                t = (1.0 - math.cos(math.pi * t)) / 2.0
            value = start_w[cls] + (end_w[cls] - start_w[cls]) * t
            break
        return float(value)

    def multiplier(self, cls: str, step: int) -> float:
        """``class_weight(cls, step) / base_weight(cls)``: the factor a trainer multiplies into the stored
        ``sample_weight`` at ``step`` (0 when the base weight is 0)."""
        base = self.base_weight(cls)
        return self.class_weight(cls, step) / base if base else 0.0

    def phase_at(self, step: int) -> Phase | None:
        """The phase whose [start_step, end_step) contains ``step`` (None between/outside phases)."""
        for ph in self.phases:
            if ph.start_step <= step < ph.end_step:
                return ph
        return None

    def lmp_overrides(self, step: int) -> dict[str, str]:
        """Loss-mask policy overrides {class: policy} in effect at ``step`` (those of the phase containing
        it; empty outside phases)."""
        ph = self.phase_at(step)
        return dict(ph.lmp_overrides) if ph else {}

    def weights_at(self, step: int) -> dict[str, float]:
        return {c: self.class_weight(c, step) for c in self.class_weights}


def _weights(raw: Any, fieldname: str, err) -> dict[str, float]:
    if not isinstance(raw, dict):
        raise err(fieldname, "expected a mapping class -> weight")
    out = {}
    for c, w in raw.items():
        if c not in PRIORITY_CLASSES:
            raise err(fieldname, f"unknown class {c!r} (known: {list(PRIORITY_CLASSES)})")
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
            raise err(f"{fieldname}.{c}", f"weight must be a finite number >= 0, got {w!r}")
        out[c] = float(w)
    return out


def schedule_path(path: str | Path | None) -> Path:
    """Where a schedule named in a training config is read from (a name, a path in the config folder, or any
    path; the first that exists, else the path as written)."""
    cfg_dir = config_dir()
    if path is None:
        return cfg_dir / "mwcs" / "default.yaml"
    p = Path(os.path.expanduser(str(path)))
    if p.is_absolute():
        return p
    for cand in (config_path(p), cfg_dir / p, cfg_dir / "mwcs" / p, cfg_dir / "mwcs" / f"{p}.yaml"):
        if cand.is_file():
            return cand
    return config_path(p)
