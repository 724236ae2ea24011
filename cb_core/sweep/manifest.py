"""Sweep manifests (configs/sweeps/<name>.yaml) -> grid points with readable, hashed keys.

A manifest names a training preset, shared overrides and a grid. The grid is a mapping of axes to value lists
(or a list of such mappings, whose points are united), e.g.::

    preset: stage1
    overrides: {train.steps: 200}
    grid:
      alpha: [5, 10, 15]
      layers: [[10, 20], [8, 16, 24]]
      policy: [assistant_only, cb_full_sequence]

An axis is a short name from ``AXES`` or any dotted training key (``train.warmup_steps``). Each point is the
preset + shared overrides + its axis values as dotted overrides, resolved by the same
``cb_core.train.config.load_train_config`` the ``adapter`` asset uses. A point's key is readable and carries
a hash of everything that defines it (``quick-a5-L10.20-assistant_only-3f9c0a1b``): two points with the same
hyper-parameters get the same key (re-running a sweep reuses finished points), any difference changes it.

An axis the point's loss mode ignores is rejected (``alpha`` does nothing under ``triplet_full``, whose weights
are ``alpha_benign``/``beta_harmful``/``gamma_kl``), so a sweep never spends GPU hours on identical runs.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cb_core.config import LocatedError, did_you_mean

# short axis name -> dotted training key
AXES: dict[str, str] = {
    "loss_mode": "loss.mode",
    "alpha": "loss.alpha",
    "alpha_benign": "loss.alpha_benign",
    "beta_harmful": "loss.beta_harmful",
    "gamma_kl": "loss.gamma_kl",
    "margin_benign": "loss.margin_benign",
    "margin_harmful": "loss.margin_harmful",
    "layers": "loss.target_layers",
    "policy": "data.mask_policy",
    "lr": "train.lr",
    "seed": "train.seed",
    "steps": "train.steps",
}
# how an axis value reads inside a key
_KEY_ABBREV = {"loss.mode": "", "loss.alpha": "a", "loss.alpha_benign": "ab", "loss.beta_harmful": "bh",
               "loss.gamma_kl": "gk", "loss.margin_benign": "mb", "loss.margin_harmful": "mh",
               "loss.target_layers": "L", "data.mask_policy": "", "train.lr": "lr", "train.seed": "s",
               "train.steps": "n"}

_TRIPLET_ONLY = {"loss.alpha_benign", "loss.beta_harmful", "loss.margin_benign", "loss.margin_harmful",
                 "loss.margin_scale", "loss.benign_pos_distance", "loss.benign_neg_distance",
                 "loss.harmful_pos_distance", "loss.harmful_neg_distance", "loss.mix_l2_weight",
                 "loss.mix_cos_weight", "loss.centroid", "loss.centroid_decay"}
_LEGACY_ONLY = {"loss.alpha", "loss.schedule", "loss.weighting"}
# training keys each loss mode never reads (cb_core/train/trainer.py: Trainer.loss_terms)
IGNORED_BY_MODE: dict[str, set[str]] = {
    "triplet_full": _LEGACY_ONLY | {"loss.use_kl"},
    "legacy_cb": set(_TRIPLET_ONLY),  # gamma_kl / kl_temperature are read only with use_kl (checked per point)
    "legacy_schema": _TRIPLET_ONLY | {"loss.use_kl", "loss.gamma_kl", "loss.kl_temperature"},
}
_WEIGHTS_OF = {"triplet_full": "alpha_benign / beta_harmful / gamma_kl", "legacy_cb": "alpha (with schedule)",
               "legacy_schema": "alpha (with schedule)"}
KEY_RE = re.compile(r"^[A-Za-z0-9_.-]{1,120}$")
MANIFEST_KEYS = {"name", "description", "preset", "overrides", "grid", "eval", "selection", "final",
                 "continue_on_error"}


class SweepError(LocatedError):
    """A bad manifest: the message names the file and the key."""


# What `selection` may name: the eval_scores metrics (a test checks an evaluation produces no other) and the
# gates of cb_core.evaluate.scores.gates. Checked at load: a typo would otherwise surface after every point
# had trained, when the leaderboard ranks.
KNOWN_METRICS = frozenset({
    "agentdojo_asr", "agentdojo_utility", "agentdojo_utility_under_attack", "capability_retention", "coherence",
    "forced_function_call", "injection_followed_rate", "llmail_attacker_send", "llmail_refusal", "llmail_useful",
    "output_difference_rate", "rep_cos_benign",
    "rep_cos_harmful", "tool_flip_asr", "tool_flip_correct", "unparseable_rate", "valid_json_rate",
    "xstest_over_refusal", "xstest_unsafe_refusal",
})
KNOWN_GATES = ("asr_reduction", "capability", "output_difference", "over_refusal")


@dataclass(frozen=True)
class Point:
    """One grid point: its key, the axis values (short names) and every override it adds to the preset."""

    sweep: str
    key: str
    preset: str
    axes: dict[str, Any]
    overrides: dict[str, Any]
    eval: dict[str, Any] = field(default_factory=dict)

    def override_strings(self) -> list[str]:
        """``["loss.alpha=10", "loss.target_layers=[10, 20]"]``: what `adapter`'s `overrides` config takes."""
        return [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in sorted(self.overrides.items())]

    def row(self) -> dict[str, Any]:
        return {"sweep": self.sweep, "key": self.key, "preset": self.preset,
                "axes": json.dumps(self.axes, sort_keys=True), "overrides": self.override_strings(),
                "eval": json.dumps(self.eval, sort_keys=True)}


@dataclass
class Selection:
    """How the leaderboard ranks points: the adapter's `metric` (lower is better unless `higher_is_better`)
    among the points whose `gates` passed; a gate that is "not measured" counts as `not_measured`."""

    metric: str = "tool_flip_asr"
    higher_is_better: bool | None = None  # None: from cb_core.evaluate.scores.LOWER_IS_BETTER
    gates: list[str] = field(default_factory=lambda: ["capability", "over_refusal"])
    not_measured: str = "fail"  # fail | pass


@dataclass
class Manifest:
    name: str
    preset: str
    grids: list[dict[str, list[Any]]]
    overrides: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    eval: dict[str, Any] = field(default_factory=dict)
    selection: Selection = field(default_factory=Selection)
    final: dict[str, Any] = field(default_factory=lambda: {"seeds": [101, 555, 888], "overrides": {}})
    continue_on_error: bool = True
    source: str = "<manifest>"
    # where each grid and each shared override is written in the manifest (``grid[1]``, ``overrides.train.lr``),
    # for messages about a point's values; overrides given with the manifest (load_manifest) are not written there
    grid_keys: list[str] = field(default_factory=list, repr=False)
    override_keys: dict[str, str] = field(default_factory=dict, repr=False)
    # manifest key (``grid.alpha``, ``overrides.train.steps``) -> where its value came from when not from this
    # file (the sbatch toggle ``ALPHAS='5 10'``, the base manifest of one built from toggles): messages name that
    origins: dict[str, str] = field(default_factory=dict, repr=False)

    def expand(self, *, validate: bool = True) -> list[Point]:
        return expand(self, validate=validate)


# ------------------------------------------------------------------------------------------------ loading
def sweeps_dir() -> Path:
    from cb_core.config import config_dir

    return config_dir() / "sweeps"


def manifest_path(name_or_path: str) -> Path:
    from cb_core.config import named_config

    return named_config("sweeps", name_or_path, "sweep manifest", SweepError)


def axis_key(axis: str, source: str = "<manifest>") -> str:
    if axis in AXES:
        return AXES[axis]
    if re.fullmatch(r"[a-z_]+\.[a-z_0-9]+", axis):
        return axis
    raise SweepError(f"{source}: grid axis {axis!r}: not a known axis{did_you_mean(axis, AXES)} ({sorted(AXES)}) "
                     "nor a dotted training key")


def _dotted(d: dict | None, where: str) -> dict[str, Any]:
    if d is not None and not isinstance(d, dict):
        raise SweepError(f"{where}: expected a mapping of training keys -> values (e.g. {{train.steps: 200}}), "
                         f"got {d!r}")
    out = {}
    for k, v in (d or {}).items():
        out[axis_key(str(k), where)] = v
    return out


def from_dict(raw: dict, source: str = "<manifest>") -> Manifest:
    if not isinstance(raw, dict):
        raise SweepError(f"{source}: expected a mapping at the top level")
    unknown = set(raw) - MANIFEST_KEYS
    if unknown:
        first = sorted(unknown)[0]
        raise SweepError(f"{source}: unknown keys {sorted(unknown)}{did_you_mean(first, MANIFEST_KEYS)} "
                         f"(known: {sorted(MANIFEST_KEYS)})")
    name = str(raw.get("name") or Path(source).stem)
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,32}", name):
        raise SweepError(f"{source}: name {name!r} must match [A-Za-z0-9_-]{{1,32}} (it starts every point key)")
    if not raw.get("preset"):
        raise SweepError(f"{source}: preset: required (a configs/train/<preset>.yaml name)")
    from cb_core.train.config import TrainConfigError, preset_path

    try:  # found now, not when the first point resolves it
        preset_path(str(raw["preset"]))
    except TrainConfigError as e:
        raise SweepError(f"{source}: preset: {e}") from None
    grid = raw.get("grid")
    grids = grid if isinstance(grid, list) else [grid]
    if not grids:
        raise SweepError(f"{source}: grid: an empty list has no point to train; give one mapping of axis -> values "
                         "or a list of them")
    out_grids, grid_keys = [], []
    for i, g in enumerate(grids):
        grid_keys.append("grid" + (f"[{i}]" if isinstance(grid, list) else ""))
        where = f"{source}: {grid_keys[-1]}"
        if not isinstance(g, dict) or not g:
            raise SweepError(f"{where}: expected a non-empty mapping of axis -> list of values")
        axes = {}
        for axis, values in g.items():
            if not isinstance(values, list) or not values:
                raise SweepError(f"{where}.{axis}: expected a non-empty list of values, got {values!r}")
            axis_key(str(axis), where)
            axes[str(axis)] = values
        out_grids.append(axes)
    sel_raw = raw.get("selection") or {}
    if not isinstance(sel_raw, dict):
        raise SweepError(f"{source}: selection: expected a mapping (e.g. {{metric: tool_flip_asr}}), got {sel_raw!r}")
    bad = set(sel_raw) - set(Selection.__dataclass_fields__)
    if bad:
        raise SweepError(f"{source}: selection: unknown keys {sorted(bad)}")
    sel = Selection(**sel_raw)
    if sel.not_measured not in ("fail", "pass"):
        raise SweepError(f"{source}: selection.not_measured must be fail or pass, got {sel.not_measured!r}")
    if not isinstance(sel.metric, str) or sel.metric not in KNOWN_METRICS:
        raise SweepError(f"{source}: selection.metric {sel.metric!r} is not an eval_scores metric "
                         f"({sorted(KNOWN_METRICS)}){did_you_mean(sel.metric, KNOWN_METRICS)}")
    if not isinstance(sel.gates, list) or any(g not in KNOWN_GATES for g in sel.gates):
        bad_gate = next((g for g in sel.gates if g not in KNOWN_GATES), None) if isinstance(sel.gates, list) else None
        raise SweepError(f"{source}: selection.gates must be a list of {list(KNOWN_GATES)}, got {sel.gates!r}"
                         + (did_you_mean(bad_gate, KNOWN_GATES) if bad_gate is not None else ""))
    if sel.higher_is_better is not None and not isinstance(sel.higher_is_better, bool):
        raise SweepError(f"{source}: selection.higher_is_better must be true, false or null, "
                         f"got {sel.higher_is_better!r}")
    if not isinstance(raw.get("continue_on_error", True), bool):
        raise SweepError(f"{source}: continue_on_error must be true or false (unquoted), "
                         f"got {raw['continue_on_error']!r}")
    if not isinstance(raw.get("final") or {}, dict):
        raise SweepError(f"{source}: final: expected a mapping (e.g. {{seeds: [101, 555]}}), got {raw['final']!r}")
    final = {"seeds": [101, 555, 888], "overrides": {}, **(raw.get("final") or {})}
    bad = sorted(set(final) - {"seeds", "overrides"})
    if bad:  # `seed: [1]` would have left the default seeds in force
        raise SweepError(f"{source}: final: unknown keys {bad}{did_you_mean(bad[0], ['seeds', 'overrides'])} "
                         "(known: ['overrides', 'seeds'])")
    seeds = final["seeds"]
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise SweepError(f"{source}: final.seeds must be a non-empty list of integers, got {seeds!r}")
    if len(set(seeds)) != len(seeds):  # one partition key per seed: a repeated seed is one run, not two
        raise SweepError(f"{source}: final.seeds must be distinct, got {seeds!r}")
    final["overrides"] = _dotted(final.get("overrides"), f"{source}: final.overrides")
    ev = raw.get("eval") or {}
    if not isinstance(ev, dict):
        raise SweepError(f"{source}: eval: expected a mapping (e.g. {{limit: 20}})")
    from cb_core.config import ConfigError, section
    from cb_core.evaluate.pipeline import EVAL_RULES

    try:  # the keys and values of configs/evaluation.yaml's eval section (a typo would leave the file's value)
        section(EVAL_RULES)(ev, f"{source}: eval")
    except ConfigError as e:
        raise SweepError(str(e)) from None
    overrides = _dotted(raw.get("overrides"), f"{source}: overrides")
    return Manifest(name=name, preset=str(raw["preset"]), grids=out_grids, overrides=overrides,
                    description=str(raw.get("description", "")), eval=dict(ev), selection=sel, final=final,
                    continue_on_error=raw.get("continue_on_error", True), source=source, grid_keys=grid_keys,
                    override_keys={axis_key(str(k)): f"overrides.{k}" for k in raw.get("overrides") or {}})


def load_manifest(name_or_path: str | dict, overrides: dict[str, Any] | None = None,
                  origins: dict[str, str] | None = None, source: str = "<manifest>") -> Manifest:
    """Load a manifest (a name, a path, or a mapping built in code, called ``source`` in messages: the sbatch
    toggles' grid, checked before it is written); ``overrides`` (dotted keys) are added to its shared overrides
    (sbatch toggles), ``origins`` says where values not written in it came from (`Manifest.origins`)."""
    from cb_core.config import read_config

    if isinstance(name_or_path, dict):
        m = from_dict(name_or_path, source=source)
    else:
        path = manifest_path(name_or_path)
        try:
            raw = read_config(path) or {}
        except yaml.YAMLError as e:
            raise SweepError(f"{path}: invalid YAML: {e}") from e
        m = from_dict(raw, source=str(path))
    m.origins.update(origins or {})
    if overrides:  # given with the manifest, not written in it: their messages name no line of the file
        given = _dotted(overrides, f"overrides given with {m.source}")
        m.overrides.update(given)
        for k in given:
            m.override_keys.pop(k, None)
    return m


# ---------------------------------------------------------------------------------------------- expansion
def _fmt(v: Any) -> str:
    if isinstance(v, (list, tuple)):
        return ".".join(_fmt(x) for x in v)
    if isinstance(v, float):
        return f"{v:g}"
    return re.sub(r"[^A-Za-z0-9_.]", "_", str(v))


def resolved_overrides(preset: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """Each override as the training config reads it (`beta_harmful: 1` and `1.0` are one value, `lr: 1e-3`, a
    string to YAML 1.1, is 0.001), so equal hyper-parameters hash alike; as written where they do not resolve
    (the validation in `expand` then names the error)."""
    from cb_core.train.config import TrainConfigError, load_train_config

    try:
        cfg, _, _ = load_train_config(preset, dict(overrides))
    except (TrainConfigError, ValueError, TypeError):
        return overrides
    out = {}
    for k, v in overrides.items():
        sec, _, name = k.partition(".")
        out[k] = getattr(getattr(cfg, sec, None), name, v) if name else v
    return out


def point_key(sweep: str, preset: str, axes: dict[str, Any], overrides: dict[str, Any]) -> str:
    """``<sweep>-<axis values>-<8 hex of sha256(preset, every override as resolved)>``, at most 120 chars of
    [A-Za-z0-9_.-]."""
    res = resolved_overrides(preset, overrides)
    digest = hashlib.sha256(json.dumps({"preset": preset, "overrides": res}, sort_keys=True,
                                       default=str).encode()).hexdigest()[:8]
    parts = [_KEY_ABBREV.get(axis_key(a), a.split(".")[-1][:3]) + _fmt(res.get(axis_key(a), v))
             for a, v in axes.items()]
    readable = "-".join(p for p in parts if p)[: 120 - len(sweep) - 10]
    return f"{sweep}-{readable}-{digest}" if readable else f"{sweep}-{digest}"


def _loss_mode(preset: str, overrides: dict[str, Any]) -> tuple[str, dict]:
    from cb_core.train.config import load_preset_raw

    raw, _ = load_preset_raw(preset)
    mode = overrides.get("loss.mode", (raw.get("loss") or {}).get("mode", "triplet_full"))
    use_kl = overrides.get("loss.use_kl", (raw.get("loss") or {}).get("use_kl", False))
    return str(mode), {"use_kl": bool(use_kl)}


def check_ignored_axes(m: Manifest, grid: dict[str, list], grid_index: int | None) -> None:
    """Reject an axis that no point of this grid's loss mode(s) reads."""
    gk = "grid" + (f"[{grid_index}]" if grid_index is not None else "")
    where = f"{m.source}: {gk}"
    modes = grid.get("loss_mode") or grid.get("loss.mode")
    mode_from = "" if modes else m.origins.get("overrides.loss.mode", "")  # LOSS_MODE, say
    for mode in (modes or [None]):
        ov = {**m.overrides, **({"loss.mode": mode} if mode else {})}
        resolved, extra = _loss_mode(m.preset, ov)
        ignored = set(IGNORED_BY_MODE.get(resolved, set()))
        if resolved == "legacy_cb" and not extra["use_kl"]:
            ignored |= {"loss.gamma_kl", "loss.kl_temperature"}
        for axis in grid:
            key = axis_key(axis, where)
            if key in ignored:
                raise SweepError(
                    f"{m.origins.get(f'{gk}.{axis}') or f'{where}.{axis}'}: the loss mode {resolved!r}"
                    f"{f' ({mode_from})' if mode_from else ''} ignores {key} (its weights are "
                    f"{_WEIGHTS_OF.get(resolved, '?')}); every value of this axis would train the same adapter. "
                    f"Sweep the mode's own weights, or split the grid per loss mode (grid: [{{loss_mode: [...], ...}}])")


def check_shadowed_overrides(m: Manifest, grid: dict[str, list], grid_index: int | None) -> None:
    """Reject a shared override of a key that a grid axis also sets: the axis wins at every point, so the shared
    value would silently never be used (`POLICY=x` beside `POLICIES=...`, or both written in one manifest)."""
    gk = "grid" + (f"[{grid_index}]" if grid_index is not None else "")
    for axis in grid:
        key = axis_key(axis, f"{m.source}: {gk}")
        if key not in m.overrides:
            continue
        at = (m.origins.get(f"overrides.{key}")
              or (f"{m.source}: {m.override_keys[key]}" if key in m.override_keys else f"overrides given with {m.source}"))
        axis_at = m.origins.get(f"{gk}.{axis}") or f"{m.source}: {gk}.{axis}"
        raise SweepError(f"{at}: {key} = {m.overrides[key]!r} is also a grid axis ({axis_at}): every point takes "
                         "the axis's values, so this shared value would never be used; drop one of them")


def expand(m: Manifest, *, validate: bool = True) -> list[Point]:
    """Every point of every grid (union, first occurrence kept), in manifest order.

    ``validate`` resolves each point's training config (unknown keys and bad values fail here, before anything
    is launched)."""
    points: dict[str, Point] = {}
    for gi, grid in enumerate(m.grids):
        check_ignored_axes(m, grid, gi if len(m.grids) > 1 else None)
        check_shadowed_overrides(m, grid, gi if len(m.grids) > 1 else None)
        names = list(grid)
        for combo in itertools.product(*(grid[a] for a in names)):
            axes = dict(zip(names, combo))
            ov = {**m.overrides, **{axis_key(a): v for a, v in axes.items()}}
            key = point_key(m.name, m.preset, axes, ov)
            if key in points:
                continue
            p = Point(sweep=m.name, key=key, preset=m.preset, axes=axes, overrides=ov, eval=dict(m.eval))
            if validate:
                from cb_core.train.config import TrainConfigError, load_train_config

                try:
                    load_train_config(m.preset, p.override_strings())
                except TrainConfigError as e:
                    raise SweepError(f"{_written_at(m, gi, grid, axes, str(e))}: point {key}: {e}") from e
                if m.final.get("overrides"):  # any point may be the best one: its final seeds must resolve too,
                    fin = final_points(m, p, m.final["seeds"][:1])[0]  # not only after the whole sweep has run
                    try:
                        load_train_config(m.preset, fin.override_strings())
                    except TrainConfigError as e:
                        raise SweepError(f"{m.source}: final.overrides: the final seeds of point {key}: {e}") from e
            points[key] = p
    return list(points.values())


_POINT_KEY = re.compile(r"^(?:override '|.*? \+ overrides \[[^\]\n]*\]: )([a-z_]+\.[a-z_0-9]+)")


def message_key(message: str) -> str | None:
    """The training key a `load_train_config` message (with overrides) is about, if it names one."""
    hit = _POINT_KEY.match(message)
    return hit.group(1) if hit else None


def _written_at(m: Manifest, gi: int, grid: dict[str, list], axes: dict[str, Any], message: str) -> str:
    """Where the value a point's message is about was given: ``<file>: grid.lr[1]``, ``<file>:
    overrides.train.steps``, its origin (``LR_LIST='1e-4 x'``, `Manifest.origins`), or the file alone (a value
    of the preset, or an override given with the manifest from nowhere named)."""
    key = message_key(message)
    if not key:
        return m.source
    for axis, value in axes.items():
        if axis_key(axis) == key and gi < len(m.grid_keys):
            at = f"{m.grid_keys[gi]}.{axis}"
            if at in m.origins:
                return m.origins[at]
            i = next((j for j, v in enumerate(grid[axis]) if v is value), None)
            return f"{m.source}: {at}" + (f"[{i}]" if i is not None else "")
    at = m.origins.get(f"overrides.{key}")
    if at:
        return at
    at = m.override_keys.get(key, "")
    return f"{m.source}: {at}" if at else m.source


def final_points(m: Manifest, best: Point | dict, seeds: list[int] | None = None) -> list[Point]:
    """The best point trained again (``final.overrides``, e.g. more steps) once per seed: partition keys
    ``<best key>-seed<N>``."""
    b = best if isinstance(best, Point) else point_from_row(best)
    out = []
    for seed in seeds or m.final["seeds"]:
        ov = {**b.overrides, **m.final.get("overrides", {}), "train.seed": int(seed)}
        out.append(Point(sweep=b.sweep, key=f"{b.key}-seed{int(seed)}", preset=b.preset,
                         axes={**b.axes, "seed": int(seed)}, overrides=ov, eval=dict(b.eval)))
    return out


def point_from_row(row: dict) -> Point:
    """Inverse of ``Point.row`` (a row of the sweep_points table)."""
    from cb_core.train.config import parse_overrides

    return Point(sweep=row["sweep"], key=row["key"], preset=row["preset"], axes=json.loads(row["axes"]),
                 overrides=parse_overrides(list(row["overrides"])), eval=json.loads(row.get("eval") or "{}"))
