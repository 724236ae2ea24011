"""The tiktoken fast path (cb_core.llama3_fast) gives exactly the HF tokenizer's ids and token start
characters, renders through it equal renders through HF, and other tokenizers fall back to HF."""
from __future__ import annotations

import json
import random

import numpy as np
import polars as pl
import pytest

from cb_core.config import DatasetsConfig, resolve_source_paths
from cb_core.llama3_fast import FastEncoder, fast_encoder, is_llama3_encoding
from cb_core.render import RenderConfig, render_conversation, render_traces
from cb_core.sources import get_reader

TRICKY = [
    "",
    "   ",
    "héllo wörld — naïve café",
    "emoji 👍🏽👨‍👩‍👧 and 🇩🇪 flags",
    "日本語のテキスト\n\n中文  文本\n\n한국어",
    "CRLF line\r\n\r\nnext\r\n  \r\nlast\r",
    "long runs" + " " * 300 + "x" + "\n" * 50 + "y" + "\t \n " * 40 + "z\n\n   \n\n",
    "ends with spaces   ",
    "ends with newline run  \n\n\n",
    "\n\n\n  leading newlines",
    "<|eot_id|><|eot_id|>  <|start_header_id|>user<|end_header_id|>\n\n  hi  <|eom_id|>",
    "<|notspecial|> <|reserved_special_token_7|>x<|<|eot_id|>|>",
    "numbers 1234567 3.14159 1,000,000 and contractions it's we'LL they'Re",
    '{"name": "send_money", "parameters": {"recipient": "US133000000121212121212"}}\n\n{\n    "a": 1\n}\n\n',
    "zero\u200bwidth \u00a0nbsp \u2028line\u2029para \u3000ideographic \x85next \x1cfs\x1d",
    "a\n\n\u00a0b\n\n\u3000c\n\n\x1cd",
]


@pytest.fixture(scope="module")
def fe(llama_tokenizer) -> FastEncoder:
    out = fast_encoder(llama_tokenizer)
    assert out is not None
    return out


def _hf(tok, texts):
    enc = tok(texts, add_special_tokens=False, return_offsets_mapping=True)
    return enc["input_ids"], [[o[0] for o in offs] for offs in enc["offset_mapping"]]


def _assert_same(fe, tok, texts):
    ids, starts = _hf(tok, texts)
    for t, i, s in zip(texts, ids, starts):
        got_i, got_s = fe.encode_with_starts(t)
        assert got_i.tolist() == i, t[:80]
        assert got_s.tolist() == s, t[:80]


def test_tricky_strings_equal_hf(fe, llama_tokenizer):
    _assert_same(fe, llama_tokenizer, TRICKY)
    # twice: the second pass comes from the block cache and must be the same
    hits = fe.hits
    _assert_same(fe, llama_tokenizer, TRICKY)
    assert fe.hits > hits


def test_random_strings_equal_hf(fe, llama_tokenizer):
    """Fuzz the split rule (after a newline followed by non-whitespace) and the special-token split."""
    rng = random.Random(0)
    alphabet = [" ", "  ", "\n", "\n\n", "\r\n", "\t", "a", "Word", "1", "42", "!", "?!", "'s", "é", "👍", "中",
                "\u00a0", "\u3000", "{", "}", '"', "<|eot_id|>", "<|python_tag|>", "<|x|>"]
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 60))) for _ in range(600)]
    _assert_same(fe, llama_tokenizer, texts)


def test_hf_compatible_call(fe, llama_tokenizer):
    out = fe(TRICKY[2:5], return_offsets_mapping=True)
    ids, starts = _hf(llama_tokenizer, TRICKY[2:5])
    assert [x.tolist() for x in out["input_ids"]] == ids
    assert [x.tolist() for x in out["offset_mapping"]] == starts
    with pytest.raises(ValueError):
        fe(["x"], add_special_tokens=True)


def test_repeated_block_is_encoded_once(llama_tokenizer):
    fe = FastEncoder()
    block = "".join(json.dumps({"name": f"tool_{k}", "description": "d " * 50}, indent=4) + "\n\n" for k in range(20))
    a = fe.encode_with_starts("\n\nGiven:\n\n" + block + "first question")
    misses = fe.misses
    b = fe.encode_with_starts("\n\nGiven:\n\n" + block + "second question")
    assert fe.misses - misses == 1  # only the new question was encoded
    ref = llama_tokenizer("\n\nGiven:\n\n" + block + "second question", add_special_tokens=False)["input_ids"]
    assert b[0].tolist() == ref
    assert a[0][:-2].tolist() == b[0][:-2].tolist()


def test_block_hint_is_one_piece_and_never_changes_ids(llama_tokenizer):
    """A tool-definition block passed as a hint is encoded and cached as one piece; hints whose edges are
    not split points (mid-word, before whitespace, across a special token) are ignored: same ids."""
    fe = FastEncoder()
    block = "".join(json.dumps({"name": f"tool_{k}", "description": "d " * 30}, indent=4) + "\n\n" for k in range(12))
    text = "<|start_header_id|>user<|end_header_id|>\n\nGiven:\n\n" + block + "question  \n\n x<|eot_id|>"
    a = text.index("Given:\n\n") + len("Given:\n\n")
    b = a + len(block)
    ref_i, ref_s = _hf(llama_tokenizer, [text])
    fe.encode_with_starts(text, [(a, b)])
    assert block in fe.cache and not any(k.startswith("{") and k != block for k in fe.cache)
    for hint in ([(a, b)], [(a + 3, b)], [(a, b - 1)], [(a, len(text) - 3)], [(0, b)], [(b - 4, b + 9)],
                 [(a, a + 40), (a + 20, b)], [(a - 5, a + 1)]):
        i, st = fe.encode_with_starts(text, hint)
        assert i.tolist() == ref_i[0] and st.tolist() == ref_s[0], hint


def _read(dataset: str, path) -> pl.DataFrame:
    cfg = getattr(DatasetsConfig.load(), dataset)
    paths = resolve_source_paths(path)
    return get_reader(dataset)(paths, cfg).good


def _assert_renders_equal(traces: pl.DataFrame, tok, cfg: RenderConfig):
    fast, q_fast = render_traces(traces, tok, cfg)
    slow, q_slow = render_traces(traces, tok, cfg, fast=False)
    assert fast.height == slow.height > 0
    assert fast.equals(slow)
    assert q_fast.select("reason").equals(q_slow.select("reason"))
    return fast


def test_demo_renders_equal_hf_path(tmp_path, llama_tokenizer):
    from cb_core.sources.demo import write_demo_sources

    frames = [_read(ds, p) for ds, p in write_demo_sources(tmp_path, seed=0).items()]
    traces = pl.concat([f for f in frames if f.height], how="diagonal_relaxed")
    for cfg in (RenderConfig(), RenderConfig(tool_call_format="json", tools_in_user_message=False),
                RenderConfig(max_length=300, truncation={"steps": ["drop_turns", "shorten_tool_outputs", "cut"]})):
        _assert_renders_equal(traces, llama_tokenizer, cfg)


def test_two_workers_equal_one(tmp_path, llama_tokenizer):
    from cb_core.sources.demo import write_demo_sources

    traces = _read("agentdojo", write_demo_sources(tmp_path, seed=0)["agentdojo"])
    one, _ = render_traces(traces, llama_tokenizer, RenderConfig(max_length=65536), num_workers=1)
    two, _ = render_traces(traces, llama_tokenizer, RenderConfig(max_length=65536), num_workers=2)
    assert one.height == traces.height
    assert one.equals(two)


@pytest.mark.parametrize("step", [1, 4, 10**6])
def test_two_workers_keep_input_order_and_rejects(tmp_path, llama_tokenizer, monkeypatch, step):
    """The workers take steps from one queue (each its own half first, then the other's from the back), so
    steps finish out of order; renders and quarantine rows come back in input order, equal to one
    worker's, with the rejects' reasons (render errors first, then length rejects, as one process)."""
    import cb_core.render as render_mod
    from cb_core.sources.demo import write_demo_sources

    monkeypatch.setattr(render_mod, "STEP_ROWS", step)
    traces = _read("agentdojo", write_demo_sources(tmp_path, seed=0)["agentdojo"])
    bad = traces.head(3).with_columns(
        pl.Series("id", ["bad-a", "bad-b", "bad-c"]), pl.lit("not json").alias("tools"), pl.lit("g-bad").alias("pair_group")
    )
    mixed = pl.concat([traces.reverse().head(20), bad, traces.head(25)], how="vertical_relaxed")
    mixed = mixed.with_columns((pl.col("id") + "-" + pl.int_range(pl.len()).cast(pl.String)).alias("id"))
    n_tok = render_traces(mixed, llama_tokenizer, RenderConfig(max_length=65536))[0]["n_tokens"]
    cfg = RenderConfig(max_length=int(n_tok.sort()[-4]) - 1)  # the longest traces (ties too) are too long
    st1: dict = {}
    one, q1 = render_traces(mixed, llama_tokenizer, cfg, num_workers=1, stats=st1)
    st: dict = {}
    two, q2 = render_traces(mixed, llama_tokenizer, cfg, num_workers=2, stats=st)
    assert st["truncation"] == st1["truncation"] and st1["truncation"]["agentdojo"]["over_length"] >= 3
    too_long = q1.filter(pl.col("reason").str.starts_with("too long")).height
    assert st["workers"] == 2 and too_long >= 3 and one.height == mixed.height - 3 - too_long
    assert one.equals(two) and q1.equals(q2)
    # every row done once, in runs of at most `step` rows (shorter at the end); how they split depends on
    # when the child starts (a late one may rightly get none)
    assert len(st["worker_rows"]) == 2 and sum(st["worker_rows"]) == mixed.height
    assert sum(st["worker_steps"]) >= -(-mixed.height // step)
    # the last worker to finish was idle for no time; the other waited for it, never a negative time
    assert len(st["worker_idle_s"]) == 2 and min(i for i in st["worker_idle_s"] if i is not None) == 0
    assert all(i is None or i >= 0 for i in st["worker_idle_s"])
    # where the time went: each worker's CPU (its steps' sum), forking's timings (only with two workers)
    assert len(st["worker_cpu_s"]) == 2 and abs(sum(st["worker_cpu_s"]) - st["cpu_s"]) < 1e-3
    assert 0 < st["fork_s"] < st["wall_s"] and 0 < st["own_part_s"] < st["wall_s"] and min(st["wait_s"], st["load_s"]) >= 0
    assert st1["worker_cpu_s"] == [round(st1["cpu_s"], 4)] and "fork_s" not in st1
    assert len(st["worker_faults"]) == 2 and min(st["worker_faults"]) >= 0 and sum(st["worker_faults"]) > 0
    kept = set(two["trace_id"])
    assert two["trace_id"].to_list() == [i for i in mixed["id"].to_list() if i in kept]  # input order
    assert set(two["trace_id"]).isdisjoint({"bad-a", "bad-b", "bad-c"})
    reasons = q2["reason"].to_list()
    assert [r.split(":")[0] for r in reasons] == ["render error"] * 3 + ["too long"] * too_long
    assert q2["field"].to_list()[:3] == ["tools"] * 3


@pytest.mark.parametrize("how", ["raises", "killed"])
def test_a_failing_worker_is_reported(tmp_path, llama_tokenizer, monkeypatch, how):
    import os
    import signal

    import cb_core.render as render_mod
    from cb_core.sources.demo import write_demo_sources

    traces = _read("agentdojo", write_demo_sources(tmp_path, seed=0)["agentdojo"])
    real = render_mod._chunk

    def boom(args):
        if len(args) == 1 and args[0] > 0:  # the forked child's share (its index into _WORK)
            if how == "killed":
                os.kill(os.getpid(), signal.SIGKILL)
            raise ValueError("disk on fire")
        return real(args)

    monkeypatch.setattr(render_mod, "_chunk", boom)
    import tempfile

    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    want = r"disk on fire" if how == "raises" else r"render worker 1 .* died without a result"
    with pytest.raises(ValueError if how == "raises" else RuntimeError, match=want) as err:
        render_traces(traces, llama_tokenizer, RenderConfig(max_length=65536), num_workers=2)
    if how == "raises":  # raised as itself, the child's traceback attached
        assert "render worker 1" in "".join(err.value.__notes__) and "boom" in "".join(err.value.__notes__)
    assert not list(scratch.iterdir())  # the share files are gone


@pytest.mark.slow
@pytest.mark.shared_data
def test_all_shared_data_renders_equal_hf_path(shared_data, llama_tokenizer):
    """Every real trace (AgentDojo with the full suite tool sets, TAU2, LLMail, XSTest), rendered with no
    length limit: ids and token spans through the fast path equal those through HF with offsets."""
    sources = {"agentdojo": shared_data / "agent_dojo" / "*.jsonl", "tau2": shared_data / "tau2",
               "llmail_inject": shared_data / "llmail_inject", "xstest": shared_data / "xstest"}
    frames = [_read(ds, p) for ds, p in sources.items()]
    traces = pl.concat([f for f in frames if f.height], how="diagonal_relaxed")
    assert traces.height > 3000
    out = _assert_renders_equal(traces, llama_tokenizer, RenderConfig(max_length=1 << 20))
    assert out.height == traces.height


# ------------------------------------------------------------------------------------------- fallback
@pytest.fixture(scope="module")
def swapped_tokenizer(llama_tokenizer, tmp_path_factory):
    """A local tokenizer directory whose vocabulary differs from Llama-3's (two ids swapped)."""
    from cb_core.tokenizer import load_tokenizer

    d = tmp_path_factory.mktemp("swapped")
    llama_tokenizer.save_pretrained(str(d))
    tj = json.loads((d / "tokenizer.json").read_text())
    vocab = tj["model"]["vocab"]
    a, b = "Ġhello", "Ġworld"
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (d / "tokenizer.json").write_text(json.dumps(tj))
    return load_tokenizer(d)


def test_same_build_in_a_directory_takes_fast_path(llama_tokenizer, tmp_path):
    from cb_core.tokenizer import load_tokenizer

    llama_tokenizer.save_pretrained(str(tmp_path))
    assert is_llama3_encoding(load_tokenizer(tmp_path))


def test_other_vocab_falls_back_to_hf(swapped_tokenizer, llama_tokenizer):
    assert not is_llama3_encoding(swapped_tokenizer)
    assert fast_encoder(swapped_tokenizer) is None
    msgs = [{"role": "user", "content": "say hello world"}, {"role": "assistant", "content": "hello world"}]
    traces = pl.DataFrame({"id": ["t1"], "dataset": ["demo"], "source_locator": ["f.jsonl:1"],
                           "messages": [msgs], "tools": ["[]"]})
    renders, _ = render_traces(traces, swapped_tokenizer, RenderConfig())
    text = render_conversation(msgs, None, RenderConfig()).text
    want = swapped_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert renders["input_ids"][0].to_list() == want
    assert want != llama_tokenizer(text, add_special_tokens=False)["input_ids"]  # the vocab really differs
    assert np.array_equal(renders["input_ids"][0].to_numpy(), np.asarray(want))


def test_auto_workers_take_one_per_core_only_for_enough_traces(tmp_path, llama_tokenizer, monkeypatch):
    """num_workers=0 (the renders asset's default): one process per core when each gets
    AUTO_MIN_ROWS_PER_WORKER traces, else one."""
    import cb_core.forking
    import cb_core.render as render_mod
    from cb_assets.assets.renders import RendersConfig
    from cb_core.sources.demo import write_demo_sources

    assert RendersConfig().num_workers == 0
    traces = _read("agentdojo", write_demo_sources(tmp_path, seed=0)["agentdojo"])
    monkeypatch.setattr(cb_core.forking, "cores", lambda: 2)
    monkeypatch.setattr(render_mod, "AUTO_MIN_ROWS_PER_WORKER", traces.height // 2)
    cfg = RenderConfig(max_length=65536)
    st: dict = {}
    many, _ = render_traces(traces, llama_tokenizer, cfg, num_workers=0, stats=st)
    assert st["workers"] == 2
    few, _ = render_traces(traces.head(traces.height // 2 + 1), llama_tokenizer, cfg, num_workers=0, stats=st)
    assert st["workers"] == 1
    assert few.equals(many.head(few.height))
