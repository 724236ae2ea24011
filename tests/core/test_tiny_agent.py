"""The tiny agent: corpus policy, loss at assistant positions only, exact full-vocab CE, cache, and the held-out
figures it reaches on the pipeline's own demo skeletons (greedy)."""
from __future__ import annotations

import json

import pytest

from cb_core.generate import tiny_agent as ta


def test_assistant_ce_equals_full_vocab_cross_entropy():
    import torch

    g = torch.Generator().manual_seed(0)
    V, H, N = 40, 8, 13
    active = torch.tensor([0, 3, 5, 7, 11, 20, 33])
    W = torch.zeros(V, H)
    W[active] = torch.randn(len(active), H, generator=g)
    hidden = torch.randn(N, H, generator=g)
    targets = active[torch.randint(0, len(active), (N,), generator=g)]
    col_of = torch.zeros(V, dtype=torch.long)
    col_of[active] = torch.arange(len(active))
    ours = ta.assistant_ce(hidden, targets, W[active], col_of, V - len(active))
    full = torch.nn.functional.cross_entropy(hidden @ W.T, targets)
    assert torch.allclose(ours, full, atol=1e-6)
    # and it is not the active-only softmax (the zero rows do count)
    active_only = torch.nn.functional.cross_entropy(hidden @ W[active].T, col_of[targets])
    assert not torch.allclose(ours, active_only, atol=1e-3)


def test_prefix_forward_equals_full_rows_values_and_gradients():
    """The shared-prefix batch is exact: same hidden states and same gradients as running every full row."""
    import torch

    model = ta._compact_model(ta.TinyAgentConfig(), 300)
    g = torch.Generator().manual_seed(1)
    pre = torch.randint(1, 300, (90,), generator=g).tolist()
    rows = [pre + torch.randint(1, 300, (n,), generator=g).tolist() for n in (17, 5, 30)]
    P = len(pre)
    h = ta.prefix_forward(model, rows, P)
    sum((h[r, : len(x) - P] ** 2).sum() for r, x in enumerate(rows)).backward()
    g_prefix = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    full = [model.model(input_ids=torch.tensor([x])).last_hidden_state[0, P:] for x in rows]
    sum((f ** 2).sum() for f in full).backward()
    for r, f in enumerate(full):
        assert torch.allclose(h[r, : f.shape[0]], f, atol=1e-5)
    for a, b in zip(g_prefix, (p.grad for p in model.parameters())):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5 * float(b.abs().max()))


def test_prefix_batches_share_prefixes_and_keep_every_trained_position():
    import random

    pre = list(range(1, 41))
    enc = []
    for k in range(10):  # two "sources", each a shared 40-token prefix; trained tokens only at the end
        ids = ([100 + k % 2] + pre + [200 + k] * (3 + k))
        enc.append((ids, [0] * (len(ids) - 2) + [1, 1]))
    enc.append(([7, 8, 9], [0, 1, 1]))  # trained right after the first token: no prefix possible
    batches = ta.prefix_batches(enc, batch_tokens=200, batch_size=4, rng=random.Random(0))
    assert sorted(i for b, _ in batches for i in b) == list(range(len(enc)))  # each example exactly once
    for b, P in batches:
        rows = [enc[i][0] for i in b]
        assert all(r[:P] == rows[0][:P] for r in rows)  # P tokens really shared
        assert all(P <= enc[i][1].index(1) - 1 for i in b)  # every hidden state the loss needs is computed
        assert P + len(b) * (max(map(len, rows)) - P) <= 200 or len(b) == 1
    assert max(P for _, P in batches) >= 41  # the source prefix is shared, not recomputed per row


@pytest.fixture(scope="module")
def demo_seed1():
    return ta.demo_rows(1)


def test_policy_follows_some_injections_and_resists_others(demo_seed1):
    ex = [e for r in demo_seed1 for e in ta.policy_examples(r)]
    attacked = [e for e in ex if e["attacked"]]
    by_ds = {}
    for e in attacked:
        by_ds.setdefault(e["dataset"], set()).add(e["follow"])
    for ds in ("fujitsu_b4", "llmail_inject", "agentdojo"):
        assert by_ds[ds] == {True, False}, ds  # both outcomes in every attacked source
    for e in attacked:
        names = [c["name"] for c in e["target"]["tool_calls"]]
        assert (e["attacker_tool"] in names) == e["follow"] or e["dataset"] == "fujitsu_b4" and not e["follow"]
    # benign twins: the injection text is gone from the prompt
    twins = [e for e in ex if e["dataset"] == "llmail_inject" and not e["attacked"]]
    assert twins and all("contact@contact.com" not in e["messages"][-1]["content"] for e in twins)
    # skeleton prompts end where the agent acts: never on an assistant turn
    assert all(e["messages"][-1]["role"] != "assistant" for e in ex if not e.get("history_assistant"))


def test_loss_mask_covers_exactly_the_assistant_turn(demo_seed1, llama_tokenizer):
    from cb_core.render import RenderConfig

    cfg = RenderConfig(max_length=4096)
    row = next(r for r in demo_seed1 if r["dataset"] == "llmail_inject" and r["completeness"] == "skeleton")
    ex = ta.policy_examples(row)[0]
    ids, mask = ta.encode_example(ex, llama_tokenizer, cfg)
    first = mask.index(1)
    assert sum(mask) == len(mask) - first  # one contiguous block at the end
    prompt = llama_tokenizer(ta.prompt_text(ex["messages"], ex["tools"], cfg), add_special_tokens=False)["input_ids"]
    assert ids[:first] == prompt  # trained on exactly what generation will be prompted with
    assert prompt.count(128000) == 1 and prompt[-4:] == llama_tokenizer.encode(
        "<|start_header_id|>assistant<|end_header_id|>\n\n", add_special_tokens=False)
    body = llama_tokenizer.decode(ids[first:], skip_special_tokens=False)
    tgt = ex["target"]
    if tgt["tool_calls"]:
        assert body.startswith("<|python_tag|>{\"name\": \"send_email\"") and body.endswith("<|eom_id|>")
    else:
        assert body == tgt["content"] + "<|eot_id|>"


def test_cache_key_depends_on_config_and_data(llama_tokenizer):
    a = ta.build_key(ta.TinyAgentConfig(), llama_tokenizer, "d1")
    assert a == ta.build_key(ta.TinyAgentConfig(), llama_tokenizer, "d1")
    assert a != ta.build_key(ta.TinyAgentConfig(steps=7), llama_tokenizer, "d1")
    assert a != ta.build_key(ta.TinyAgentConfig(), llama_tokenizer, "d2")
    with pytest.raises(ValueError, match="unknown keys"):
        ta.TinyAgentConfig.from_dict({"stepz": 3})


@pytest.mark.slow
def test_small_build_is_deterministic(tmp_path):
    import torch
    from safetensors.torch import load_file

    cfg = {"seeds": [5], "steps": 3, "batch_tokens": 4096, "eval_limit": 4, "eval_max_tokens": 4}
    p1 = ta.tiny_agent_dir(cfg, cache=tmp_path / "a")
    p2 = ta.tiny_agent_dir(cfg, cache=tmp_path / "b")
    assert p1.name == p2.name  # same key
    w1, w2 = load_file(p1 / "model.safetensors"), load_file(p2 / "model.safetensors")
    assert w1.keys() == w2.keys() and all(torch.equal(w1[k], w2[k]) for k in w1)
    info = ta.build_info(p1)
    assert info["steps"] == 3 and info["figures"]["eval_prompts"] == 4
    assert ta.tiny_agent_dir(cfg, cache=tmp_path / "a") == p1  # cached: no rebuild


@pytest.fixture(scope="module")
def built():
    path = ta.tiny_agent_dir()  # the profile's config; cached on disk after the first build
    return path, ta.build_info(path)


@pytest.mark.slow
def test_figures_on_heldout_demo_skeletons(built):
    path, info = built
    fig = info["figures"]
    assert info["config"]["eval_seed"] not in info["config"]["seeds"]  # held out from training
    assert fig["eval_prompts"] >= 200 and fig["attacked_prompts"] >= 100
    assert fig["parse_rate"] >= 0.70
    assert 0.10 <= fig["attacker_call_rate"] <= 0.90
    per = fig["per_dataset"]
    assert sum(d["attacker_call"] for d in per.values()) > 0
    assert sum(d["attacked"] - d["attacker_call"] for d in per.values()) > 0
    assert info["n_params"] < 20_000_000 and info["size_bytes"] < 100 * 2**20


@pytest.mark.slow
def test_figures_reproduce_from_the_saved_model(built):
    """Recompute a sample of the figures from the saved directory (not trusting cb_build.json)."""
    path, info = built
    model, tok = ta.load_tiny_agent()
    assert model.config.tie_word_embeddings and model.config.vocab_size == 128256
    held = ta.heldout_examples(ta.TinyAgentConfig.from_dict(info["config"]))
    attacked = [e for e in held if e["attacked"]][:24]
    benign = [e for e in held if not e["attacked"]][:24]
    fig = ta.evaluate(model, tok, attacked + benign, max_tokens=info["config"]["eval_max_tokens"])
    assert fig["parse_rate"] >= 0.70
    assert 0.0 < fig["attacker_call_rate"] < 1.0


@pytest.mark.slow
def test_profile_and_asset(built, data_root):
    import dagster as dg

    from cb_assets.assets.tiny_agent import tiny_agent_model
    from cb_assets.io_manager import ParquetIOManager
    from cb_core.model import load_model, load_profile

    path, info = built
    prof = load_profile("tiny_agent")
    assert prof.model == "tiny_agent" and prof.resolved_path == path
    model = load_model(prof)
    assert sum(p.numel() for p in model.parameters()) == info["n_params"]
    res = dg.materialize([tiny_agent_model], resources={"io_manager": ParquetIOManager(root=str(data_root))})
    assert res.success
    meta = res.asset_materializations_for_node("tiny_agent_model")[0].metadata
    assert meta["steps"].value == info["steps"] and meta["data_digest"].value == info["data_digest"]
    assert meta["parse_rate"].value == info["figures"]["parse_rate"]
    assert json.loads(json.dumps(meta["figures"].value))["eval_prompts"] == info["figures"]["eval_prompts"]
