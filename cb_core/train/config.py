"""Training configuration: a preset YAML (configs/train/<name>.yaml) + dotted overrides -> ``TrainConfig``.

Sections mirror the YAML: ``model``, ``lora``, ``loss``, ``train``, ``data``, ``log``. Overrides are
``section.field=value`` strings (``train.lr=3e-5``, ``loss.target_layers=[10,20]``), values parsed with
``yaml.safe_load``; an unknown section or field is an error naming it. The loss field names follow the
old environment variables (alpha_benign, beta_harmful, gamma_kl, margin_benign, margin_harmful, ...).
"""
from __future__ import annotations

import copy
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable

import yaml

from cb_core.config import safe_load
from cb_core.train.losses import CENTROIDS, DISTANCES, LOSS_MODES, SCHEDULES, check_centroid_config

ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class TrainConfigError(ValueError):
    """A bad preset or override: the message names the file/override and the field."""


@dataclass
class ModelSection:
    profile: str = "tiny"  # configs/models/<profile>.yaml
    max_length: int = 512  # training sequences are cut to this many tokens (the mask is kept in the window)
    dtype: str = "float32"  # float32 | bfloat16 | float16
    gradient_checkpointing: bool = False


@dataclass
class LoraSection:
    r: int = 16
    alpha: float = 16.0
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: list(ALL_PROJECTIONS))
    layers_to_transform: list[int] | None = None  # decoder layer indices (0-based); None: every layer


@dataclass
class LossSection:
    mode: str = "triplet_full"  # triplet_full | legacy_cb | legacy_schema
    target_layers: list[int] = field(default_factory=lambda: [10, 20])  # hidden_states[l], 0 = embeddings
    # triplet_full
    alpha_benign: float = 1.0
    beta_harmful: float = 1.0
    gamma_kl: float = 0.5
    margin_benign: float = 0.45  # used as written when margin_scale is null
    margin_harmful: float = 0.3
    # margins on the measured scale: m = margin_scale x mean distance of the base model's representations to
    # the first step's harmful centroid (d_n(b, mu) for m_b, d_p(h, mu) for m_h), measured before step 1
    margin_scale: float | None = 0.5
    benign_pos_distance: str = "cosine"
    benign_neg_distance: str = "cosine"
    harmful_pos_distance: str = "cosine"
    harmful_neg_distance: str = "cosine"
    mix_l2_weight: float = 0.0
    mix_cos_weight: float = 1.0
    centroid: str = "ema"  # ema (detached running mean) | batch (detached, >= 2 harmful) | batch_live (old)
    centroid_decay: float = 0.9
    kl_temperature: float = 1.0
    # legacy_cb / legacy_schema
    alpha: float = 10.0
    schedule: str = "reference"  # reference | legacy_horizon | stage2 | constant
    weighting: str = "dual"  # dual: c_s, c_r both from the schedule | single_alpha: c_s scheduled, c_r = 1
    use_kl: bool = False  # legacy_cb: add gamma_kl * KL


@dataclass
class TrainSection:
    steps: int = 500
    batch_size: int = 16  # samples per micro-batch per process
    grad_accum: int = 1  # micro-batches per optimizer step
    harmful_fraction: float = 0.5  # share of each micro-batch drawn from the harmful pool
    lr: float = 5e-5
    weight_decay: float = 0.0
    warmup_steps: int = 10
    max_grad_norm: float = 1.0
    seed: int = 0
    nproc: int = 1  # processes (torchrun) when no SLURM allocation says otherwise
    checkpoint_every: int = 50
    keep_checkpoints: int = 3  # ranked by selection_metric (lower is better) + the latest
    selection_metric: str = "train/loss"
    fast_dev_run: bool = False  # a handful of steps for a smoke run
    fast_dev_steps: int = 3
    throttle_s: float = 0.0  # sleep per step (tests that kill a run mid-way; demos)
    deterministic: bool = False  # torch.use_deterministic_algorithms (recorded in run_metadata.json)


@dataclass
class DataSection:
    mwcs_schedule: str | None = "default"  # configs/mwcs/<name>.yaml; null: static sample weights
    mask_prompt_tokens: bool = False  # stage2: never a loss on system/user tokens (drops them from masks)
    mask_policy: str | None = None  # one lossmask policy for every sample (sweeps); null: curation's per category


@dataclass
class LogSection:
    every: int = 1
    wandb: bool = True  # W&B, offline unless WANDB_API_KEY is set (or WANDB_MODE says otherwise)
    wandb_project: str = "cb-platform"
    post_checks: bool = True  # final KL / cos-sim / greedy generations for the adapter's asset checks
    generation_tokens: int = 24


SECTIONS = {"model": ModelSection, "lora": LoraSection, "loss": LossSection, "train": TrainSection,
            "data": DataSection, "log": LogSection}


@dataclass
class TrainConfig:
    name: str = "custom"
    description: str = ""
    model: ModelSection = field(default_factory=ModelSection)
    lora: LoraSection = field(default_factory=LoraSection)
    loss: LossSection = field(default_factory=LossSection)
    train: TrainSection = field(default_factory=TrainSection)
    data: DataSection = field(default_factory=DataSection)
    log: LogSection = field(default_factory=LogSection)

    # ----------------------------------------------------------------------------------------------
    @property
    def total_steps(self) -> int:
        return min(self.train.steps, self.train.fast_dev_steps) if self.train.fast_dev_run else self.train.steps

    def harmful_per_micro(self) -> int:
        return int(round(self.train.batch_size * self.train.harmful_fraction))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def validate(self, source: str = "<config>") -> "TrainConfig":
        def err(f: str, msg: str) -> TrainConfigError:
            return TrainConfigError(f"{source}: {f}: {msg}")

        L = self.loss
        if L.mode not in LOSS_MODES:
            raise err("loss.mode", f"unknown loss mode {L.mode!r} (known: {LOSS_MODES})")
        for k in ("benign_pos_distance", "benign_neg_distance", "harmful_pos_distance", "harmful_neg_distance"):
            if getattr(L, k) not in DISTANCES:
                raise err(f"loss.{k}", f"unknown distance {getattr(L, k)!r} (known: {DISTANCES})")
        if L.schedule not in SCHEDULES:
            raise err("loss.schedule", f"unknown schedule {L.schedule!r} (known: {SCHEDULES})")
        if L.weighting not in ("dual", "single_alpha"):
            raise err("loss.weighting", "must be dual or single_alpha")
        if not L.target_layers or any((not isinstance(x, int)) or x < 1 for x in L.target_layers):
            raise err("loss.target_layers", f"need a non-empty list of layer indices >= 1, got {L.target_layers}")
        if not 0.0 <= L.centroid_decay < 1.0:
            raise err("loss.centroid_decay", f"must be in [0, 1), got {L.centroid_decay}")
        if L.kl_temperature <= 0:
            raise err("loss.kl_temperature", "must be > 0")
        if L.centroid not in CENTROIDS:
            raise err("loss.centroid", f"unknown centroid {L.centroid!r} (known: {CENTROIDS})")
        if L.mode == "triplet_full":
            try:
                check_centroid_config(L.centroid, self.harmful_per_micro())
            except ValueError as e:
                raise err("loss.centroid", str(e)) from None
        T = self.train
        for k in ("steps", "batch_size", "grad_accum", "nproc", "checkpoint_every", "fast_dev_steps"):
            if int(getattr(T, k)) < 1:
                raise err(f"train.{k}", f"must be >= 1, got {getattr(T, k)}")
        if not 0.0 < T.harmful_fraction < 1.0:
            raise err("train.harmful_fraction", f"must be in (0, 1), got {T.harmful_fraction}")
        if self.harmful_per_micro() < 1 or self.harmful_per_micro() >= T.batch_size:
            raise err("train.batch_size", f"batch_size {T.batch_size} x harmful_fraction {T.harmful_fraction} must "
                      "leave >= 1 harmful and >= 1 retain sample per micro-batch")
        if self.model.dtype not in ("float32", "bfloat16", "float16"):
            raise err("model.dtype", f"unknown dtype {self.model.dtype!r}")
        if self.data.mask_policy is not None:
            from cb_core.schemas import POLICY_NAMES as POLICIES

            if self.data.mask_policy not in POLICIES:
                raise err("data.mask_policy", f"unknown loss-mask policy {self.data.mask_policy!r} (known: {list(POLICIES)})")
        unknown = set(self.lora.target_modules) - set(ALL_PROJECTIONS)
        if unknown:
            raise err("lora.target_modules", f"unknown projections {sorted(unknown)} (known: {ALL_PROJECTIONS})")
        return self


# ------------------------------------------------------------------------------------------ loading
def presets_dir() -> Path:
    from cb_core.config import config_dir

    return config_dir() / "train"


def preset_path(name_or_path: str) -> Path:
    from cb_core.config import named_config

    return named_config("train", name_or_path, "training preset", TrainConfigError)


def load_preset_raw(name_or_path: str) -> tuple[dict, Path]:
    path = preset_path(name_or_path)
    try:
        raw = safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise TrainConfigError(f"{path}: invalid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise TrainConfigError(f"{path}: expected a mapping at the top level")
    return raw, path


def parse_overrides(items: Iterable[str] | dict | None) -> dict[str, Any]:
    """``["train.lr=3e-5", "loss.target_layers=[10,20]"]`` (or a mapping) -> {"train.lr": 3e-05, ...}."""
    if not items:
        return {}
    if isinstance(items, dict):
        return dict(items)
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise TrainConfigError(f"override {item!r}: expected section.field=value")
        k, v = item.split("=", 1)
        try:
            val = safe_load(v) if v.strip() else None
        except yaml.YAMLError as e:
            raise TrainConfigError(f"override {item!r}: cannot parse value: {e}") from e
        out[k.strip()] = _number(val)
    return out


def _number(val: Any) -> Any:
    """YAML 1.1 reads ``3e-5`` (no dot) as a string: numbers written that way are numbers here."""
    if isinstance(val, str):
        try:
            return float(val)
        except ValueError:
            return val
    return val


def _coerce(cls, body: dict, where: str) -> dict:
    """Check each field against its default's type (ints stay ints, floats accept ints and 1e-5 strings)."""
    out = {}
    defaults = {f.name: f for f in fields(cls)}
    for k, v in body.items():
        f = defaults[k]
        if v is None and "None" in str(f.type):
            out[k] = v
            continue
        kind = type(f.default) if f.default is not MISSING and f.default is not None else None
        if kind is float and not isinstance(v, bool):
            v = _number(v)
            if isinstance(v, int):
                v = float(v)
            if not isinstance(v, float):
                raise TrainConfigError(f"{where}.{k}: expected a number, got {v!r}")
        elif kind is int and (isinstance(v, bool) or not isinstance(v, int)):
            if isinstance(v, float) and v.is_integer():
                v = int(v)
            else:
                raise TrainConfigError(f"{where}.{k}: expected an integer, got {v!r}")
        elif kind is bool and not isinstance(v, bool):
            raise TrainConfigError(f"{where}.{k}: expected true/false, got {v!r}")
        out[k] = v
    return out


def apply_overrides(raw: dict, overrides: dict[str, Any], source: str = "override") -> dict:
    out = copy.deepcopy(raw)
    for key, value in overrides.items():
        parts = key.split(".")
        if len(parts) == 1 and parts[0] in ("name", "description"):
            out[parts[0]] = value
            continue
        if len(parts) != 2 or parts[0] not in SECTIONS:
            raise TrainConfigError(f"{source} {key!r}: expected <section>.<field> with section in {list(SECTIONS)}")
        sec, f = parts
        names = {x.name for x in fields(SECTIONS[sec])}
        if f not in names:
            raise TrainConfigError(f"{source} {key!r}: unknown field {f!r} of section {sec!r} (known: {sorted(names)})")
        out.setdefault(sec, {})
        if out[sec] is None:
            out[sec] = {}
        out[sec][f] = value
    return out


def from_dict(raw: dict, source: str = "<dict>") -> TrainConfig:
    unknown = set(raw) - {"name", "description", *SECTIONS}
    if unknown:
        raise TrainConfigError(f"{source}: unknown top-level keys {sorted(unknown)} (known: {['name', *SECTIONS]})")
    kwargs: dict[str, Any] = {"name": str(raw.get("name", Path(source).stem)), "description": str(raw.get("description", ""))}
    for sec, cls in SECTIONS.items():
        body = raw.get(sec) or {}
        if not isinstance(body, dict):
            raise TrainConfigError(f"{source}: {sec}: expected a mapping")
        names = {x.name for x in fields(cls)}
        bad = set(body) - names
        if bad:
            raise TrainConfigError(f"{source}: {sec}: unknown fields {sorted(bad)} (known: {sorted(names)})")
        try:
            kwargs[sec] = cls(**_coerce(cls, body, f"{source}: {sec}"))
        except TypeError as e:
            raise TrainConfigError(f"{source}: {sec}: {e}") from e
    return TrainConfig(**kwargs).validate(source)


def load_train_config(preset: str = "tiny", overrides: Iterable[str] | dict | None = None) -> tuple[TrainConfig, dict, dict]:
    """(resolved config, the preset as written, the parsed overrides)."""
    raw, path = load_preset_raw(preset)
    ov = parse_overrides(overrides)
    cfg = from_dict(apply_overrides(raw, ov), source=str(path) + (f" + overrides {sorted(ov)}" if ov else ""))
    return cfg, raw, ov
