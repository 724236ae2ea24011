"""Preflight: per-sample checks a training run would otherwise discover hours in."""
from __future__ import annotations

import json
from typing import Any

import polars as pl

from cb_core.curate.config import CurationConfig
from cb_core.curate.mix import lossmask_rows
from cb_core.parse import tool_call_problems
from cb_core.schemas import END_IDS

DEFAULT_END_IDS = END_IDS  # <|eot_id|>, <|eom_id|>


def _end_ids(tokenizer) -> set[int]:
    if tokenizer is None:
        return set(DEFAULT_END_IDS)
    ids = set()
    for t in ("<|eot_id|>", "<|eom_id|>"):
        try:
            i = tokenizer.convert_tokens_to_ids(t)
        except Exception:  # noqa: BLE001 - a tokenizer without these tokens: fall back to the Llama ids
            i = None
        if isinstance(i, int) and i >= 0 and i != getattr(tokenizer, "unk_token_id", None):
            ids.add(i)
    return ids or set(DEFAULT_END_IDS)


def preflight(
    train: pl.DataFrame,
    traces: pl.DataFrame | None,
    renders: pl.DataFrame,
    lossmasks: pl.DataFrame | None,
    tokenizer,
    cfg: CurationConfig,
) -> list[dict[str, Any]]:
    """Per-sample training preflight; returns one row {id, dataset, reason} per problem (empty = pass).

    * the sample tokenizes: it has a render made with the training tokenizer (`training.tokenizer_id`, else
      the given tokenizer's id) and its ids lie inside that tokenizer's vocabulary;
    * assistant boundaries: each assistant message has header and end_token spans, and the token at the end
      span is <|eot_id|> or <|eom_id|> (a message cut by deliberate truncation is exempt);
    * length: n_tokens <= training.max_seq_length (a render truncated on purpose passes when its mask is
      still non-empty);
    * tool calls: arguments parse as a JSON object naming a tool of the trace's `tools` with the required
      parameters present;
    * the mask under the configured policy exists, is non-empty and lies inside the sequence.
    """
    if "messages" not in train.columns or "tools" not in train.columns:
        if traces is None:
            raise ValueError("preflight: train has no messages/tools and no traces were given")
        train = train.join(traces.select("id", "messages", "tools"), on="id", how="left")
    ids = train["id"].to_list()
    want_tok = cfg.training.tokenizer_id
    if want_tok is None and tokenizer is not None:
        try:
            from cb_core.tokenizer import tokenizer_id

            want_tok = tokenizer_id(tokenizer)
        except Exception:  # noqa: BLE001 - an unusual tokenizer object: skip the identity check
            want_tok = None
    r = renders.filter(pl.col("trace_id").is_in(ids))
    if want_tok and "tokenizer_id" in r.columns:  # prefer the render made with the training tokenizer
        r = r.sort(pl.col("tokenizer_id") != want_tok, "tokenizer_id")
    r = r.unique("trace_id", keep="first", maintain_order=True)
    rmap = {row["trace_id"]: row for row in r.iter_rows(named=True)}

    # masks: the mix carries them; otherwise look them up in lossmasks under the category's policy
    if "mask_spans" in train.columns and "n_masked" in train.columns:
        mmap = {
            row["id"]: row
            for row in train.select("id", "mask_spans", "n_masked", "policy").iter_rows(named=True)
        }
    else:
        mmap = {}
        if lossmasks is not None:
            cat = train.select("id", pl.col("labels").struct.field("category").alias("_cat"))
            for c in ("harmful", "retain"):
                ids_c = cat.filter(pl.col("_cat") == c)["id"].to_list()
                lm = lossmask_rows(lossmasks, cfg.training.lossmask_policy[c]).filter(
                    pl.col("trace_id").is_in(ids_c)
                )
                for row in lm.iter_rows(named=True):
                    mmap[row["trace_id"]] = row

    end_ids = _end_ids(tokenizer)
    vocab = len(tokenizer) if tokenizer is not None else None
    max_len = cfg.training.max_seq_length
    fails: list[dict[str, Any]] = []
    datasets = train["dataset"].to_list() if "dataset" in train.columns else [None] * len(ids)
    for tid, ds, msgs, tools in zip(ids, datasets, train["messages"].to_list(), train["tools"].to_list()):
        def bad(reason: str) -> None:
            fails.append({"id": tid, "dataset": ds, "reason": reason})

        ren = rmap.get(tid)
        mask = mmap.get(tid)
        for p in tool_call_problems(msgs, tools):
            bad(f"tool call: {p}")
        if mask is None:
            bad("no lossmask under the configured policy")
        elif not (mask.get("n_masked") or 0) > 0 or not mask.get("mask_spans"):
            bad("empty mask")
        if ren is None:
            bad("no render: the sample did not tokenize")
            continue
        if want_tok and ren.get("tokenizer_id") != want_tok:
            bad(f"rendered with tokenizer {ren.get('tokenizer_id')!r}, training uses {want_tok!r}")
        input_ids = ren["input_ids"] or []
        n_tok = ren.get("n_tokens") if ren.get("n_tokens") is not None else len(input_ids)
        truncated = bool(ren.get("truncated"))
        if not input_ids:
            bad("render has no tokens")
            continue
        if vocab is not None and (max(input_ids) >= vocab or min(input_ids) < 0):
            bad(f"token id outside the tokenizer's vocabulary ({vocab})")
        if n_tok > max_len:
            bad(f"{n_tok} tokens > max_seq_length {max_len}")
        if mask is not None:
            spans = mask.get("mask_spans") or []
            if any(s["token_start"] < 0 or s["token_end"] > n_tok or s["token_end"] < s["token_start"] for s in spans):
                bad("mask span outside the sequence")
            if any(s["token_end"] > max_len for s in spans):
                bad(f"mask span beyond max_seq_length {max_len}")
        spans_by_msg: dict[int, dict[str, list[dict]]] = {}
        for s in ren["spans"] or []:
            mi = s.get("message_index")
            if mi is None:
                continue
            spans_by_msg.setdefault(mi, {}).setdefault(s.get("kind"), []).append(s)
        last_rendered = max(spans_by_msg) if spans_by_msg else -1
        for i, m in enumerate(msgs or []):
            if (m or {}).get("role") != "assistant":
                continue
            kinds = spans_by_msg.get(i, {})
            if truncated and i >= last_rendered and "end_token" not in kinds:
                continue  # cut by deliberate truncation
            if "header" not in kinds:
                bad(f"assistant message {i}: no header span")
            ends = kinds.get("end_token") or []
            if not ends:
                bad(f"assistant message {i}: no end_token span")
                continue
            pos = ends[-1]["token_start"]
            if not (0 <= pos < len(input_ids)) or input_ids[pos] not in end_ids:
                got = input_ids[pos] if 0 <= pos < len(input_ids) else None
                bad(f"assistant message {i}: end token at {pos} is {got}, not one of {sorted(end_ids)}")
    return fails
