"""Base and adapter as one model: a PeftModel whose adapter is switched off for the base pass
(`disable_adapter()`), so both are scored on the same weights, the same prompts and the same backend."""
from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import polars as pl

from cb_core.evaluate.runner import EvalConfig, EvalSample, Generate
from cb_core.evaluate.stats import Mean, mean_of


def load_adapter_model(base_model, adapter_dir: str | Path):
    """Wrap a loaded base model with the trained LoRA adapter (safetensors; nothing is unpickled)."""
    from peft import PeftModel

    from cb_core.model import peft_wrap_quiet

    with peft_wrap_quiet():
        model = PeftModel.from_pretrained(base_model, str(adapter_dir), is_trainable=False)
    model.eval()
    return model


def _switch(model, name: str):
    if name == "base" and hasattr(model, "disable_adapter"):
        return model.disable_adapter()
    return contextlib.nullcontext()


def transformers_generate(model, tokenizer, render_cfg, cfg: EvalConfig, *, log=None) -> Generate:
    """A `Generate` over the project's transformers backend; `model` is a PeftModel (base = adapter off)."""
    from cb_core.generate.backends import SamplingConfig, TransformersBackend, prompt_ids

    backend = TransformersBackend(model, tokenizer, batch_size=cfg.batch_size)
    sampling = SamplingConfig(temperature=cfg.temperature, max_tokens=cfg.max_tokens, seed=cfg.seed)

    def generate(name: str, samples: list[EvalSample], prefills: list[str]) -> list[str]:
        prompts = [prompt_ids(tokenizer, s.messages, s.tools, render_cfg, prefill=p) for s, p in zip(samples, prefills)]
        with _switch(model, name):
            comps = backend.generate(prompts, sampling)
        return [c[0].text for c in comps]

    return generate


def vllm_model_dirs(model, tokenizer, work_dir: str | Path, *, base_dir: str | Path | None = None) -> dict[str, Path]:
    """Directories a vLLM engine loads: the base (``base_dir``, or the PeftModel's base weights saved) and the
    adapter merged into a copy of the base weights."""
    work = Path(work_dir)
    base = Path(base_dir) if base_dir else _save_base(model, tokenizer, work / "base")
    return {"base": base, "adapter": merged_model_dir(model, tokenizer, work / "adapter_merged")}


def vllm_generate(model_dirs: dict[str, Path], tokenizer, render_cfg, cfg: EvalConfig, *, log=None) -> Generate:
    """A `Generate` over vLLM, one engine per model (``model_dirs``: base and merged adapter), built on first use
    and kept: the scorer alternates base and adapter per prompt set. Same token ids in, same decoding as the
    transformers backend."""
    from cb_core.generate.backends import SamplingConfig, make_backend, prompt_ids

    sampling = SamplingConfig(temperature=cfg.temperature, max_tokens=cfg.max_tokens, seed=cfg.seed)
    engines: dict[str, Any] = {}

    def engine(name: str):
        if name not in engines:
            if log:
                log(f"eval: vLLM engine for {name} from {model_dirs[name]}")
            engines[name] = make_backend("vllm", model_dir=str(model_dirs[name]), tokenizer=tokenizer,
                                         tensor_parallel_size=cfg.tensor_parallel_size, dtype=cfg.dtype,
                                         enforce_eager=cfg.enforce_eager,
                                         gpu_memory_utilization=cfg.gpu_memory_utilization, seed=cfg.seed)
        return engines[name]

    def generate(name: str, samples: list[EvalSample], prefills: list[str]) -> list[str]:
        prompts = [prompt_ids(tokenizer, s.messages, s.tools, render_cfg, prefill=p) for s, p in zip(samples, prefills)]
        return [c[0].text for c in engine(name).generate(prompts, sampling)]

    return generate


def _save_base(model, tokenizer, out: Path) -> Path:
    """The PeftModel's base weights (LoRA layers removed from a copy), saved for an engine that loads a directory."""
    import copy

    base = copy.deepcopy(model).unload() if hasattr(model, "unload") else model
    base.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def merged_model_dir(model, tokenizer, out_dir: str | Path) -> Path:
    """The adapter merged into a copy of the base weights, saved for engines that load a directory (vLLM)."""
    import copy

    out = Path(out_dir)
    merged = copy.deepcopy(model).merge_and_unload()
    merged.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def representation_similarity(
    model, rows: pl.DataFrame, layers: Sequence[int], *, limit: int | None = 16, device: str = "cpu"
) -> dict[str, Mean]:
    """Cosine similarity of adapter vs base hidden states (`hidden_states[l]`, index 0 = embeddings) at the
    target layers over each sample's loss-masked tokens, averaged per sample; split by category. A circuit
    breaker should push harmful tokens away (low similarity) and keep benign ones (similarity near 1).

    `rows`: `input_ids`, `mask_spans` (token ranges), `category` (harmful | retain)."""
    import torch

    out: dict[str, list[float]] = {"harmful": [], "retain": []}
    layers = sorted(set(int(x) for x in layers))
    depth = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    if depth is not None and any(not 0 <= layer <= depth for layer in layers):
        # the adapter's layers were checked against its base at training: another depth means another base model
        raise ValueError(f"target layers {layers}: hidden_states of this {depth}-layer model run 0..{depth} "
                         "(is the adapter evaluated on the base it was trained on?)")
    deepest = max(layers) if layers else 0
    for cat in ("harmful", "retain"):
        sub = rows.filter(pl.col("category") == cat)
        if limit:
            sub = sub.head(limit)
        for r in sub.iter_rows(named=True):
            ids = torch.tensor([r["input_ids"]], device=device)
            pos = sorted({t for s in (r["mask_spans"] or []) for t in range(s["token_start"], s["token_end"])})
            pos = [p for p in pos if p < ids.shape[1]]
            if not pos:
                continue
            with torch.no_grad():
                with _switch(model, "base"):
                    hb = model(input_ids=ids, output_hidden_states=True).hidden_states
                ha = model(input_ids=ids, output_hidden_states=True).hidden_states
            idx = torch.tensor(pos, device=device)
            sims = []
            for layer in layers:
                if layer > deepest or layer >= len(ha):
                    continue
                a, b = ha[layer][0, idx].float(), hb[layer][0, idx].float()
                sims.append(torch.nn.functional.cosine_similarity(a, b, dim=-1).mean().item())
            if sims:
                out[cat].append(sum(sims) / len(sims))
    return {"rep_cos_harmful": mean_of(out["harmful"]), "rep_cos_benign": mean_of(out["retain"])}

