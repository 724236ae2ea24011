"""Training configuration: a preset YAML (configs/train/<name>.yaml) + dotted overrides -> ``TrainConfig``.

Sections mirror the YAML: ``model``, ``lora``, ``loss``, ``train``, ``data``, ``log``. Overrides are
``section.field=value`` strings (``train.lr=3e-5``, ``loss.target_layers=[10,20]``), values parsed with
``yaml.safe_load``; an unknown section or field is an error naming it. The loss field names follow the
old environment variables (alpha_benign, beta_harmful, gamma_kl, margin_benign, margin_harmful, ...).
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable, get_args, get_origin, get_type_hints

import yaml

from cb_core.config import (ConfigError, LocatedError, read_config, check_bool, check_int, check_number, check_str, did_you_mean, named_config,
                            safe_load)
from cb_core.mixture import schedule_path
from cb_core.schemas import POLICY_NAMES
from cb_core.train.losses import CENTROIDS, DISTANCES, LOSS_MODES, SCHEDULES, check_centroid_config

ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class TrainConfigError(LocatedError):
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
    # hidden_states[l], 0 = embeddings. [2, 4] fits the default model.profile (the random tiny model, 4 layers):
    # a dict-built config is consistent as it stands; every preset sets its own ([10, 20] for 8B)
    target_layers: list[int] = field(default_factory=lambda: [2, 4])
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

    def validate(self, source: str = "<config>", file: str | None = None,
                 overridden: Iterable[str] = ()) -> "TrainConfig":
        """Every field against its annotated type and ``FIELD_RULES`` (`check_field`), then the checks that
        involve several fields; errors name ``source`` and ``section.field``. With ``file`` (the preset
        ``source`` adds overrides to), a value that no key in ``overridden`` set is named by ``file`` alone, so
        that the message gives its line there."""
        overridden = set(overridden)

        def src(*keys: str) -> str:
            return file if file and not overridden.intersection(keys) else source

        for sec in SECTIONS:
            for f in fields(SECTIONS[sec]):
                check_field(sec, f.name, getattr(getattr(self, sec), f.name), src(f"{sec}.{f.name}"))
        if self.loss.mode == "triplet_full":
            try:
                check_centroid_config(self.loss.centroid, self.harmful_per_micro())
            except ValueError as e:
                at = src("loss.mode", "loss.centroid", "train.batch_size", "train.harmful_fraction")
                raise TrainConfigError(f"{at}: loss.centroid: {e}") from None
        try:  # found now: a sweep would otherwise launch every point before the first one failed on it
            named_config("models", self.model.profile, "model profile")
        except ConfigError as e:
            raise TrainConfigError(f"{src('model.profile')}: model.profile: {e}") from None
        from cb_core.model import profile_depth

        depth = profile_depth(self.model.profile)  # the trainer's own check, before a sweep launches every point
        if depth is not None and max(self.loss.target_layers) > depth:
            raise TrainConfigError(f"{src('loss.target_layers', 'model.profile')}: loss.target_layers: "
                                   f"{self.loss.target_layers}: model profile {self.model.profile!r} has {depth} "
                                   f"layers (hidden_states[0..{depth}])")
        if self.data.mwcs_schedule and not schedule_path(self.data.mwcs_schedule).is_file():
            raise TrainConfigError(f"{src('data.mwcs_schedule')}: data.mwcs_schedule: MWCS schedule "
                                   f"{self.data.mwcs_schedule!r} not found (looked for "
                                   f"{schedule_path(self.data.mwcs_schedule)})")
        T = self.train
        if self.harmful_per_micro() < 1 or self.harmful_per_micro() >= T.batch_size:
            raise TrainConfigError(f"{src('train.batch_size', 'train.harmful_fraction')}: train.batch_size: batch_size "
                                   f"{T.batch_size} x harmful_fraction "
                                   f"{T.harmful_fraction} must leave >= 1 harmful and >= 1 retain sample per micro-batch")
        return self


# ---------------------------------------------------------------------------------------- field checks
# What a field's annotation cannot say: lo / hi bound a number (or each int of a list), lo_open / hi_open make
# the bound strict, choices lists the texts a str (or each item of a list[str]) may be (what: the message says
# "unknown <what>", as lossmask / mixture / sweep manifests do for the same mistake). Every number is also
# finite and never a boolean, a list is never empty, and null passes only where the annotation has `| None`.
_WEIGHT = {"lo": 0}  # a loss weight / margin: 0 switches the term off, a negative one reverses it
_COUNT = {"lo": 1}  # a step, size or period (log.every: step % every; steps: the schedules divide by it)
FIELD_RULES: dict[str, dict[str, Any]] = {
    "model.max_length": _COUNT,
    "model.dtype": {"choices": ("float32", "bfloat16", "float16")},
    "lora.r": _COUNT,
    "lora.alpha": {"lo": 0, "lo_open": True},  # the adapter is scaled by alpha / r
    "lora.dropout": {"lo": 0, "hi": 1, "hi_open": True},
    "lora.target_modules": {"choices": ALL_PROJECTIONS},
    "lora.layers_to_transform": {"lo": 0},  # 0-based decoder layers (the model's depth is checked in add_lora)
    "loss.mode": {"choices": LOSS_MODES},
    "loss.target_layers": {"lo": 1},  # hidden_states[l]: the output of decoder layer l - 1
    **dict.fromkeys(["loss.alpha_benign", "loss.beta_harmful", "loss.gamma_kl", "loss.margin_benign",
                     "loss.margin_harmful", "loss.margin_scale", "loss.mix_l2_weight", "loss.mix_cos_weight",
                     "loss.alpha"], _WEIGHT),
    **dict.fromkeys(["loss.benign_pos_distance", "loss.benign_neg_distance", "loss.harmful_pos_distance",
                     "loss.harmful_neg_distance"], {"choices": DISTANCES}),
    "loss.centroid": {"choices": CENTROIDS},
    "loss.centroid_decay": {"lo": 0, "hi": 1, "hi_open": True},  # EMA: decay 1 would never move mu
    "loss.kl_temperature": {"lo": 0, "lo_open": True},  # logits / temperature
    "loss.schedule": {"choices": SCHEDULES},
    "loss.weighting": {"choices": ("dual", "single_alpha")},
    **dict.fromkeys(["train.steps", "train.batch_size", "train.grad_accum", "train.nproc", "train.checkpoint_every",
                     "train.fast_dev_steps", "train.keep_checkpoints", "log.every", "log.generation_tokens"], _COUNT),
    "train.harmful_fraction": {"lo": 0, "lo_open": True, "hi": 1, "hi_open": True},
    "train.lr": {"lo": 0, "lo_open": True},
    "train.weight_decay": {"lo": 0},
    "train.warmup_steps": {"lo": 0},  # 0: no warm-up
    "train.max_grad_norm": {"lo": 0, "lo_open": True},  # clipping to 0 zeroes every gradient
    "train.seed": {"lo": 0, "hi": 2**32 - 1},
    "train.throttle_s": {"lo": 0},  # time.sleep
    "data.mask_policy": {"choices": POLICY_NAMES, "what": "loss-mask policy"},
}


def _check_text(value: Any, where: str, choices=None, what=None, **_) -> str:
    """``check_str``; with ``what`` an unknown choice reads "unknown <what> 'x' (known: ...)"."""
    check_str(value, where, None if what else choices)
    if what and value not in choices:
        raise ConfigError(f"{where}: unknown {what} {value!r} (known: {list(choices)})")
    return value


_CHECKS = {  # annotated type -> its check (cb_core.config), given the field's rule
    bool: lambda v, where, **_: check_bool(v, where),
    int: lambda v, where, lo=None, hi=None, **_: check_int(v, where, lo, hi),
    float: lambda v, where, lo=None, hi=None, lo_open=False, hi_open=False, **_: check_number(v, where, lo, hi,
                                                                                            lo_open, hi_open),
    str: _check_text,
}
_HINTS = {sec: get_type_hints(cls) for sec, cls in SECTIONS.items()}


def _unnull(tp: Any) -> tuple[Any, bool]:
    """(the annotation without ``| None``, whether it had it: only then may the value be null)."""
    rest = [a for a in get_args(tp) if a is not type(None)]
    return (rest[0], True) if len(rest) < len(get_args(tp)) else (tp, False)


def _check_value(value: Any, tp: Any, where: str, rule: dict) -> None:
    """``value`` against the annotation ``tp`` (bool | int | float | str, list[...] of one, ``| None``)."""
    tp, nullable = _unnull(tp)
    if value is None and nullable:
        return
    if get_origin(tp) is list:
        if not isinstance(value, list) or not value:
            raise ConfigError(f"{where} must be a non-empty list, e.g. [a, b], got {value!r} ({type(value).__name__})")
        for i, item in enumerate(value):
            _check_value(item, get_args(tp)[0], f"{where}[{i}]", rule)
        return
    _CHECKS[tp](value, where, **rule)


def check_field(sec: str, name: str, value: Any, source: str) -> None:
    """One field's value by its annotation and ``FIELD_RULES``: TrainConfigError naming ``source`` (the preset
    file and the overrides given) and ``sec.name``, and saying what was found."""
    try:
        _check_value(value, _HINTS[sec][name], f"{source}: {sec}.{name}", FIELD_RULES.get(f"{sec}.{name}", {}))
    except ConfigError as e:
        raise TrainConfigError(str(e)) from None


# ------------------------------------------------------------------------------------------ loading
def presets_dir() -> Path:
    from cb_core.config import config_dir

    return config_dir() / "train"


def preset_path(name_or_path: str) -> Path:
    from cb_core.config import named_config

    return named_config("train", name_or_path, "training preset", TrainConfigError)


def default_preset(demo: bool | None = None) -> str:
    """The preset a run gets when none is named: $CB_TRAIN_PRESET, else operations.yaml `training.preset`, else
    `tiny` on the demo sample (``demo``; default: configs/datasets.yaml's selection), else `stage1`. One rule for
    the `adapter` asset, `cb run` and the sbatch plan; a preset that does not exist is named with where it came
    from."""
    from cb_core.config import DatasetsConfig, setting

    def existing(value: str, where: str) -> str:
        try:
            preset_path(value)
        except TrainConfigError as e:
            raise TrainConfigError(f"{where}: {e}") from None
        return value

    name = setting("CB_TRAIN_PRESET", "operations.yaml", "training", "preset", None, str, check=existing)
    if name:
        return name
    if demo is None:
        demo = DatasetsConfig.load().selection().demo
    return "tiny" if demo else "stage1"


def load_preset_raw(name_or_path: str) -> tuple[dict, Path]:
    path = preset_path(name_or_path)
    try:
        raw = read_config(path) or {}
    except yaml.YAMLError as e:
        raise TrainConfigError(f"{path}: invalid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise TrainConfigError(f"{path}: expected a mapping at the top level")
    return raw, path


def parse_overrides(items: Iterable[str] | dict | None) -> dict[str, Any]:
    """``["train.lr=3e-5", "loss.target_layers=[10,20]"]`` (or a mapping) -> {"train.lr": 3e-05, ...}. One key
    given twice with two values is an error (the last one silently won, where a config file's duplicate key is
    refused); the same value twice is one override."""
    if not items:
        return {}
    if isinstance(items, dict):
        return dict(items)
    out: dict[str, Any] = {}
    given: dict[str, str] = {}
    for item in items:
        if "=" not in item:
            raise TrainConfigError(f"override {item!r}: expected section.field=value")
        k, v = item.split("=", 1)
        try:
            val = safe_load(v) if v.strip() else None
        except yaml.YAMLError as e:
            raise TrainConfigError(f"override {item!r}: cannot parse value: {e}") from e
        k, val = k.strip(), _number(val)
        if k in out and out[k] != val:
            raise TrainConfigError(f"override {item!r}: {k} is also given as {given[k]!r}; give each key once")
        out[k], given[k] = val, item
    return out


def _number(val: Any) -> Any:
    """YAML 1.1 reads ``3e-5`` (no dot) as a string: numbers written that way are numbers here."""
    if isinstance(val, str):
        try:
            return float(val)
        except ValueError:
            return val
    return val


def _coerce(cls, body: dict) -> dict:
    """Numbers as their annotation wants them: a float field takes an int or a ``1e-5`` string (YAML 1.1 reads
    that as text), an int field a whole float (``1e3``). Anything else stays as written for `check_field`
    (a boolean is never a number)."""
    hints, out = get_type_hints(cls), {}
    for k, v in body.items():
        kind, _ = _unnull(hints[k])
        if kind in (int, float) and not isinstance(v, bool):
            v = _number(v)
            v = float(v) if kind is float and isinstance(v, int) else v
            v = int(v) if kind is int and isinstance(v, float) and v.is_integer() else v
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
            raise TrainConfigError(f"{source} {key!r}: unknown field {f!r} of section {sec!r}{did_you_mean(f, names)} "
                                   f"(known: {sorted(names)})")
        out.setdefault(sec, {})
        if out[sec] is None:
            out[sec] = {}
        out[sec][f] = value
    return out


def from_dict(raw: dict, source: str = "<dict>", file: str | None = None,
              overridden: Iterable[str] = ()) -> TrainConfig:
    """``source`` names where ``raw`` came from in messages; ``file``/``overridden``: see `TrainConfig.validate`
    (a key or section nobody overrode is the file's, named by ``file``)."""
    overridden = set(overridden)
    written = file or source  # keys an override cannot add (apply_overrides refuses unknown ones)
    unknown = set(raw) - {"name", "description", *SECTIONS}
    if unknown:
        raise TrainConfigError(f"{written}: unknown top-level keys {sorted(unknown)}"
                               f"{did_you_mean(sorted(unknown)[0], ['name', 'description', *SECTIONS])} "
                               f"(known: {['name', *SECTIONS]})")
    kwargs: dict[str, Any] = {"name": str(raw.get("name", Path(source).stem)), "description": str(raw.get("description", ""))}
    for sec, cls in SECTIONS.items():
        body = raw.get(sec) or {}
        if not isinstance(body, dict):
            raise TrainConfigError(f"{written}: {sec}: expected a mapping")
        names = {x.name for x in fields(cls)}
        bad = set(body) - names
        if bad:
            raise TrainConfigError(f"{written}: {sec}: unknown fields {sorted(bad)}"
                                   f"{did_you_mean(sorted(bad)[0], names)} "
                                   f"(known: {sorted(names)})")
        try:
            kwargs[sec] = cls(**_coerce(cls, body))
        except TypeError as e:
            raise TrainConfigError(f"{source}: {sec}: {e}") from e
    return TrainConfig(**kwargs).validate(source, file, overridden)


def load_train_config(preset: str = "tiny", overrides: Iterable[str] | dict | None = None) -> tuple[TrainConfig, dict, dict]:
    """(resolved config, the preset as written, the parsed overrides)."""
    raw, path = load_preset_raw(preset)
    ov = parse_overrides(overrides)
    cfg = from_dict(apply_overrides(raw, ov), source=str(path) + (f" + overrides {sorted(ov)}" if ov else ""),
                    file=str(path), overridden=ov)
    return cfg, raw, ov
