"""HTML preview of loss masks: a few samples per policy, every token shown, masked tokens highlighted.

Each token is a ``<span>``: masked tokens get a background whose intensity follows the weight; a message
starts on a new line with a role badge (message boundaries visible); special tokens are shown in a muted
monospace box. All text is HTML-escaped. The page is self-contained (inline CSS, no scripts).
"""
from __future__ import annotations

import html
import re
from typing import Sequence

import polars as pl

_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;max-width:1200px}
h2{border-bottom:2px solid #444;margin-top:2em} h3{font-size:1em;margin:1.2em 0 .3em;color:#333}
.doc{color:#555;font-size:.9em;white-space:pre-wrap}
.seq{font-family:ui-monospace,monospace;font-size:12px;line-height:1.9;white-space:pre-wrap;
     word-break:break-word;border:1px solid #ccc;padding:.6em;background:#fafafa}
.t{border-radius:2px}
.m{outline:1px solid #c60}
.sp{color:#777;background:#eee;border:1px solid #bbb;font-size:10px;padding:0 2px}
.msg{display:block;border-top:1px dashed #999;margin-top:.4em;padding-top:.2em}
.role{display:inline-block;font:bold 10px system-ui;color:#fff;background:#555;padding:0 4px;margin-right:4px;border-radius:3px}
.role-assistant{background:#2a7} .role-user{background:#27a} .role-tool{background:#a72} .role-system{background:#777}
.legend span{padding:0 6px;margin-right:6px}
.stats{color:#444;font-size:.85em}
"""


def _bg(weight: float) -> str:
    a = max(0.15, min(1.0, float(weight) / 2.0 + 0.35))
    return f"background:rgba(255,170,0,{a:.2f})"


def render_sample_html(
    tokenizer,
    input_ids: Sequence[int],
    spans: Sequence[dict],
    mask_spans: Sequence[dict],
    *,
    title: str = "",
) -> str:
    """One sample: every token of ``input_ids`` as an escaped span; masked ones highlighted by weight."""
    ids = [int(i) for i in input_ids]
    n = len(ids)
    weight = [0.0] * n
    for m in mask_spans:
        for t in range(max(0, m["token_start"]), min(n, m["token_end"])):
            weight[t] = float(m["weight"])
    msg_start: dict[int, str] = {}
    for s in spans:
        if s["kind"] == "message" and s["token_start"] < n:
            msg_start[s["token_start"]] = s["role"] or "?"
    uniq = sorted(set(ids))  # each distinct token decoded once (a sample repeats most of its tokens)
    text_of = dict(zip(uniq, tokenizer.batch_decode([[i] for i in uniq], skip_special_tokens=False)))
    pieces = [text_of[i] for i in ids]
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    out = [f"<h3>{html.escape(title)}</h3><div class='seq'>"]
    for t, (tid, txt) in enumerate(zip(ids, pieces)):
        if t in msg_start:
            role = msg_start[t]
            out.append(f"<span class='msg'><span class='role role-{html.escape(role)}'>{html.escape(role)}</span></span>")
        cls = ["t"]
        style = ""
        if weight[t] > 0:
            cls.append("m")
            style = f" style='{_bg(weight[t])}'"
        if tid in special or tid >= 128000:
            cls.append("sp")
        tip = f"#{t} id={tid}" + (f" w={weight[t]:g}" if weight[t] else "")
        out.append(f"<span class='{' '.join(cls)}'{style} title='{html.escape(tip)}'>{html.escape(txt)}</span>")
    out.append("</div>")
    return "".join(out)


def mask_preview_html(
    tokenizer,
    lossmasks: pl.DataFrame,
    renders: pl.DataFrame,
    *,
    samples_per_policy: int = 3,
    policies: Sequence[str] | None = None,
    title: str = "Loss-mask preview",
    max_tokens: int = 1500,
) -> str:
    """The preview page: for each policy, its definition, coverage stats and ``samples_per_policy``
    samples (the first ones by trace id, preferring traces with a tool call and text before it so
    the policies differ visibly). Long samples are cut at ``max_tokens`` tokens (noted in the title)."""
    from cb_core.lossmask import POLICIES

    policies = list(policies or [p for p in POLICIES if p in set(lossmasks["policy"].unique().to_list())])
    by_id = renders.select("trace_id", "input_ids", "spans", "n_tokens")
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        "<p class='legend'>Masked tokens: <span style='" + _bg(1.0) + "'>weight 1</span>"
        "<span style='" + _bg(0.3) + "'>lower weight</span> unmasked: <span>plain</span>; "
        "<span class='sp'>special</span> tokens boxed; a dashed line + role badge starts each message. "
        "Hover a token for its position and id.</p>",
    ]
    # prefer samples that show the differences between policies: a tool call with text before it
    prefer = _preferred_traces(renders)
    for pol in policies:
        lm = lossmasks.filter(pl.col("policy") == pol)
        fn = POLICIES.get(pol)
        doc = (fn.__doc__ or "").strip() if fn else ""
        tot = lm.select(pl.col("n_masked").cast(pl.Int64).sum(), pl.col("n_tokens").cast(pl.Int64).sum()).row(0)
        frac = (tot[0] / tot[1]) if tot[1] else 0.0
        parts.append(f"<h2 id='{html.escape(pol)}'>{html.escape(pol)}</h2><div class='doc'>{html.escape(doc)}</div>")
        parts.append(f"<p class='stats'>{lm.height} rows; masked tokens {tot[0]} of {tot[1]} ({frac:.1%})</p>")
        if lm.height == 0:
            continue
        lm = lm.with_columns(pl.col("trace_id").is_in(prefer).alias("_pref")).sort(["_pref", "trace_id"], descending=[True, False])
        sample = lm.head(samples_per_policy).join(by_id, on="trace_id", how="inner", suffix="_r")
        for r in sample.iter_rows(named=True):
            ids = r["input_ids"][:max_tokens]
            cut = len(r["input_ids"]) > max_tokens
            t = f"{r['trace_id'][:16]} · {r.get('dataset') or ''} · {r.get('priority_class') or ''} · " \
                f"{r['n_masked']}/{r['n_tokens']} masked" + (f" · first {max_tokens} tokens shown" if cut else "")
            parts.append(render_sample_html(tokenizer, ids, r["spans"], r["mask_spans"], title=t))
    parts.append("</body></html>")
    return "".join(parts)


def _preferred_traces(renders: pl.DataFrame, k: int = 50) -> list[str]:
    """Trace ids whose render has an assistant message with both content and a tool call (shortest first)."""
    if renders.height == 0:
        return []
    sp = (
        renders.select("trace_id", "n_tokens", "spans")
        .explode("spans")
        .drop_nulls("spans")
        .unnest("spans")
        .filter(pl.col("role") == "assistant")
    )
    per = sp.group_by("trace_id", "message_index").agg(
        ((pl.col("kind") == "content").any() & (pl.col("kind") == "tool_call").any()).alias("both"),
        pl.col("n_tokens").first(),
    )
    ids = per.filter("both").sort("n_tokens").get_column("trace_id").unique(maintain_order=True)
    return ids.head(k).to_list()


# ------------------------------------------------------------------------------- Markdown for asset metadata
def _marked(tokenizer, input_ids: Sequence[int], mask_spans: Sequence[dict], mark, text=lambda s: s) -> str:
    """The decoded sequence with each masked span passed through ``mark`` (the rest through ``text``)."""
    ids = list(input_ids)
    pieces, pos = [], 0
    for sp in mask_spans:
        pieces.append(text(tokenizer.decode(ids[pos : sp["token_start"]])))
        pieces.append(mark(text(tokenizer.decode(ids[sp["token_start"] : sp["token_end"]]))))
        pos = sp["token_end"]
    pieces.append(text(tokenizer.decode(ids[pos:])))
    return "".join(pieces)


def preview_markdown(stats: dict, path: str, lossmasks: pl.DataFrame, renders: pl.DataFrame, tokenizer) -> str:
    """Per-policy counts and one short excerpt per policy (masked text wrapped in [[ ]]), linking the file."""
    lines = [
        f"Full preview (every token, masked ones highlighted): `{path}`",
        "",
        "| policy | rows | masked tokens | fraction | rejected |",
        "|---|---:|---:|---:|---:|",
    ]
    for pol, s in stats.items():
        lines.append(
            f"| {pol} | {s['rows']} | {s['masked_tokens']} | {s['masked_fraction']:.1%} | {s.get('rejected', 0)} |"
        )
    if lossmasks.height:
        first = lossmasks.sort("n_tokens").head(1)["trace_id"][0]
        ids = renders.filter(pl.col("trace_id") == first).row(0, named=True)["input_ids"]
        lines += ["", f"Sample `{first[:16]}` (masked text between `[[` and `]]`, first 600 chars):", ""]
        for row in lossmasks.filter(pl.col("trace_id") == first).iter_rows(named=True):
            text = _marked(tokenizer, ids, row["mask_spans"], lambda s: "[[" + s + "]]")[:600].replace("```", "'''")
            lines += [f"**{row['policy']}**", "", "```", text, "```", ""]
    return "\n".join(lines)


_MD_SPECIAL = re.compile(r"([\\`*_\[\]{}()#+\-.!|~>])")


def _md_text(t: str) -> str:
    """Plain text safe inside a Markdown paragraph: specials backslash-escaped, `<`/`&` as entities (Dagster's
    sanitizer drops raw HTML), line ends as hard breaks, blank lines folded so the paragraph holds."""
    t = t.replace("&", "&amp;").replace("<", "&lt;")
    t = _MD_SPECIAL.sub(r"\\\1", t)
    return re.sub(r"\n+", "  \n", t)


def inline_preview_markdown(lossmasks: pl.DataFrame, renders: pl.DataFrame, tokenizer, samples: int,
                            max_chars: int = 1500) -> str:
    """The mask preview as Markdown the asset page renders in one click: per policy, a few samples with the
    masked tokens in bold, in a window that starts shortly before the first masked token (the head of every
    sample is the same system prompt and tool definitions). Pure Markdown: the UI's sanitizer drops HTML."""
    picks = {pol: lossmasks.filter(pl.col("policy") == pol).sort("n_tokens", maintain_order=True).head(samples)
             for pol in lossmasks["policy"].unique(maintain_order=True).to_list()}
    # only the sampled traces' ids become Python lists (all of them: 16 M tokens, ~0.5 s and 460 MB)
    wanted = {t for p in picks.values() for t in p["trace_id"].to_list() if t is not None}
    sub = renders.filter(pl.col("trace_id").is_in(list(wanted)))
    return inline_samples_markdown(picks, dict(zip(sub["trace_id"].to_list(), sub["input_ids"].to_list())),
                                   tokenizer, max_chars)


def inline_samples_markdown(picks: dict[str, pl.DataFrame], ids_of: dict, tokenizer, max_chars: int = 1500) -> str:
    """`inline_preview_markdown`'s page from its sampled lossmask rows per policy and their traces' ids
    (a row whose ids are not in ``ids_of`` is left out)."""
    out = ["Masked tokens are **bold**; each sample from shortly before its first masked token.", ""]
    for pol, rows in picks.items():
        out += [f"**{pol}**", ""]
        for row in rows.iter_rows(named=True):
            ids = ids_of.get(row["trace_id"])
            if ids is None:
                continue
            ids = list(ids)
            pieces, pos = [], 0  # (text, masked)
            for sp in row["mask_spans"] or []:
                pieces.append((tokenizer.decode(ids[pos : sp["token_start"]]), False))
                pieces.append((tokenizer.decode(ids[sp["token_start"] : sp["token_end"]]), True))
                pos = sp["token_end"]
            pieces.append((tokenizer.decode(ids[pos:]), False))
            first = next((i for i, (_, m) in enumerate(pieces) if m and _.strip()), None)
            if first is not None and first > 0:  # keep ~200 characters of context before the first mask
                head = pieces[first - 1][0]
                pieces = [("…" + head[-200:] if len(head) > 200 else head, False)] + pieces[first:]
            md, used = [], 0
            for t, masked in pieces:
                t = t[: max(0, max_chars - used)]
                used += len(t)
                if masked and t.strip():
                    lead, core, trail = re.match(r"(\s*)(.*?)(\s*)$", t, re.S).groups()
                    md.append(_md_text(lead) + "**" + _md_text(core) + "**" + _md_text(trail))
                else:
                    md.append(_md_text(t))
                if used >= max_chars:
                    break
            out += [f"`{row['trace_id'][:12]}` ({row['n_masked']}/{row['n_tokens']} tokens):  ", "".join(md), ""]
    return "\n".join(out)
