"""Score one published adapter against its own base model: the single body behind `eval_scores` and every sweep
point (`sweep_eval_scores`, `final_eval_scores`), so a leaderboard row and the main `eval_scores` table are
computed the same way.

The base is the exact weights the adapter was trained on: `base_model_name_or_path` in `adapter_config.json`
when that is a local directory (the tiny agent, a prebuilt checkpoint), otherwise the model profile named in the
resolved training config published beside the adapter (`config.yaml`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import polars as pl

from cb_core.evaluate.pipeline import EvaluationOutcome, EvaluationSettings, evaluate, held_out_samples, \
    representation_rows, write_outputs

EVAL_FRAMES = ("eval_attacks", "eval_split", "train_split", "traces", "renders")


class AdapterNotFound(FileNotFoundError):
    """No published adapter (or its resolved config) at the given directory."""


@dataclass(frozen=True)
class AdapterRecord:
    adapter_dir: Path
    model_profile: str
    target_layers: list[int]
    base_dir: Path | None  # the exact base weights, when they are a local directory
    note: str | None = None  # why scoring does not use the exact trained-on base (said in the eval log)

    @property
    def base_name(self) -> str:
        return str(self.base_dir) if self.base_dir else self.model_profile


def adapter_record(path: str | Path) -> AdapterRecord:
    """Read what scoring needs from a published adapter directory (`adapter_config.json` + `config.yaml`)."""
    import yaml

    path = Path(path)
    cfg_path = path / "config.yaml"
    if not (path / "adapter_config.json").exists() or not cfg_path.exists():
        raise AdapterNotFound(f"no published adapter at {path} (adapter_config.json and config.yaml expected)")
    weights = path / "adapter_model.safetensors"
    if not weights.is_file() or weights.stat().st_size == 0:
        raise AdapterNotFound(f"no adapter weights at {weights} ({'empty' if weights.is_file() else 'missing'}): "
                              "publish the adapter again (materialize `adapter`)")
    cfg = yaml.safe_load(cfg_path.read_text()) or {}
    try:
        peft_cfg = json.loads((path / "adapter_config.json").read_text())
    except ValueError as e:
        raise ValueError(f"{path / 'adapter_config.json'}: not valid JSON ({e})") from e
    if not isinstance(peft_cfg, dict) or "peft_type" not in peft_cfg:
        raise ValueError(f"{path / 'adapter_config.json'}: not a peft adapter config (no peft_type)")
    base = peft_cfg.get("base_model_name_or_path")
    try:
        profile = str(cfg["model"]["profile"])
        layers = [int(x) for x in cfg["loss"]["target_layers"]]
    except (KeyError, TypeError) as e:
        raise ValueError(f"{cfg_path}: lacks model.profile or loss.target_layers ({e})") from e
    is_dir = bool(base) and Path(base).is_dir()
    note = (f"{path / 'adapter_config.json'}: base_model_name_or_path {base} is no directory any more; scoring "
            f"against the model profile {profile!r} instead (not necessarily the exact trained-on weights)"
            if base and Path(base).is_absolute() and not is_dir else None)
    return AdapterRecord(adapter_dir=path, model_profile=profile, target_layers=layers,
                         base_dir=Path(base) if is_dir else None, note=note)


def load_base_and_adapter(rec: AdapterRecord):
    """(PeftModel with the adapter loaded, tokenizer, model profile); the base pass switches the adapter off."""
    from cb_core.evaluate.models import load_adapter_model
    from cb_core.model import load_model, load_profile, load_profile_tokenizer

    profile = load_profile(rec.model_profile)
    tokenizer = load_profile_tokenizer(profile)
    if rec.base_dir is not None:
        from transformers import AutoModelForCausalLM

        base = AutoModelForCausalLM.from_pretrained(str(rec.base_dir), local_files_only=True)
    else:
        base = load_model(profile, tokenizer)
    return load_adapter_model(base, rec.adapter_dir), tokenizer, profile


@dataclass
class AdapterScores:
    outcome: EvaluationOutcome
    files: dict[str, Path]
    counts: dict[str, int]
    record: AdapterRecord
    backend: str
    extra: dict = field(default_factory=dict)


def score_adapter(rec: AdapterRecord, frames: dict[str, pl.DataFrame | None], settings: EvaluationSettings,
                  out_dir: str | Path, *, log: Callable[[str], None] = print) -> AdapterScores:
    """Held-out prompt sets (none from `train_split`) → base and adapter generations with the configured backend
    → the eval_scores table, details, chart (and live AgentDojo) under ``out_dir``."""
    from cb_core.evaluate.agentdojo_live import text_generate
    from cb_core.evaluate.models import transformers_generate, vllm_generate, vllm_model_dirs
    from cb_core.parse import parse_completion

    out_dir = Path(out_dir)
    if rec.note:
        log(f"warning: {rec.note}")
    model, tokenizer, profile = load_base_and_adapter(rec)
    render_cfg = profile.render_config()
    samples, counts = held_out_samples(frames["eval_attacks"], frames["eval_split"], frames["train_split"],
                                       frames.get("traces"))
    backend = settings.eval.backend
    if backend not in ("transformers", "vllm"):
        raise ValueError(f"eval.backend must be transformers or vllm, got {backend!r}")
    log(f"eval: base {rec.base_name}, adapter {rec.adapter_dir}, backend {backend}: {len(samples)} held-out "
        f"prompts ({counts}); limit={settings.eval.limit}")
    if backend == "vllm":
        dirs = vllm_model_dirs(model, tokenizer, out_dir / ".vllm_models", base_dir=rec.base_dir)
        gen = vllm_generate(dirs, tokenizer, render_cfg, settings.eval, log=log)
    else:
        gen = transformers_generate(model, tokenizer, render_cfg, settings.eval)
    outcome = evaluate(
        samples, gen, parse_completion, settings, rep_rows=representation_rows(frames["eval_split"],
                                                                               frames.get("renders")),
        model=model, layers=rec.target_layers,
        live_generate=lambda name: text_generate(model, tokenizer, render_cfg, adapter=name == "adapter",
                                                 max_tokens=settings.eval.max_tokens),
        log=log,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    files = write_outputs(outcome, out_dir)
    return AdapterScores(outcome=outcome, files=files, counts=counts, record=rec, backend=backend)
