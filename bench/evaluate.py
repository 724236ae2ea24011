"""Evaluation benchmark: prompts/s of the whole scoring pass (`cb_core.evaluate.runner.score`: base and adapter,
plain and forced-call prompts, parsing and every metric) with the transformers backend batched vs one prompt at
a time, and with vLLM (its CPU engine here, `.venv-vllm`) vs transformers, on the same prompts, printing ratios.

Model: the tiny agent with a LoRA adapter of non-zero random weights (or ``--adapter DIR``, a published adapter
whose base is the tiny agent). Prompts: held-out demo skeletons (the pipeline's seed, attacked first), as
`EvalSample`s of the `attacks` set, so the forced-call pass runs too. Greedy; every pass gets identical
prompts. vLLM runs in a subprocess of the vLLM venv (no peft there: the adapter is merged first); its engine
start-up is timed apart from scoring. Other processes on the machine add noise: the best of ``--repeat`` passes.

    .venv/bin/python bench/evaluate.py [--prompts 24] [--max-tokens 48] [--batch-size 8] [--repeat 1]
                                       [--no-vllm] [--json out.json]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
VLLM_PY = Path(os.environ.get("CB_VLLM_PYTHON", ROOT / ".venv-vllm" / "bin" / "python"))

VLLM_SCRIPT = r'''
import json, sys, time
from pathlib import Path

def main():
    job = json.loads(Path(sys.argv[1]).read_text())
    from cb_core.evaluate.models import vllm_generate
    from cb_core.evaluate.runner import EvalConfig, EvalSample, score
    from cb_core.parse import parse_completion
    from cb_core.render import RenderConfig
    from cb_core.tokenizer import load_tokenizer

    tok = load_tokenizer(job["dirs"]["base"])
    cfg = EvalConfig(**job["cfg"], backend="vllm", dtype="float32", enforce_eager=True, gpu_memory_utilization=0.15)
    gen = vllm_generate({k: Path(v) for k, v in job["dirs"].items()}, tok, RenderConfig(**job["render"]), cfg)
    samples = [EvalSample(**s) for s in job["samples"]]
    t0 = time.perf_counter()
    gen("base", samples[:1], [""]); gen("adapter", samples[:1], [""])  # engine start-up, timed apart
    startup = time.perf_counter() - t0
    best = None
    for _ in range(job["repeat"]):
        t1 = time.perf_counter()
        res = score(samples, gen, cfg, parse_completion)
        dt = time.perf_counter() - t1
        best = dt if best is None else min(best, dt)
    Path(sys.argv[2]).write_text(json.dumps({"startup_s": startup, "score_s": best,
                      "asr": {m: res.scores[m]["tool_flip_asr"].value for m in ("base", "adapter")}}))

if __name__ == "__main__":  # vLLM's engine runs in a spawned process
    main()
'''


def build(prompts: int, adapter: str | None):
    import torch

    from cb_core.evaluate.runner import EvalSample
    from cb_core.generate import tiny_agent as ta

    model, tok = ta.load_tiny_agent()
    if adapter:
        from cb_core.evaluate.models import load_adapter_model

        peft_model = load_adapter_model(model, adapter)
    else:
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(0)
        peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=64, target_modules=["q_proj", "v_proj"],
                                                      init_lora_weights=False))
    peft_model.eval()
    held = [e for e in ta.heldout_examples(ta.TinyAgentConfig(eval_limit=10_000)) if e["dataset"] != "ultrachat"]
    samples = [EvalSample(id=f"b{i}", set="attacks", dataset=e["dataset"], messages=e["messages"],
                          tools=e["tools"] if isinstance(e["tools"], str) else json.dumps(e["tools"]),
                          expected_tool=((e["target"].get("tool_calls") or [{}])[0].get("name")
                                         if not e["follow"] else None),
                          attacker_tool=e["attacker_tool"])
               for i, e in enumerate(held[:prompts])]
    return peft_model, tok, samples, ta._render_cfg(8192)


def timed(fn, repeat: int) -> tuple[float, object]:
    best, out = None, None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        dt = time.perf_counter() - t0
        best = dt if best is None else min(best, dt)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=int, default=24)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--adapter", default=None, help="a published adapter directory (base: the tiny agent)")
    ap.add_argument("--no-vllm", action="store_true")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()

    from cb_core.evaluate.models import transformers_generate, vllm_model_dirs
    from cb_core.evaluate.runner import EvalConfig, score
    from cb_core.parse import parse_completion

    model, tok, samples, render_cfg = build(a.prompts, a.adapter)
    n_forced = sum(1 for s in samples if s.attacker_tool)
    passes = 2 * (len(samples) + n_forced)  # base + adapter, plain + forced-call prompts
    cfg = EvalConfig(max_tokens=a.max_tokens, batch_size=a.batch_size)
    one = dataclasses.replace(cfg, batch_size=1)
    t_batched, r_b = timed(lambda: score(samples, transformers_generate(model, tok, render_cfg, cfg), cfg,
                                         parse_completion), a.repeat)
    t_single, r_s = timed(lambda: score(samples, transformers_generate(model, tok, render_cfg, one), one,
                                        parse_completion), a.repeat)
    res = {"prompts": len(samples), "generations": passes, "max_tokens": a.max_tokens,
           "transformers_batched_s": round(t_batched, 2), "transformers_one_by_one_s": round(t_single, 2),
           "transformers_batched_prompts_per_s": round(passes / t_batched, 2),
           "transformers_one_by_one_prompts_per_s": round(passes / t_single, 2),
           "batched_over_one_by_one": round(t_single / t_batched, 2),
           "asr_transformers": {m: r_b.scores[m]["tool_flip_asr"].value for m in ("base", "adapter")}}
    if not a.no_vllm:
        if not VLLM_PY.is_file():
            res["vllm"] = f"not run: {VLLM_PY} absent (bash scripts/setup.sh vllm)"
        else:
            with tempfile.TemporaryDirectory(prefix="cb_bench_eval_") as tmp:
                dirs = vllm_model_dirs(model, tok, Path(tmp) / "models")
                job = {"dirs": {k: str(v) for k, v in dirs.items()},
                       "samples": [dataclasses.asdict(s) for s in samples], "repeat": a.repeat,
                       "cfg": {"max_tokens": a.max_tokens, "batch_size": a.batch_size},
                       "render": dataclasses.asdict(render_cfg)}
                (Path(tmp) / "job.json").write_text(json.dumps(job))
                (Path(tmp) / "run.py").write_text(VLLM_SCRIPT)
                env = {**os.environ, "VLLM_TARGET_DEVICE": "cpu", "PYTHONPATH": str(ROOT)}
                p = subprocess.run([str(VLLM_PY), str(Path(tmp) / "run.py"), str(Path(tmp) / "job.json"),
                                    str(Path(tmp) / "out.json")],
                                   capture_output=True, text=True, env=env, cwd=tmp, timeout=1800)
                if p.returncode != 0:
                    res["vllm"] = f"failed: {p.stderr[-600:]}"
                else:
                    v = json.loads((Path(tmp) / "out.json").read_text())
                    res.update({"vllm_startup_s": round(v["startup_s"], 1), "vllm_s": round(v["score_s"], 2),
                                "vllm_prompts_per_s": round(passes / v["score_s"], 2),
                                "vllm_over_transformers_batched": round(t_batched / v["score_s"], 2),
                                "asr_vllm": v["asr"]})
    for k, v in res.items():
        print(f"{k:40s} {v}")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
