"""Generation benchmark: tokens/s of the transformers backend, batched vs one prompt at a time (and, through the
hook below, vLLM vs transformers), on the same prompts, in one process, printing ratios.

Prompts: the DR / DS jobs of the embedded demo sample (cb_core.sources.demo -> the Tier A readers -> traces), rendered
by the project's renderer, so the prompt lengths are those generation really sees (B4 skeletons carry ~2k
tokens of tool definitions). Greedy by default, every completion forced to ``--max-tokens`` new tokens
(``ignore_eos``-style: the end tokens are masked out of the stop set) so both modes produce the same token
count and tokens/s compare like for like.

    .venv/bin/python bench/generate.py [--profile tiny] [--prompts 16] [--max-tokens 32] [--batch-size 8]
                                       [--repeat 2] [--json out.json] [--vllm]

``--vllm`` also runs ``cb_core.generate.vllm_backend.VllmBackend`` on the same prompts when that module and the
``vllm`` package import (run this script with the vLLM venv's python, e.g. ``.venv-vllm/bin/python``); the
ratio vllm/transformers-batched is printed beside the others. Other processes on the machine add noise: the
best of ``--repeat`` passes is reported.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def demo_prompts(tokenizer, render_cfg, n: int) -> list[list[int]]:
    """n prompts from the demo sample's generation jobs (DS and DR jobs interleaved, stable order)."""
    import polars as pl

    from cb_core.config import DatasetsConfig, resolve_source_paths
    from cb_core.sources.demo import write_demo_sources
    from cb_core.generate.backends import prompt_ids
    from cb_core.generate.completions import select_jobs
    from cb_core.schemas import TRACE_SCHEMA
    from cb_core.sources import get_reader

    cfg = DatasetsConfig.load()
    parts = []
    with tempfile.TemporaryDirectory() as tmp:
        for ds, path in write_demo_sources(Path(tmp), seed=0).items():
            parts.append(get_reader(ds)(resolve_source_paths(path), getattr(cfg, ds)).good)
    traces = pl.concat([p.select(list(TRACE_SCHEMA)).cast(dict(TRACE_SCHEMA)) for p in parts])
    jobs = []
    for table in ("ds_completions", "dr_completions"):
        jobs.extend(select_jobs(traces, table)[0])
    jobs.sort(key=lambda j: j.key)
    return [prompt_ids(tokenizer, j.messages, j.parent.get("tools"), render_cfg) for j in jobs[:n]]


def timed(backend, prompts, sampling, repeat: int) -> tuple[float, int]:
    best, toks = float("inf"), 0
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = backend.generate(prompts, sampling)
        dt = time.perf_counter() - t0
        toks = sum(len(c.token_ids) for cs in out for c in cs)
        best = min(best, dt)
    return best, toks


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default=os.environ.get("CB_MODEL") or "tiny")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--json")
    ap.add_argument("--vllm", action="store_true", help="also time the vLLM backend (vLLM venv)")
    a = ap.parse_args(argv)

    from cb_core.generate.backends import SamplingConfig, TransformersBackend
    from cb_core.generate.completions import ModelHandle

    h = ModelHandle.from_profile(a.profile)
    prompts = demo_prompts(h.tokenizer, h.render_cfg, a.prompts)
    sampling = SamplingConfig(temperature=0.0, max_tokens=a.max_tokens)
    prompt_tokens = sum(len(p) for p in prompts)
    # no stop ids: every completion runs to max_tokens, so both modes generate the same number of tokens
    batched = TransformersBackend(h.model, h.tokenizer, batch_size=a.batch_size, stop_ids=[-1])
    single = TransformersBackend(h.model, h.tokenizer, batch_size=1, stop_ids=[-1])
    timed(batched, prompts[:2], SamplingConfig(max_tokens=2), 1)  # warm-up (allocator, kernels)
    t_b, n_b = timed(batched, prompts, sampling, a.repeat)
    t_s, n_s = timed(single, prompts, sampling, a.repeat)
    res = {
        "profile": h.name, "prompts": len(prompts), "prompt_tokens": prompt_tokens, "max_tokens": a.max_tokens,
        "batch_size": a.batch_size, "threads": __import__("torch").get_num_threads(),
        "transformers_batched": {"s": round(t_b, 3), "tokens": n_b, "tokens_per_s": round(n_b / t_b, 1)},
        "transformers_single": {"s": round(t_s, 3), "tokens": n_s, "tokens_per_s": round(n_s / t_s, 1)},
    }
    res["ratio_batched_vs_single"] = round((n_b / t_b) / (n_s / t_s), 2)

    if a.vllm:  # hook: the vLLM backend (cb_core/generate/vllm_backend.py) on the same prompts
        try:
            from cb_core.generate.backends import make_backend

            vb = make_backend("vllm", model_dir=h.model_dir, tokenizer=h.tokenizer)
            vs = SamplingConfig(temperature=0.0, max_tokens=a.max_tokens)
            timed(vb, prompts[:2], SamplingConfig(max_tokens=2), 1)
            t_v, n_v = timed(vb, prompts, vs, a.repeat)
            res["vllm"] = {"s": round(t_v, 3), "tokens": n_v, "tokens_per_s": round(n_v / t_v, 1)}
            res["ratio_vllm_vs_transformers_batched"] = round((n_v / t_v) / (n_b / t_b), 2)
        except (ImportError, ValueError) as e:
            res["vllm"] = f"not measured: {e}"

    print(json.dumps(res, indent=1))
    print(f"transformers batched/single tokens/s: {res['ratio_batched_vs_single']}x "
          f"({res['transformers_batched']['tokens_per_s']} vs {res['transformers_single']['tokens_per_s']} tok/s, "
          f"{len(prompts)} prompts, {prompt_tokens} prompt tokens, {a.max_tokens} new tokens each)")
    if "ratio_vllm_vs_transformers_batched" in res:
        print(f"vllm/transformers batched tokens/s: {res['ratio_vllm_vs_transformers_batched']}x")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":  # the vLLM engine runs in a spawned process: keep the guard
    sys.exit(main())
