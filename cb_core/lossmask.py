"""Loss-mask policies (lossmask_v1): which tokens of a render a training loss sees.

A policy is a pure function of one render's token spans (render_v1 ``spans``; see cb_core/render.py) and
its length: it returns token ranges ``[start, end)`` with a weight. Spans tile the sequence: ``bos``, then
one ``message`` span per rendered message (``header`` + body + ``end_token``); nested inside a message are
``header``, ``content``, ``tool_call`` (the call JSON incl. ``<|python_tag|>``), ``tool_name`` (the name's
characters inside the call) and ``end_token``; ``tool_defs`` (the tool instructions + definitions block,
``message_index`` -1) sits inside the system or the first user message.

Words used below:

* *body* of a message: every token of the message after its header, i.e. ``[header.token_end,
  message.token_end)``: its content, any tool calls (and the separators between them) and the end token.
* *assistant* messages have role ``assistant``; *tool* messages role ``tool`` (rendered as ``ipython``).

Masks are stored as ranges (``mask_spans``), merged and sorted, never as dense vectors: the data loader
builds dense masks. ``build_lossmasks`` computes every policy for a whole frame at once with polars
(spans exploded once, aggregated per message, ranges merged per row); the per-row functions in
``POLICIES`` are the reference definitions, and tests check the two agree.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
import polars as pl
import pyarrow as pa

from cb_core.config import (
    ConfigError,
    ConfigFileNotFound,
    check_int,
    check_keys,
    check_mapping,
    check_str,
    check_str_list,
    config_dir,
    config_path,
    display_path,
    load_yaml,
)
from cb_core.schemas import (  # noqa: F401  (the lossmask_v1 contract, re-exported)
    DEFAULT_CLASS_WEIGHTS,
    DEFAULT_TRAINING_POLICY,
    EOM_ID,
    EOT_ID,
    LOSSMASK_SCHEMA,
    MASK_SPAN,
    POLICY_NAMES,
    QUARANTINE_SCHEMA,
    START_HEADER_ID,
    TOOL_POLICIES,
    LossmaskModel,
    canonical_json,
    split_locator,
)

ASSISTANT = "assistant"
TOOL_ROLES = ("tool", "ipython")

Range = tuple[int, int, float]


# ------------------------------------------------------------------------------------ per-row helpers
@dataclass
class _Msg:
    index: int
    role: str = ""
    start: int | None = None  # message span
    end: int | None = None
    header_end: int | None = None
    call_start: int | None = None  # first tool_call
    name_end: int | None = None  # end of the first tool_name
    calls: list[tuple[int, int]] = field(default_factory=list)


def _messages(spans: Iterable[dict]) -> list[_Msg]:
    """Per-message view of one render's spans, in message order (message_index >= 0 or the injected
    system preamble, -1)."""
    by: dict[int, _Msg] = {}
    for s in spans:
        kind, i = s["kind"], s["message_index"]
        if kind in ("bos", "tool_defs"):
            continue
        m = by.setdefault(i, _Msg(i))
        if kind == "message":
            m.role, m.start, m.end = s["role"], s["token_start"], s["token_end"]
        elif kind == "header":
            m.header_end = s["token_end"]
            m.role = m.role or s["role"]
        elif kind == "tool_call":
            m.calls.append((s["token_start"], s["token_end"]))
            m.call_start = s["token_start"] if m.call_start is None else min(m.call_start, s["token_start"])
        elif kind == "tool_name":
            m.name_end = s["token_end"] if m.name_end is None else min(m.name_end, s["token_end"])
    return [by[i] for i in sorted(by) if by[i].start is not None and by[i].header_end is not None]


def _body(m: _Msg) -> tuple[int, int]:
    return (m.header_end, m.end)  # type: ignore[return-value]


def merge_ranges(ranges: Iterable[tuple[int, int, float]], n_tokens: int) -> list[Range]:
    """Clip to [0, n_tokens], drop empty ranges, sort, and merge overlapping or touching ranges of equal
    weight (the larger weight wins where ranges of different weights overlap... they never do here: every
    policy uses weight 1.0)."""
    out: list[list] = []
    for s, e, w in sorted((max(0, s), min(n_tokens, e), w) for s, e, w in ranges):
        if s >= e:
            continue
        if out and s <= out[-1][1] and w == out[-1][2]:
            out[-1][1] = max(out[-1][1], e)
        else:
            out.append([s, e, w])
    return [(int(s), int(e), float(w)) for s, e, w in out]


# ----------------------------------------------------------------------------------------- policies
def assistant_only(spans: Sequence[dict], n_tokens: int) -> list[Range]:
    """The body of every assistant message: its content, tool calls and end token
    (``<|eot_id|>``/``<|eom_id|>``); never a header, never a user/system/tool token."""
    return merge_ranges(((*_body(m), 1.0) for m in _messages(spans) if m.role == ASSISTANT), n_tokens)


def completion_only(spans: Sequence[dict], n_tokens: int) -> list[Range]:
    """The body of the last assistant message only (the final completion)."""
    asst = [m for m in _messages(spans) if m.role == ASSISTANT]
    return merge_ranges([(*_body(asst[-1]), 1.0)] if asst else [], n_tokens)


def full_sequence(spans: Sequence[dict], n_tokens: int) -> list[Range]:
    """Every token, ``[0, n_tokens)`` (bos, system message and tool definitions included)."""
    return merge_ranges([(0, n_tokens, 1.0)], n_tokens)


def cb_full_sequence(spans: Sequence[dict], n_tokens: int) -> list[Range]:
    """Every token of every non-system message (header, content, tool calls, end token of user, assistant
    and tool messages), minus the ``tool_defs`` block the template puts into the first user message: the
    bos, the system message (incl. an injected date preamble) and the tool definitions are excluded."""
    ranges = [(m.start, m.end, 1.0) for m in _messages(spans) if m.role != "system"]
    defs = [(s["token_start"], s["token_end"]) for s in spans if s["kind"] == "tool_defs"]
    return merge_ranges(_subtract(ranges, defs), n_tokens)


def cb_from_injection(spans: Sequence[dict], n_tokens: int) -> list[Range]:
    """From the first token of the first ``injection`` span (the token holding the injection's first
    character) through the end of the trace: the injected text and everything the model does after reading
    it (its compromised calls), headers and end tokens included. Rerouting starts where the attack is read,
    not at the user turn. A render without an injection span falls back to ``cb_full_sequence``."""
    starts = [s["token_start"] for s in spans if s["kind"] == "injection" and s["token_end"] > s["token_start"]]
    if not starts:
        return cb_full_sequence(spans, n_tokens)
    return merge_ranges([(min(starts), n_tokens, 1.0)], n_tokens)


def assistant_and_tool(spans: Sequence[dict], n_tokens: int) -> list[Range]:
    """The body of every assistant message and of every tool-result message (content + end token;
    headers excluded)."""
    return merge_ranges(
        ((*_body(m), 1.0) for m in _messages(spans) if m.role == ASSISTANT or m.role in TOOL_ROLES), n_tokens
    )


def tool_calls_only(spans: Sequence[dict], n_tokens: int) -> list[Range]:
    """The ``tool_call`` tokens of assistant messages only (the call JSON, incl. ``<|python_tag|>``;
    not the text before it, not the end token). Token ranges follow the renderer's rule that a token belongs
    to the span it starts in, so the "\n" between two calls, which BPE merges into the first call's
    final token (``}}\n``), comes with that call."""
    return merge_ranges(
        ((s, e, 1.0) for m in _messages(spans) if m.role == ASSISTANT for s, e in m.calls), n_tokens
    )


def action_prefix_only(spans: Sequence[dict], n_tokens: int) -> list[Range]:
    """For every assistant message with a tool call: from the start of its body (its content, or the call
    when there is no content) through the end of the *first* call's tool name. The arguments, later calls
    and the end token are excluded."""
    return merge_ranges(
        ((m.header_end, m.name_end, 1.0) for m in _messages(spans)
         if m.role == ASSISTANT and m.name_end is not None),
        n_tokens,
    )


def action_commitment(spans: Sequence[dict], n_tokens: int) -> list[Range]:
    """For every assistant message with a tool call: from the start of the first ``tool_call`` (incl.
    ``<|python_tag|>``) through the end of its tool name: the tokens that commit to an action. Equals
    ``action_prefix_only`` when the assistant writes no text before the call."""
    return merge_ranges(
        ((m.call_start, m.name_end, 1.0) for m in _messages(spans)
         if m.role == ASSISTANT and m.name_end is not None and m.call_start is not None),
        n_tokens,
    )


def _subtract(ranges: list[tuple[int, int, float]], holes: list[tuple[int, int]]) -> list[tuple[int, int, float]]:
    for hs, he in holes:
        nxt = []
        for s, e, w in ranges:
            nxt.append((s, min(e, max(s, hs)), w))
            nxt.append((max(s, min(e, he)), e, w))
        ranges = [r for r in nxt if r[0] < r[1]]
    return ranges


POLICIES: dict[str, Callable[[Sequence[dict], int], list[Range]]] = {
    "assistant_only": assistant_only,
    "completion_only": completion_only,
    "full_sequence": full_sequence,
    "cb_full_sequence": cb_full_sequence,
    "cb_from_injection": cb_from_injection,
    "assistant_and_tool": assistant_and_tool,
    "tool_calls_only": tool_calls_only,
    "action_prefix_only": action_prefix_only,
    "action_commitment": action_commitment,
}
assert tuple(POLICIES) == POLICY_NAMES, "cb_core.schemas.POLICY_NAMES names every policy, in this order"


def mask_for(policy: str, spans: Sequence[dict], n_tokens: int) -> list[Range]:
    """The reference (per-row) mask of one render under ``policy``."""
    try:
        fn = POLICIES[policy]
    except KeyError:
        raise ValueError(f"unknown loss-mask policy {policy!r} (known: {list(POLICIES)})") from None
    return fn(spans, n_tokens)


# ------------------------------------------------------------------------------------------- config
@dataclass
class LossmaskConfig:
    """configs/lossmask.yaml: which policies to materialize and the training default per category."""

    policies: list[str] = field(default_factory=lambda: list(POLICIES))
    training_default: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_TRAINING_POLICY))
    preview_samples: int = 3
    source: str = "<defaults>"

    @classmethod
    def load(cls, path: str | Path | None = None) -> "LossmaskConfig":
        """configs/lossmask.yaml (built-in defaults when the folder has none), or ``path`` (must exist)."""
        cfg_dir = config_dir()  # `configs/...` follows CB_CONFIG_DIR
        p = Path(path) if path else cfg_dir / "lossmask.yaml"
        if not p.is_absolute():
            p = next((c for c in (config_path(p), cfg_dir / p) if c.is_file()), config_path(p))
        if not p.is_file():
            if path:
                raise ConfigFileNotFound(f"lossmask config {display_path(p)} not found")
            return cls()
        return cls.from_dict(load_yaml(p), source=display_path(p))

    @classmethod
    def from_dict(cls, raw: dict, source: str = "<dict>") -> "LossmaskConfig":
        """Every key checked, naming ``source`` (the file) and the key (ConfigError, a ValueError):
        ``policies`` is ``all`` (or null) or a list of policy names; ``training_default`` maps a category
        (harmful, retain) to one of those policies; ``preview_samples`` is a whole number >= 0."""
        check_keys(check_mapping(raw, source), _LOSSMASK_KEYS, source)
        pols = raw.get("policies", "all")
        if pols in (None, "all") or pols == ["all"]:
            pols = list(POLICIES)
        pols = list(dict.fromkeys(check_str_list(pols, f"{source}: policies (`all` or a list)", tuple(POLICIES))))
        given = check_mapping(raw.get("training_default") or {}, f"{source}: training_default")
        check_keys(given, DEFAULT_TRAINING_POLICY, f"{source}: training_default (categories)")
        td = {**cls().training_default, **given}
        for cat, pol in td.items():
            check_str(pol, f"{source}: training_default.{cat}", tuple(POLICIES))
            if pol not in pols:
                raise ConfigError(f"{source}: training_default.{cat}: policy {pol!r} is not in `policies` {pols}")
        return cls(
            policies=pols,
            training_default=td,
            preview_samples=check_int(raw.get("preview_samples", 3), f"{source}: preview_samples", 0),
            source=source,
        )


_LOSSMASK_KEYS = tuple(f.name for f in fields(LossmaskConfig) if f.name != "source")  # the keys of the file


# ------------------------------------------------------------------------------------ vectorised core
# Every render's spans as flat numpy columns, in numpy over whole columns: the polars plan this replaced
# (explode, a group-by per message, a frame per policy, joins) took 47 ms for 1000 traces on one thread,
# most of it fixed per-operation cost, against ~17 ms now; the per-row helpers above are its reference.
_KINDS = ("message", "header", "tool_call", "tool_name", "tool_defs", "injection", "bos")
_K = {k: i for i, k in enumerate(_KINDS)}
_ROLE_CODES = {"system": 1, ASSISTANT: 2, **{r: 3 for r in TOOL_ROLES}}
_NONE = np.iinfo(np.int64).max  # "no such span" in a min; its negation in a max


class _Spans:
    """The spans of ``renders`` (a frame with ``spans``) as columns: r (render row), kind code (-1 for any
    kind the policies do not read), message index, role code (0 any other role, -1 none), start, end."""

    def __init__(self, renders: pl.DataFrame) -> None:
        sp = (
            renders.select(pl.int_range(pl.len(), dtype=pl.Int64).alias("_r"), "spans")
            .explode("spans")
            .drop_nulls("spans")
            .unnest("spans")
            .drop_nulls(["message_index", "token_start", "token_end"])
            .select(
                "_r",
                pl.col("kind").replace_strict(_K, default=-1, return_dtype=pl.Int64).fill_null(-1),
                pl.col("message_index").cast(pl.Int64),
                pl.col("role").replace_strict(_ROLE_CODES, default=0, return_dtype=pl.Int64).fill_null(-1),
                pl.col("token_start").cast(pl.Int64),
                pl.col("token_end").cast(pl.Int64),
            )
        )
        self.r, self.kind, self.mi, self.role, self.s, self.e = (sp.to_series(i).to_numpy() for i in range(6))


class _Messages:
    """Per (render, message) with a message span and a header: r, message index, role code, ms/me (the
    message span), he (header end), cs (first tool-call start), ne (first tool-name end); a missing cs or
    ne is ``_NONE``. Sorted by (render, message index)."""

    def __init__(self, sp: _Spans) -> None:
        keep = (sp.kind != _K["bos"]) & (sp.kind != _K["tool_defs"])
        r, kind, mi, role, s, e = (x[keep] for x in (sp.r, sp.kind, sp.mi, sp.role, sp.s, sp.e))
        key = r * (int(mi.max(initial=0)) + 2) + (mi + 1)
        o = np.argsort(key, kind="stable")
        r, kind, mi, role, s, e, key = (x[o] for x in (r, kind, mi, role, s, e, key))
        at = np.flatnonzero(np.r_[True, key[1:] != key[:-1]]) if len(key) else np.zeros(0, np.int64)

        def low(k: str, v: np.ndarray) -> np.ndarray:
            return np.minimum.reduceat(np.where(kind == _K[k], v, _NONE), at) if len(at) else v[:0]

        ms, first_msg = low("message", s), low("message", np.arange(len(s)))
        me, he = -low("message", -e), -low("header", -e)
        ok = (ms != _NONE) & (he != -_NONE)
        self.r, self.mi = r[at][ok], mi[at][ok]
        self.role = role[first_msg[ok]]
        self.ms, self.me, self.he = ms[ok], me[ok], he[ok]
        self.cs, self.ne = low("tool_call", s)[ok], low("tool_name", e)[ok]


def _policy_ranges(policy: str, n_tokens: np.ndarray, sp: _Spans, msg: _Messages) -> tuple[np.ndarray, ...]:
    """(r, s, e) ranges of one policy, unmerged."""
    asst = msg.role == _ROLE_CODES[ASSISTANT]
    if policy == "assistant_only":
        return msg.r[asst], msg.he[asst], msg.me[asst]
    if policy == "completion_only":  # the last assistant message of each render (sorted by message index)
        r = msg.r[asst]
        last = np.r_[r[1:] != r[:-1], True] if len(r) else np.zeros(0, bool)
        return r[last], msg.he[asst][last], msg.me[asst][last]
    if policy == "full_sequence":
        return np.arange(len(n_tokens)), np.zeros(len(n_tokens), np.int64), n_tokens
    if policy == "assistant_and_tool":
        k = asst | (msg.role == _ROLE_CODES[TOOL_ROLES[0]])
        return msg.r[k], msg.he[k], msg.me[k]
    if policy == "tool_calls_only":
        k = (sp.kind == _K["tool_call"]) & (sp.role == _ROLE_CODES[ASSISTANT])
        return sp.r[k], sp.s[k], sp.e[k]
    if policy == "action_prefix_only":
        k = asst & (msg.ne != _NONE)
        return msg.r[k], msg.he[k], msg.ne[k]
    if policy == "action_commitment":
        k = asst & (msg.ne != _NONE) & (msg.cs != _NONE)
        return msg.r[k], msg.cs[k], msg.ne[k]
    if policy == "cb_from_injection":  # from the first injected token to the end; cb_full_sequence without one
        k = (sp.kind == _K["injection"]) & (sp.e > sp.s)
        first = np.full(len(n_tokens), _NONE)
        np.minimum.at(first, sp.r[k], sp.s[k])
        has = first != _NONE
        r, s, e = _policy_ranges("cb_full_sequence", n_tokens, sp, msg)
        back = ~has[r]
        rows = np.flatnonzero(has)
        return np.r_[rows, r[back]], np.r_[first[rows], s[back]], np.r_[n_tokens[rows], e[back]]
    if policy == "cb_full_sequence":  # every non-system message, the tool-definition block cut out
        k = sp.kind == _K["tool_defs"]
        ts, te = np.full(len(n_tokens), _NONE), np.full(len(n_tokens), -_NONE)
        np.minimum.at(ts, sp.r[k], sp.s[k])
        np.maximum.at(te, sp.r[k], sp.e[k])
        m = (msg.role != _ROLE_CODES["system"]) & (msg.role >= 0)
        r, ms, me = msg.r[m], msg.ms[m], msg.me[m]
        has = ts[r] != _NONE
        clamp = lambda x: np.maximum(ms, np.minimum(me, x))  # noqa: E731
        before_e = np.where(has, clamp(ts[r]), me)
        return np.r_[r, r[has]], np.r_[ms, clamp(te[r])[has]], np.r_[before_e, me[has]]
    raise ValueError(f"unknown loss-mask policy {policy!r} (known: {list(POLICIES)})")


def compute_masks(renders: pl.DataFrame, policies: Sequence[str]) -> pl.DataFrame:
    """Vectorised masks for every render x policy: columns _r, policy, mask_spans (merged; empty list when
    the mask is empty), n_masked. ``renders`` needs spans and n_tokens."""
    for p in policies:
        if p not in POLICIES:
            raise ValueError(f"unknown loss-mask policy {p!r} (known: {list(POLICIES)})")
    n_tokens = renders["n_tokens"].cast(pl.Int64).to_numpy()
    sp = _Spans(renders)
    msg = _Messages(sp)
    names = sorted(set(policies))  # the output order within a render
    cols: list[list[np.ndarray]] = [[np.zeros(0, np.int64)] for _ in range(4)]  # r, c, s, e
    for p in dict.fromkeys(policies):
        r, s, e = _policy_ranges(p, n_tokens, sp, msg)
        for col, x in zip(cols, (r, np.full(len(r), names.index(p)), s, e)):
            col.append(x)
    r, c, s, e = (np.concatenate(col).astype(np.int64) for col in cols)
    return _merged(r, c, s, e, n_tokens, names)


def _merged(r: np.ndarray, c: np.ndarray, s: np.ndarray, e: np.ndarray, n_tokens: np.ndarray,
            names: list[str]) -> pl.DataFrame:
    """Unmerged (r, c: index into ``names``, s, e) ranges -> one row per (render, policy) in that order:
    mask_spans clipped to the sequence, empty ones dropped, overlapping or touching ones merged. In numpy
    over whole columns (the same steps in polars, a sort, a running maximum and two group-bys, took 28 of
    compute_masks' 47 ms on 1000 traces; this takes ~2.5).

    Sorted by (group = render x policy, start), a range opens a new merged one when it starts past the
    largest end before it in its group: one running maximum over the column once each end is offset by
    its group's key << 32 (a later group's values exceed every earlier one's)."""
    n, P = len(n_tokens), len(names)
    s = np.maximum(s, 0)
    e = np.minimum(e, n_tokens[r])
    keep = s < e
    key, s, e = (r * P + c)[keep], s[keep], e[keep]
    order = np.argsort((key << 32) | s, kind="stable")  # by (group, start); 0 <= s < 2**31 (lexsort: 13x slower)
    key, s, e = key[order], s[order], e[order]
    first = np.ones(len(key), bool)
    first[1:] = key[1:] != key[:-1]
    run_max = np.maximum.accumulate((key << 32) + e) - (key << 32)
    opens = first.copy()
    opens[1:] |= s[1:] > run_max[:-1]
    at = np.flatnonzero(opens)
    ms, me, mkey = s[at], (np.maximum.reduceat(e, at) if len(at) else e[:0]), key[at]
    counts = np.bincount(mkey, minlength=n * P)
    offsets = np.zeros(n * P + 1, np.int64)
    np.cumsum(counts, out=offsets[1:])
    n_masked = np.bincount(mkey, weights=me - ms, minlength=n * P).astype(np.int32)
    spans = pa.StructArray.from_arrays(
        [pa.array(ms.astype(np.int32)), pa.array(me.astype(np.int32)), pa.array(np.ones(len(ms), np.float32))],
        names=["token_start", "token_end", "weight"],
    )
    mask_spans = pl.from_arrow(pa.LargeListArray.from_arrays(pa.array(offsets), spans)).cast(pl.List(MASK_SPAN))
    return pl.DataFrame({
        "_r": np.repeat(np.arange(n, dtype=np.int64), P),
        "policy": pl.Series(names, dtype=pl.String).gather(np.tile(np.arange(P), n)),
        "mask_spans": mask_spans,
        "n_masked": n_masked,
    })


# ------------------------------------------------------------------------------------- build (batch)
def build_lossmasks(
    renders: pl.DataFrame,
    traces: pl.DataFrame,
    policies: Sequence[str] | None = None,
    class_weights: Mapping[str, float] | None = None,
    *,
    stats: dict | None = None,
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """render_v1 + trace_v1 -> (lossmask_v1 rows, quarantine rows with stage "lossmasks").

    One row per (training-bound trace, policy). A trace is *training-bound* when it has an assistant
    message and is not a skeleton; skeletons are generation inputs and are skipped (counted in
    ``stats["skipped_skeleton"]``). A training-bound trace whose mask under a policy is empty is never
    written as an all-zero mask: it becomes a quarantine row naming the policy, severity "excluded" when
    the policy needs a tool call and the trace has none, else "malformed". Renders without a trace row are
    counted in ``stats["missing_trace"]``. ``class_weights``: priority class -> MWCS base weight
    (``MixtureSchedule.base_weights()``; default: ``DEFAULT_CLASS_WEIGHTS``); ``sample_weight`` is the
    class's base weight (1.0 for a class it does not name). The step-dependent factor is the trainer's.
    """
    policies = list(policies or POLICIES)
    weights = dict(DEFAULT_CLASS_WEIGHTS if class_weights is None else class_weights)
    lab = pl.col("labels")
    role_list = pl.col("messages").list.eval(pl.element().struct.field("role"))
    tmeta = traces.select(
        pl.col("id").alias("trace_id"),
        "dataset",
        "source_locator",
        lab.struct.field("category").alias("category"),
        lab.struct.field("priority_class").alias("priority_class"),
        (
            (pl.col("completeness") != "skeleton")
            & role_list.list.contains(ASSISTANT)
        ).alias("_bound"),
        pl.col("messages")
        .list.eval(pl.element().struct.field("tool_calls").list.len())
        .list.sum()
        .gt(0)
        .alias("_has_calls"),
    )
    joined = renders.select("trace_id", "spans", "n_tokens").join(tmeta, on="trace_id", how="left")
    missing = joined.filter(pl.col("dataset").is_null()).height
    skipped = joined.filter(pl.col("dataset").is_not_null() & ~pl.col("_bound")).height
    bound = joined.filter(pl.col("_bound").fill_null(False))

    masks = compute_masks(bound.select("spans", "n_tokens"), policies)
    meta = bound.drop("spans").with_row_index("_r").with_columns(pl.col("_r").cast(pl.Int64))
    full = masks.join(meta, on="_r", how="left")
    full = full.with_columns(
        pl.col("priority_class").replace_strict(weights, default=1.0, return_dtype=pl.Float64).alias("sample_weight")
    )
    good = full.filter(pl.col("n_masked") > 0).select(LOSSMASK_SCHEMA.names()).cast(dict(LOSSMASK_SCHEMA))
    empty = full.filter(pl.col("n_masked") == 0)
    rej_rows = []
    for r in empty.select("trace_id", "policy", "dataset", "source_locator", "n_tokens", "_has_calls").iter_rows(named=True):
        file, line = split_locator(r["source_locator"])
        no_calls = r["policy"] in TOOL_POLICIES and not r["_has_calls"]
        why = "the trace has no tool call" if no_calls else "no token selected (truncated or missing spans)"
        rej_rows.append(
            {
                "stage": "lossmasks",
                "dataset": r["dataset"] or "",
                "file": file,
                "line": line,
                "field": f"policy:{r['policy']}",
                "reason": f"empty loss mask under policy {r['policy']}: {why}",
                "severity": "excluded" if no_calls else "malformed",
                "raw": canonical_json(
                    {"trace_id": r["trace_id"], "policy": r["policy"], "source_locator": r["source_locator"],
                     "n_tokens": r["n_tokens"]}
                ),
            }
        )
    rejected = pl.DataFrame(rej_rows, schema=QUARANTINE_SCHEMA)
    if stats is not None:
        if "cb_from_injection" in policies:
            # training-bound traces without an injection span: cb_from_injection fell back to
            # cb_full_sequence for them (per category; harmful ones are the ones that matter)
            no_inj = bound.filter(
                ~pl.col("spans").list.eval(pl.element().struct.field("kind") == "injection").list.any()
            )
            stats["cb_from_injection_fallback"] = {
                c: int((no_inj["category"] == c).sum()) for c in ("harmful", "retain")
            }
        stats.update(
            n_renders=renders.height,
            training_bound=bound.height,
            skipped_skeleton=skipped,
            missing_trace=missing,
            rows=good.height,
            rejected=rejected.height,
            rejected_malformed=int((rejected["severity"] == "malformed").sum()) if rejected.height else 0,
        )
    return good, rejected


def lossmask_stats(lossmasks: pl.DataFrame, rejected: pl.DataFrame | None = None) -> dict[str, dict]:
    """Per policy: rows, masked tokens, total tokens, masked fraction, mean masked tokens, rejected."""
    out: dict[str, dict] = {}
    if lossmasks.height:
        g = lossmasks.group_by("policy").agg(
            pl.len().alias("rows"),
            pl.col("n_masked").cast(pl.Int64).sum().alias("masked_tokens"),
            pl.col("n_tokens").cast(pl.Int64).sum().alias("tokens"),
        )
        for r in g.sort("policy").iter_rows(named=True):
            out[r["policy"]] = {
                "rows": r["rows"],
                "masked_tokens": r["masked_tokens"],
                "tokens": r["tokens"],
                "masked_fraction": round(r["masked_tokens"] / r["tokens"], 4) if r["tokens"] else 0.0,
            }
    if rejected is not None and rejected.height:
        pol = rejected.select(pl.col("field").str.strip_prefix("policy:").alias("policy"))
        for p, n in pol.group_by("policy").len().iter_rows():
            out.setdefault(p, {"rows": 0, "masked_tokens": 0, "tokens": 0, "masked_fraction": 0.0})["rejected"] = n
    return out


# --------------------------------------------------------------------------------------------- checks
def bad_span_rows(lossmasks: pl.DataFrame) -> pl.Series:
    """Boolean per row: some mask span outside ``0 <= start < end <= n_tokens``, spans unsorted or
    overlapping, or ``n_masked`` not their total length."""
    lf = (
        lossmasks.select("n_tokens", "n_masked", "mask_spans")
        .with_row_index("_r")
        .explode("mask_spans")
        .unnest("mask_spans")
        .with_columns(pl.col("token_end").shift(1).over("_r").alias("_prev"))
    )
    per_row = lf.group_by("_r", maintain_order=True).agg(
        (
            pl.col("token_start").is_null()
            | (pl.col("token_start") < 0)
            | (pl.col("token_start") >= pl.col("token_end"))
            | (pl.col("token_end") > pl.col("n_tokens"))
            | (pl.col("_prev").is_not_null() & (pl.col("token_start") < pl.col("_prev")))
        ).any().alias("bad_span"),
        ((pl.col("token_end") - pl.col("token_start")).sum() != pl.col("n_masked").first()).alias("bad_count"),
    )
    return per_row.sort("_r").select(pl.col("bad_span") | pl.col("bad_count")).to_series()


def boundary_problems(renders: pl.DataFrame) -> pl.DataFrame:
    """Assistant messages whose boundary tokens are missing: one row per (trace_id, message_index,
    problem). Each assistant message span must contain a ``header`` span starting with
    ``<|start_header_id|>`` (128006) and an ``end_token`` span whose token is ``<|eot_id|>``/``<|eom_id|>``.
    Messages cut by truncation (their message span reaching the cut) are exempt."""
    sp = (
        renders.select("trace_id", "n_tokens", "truncated", "spans")
        .with_row_index("_r")
        .explode("spans")
        .drop_nulls("spans")
        .unnest("spans")
        .filter(pl.col("role") == ASSISTANT)
        .with_row_index("_i")
    )
    # The token at each span's start, gathered per trace from its own ids. Why not carry `input_ids` through
    # the explode: every span row would copy its trace's ids (the full shared set: 6 GB, 2.8 s).
    pos = sp.group_by("_r").agg("_i", "token_start")
    tok = (
        renders.select("input_ids").with_row_index("_r").join(pos, on="_r")
        .select("_i", pl.col("input_ids").fill_null(pl.lit([], dtype=pl.List(pl.Int32)))  # no ids: no token found
                .list.gather("token_start", null_on_oob=True).alias("tok"))
        .explode("_i", "tok")
    )
    sp = sp.join(tok, on="_i", how="left")
    k = pl.col("kind")
    per = sp.group_by("trace_id", "message_index").agg(
        has_msg=(k == "message").any(),
        cut=(pl.col("truncated") & (k == "message") & (pl.col("token_end") >= pl.col("n_tokens"))).any(),
        header_ok=((k == "header") & (pl.col("tok") == START_HEADER_ID)).any(),
        end_ok=(
            (k == "end_token")
            & (pl.col("token_end") - pl.col("token_start") == 1)
            & pl.col("tok").is_in([EOT_ID, EOM_ID])
        ).any(),
    )
    per = per.filter(pl.col("has_msg") & ~pl.col("cut"))
    return pl.concat(
        [
            per.filter(~pl.col("header_ok")).select("trace_id", "message_index", pl.lit("header not found").alias("problem")),
            per.filter(~pl.col("end_ok")).select(
                "trace_id", "message_index", pl.lit("end token (128009/128008) not found").alias("problem")
            ),
        ]
    ).sort("trace_id", "message_index", maintain_order=True)


def masked_text(tokenizer, input_ids: Sequence[int], mask_spans: Iterable[dict]) -> list[str]:
    """Decoded text of each mask span (tests and previews)."""
    ids = list(input_ids)
    return [
        tokenizer.decode(ids[s["token_start"] : s["token_end"]], skip_special_tokens=False) for s in mask_spans
    ]
