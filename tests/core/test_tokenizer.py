"""The offline Llama-3 tokenizer (built from llama-models' tokenizer.model), model profiles and the tiny model."""
from __future__ import annotations

import json
import random

import pytest
import torch

from cb_core.tokenizer import (
    LLAMA3_PAT_STR,
    LLAMA3_SPECIAL_IDS,
    check_llama3_special_ids,
    llama3_special_tokens,
    llama3_tokenizer,
    llama3_tokenizer_model_path,
    load_tokenizer,
    tokenizer_id,
)

EXPECTED_IDS = {
    "<|begin_of_text|>": 128000,
    "<|end_of_text|>": 128001,
    "<|start_header_id|>": 128006,
    "<|end_header_id|>": 128007,
    "<|eom_id|>": 128008,
    "<|eot_id|>": 128009,
    "<|python_tag|>": 128010,
}


@pytest.fixture(scope="module")
def tiktoken_ref():
    """Meta's reference: a tiktoken Encoding from the same tokenizer.model with Meta's pat_str."""
    import tiktoken
    from llama_models.llama3.tokenizer import Tokenizer as MetaTokenizer
    from llama_models.tokenizer_utils import load_bpe_file

    assert MetaTokenizer.pat_str == LLAMA3_PAT_STR
    ranks = load_bpe_file(llama3_tokenizer_model_path())
    specials = {t: 128000 + i for i, t in enumerate(llama3_special_tokens())}
    return tiktoken.Encoding(name="llama3-ref", pat_str=LLAMA3_PAT_STR, mergeable_ranks=ranks, special_tokens=specials)


def _varied_strings(shared_texts: list[str]) -> list[str]:
    rng = random.Random(0)
    base = [
        "Hello world",
        "  leading and trailing spaces   ",
        "tabs\tand\nnewlines\r\n\r\nCRLF",
        "numbers 1234567890 3.14159 -42 1e10 0x1F",
        "contractions: I'm, you're, it's, we've, they'd, she'll, DON'T",
        "Ünïcödé: naïve café, straße, Ελληνικά, русский, 中文字符, 日本語のテキスト, 한국어",
        "emoji 😀🎉👩‍👩‍👧‍👦 and flags 🇫🇷🇯🇵",
        'code: def f(x):\n    return {"a": [1, 2, 3]}  # comment',
        "json: {\"name\": \"send_money\", \"parameters\": {\"amount\": 98.7}}",
        "URLs https://www.true-informations.com/path?q=1&r=2 and IBAN US133000000121212121212",
        "   \n\n\n   ",
        "a" * 300,
        "!!!???...,,,;;;:::",
        "mixed   multiple    spaces\u00a0nbsp\u2009thin",
        "",
    ]
    out = list(base)
    for t in shared_texts:
        if len(out) >= 320:
            break
        if not t:
            continue
        start = rng.randrange(0, max(1, len(t) - 400))
        out.append(t[start : start + rng.randrange(1, 400)])
    alphabet = "ab Zé中😀1 \n\t.,'{}\"_-"
    for _ in range(60):
        out.append("".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 80))))
    return out


def _shared_texts(shared_data) -> list[str]:
    texts = []
    for f in sorted((shared_data / "agent_dojo").glob("agentdojo-*.jsonl"))[:3]:
        for line in f.read_text(encoding="utf-8").splitlines()[1:40]:
            for m in json.loads(line).get("messages") or []:
                texts.append(m.get("content") or "")
    return texts


def test_special_token_ids(llama_tokenizer):
    tok = llama_tokenizer
    for t, i in EXPECTED_IDS.items():
        assert tok.convert_tokens_to_ids(t) == i
        assert tok.convert_ids_to_tokens(i) == t
    assert len(tok) == 128256
    assert tok.bos_token_id == 128000
    assert tok.eos_token_id == 128009
    assert tok.convert_ids_to_tokens(128255) == "<|reserved_special_token_247|>"
    # every special id decodes to a distinct special token
    specials = tok.convert_ids_to_tokens(list(range(128000, 128256)))
    assert len(set(specials)) == 256 and all(s.startswith("<|") and s.endswith("|>") for s in specials)
    check_llama3_special_ids(tok)
    # special strings in text become single special tokens
    ids = tok.encode("<|start_header_id|>assistant<|end_header_id|>\n\nHi<|eot_id|>", add_special_tokens=False)
    assert ids[0] == 128006 and ids[2] == 128007 and ids[-1] == 128009
    assert ids[1] == tok.convert_tokens_to_ids("assistant")


def test_round_trip(llama_tokenizer):
    tok = llama_tokenizer
    for text in ["Hello world", "Ünïcödé 中文 😀\n\n  x", '{"name": "send_money", "parameters": {"a": 1}}']:
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == text
    assert tok.encode("Hello world", add_special_tokens=False) == [9906, 1917]
    assert tok.encode("Hello world")[0] == 128000  # add_special_tokens prepends BOS


def test_matches_tiktoken_reference(llama_tokenizer, tiktoken_ref, shared_data):
    texts = _varied_strings(_shared_texts(shared_data))
    assert len(texts) >= 300
    hf = llama_tokenizer(texts, add_special_tokens=False)["input_ids"]
    mismatches = [t for t, ids in zip(texts, hf) if ids != tiktoken_ref.encode(t, disallowed_special=())]
    assert mismatches == []
    # with special tokens allowed, both tokenize header strings the same way
    s = "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|><|python_tag|>{}<|eom_id|>"
    assert llama_tokenizer.encode(s, add_special_tokens=False) == tiktoken_ref.encode(s, allowed_special="all")


def test_matches_tiktoken_without_shared_data(llama_tokenizer, tiktoken_ref):
    texts = _varied_strings([])
    for t in texts:
        assert llama_tokenizer.encode(t, add_special_tokens=False) == tiktoken_ref.encode(t, disallowed_special=())


def test_cache_build_and_reload(tmp_path, llama_tokenizer):
    cache = tmp_path / "tok"
    built = llama3_tokenizer(cache_dir=cache)
    assert (cache / "tokenizer.json").is_file() and (cache / "cb_build.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left behind
    mtime = (cache / "tokenizer.json").stat().st_mtime_ns
    reloaded = llama3_tokenizer(cache_dir=cache)
    assert (cache / "tokenizer.json").stat().st_mtime_ns == mtime  # reused, not rebuilt
    text = "Cache me: 123 😀 <|eot_id|>"
    assert built.encode(text) == reloaded.encode(text) == llama_tokenizer.encode(text)
    assert tokenizer_id(built) == tokenizer_id(reloaded) == tokenizer_id(llama_tokenizer)
    assert tokenizer_id(built).startswith("llama3-")
    del reloaded._cb_tokenizer_id  # the digest recomputed from the reloaded tokenizer itself is the same
    assert tokenizer_id(reloaded) == tokenizer_id(built)
    # a corrupted cache is rebuilt, not trusted
    (cache / "tokenizer.json").write_text("{not json")
    again = llama3_tokenizer(cache_dir=cache)
    assert again.encode(text) == built.encode(text)


def test_llama3_tokenizer_id_reads_the_stamp_and_builds_only_without_one(tmp_path, llama_tokenizer, monkeypatch):
    """The Llama-3 build's digest comes from a current cache stamp without loading a tokenizer (the fast
    path's check used to load a second copy: ~1 s, ~200 MB); a missing or stale stamp means a build."""
    import cb_core.tokenizer as T

    want = tokenizer_id(llama_tokenizer)
    cache = tmp_path / "tok"
    llama3_tokenizer(cache_dir=cache)  # builds it and writes the stamp
    built: list = []
    monkeypatch.setattr(T, "llama3_tokenizer", lambda cache_dir=None: built.append(cache_dir) or llama_tokenizer)
    assert T.llama3_tokenizer_id(cache) == want and built == []
    stamp = json.loads((cache / "cb_build.json").read_text())
    (cache / "cb_build.json").write_text(json.dumps({**stamp, "source_sha256": "0" * 64}))  # stale
    assert T.llama3_tokenizer_id(cache) == want and built == [cache]
    (cache / "cb_build.json").write_text("{not json")
    assert T.llama3_tokenizer_id(cache) == want and built == [cache, cache]
    assert T.llama3_tokenizer_id(tmp_path / "none") == want and built[-1] == tmp_path / "none"


def test_load_tokenizer_specs(tmp_path, llama_tokenizer):
    assert load_tokenizer("llama3").encode("hi") == llama_tokenizer.encode("hi")
    local = tmp_path / "model_dir"
    llama_tokenizer.save_pretrained(str(local))
    tok = load_tokenizer(str(local))
    assert tok.encode("Hello world", add_special_tokens=False) == [9906, 1917]
    assert tok.convert_tokens_to_ids("<|eot_id|>") == 128009
    with pytest.raises(FileNotFoundError):
        load_tokenizer(str(tmp_path / "missing"))


def test_model_profiles():
    from cb_core.model import load_profile

    tiny = load_profile("tiny")
    assert (tiny.tokenizer, tiny.model, tiny.max_length, tiny.tool_call_format) == ("llama3", "tiny", 4096, "python_tag")
    prod = load_profile("llama31_8b")
    assert prod.model == "local" and str(prod.resolved_path).endswith("models/Llama-3.1-8B-Instruct")
    rc = prod.render_config()
    # the production profile renders up to 16384 tokens: the real suite tool sets alone pass 4096
    assert rc.tool_call_format == "python_tag" and rc.max_length == prod.max_length == 16384
    with pytest.raises(FileNotFoundError):
        from cb_core.model import load_model

        load_model(prod)  # the placeholder directory does not exist here


def test_tiny_llama_forward(llama_tokenizer, tiny_model):
    from cb_core.model import tiny_llama

    cfg = tiny_model.config
    assert cfg.vocab_size == 128256 and cfg.hidden_size == 128 and cfg.num_hidden_layers == 4
    assert cfg.num_attention_heads == 4 and cfg.head_dim == 32 and cfg.intermediate_size == 256
    assert cfg.bos_token_id == 128000 and cfg.eos_token_id == 128009
    batch = llama_tokenizer(["Hello there", "A somewhat longer second sentence."], padding=True, return_tensors="pt")
    with torch.no_grad():
        out = tiny_model(**batch, logits_to_keep=1, output_hidden_states=True)
    assert out.logits.shape == (2, 1, 128256)
    assert torch.isfinite(out.logits).all()
    assert out.hidden_states[-1].shape == (2, batch["input_ids"].shape[1], 128)
    # deterministic for a seed, different for another
    again = tiny_llama(llama_tokenizer, seed=0)
    other = tiny_llama(llama_tokenizer, seed=1)
    w = tiny_model.model.layers[0].mlp.up_proj.weight
    assert torch.equal(w, again.model.layers[0].mlp.up_proj.weight)
    assert not torch.equal(w, other.model.layers[0].mlp.up_proj.weight)
