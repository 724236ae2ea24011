"""Stable hashing (every choice is ordered by sha256 of seed and a stable key), per-trace features and
the tool-name helpers the mix, the gates and preflight share."""
from __future__ import annotations

import hashlib
import json
import math
from typing import Any

import polars as pl

from cb_core.curate.config import CurationConfig
from cb_core.parse import schema_fn, schema_name  # noqa: F401  (curate.features re-exports them)
from cb_core.schemas import digest


def hash_key(*parts: Any) -> str:
    return hashlib.sha256(":".join(str(p) for p in parts).encode("utf-8")).hexdigest()


def hash_unit(seed: Any, key: str) -> float:
    """sha256(seed + key) -> [0, 1)."""
    return int(hash_key(seed, key)[:16], 16) / float(1 << 64)


def message_content(messages: list[dict] | None) -> list[list]:
    """What a message list says: per message its role, content, name and tool calls (name, arguments).
    Tool-call ids are left out (providers number them differently); so is everything outside the messages."""
    out = []
    for m in messages or []:
        m = m or {}
        calls = [[c.get("name"), c.get("arguments")] for c in (m.get("tool_calls") or [])]
        out.append([m.get("role"), m.get("content") or "", m.get("name") or "", calls])
    return out


def content_hash(messages: list[dict] | None) -> str:
    """De-duplication key: the hash of the message list content only (`message_content`). Nothing that can
    differ by label enters it -- not the offered tool list (which once carried the attacker's tool on attacked
    traces only), not labels, ids or source locators -- so two traces that show the model the same
    conversation collapse whatever they are labelled."""
    return digest(message_content(messages))


def hash_col(df: pl.DataFrame, seed: Any, col: str, salt: str = "") -> pl.Series:
    return pl.Series([hash_key(seed, salt, v) for v in df[col].to_list()], dtype=pl.String)


def adversarial_safe_expr() -> pl.Expr:
    """True adversarial-safe: flagged `is_adversarial_safe` AND the injection is in the context
    (`attack_present`, and `injection_reached` not False). An attack the model never read is no attack, so
    a trace that was attacked but never reached the injection is never counted, whatever its flag says."""
    lab = pl.col("labels")
    return (
        lab.struct.field("is_adversarial_safe").fill_null(False)
        & lab.struct.field("attack_present").fill_null(False)
        & lab.struct.field("injection_reached").fill_null(True)
    )


def _injection_index(msgs: list[dict], tool_attack: dict | None) -> int | None:
    """Index of the first message holding an injection span (tool result or user message), or None when no
    recorded span points inside the message list at a message that really holds the injected text."""
    ta = tool_attack or {}
    spans = [s for s in (ta.get("injection_spans") or []) if s] or ([ta["injection_span"]] if ta.get(
        "injection_span") else [])
    best = None
    for sp in spans:
        idx = sp.get("message_index")
        if not isinstance(idx, int) or not 0 <= idx < len(msgs):
            continue
        m = msgs[idx] or {}
        if m.get("role") not in ("tool", "user"):
            continue
        content = m.get("content") or ""
        cs, ce = sp.get("char_start"), sp.get("char_end")
        inside = isinstance(cs, int) and isinstance(ce, int) and 0 <= cs < ce <= len(content)
        if not inside:
            continue
        best = idx if best is None else min(best, idx)
    return best


def injection_in_context(traces: pl.DataFrame) -> pl.Series:
    """Per trace: attack_present, injection_reached not False, and an injection span inside a tool/user message."""
    lab = traces["labels"]
    attacked = lab.struct.field("attack_present").fill_null(False).to_list()
    reached = lab.struct.field("injection_reached").to_list()
    out = [
        bool(a) and r is not False and _injection_index(m or [], ta) is not None
        for a, r, m, ta in zip(attacked, reached, traces["messages"].to_list(), traces["tool_attack"].to_list())
    ]
    return pl.Series("_injected", out, dtype=pl.Boolean)


def trace_features(traces: pl.DataFrame) -> pl.DataFrame:
    """Flat per-trace columns the curation logic needs (labels unnested, content hash, flags)."""
    lab = pl.col("labels")
    msgs = traces["messages"].to_list()
    hashes = [content_hash(m) for m in msgs]
    has_asst = [any((x or {}).get("role") == "assistant" for x in (m or [])) for m in msgs]
    has_calls = [any((x or {}).get("tool_calls") for x in (m or [])) for m in msgs]
    return traces.with_columns(
        lab.struct.field("category").alias("category"),
        lab.struct.field("priority_class").alias("priority_class"),
        lab.struct.field("subtype").fill_null("").alias("subtype"),
        lab.struct.field("attack_present").fill_null(False).alias("_attacked"),
        adversarial_safe_expr().alias("_adv_safe"),
        lab.struct.field("task_success").alias("_task_success"),
        injection_in_context(traces),
        pl.Series("content_hash", hashes, dtype=pl.String),
        pl.Series("_has_assistant", has_asst, dtype=pl.Boolean),
        pl.Series("_has_tool_calls", has_calls, dtype=pl.Boolean),
    )


def reserved_attack_groups(feats: pl.DataFrame, cfg: CurationConfig) -> set[str]:
    """Pair groups held out of the mix up front for `eval_attacks`: per attack stratum (dataset x subtype),
    groups holding an attacked trace with the injection in context are taken in sha256(seed, group) order
    until their distinct eval-attack cuts number `eval_attacks.min_per_stratum`, never more than `max_reserve_fraction` of the
    stratum's groups. A pair group is a task, so a reserved group takes the task's benign runs out too."""
    ea = cfg.eval_attacks
    if ea.min_per_stratum <= 0 or feats.height == 0:
        return set()
    inj = feats.filter(pl.col("_injected"))
    # count distinct cuts (identical cuts collapse into one eval attack)
    keys = [
        content_hash(cut_after_injection(m or [], ta)) + (t or "")
        for m, ta, t in zip(inj["messages"].to_list(), inj["tool_attack"].to_list(), inj["tools"].to_list())
    ]
    rows = (
        inj.with_columns(pl.Series("_cut", keys, dtype=pl.String))
        .group_by("dataset", "subtype", "pair_group")
        .agg(pl.col("_cut").n_unique().alias("len"))
    )
    out: set[str] = set()
    for (_ds, _st), grp in rows.group_by(["dataset", "subtype"]):
        sizes = dict(zip(grp["pair_group"].to_list(), grp["len"].to_list()))
        groups = sorted(sizes, key=lambda g: (hash_key(cfg.seed, "holdout", g), g))
        limit = int(math.floor(ea.max_reserve_fraction * len(groups)))
        n_rows = 0
        for g in groups[:limit]:
            if n_rows >= ea.min_per_stratum:
                break
            out.add(g)
            n_rows += sizes[g]
    return out


def tool_names(tools: str | None) -> set[str] | None:
    """Names of the functions in a `tools` JSON string; None when it does not parse as a list."""
    try:
        obj = json.loads(tools) if tools else []
    except (TypeError, ValueError):
        return None
    if not isinstance(obj, list):
        return None
    return {n for n in (schema_name(s) for s in obj) if n}


def called_tools(messages: list[dict] | None) -> list[str]:
    return [c.get("name") for m in (messages or []) for c in ((m or {}).get("tool_calls") or [])]


def cut_after_injection(msgs: list[dict], tool_attack: dict | None) -> list[dict] | None:
    """The messages up to and including the first injected message (a tool result or a user message), plus the
    tool results of the same assistant turn that follow it (a parallel call's results belong together), so the
    next turn is the model's answer to the injection. None when no injection span lies in the messages."""
    inj = _injection_index(msgs, tool_attack)
    if inj is None:
        return None
    end = inj + 1
    if (msgs[inj] or {}).get("role") == "tool":
        while end < len(msgs) and (msgs[end] or {}).get("role") == "tool":
            end += 1
    return list(msgs[:end])
