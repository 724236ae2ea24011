"""The old sbatch toggles (environment variables) -> what they mean now: Dagster op config, CB_* variables, stage
selection, sweep axes. Used by slurm/unified_pipeline.sbatch and slurm/sweep_hparams.sbatch (via cb_assets.cli);
pure, so the mapping is tested without SLURM. README "sbatch entry points" has the table.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Mapping

# SKIP_<STAGE>=1 drops these asset groups from the unified pipeline's selection
STAGES = {"SKIP_ETL_A": ["raw", "etl_a"], "SKIP_GENERATE": ["generation"], "SKIP_ETL_B": ["etl_b"],
          "SKIP_SPLIT": ["curation"], "SKIP_TRAIN": ["training"], "SKIP_EVAL": ["evaluation"]}
ENV_RENAMES = {"DATASETS": "CB_DATASETS", "MODEL": "CB_MODEL", "EVAL_LIMIT": "CB_EVAL_LIMIT",
               "FUJITSU_B4_PATH": "CB_FUJITSU_B4_PATH", "AGENTDOJO_PATH": "CB_AGENTDOJO_PATH",
               "MODE": "CB_TRAIN_PRESET"}
TRIPLET = {"ALPHA": "alpha_benign", "BETA": "beta_harmful", "GAMMA": "gamma_kl"}
GEN_TABLES = ("ds_completions", "dr_completions", "adversarial_safe")
# toggles whose old meaning has no counterpart: accepted, reported, ignored
OBSOLETE = {
    "MWCS_STEP": "MWCS weights are applied per training step by the trainer (data.mwcs_schedule); no fixed step",
    "ALLOW_SKELETON": "skeletons are never trained: generation completes them (SKIP_GENERATE skips that stage)",
    "SKELETON_POLICY": "skeletons are never trained: generation completes them (SKIP_GENERATE skips that stage)",
}
# the unified pipeline's stage toggles: a sweep trains and scores its points on the tiers already built, so it has
# no use for them (said and ignored, as OBSOLETE; they were dropped without a word)
SWEEP_UNUSED = (*STAGES, "USE_VLLM", "BATCH_SIZE", "MAX_TOKENS", "LIMIT", "TEMPERATURE_DS", "TEMPERATURE_DR",
                "TENSOR_PARALLEL", "TOKENIZER")
_TRUE = {"1", "true", "yes", "on"}


class ToggleError(ValueError):
    """A toggle with a value that cannot mean anything: the message names it."""


def _on(env: Mapping[str, str], name: str) -> bool:
    return str(env.get(name, "")).strip().lower() in _TRUE


def toggle_number(env: Mapping[str, str], name: str, kind=float, lo=None):
    """The toggle as a number, >= ``lo`` when given: a value the stage it feeds refuses fails here, not when that
    stage runs after the ETL and generation."""
    raw = str(env[name]).strip()
    try:
        v = kind(raw)
    except ValueError:
        raise ToggleError(f"{name}={raw!r}: expected {'an integer' if kind is int else 'a number'}") from None
    if lo is not None and not v >= lo:  # NaN too
        raise ToggleError(f"{name}={raw!r}: expected {'an integer' if kind is int else 'a number'} >= {lo}")
    return v


@dataclass
class Plan:
    """What one sbatch entry point runs: excluded asset groups, op config per asset, env vars, adapter
    overrides, notes (obsolete toggles, mapping log)."""

    skip_groups: list[str] = field(default_factory=list)
    ops: dict[str, dict[str, Any]] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    train_overrides: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    generation_file: dict[str, Any] = field(default_factory=dict)  # keys over configs/generation.yaml
    origins: dict[str, str] = field(default_factory=dict)  # as training_overrides: which toggle set a training key

    def op(self, name: str) -> dict[str, Any]:
        return self.ops.setdefault(name, {})


def _origin(env: Mapping[str, str], name: str) -> str:
    return f"{name}={env[name]!r}"


def training_overrides(env: Mapping[str, str]) -> tuple[list[str], list[str], dict[str, str]]:
    """TOTAL_STEPS, LOSS_MODE, TRIPLET_*, MAX_LENGTH, POLICY, MWCS_SCHEDULE -> (dotted training overrides, notes,
    origins: ``overrides.<key>`` -> the toggle and value it came from, so an error about it names the variable)."""
    ov, notes, origins = [], [], {}

    def add(name: str, override: str) -> None:
        ov.append(override)
        notes.append(f"{name} -> {override}")  # every toggle says what it became
        origins[f"overrides.{override.split('=', 1)[0]}"] = _origin(env, name)

    if env.get("TOTAL_STEPS"):
        add("TOTAL_STEPS", f"train.steps={toggle_number(env, 'TOTAL_STEPS', int)}")
    if env.get("LOSS_MODE"):
        add("LOSS_MODE", f"loss.mode={env['LOSS_MODE'].strip()}")
    for name in sorted(k for k in env if k.startswith("TRIPLET_") and env[k] != ""):
        suffix = name[len("TRIPLET_"):]
        field_ = TRIPLET.get(suffix, suffix.lower())
        if not re.fullmatch(r"[a-z_]+", field_):
            raise ToggleError(f"{name}: not a triplet setting")
        add(name, f"loss.{field_}={env[name].strip()}")
    if env.get("MAX_LENGTH"):
        add("MAX_LENGTH", f"model.max_length={toggle_number(env, 'MAX_LENGTH', int)}")
    if env.get("POLICY"):
        add("POLICY", f"data.mask_policy={env['POLICY'].strip()}")
    if env.get("MWCS_SCHEDULE"):
        add("MWCS_SCHEDULE", f"data.mwcs_schedule={env['MWCS_SCHEDULE'].strip()}")
    return ov, notes, origins


def pipeline_plan(env: Mapping[str, str]) -> Plan:
    """unified_pipeline.sbatch: the whole graph (minus sweeps) with SKIP_* stages left out."""
    p = Plan()
    for toggle, groups in STAGES.items():
        if _on(env, toggle):
            p.skip_groups += groups
            p.notes.append(f"{toggle}=1 -> groups {groups} not materialized")
    for old, new in ENV_RENAMES.items():
        if env.get(old):
            p.env[new] = env[old]
            p.notes.append(f"{old} -> {new}")
    tok = env.get("TOKENIZER")
    if tok:
        if tok != env.get("MODEL", tok):
            raise ToggleError(f"TOKENIZER={tok!r} differs from MODEL={env.get('MODEL')!r}: the tokenizer comes with "
                              "the model profile (configs/models/<MODEL>.yaml); set MODEL only")
        p.env.setdefault("CB_MODEL", tok)
        p.notes.append("TOKENIZER -> CB_MODEL (the profile's tokenizer)")
    gen: dict[str, Any] = {}
    if _on(env, "USE_VLLM"):
        gen["backend"] = "vllm"
        p.notes.append("USE_VLLM=1 -> generation backend vllm")
    for name, key, lo in (("BATCH_SIZE", "batch_size", 1), ("MAX_TOKENS", "max_tokens", 1), ("LIMIT", "limit", 0)):
        if env.get(name):
            gen[key] = toggle_number(env, name, int, lo)
            p.notes.append(f"{name} -> generation {key}")
    for table in GEN_TABLES:
        if gen:
            p.op(table).update(gen)
    if env.get("TEMPERATURE_DS"):
        t = toggle_number(env, "TEMPERATURE_DS", float, 0)
        p.op("ds_completions")["temperature"] = t
        p.op("adversarial_safe").setdefault("temperature", t)
    if env.get("TEMPERATURE_DR"):
        p.op("dr_completions")["temperature"] = toggle_number(env, "TEMPERATURE_DR", float, 0)
    if env.get("TENSOR_PARALLEL"):
        p.generation_file["tensor_parallel_size"] = toggle_number(env, "TENSOR_PARALLEL", int, 1)
        p.notes.append("TENSOR_PARALLEL -> tensor_parallel_size in a copy of configs/generation.yaml for this job")
    if env.get("MAX_LENGTH"):
        p.op("renders")["max_length"] = toggle_number(env, "MAX_LENGTH", int, 1)
        p.notes.append("MAX_LENGTH -> renders max_length")
    if env.get("MWCS_SCHEDULE"):
        name = env["MWCS_SCHEDULE"].strip()
        p.op("lossmasks")["mwcs"] = name if name.endswith((".yaml", ".yml")) else f"configs/mwcs/{name}.yaml"
        p.notes.append(f"MWCS_SCHEDULE -> lossmasks mwcs {p.op('lossmasks')['mwcs']}")
    if env.get("TEMPERATURE_DS") or env.get("TEMPERATURE_DR"):
        p.notes.append("TEMPERATURE_DS/DR -> generation temperature (ds_completions, adversarial_safe / "
                       "dr_completions)")
    ov, notes, p.origins = training_overrides(env)
    p.notes += notes
    if env.get("MODE"):
        p.origins["preset"] = _origin(env, "MODE")
    if ov:
        p.train_overrides = ov
        p.op("adapter")["overrides"] = ov
    if env.get("EVAL_LIMIT"):
        p.op("eval_scores")["limit"] = toggle_number(env, "EVAL_LIMIT", int, 1)
        p.notes.append("EVAL_LIMIT -> eval_scores limit")
    for name, why in OBSOLETE.items():
        if env.get(name):
            p.notes.append(f"{name} ignored: {why}")
    return p


def sweep_ignored(env: Mapping[str, str]) -> list[str]:
    """Notes for the toggles sweep_hparams.sbatch does not use: the pipeline's stage toggles and the obsolete ones."""
    notes = [f"{name} ignored: a sweep trains and scores its points on the tiers already built (a toggle of "
             "unified_pipeline.sbatch)" for name in SWEEP_UNUSED if env.get(name)]
    return notes + [f"{name} ignored: {why}" for name, why in OBSOLETE.items() if env.get(name)]


def _list(env: Mapping[str, str], name: str, kind) -> list:
    raw = str(env[name]).replace(",", " ").split()
    try:
        return [kind(x) for x in raw]
    except ValueError:
        raise ToggleError(f"{name}={env[name]!r}: expected a list of {kind.__name__}") from None


def sweep_manifest(env: Mapping[str, str], default: str = "full"
                   ) -> tuple[str | dict, list[str], list[str], dict[str, str]]:
    """sweep_hparams.sbatch: (a manifest name or a manifest dict built from ALPHAS / LAYER_CONFIGS / POLICIES,
    shared overrides, notes, origins). QUICK_TEST=1 starts from `quick`, else SWEEP (else ``default``: the
    caller's `$CB_SWEEP`, `tiny` on the demo sample, else `full`). ``origins`` (`Manifest.origins`): where each
    value the toggles gave came from, the variable and its value, and for a built manifest where each value of
    the base manifest is written in its file, so errors name those instead of the built manifest.

    LAYER_CONFIGS: layer sets separated by ';' or spaces, layers inside a set by ','
    (``"10,20;8,16,24"`` or ``"10,20 8,16,24"``)."""
    base = "quick" if _on(env, "QUICK_TEST") else (env.get("SWEEP") or default)
    notes = [f"manifest {base}" + (" (QUICK_TEST=1)" if _on(env, "QUICK_TEST") else "")]
    ov, n2, origins = training_overrides(env)
    notes += n2
    if env.get("EVAL_LIMIT"):  # renamed to CB_EVAL_LIMIT for the runs: checked under the name the user set
        toggle_number(env, "EVAL_LIMIT", int, 1)
    grid: dict[str, list] = {}
    if env.get("ALPHAS"):
        grid["alpha"] = _list(env, "ALPHAS", float)
    if env.get("LAYER_CONFIGS"):
        sets = [s for s in re.split(r"[;\s]+", env["LAYER_CONFIGS"].strip()) if s]
        try:
            grid["layers"] = [[int(x) for x in s.split(",") if x] for s in sets]
        except ValueError:
            raise ToggleError(f"LAYER_CONFIGS={env['LAYER_CONFIGS']!r}: expected sets like '10,20;8,16,24'") from None
    if env.get("POLICIES"):
        grid["policy"] = env["POLICIES"].replace(",", " ").split()
    if not grid:
        return base, ov, notes, origins
    from cb_core.sweep.manifest import load_manifest

    m = load_manifest(base)
    axes = dict(m.grids[0]) if len(m.grids) == 1 else {}
    origins = {**{f"grid.{a}": f"{m.source}: grid.{a}" for a in axes},
               **{f"overrides.{k}": f"{m.source}: {at}" for k, at in m.override_keys.items()},
               **{f"grid.{a}": _origin(env, name) for a, name in (("alpha", "ALPHAS"), ("layers", "LAYER_CONFIGS"),
                                                                 ("policy", "POLICIES")) if a in grid},
               **origins}
    axes.update(grid)
    notes.append(f"grid from toggles: {sorted(grid)} over {base}")
    raw = {"name": f"{m.name}-custom", "preset": m.preset, "description": f"{base} with sbatch toggles",
           "overrides": dict(m.overrides), "grid": axes, "eval": dict(m.eval),
           "selection": {"metric": m.selection.metric, "gates": m.selection.gates,
                         "not_measured": m.selection.not_measured},
           "final": {"seeds": m.final["seeds"], "overrides": m.final.get("overrides", {})},
           "continue_on_error": m.continue_on_error}
    return raw, ov, notes, origins
