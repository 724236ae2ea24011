"""Evaluation through vLLM for real (the CPU engine in ``.venv-vllm``): base and adapter (merged into a copy of the
base) score the same held-out prompts as the transformers path and produce the same greedy texts.

The main venv builds the PeftModel (the tiny agent + a LoRA adapter with non-zero weights), generates with
``transformers_generate`` and saves the two model directories with ``vllm_model_dirs``; a script under
``.venv-vllm/bin/python`` runs ``vllm_generate`` on them (no peft there: the adapter is merged already).
"""
from __future__ import annotations

import json

import pytest

from support.vllm import run_vllm_script, vllm_python

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


SCRIPT = r'''
import json, sys
from pathlib import Path

def main():
    work = Path(sys.argv[1])
    from cb_core.evaluate.models import vllm_generate
    from cb_core.evaluate.runner import EvalConfig, EvalSample
    from cb_core.render import RenderConfig
    from cb_core.tokenizer import load_tokenizer

    job = json.loads((work / "job.json").read_text())
    tok = load_tokenizer(job["dirs"]["base"])
    cfg = EvalConfig(max_tokens=job["max_tokens"], backend="vllm", dtype="float32", enforce_eager=True,
                     gpu_memory_utilization=0.15)
    gen = vllm_generate({k: Path(v) for k, v in job["dirs"].items()}, tok, RenderConfig(**job["render"]), cfg)
    samples = [EvalSample(**s) for s in job["samples"]]
    out = {name: gen(name, samples, job["prefills"]) for name in ("base", "adapter")}
    (work / "vllm.json").write_text(json.dumps(out))

if __name__ == "__main__":  # vLLM's engine runs in a spawned process
    main()
'''


def test_vllm_eval_generate_matches_transformers(tmp_path):
    vllm_python()
    import dataclasses

    import torch
    from peft import LoraConfig, get_peft_model

    from cb_core.evaluate.models import transformers_generate, vllm_model_dirs
    from cb_core.evaluate.runner import EvalConfig, EvalSample
    from cb_core.generate import tiny_agent as ta

    model, tok = ta.load_tiny_agent()
    torch.manual_seed(0)
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=64, target_modules=["q_proj", "v_proj", "o_proj"],
                                                  init_lora_weights=False))
    peft_model.eval()
    held = ta.heldout_examples(ta.TinyAgentConfig())
    picked = [e for e in held if e["attacked"]][:3] + [e for e in held if not e["attacked"]][:3]
    samples = [EvalSample(id=f"s{i}", set="attacks", dataset=e["dataset"], messages=e["messages"],
                          tools=e["tools"] if isinstance(e["tools"], str) else json.dumps(e["tools"]))
               for i, e in enumerate(picked)]
    prefills = [""] * (len(samples) - 1) + ['<|python_tag|>{"name": "send_email", "parameters": ']  # a forced call
    render_cfg = ta._render_cfg(8192)
    cfg = EvalConfig(max_tokens=24, batch_size=3)
    hf = transformers_generate(peft_model, tok, render_cfg, cfg)
    want = {name: hf(name, samples, prefills) for name in ("base", "adapter")}
    assert want["base"] != want["adapter"]  # the adapter really changes the model: a comparison that can fail

    dirs = vllm_model_dirs(peft_model, tok, tmp_path / "models")
    job = {"dirs": {k: str(v) for k, v in dirs.items()}, "samples": [dataclasses.asdict(s) for s in samples],
           "prefills": prefills, "max_tokens": cfg.max_tokens, "render": dataclasses.asdict(render_cfg)}
    (tmp_path / "job.json").write_text(json.dumps(job))
    proc = run_vllm_script(SCRIPT, [str(tmp_path)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = json.loads((tmp_path / "vllm.json").read_text())
    assert got["base"] == want["base"]
    assert got["adapter"] == want["adapter"]
