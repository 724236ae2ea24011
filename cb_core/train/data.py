"""Training data: train_split rows + their renders (token ids) + lossmasks -> padded micro-batches with dense
token-weight maps built here, in the loader (lossmask_v1 stores ranges only).

* A sample is one train_split row: its render's ``input_ids``, its ``mask_spans`` under the policy curation
  chose for its category, its ``sample_weight`` and ``priority_class``.
* ``lmp_overrides`` of the MWCS schedule swap a class's mask for the lossmask row of another policy
  (looked up in ``lossmasks`` by (trace_id, policy)); MWCS multipliers scale the sample weight per step.
  Both come from the pure functions of ``cb_core.mixture.MixtureSchedule``.
* Sequences longer than ``max_length`` are cut to a window: the first ``max_length`` tokens, or, when the
  mask reaches past that, the ``max_length`` tokens ending at the mask's end (the masked part is kept).
* ``BalancedSampler`` draws every optimizer step's harmful and retain samples from two shuffled pools,
  epoch after epoch, so no sample is dropped (the old loop kept min(#harmful, #retain) pairs); its state is
  four integers, saved in checkpoints.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import polars as pl
import torch

PROMPT_ROLES = ("system", "user")


@dataclass
class Sample:
    trace_id: str
    input_ids: list[int]
    harmful: bool
    priority_class: str
    sample_weight: float
    spans: list[tuple[int, int, float]]  # default mask (window coordinates)
    override_spans: dict[str, list[tuple[int, int, float]]] = field(default_factory=dict)


@dataclass
class TrainData:
    samples: list[Sample]
    stats: dict[str, Any]

    @property
    def harmful(self) -> list[int]:
        return [i for i, s in enumerate(self.samples) if s.harmful]

    @property
    def retain(self) -> list[int]:
        return [i for i, s in enumerate(self.samples) if not s.harmful]


def _window(n: int, spans: list[tuple[int, int, float]], max_length: int) -> tuple[int, int]:
    if n <= max_length:
        return 0, n
    end = max((e for _, e, _ in spans), default=max_length)
    if end <= max_length:
        return 0, max_length
    return end - max_length, end


def _clip(spans, start: int, end: int) -> list[tuple[int, int, float]]:
    out = []
    for s, e, w in spans:
        s2, e2 = max(s, start) - start, min(e, end) - start
        if e2 > s2:
            out.append((s2, e2, float(w)))
    return out


def _subtract(spans, holes) -> list[tuple[int, int, float]]:
    out = []
    for s, e, w in spans:
        segs = [(s, e)]
        for hs, he in holes:
            segs = [p for a, b in segs for p in ((a, min(b, hs)), (max(a, he), b)) if p[1] > p[0]]
        out += [(a, b, w) for a, b in segs]
    return out


def _spans(lst) -> list[tuple[int, int, float]]:
    return [(int(d["token_start"]), int(d["token_end"]), float(d["weight"])) for d in (lst or [])]


def _has_weight(s: Sample) -> bool:
    """Some loss weight on this sample: a non-zero sample weight and a non-zero span in its mask or an override
    mask. `!= 0`, not `> 0`: a NaN weight is no zero weight (the first step stops on it, naming the term)."""
    return s.sample_weight != 0 and any(w != 0 for spans in (s.spans, *s.override_spans.values()) for _, _, w in spans)


def build_train_data(
    train_split: pl.DataFrame,
    renders: pl.DataFrame,
    lossmasks: pl.DataFrame | None = None,
    *,
    max_length: int,
    override_policies: set[str] | frozenset[str] = frozenset(),
    mask_prompt_tokens: bool = False,
    mask_policy: str | None = None,
) -> TrainData:
    """Join train_split with renders (and lossmasks for override policies) into samples.

    A train_split row without a render is an error naming the trace (a training run must not silently train
    on less than curation chose)."""
    need = {"id", "category", "priority_class", "mask_spans", "sample_weight"}
    missing = need - set(train_split.columns)
    if missing:
        raise ValueError(f"train_split: missing columns {sorted(missing)}")
    rcols = ["trace_id", "input_ids"] + (["spans"] if mask_prompt_tokens else [])
    j = train_split.select(sorted(need)).join(
        renders.select(rcols).unique("trace_id", keep="first"), left_on="id", right_on="trace_id", how="left"
    )
    no_render = j.filter(pl.col("input_ids").is_null())["id"].to_list()
    if no_render:
        raise ValueError(f"train_split: {len(no_render)} trace(s) have no render (first: {no_render[:3]}); "
                         "materialize `renders` for the same traces")
    over: dict[tuple[str, str], list] = {}
    wanted = set(override_policies) | ({mask_policy} if mask_policy else set())
    if mask_policy and (lossmasks is None or not lossmasks.height):
        raise ValueError(f"data.mask_policy={mask_policy!r} needs the lossmasks table (materialize `lossmasks`)")
    if wanted and lossmasks is not None and lossmasks.height:
        lm = lossmasks.filter(pl.col("policy").is_in(sorted(wanted)) & pl.col("trace_id").is_in(j["id"].to_list()))
        for tid, pol, ms in lm.select("trace_id", "policy", "mask_spans").iter_rows():
            over[(tid, pol)] = _spans(ms)
    samples, n_windowed, n_prompt_empty, n_policy_kept = [], 0, 0, 0
    for row in j.sort("id").iter_rows(named=True):
        ids = list(row["input_ids"])
        spans = _spans(row["mask_spans"])
        if mask_policy:  # one policy for every sample (a sweep's policy axis); no row under it: curation's mask
            alt = over.get((row["id"], mask_policy))
            if alt:
                spans = alt
            else:
                n_policy_kept += 1
        holes = []
        if mask_prompt_tokens:
            holes = [(s["token_start"], s["token_end"]) for s in row["spans"] or []
                     if (s["kind"] == "message" and s.get("role") in PROMPT_ROLES) or s["kind"] == "tool_defs"]
            cut = _subtract(spans, holes)
            if cut:
                spans = cut
            else:
                n_prompt_empty += 1  # a mask made of prompt tokens only stays as it was (counted)
        a, b = _window(len(ids), spans, max_length)
        n_windowed += int((a, b) != (0, len(ids)))
        ov = {}
        for pol in override_policies:
            o = over.get((row["id"], pol))
            if o is not None:
                o = _clip(_subtract(o, holes) or o, a, b)
                if o:
                    ov[pol] = o
        samples.append(Sample(
            trace_id=row["id"], input_ids=ids[a:b], harmful=row["category"] == "harmful",
            priority_class=row["priority_class"], sample_weight=float(row["sample_weight"]),
            spans=_clip(spans, a, b), override_spans=ov,
        ))
    empty = [s.trace_id for s in samples if not s.spans]
    if empty:
        raise ValueError(f"train_split: {len(empty)} sample(s) have an empty mask after cutting to max_length "
                         f"{max_length} (first: {empty[:3]})")
    data = TrainData(samples, {})
    data.stats = {
        "samples": len(samples), "harmful": len(data.harmful), "retain": len(data.retain),
        "windowed": n_windowed, "prompt_only_masks_kept": n_prompt_empty, "max_length": max_length,
        "override_masks": len(over),
        **({"mask_policy": mask_policy, "mask_policy_missing_kept_default": n_policy_kept} if mask_policy else {}),
    }
    if not data.harmful or not data.retain:
        raise ValueError(f"train_split: need harmful and retain samples, got {data.stats}")
    for kind, idx in (("harmful", data.harmful), ("retain", data.retain)):
        if not any(_has_weight(samples[i]) for i in idx):
            classes = sorted({samples[i].priority_class for i in idx})
            raise ValueError(
                f"train_split: all {len(idx)} {kind} sample(s) have zero loss weight (sample_weight 0 or mask "
                f"weights 0; priority classes {classes}), so the {kind} term would be 0 at every step. Give these "
                "classes a weight > 0 in the MWCS schedule's class_weights (configs/mwcs/<schedule>.yaml) and "
                "materialize `lossmasks` again")
    return data


# ------------------------------------------------------------------------------------------- sampler
class BalancedSampler:
    """Two shuffled pools (harmful, retain) read in order, reshuffled each epoch from (seed, pool, epoch).

    ``step_indices(h, r)`` returns the next h harmful and r retain indices; the state (epoch and position per
    pool) is all a checkpoint needs."""

    def __init__(self, harmful: list[int], retain: list[int], seed: int):
        self.pools = {"harmful": list(harmful), "retain": list(retain)}
        self.seed = int(seed)
        self.state = {"harmful": [0, 0], "retain": [0, 0]}  # [epoch, position]
        self._perm: dict[str, tuple[int, list[int]]] = {}

    def _order(self, pool: str, epoch: int) -> list[int]:
        cached = self._perm.get(pool)
        if cached is None or cached[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 7919 + epoch * 2 + (pool == "retain"))
            perm = torch.randperm(len(self.pools[pool]), generator=g).tolist()
            cached = (epoch, [self.pools[pool][i] for i in perm])
            self._perm[pool] = cached
        return cached[1]

    def take(self, pool: str, n: int) -> list[int]:
        out = []
        while len(out) < n:
            epoch, pos = self.state[pool]
            order = self._order(pool, epoch)
            k = min(n - len(out), len(order) - pos)
            out += order[pos : pos + k]
            pos += k
            self.state[pool] = [epoch + 1, 0] if pos >= len(order) else [epoch, pos]
        return out

    def step_indices(self, n_harmful: int, n_retain: int) -> tuple[list[int], list[int]]:
        return self.take("harmful", n_harmful), self.take("retain", n_retain)

    def state_dict(self) -> dict[str, list[int]]:
        return {k: list(v) for k, v in self.state.items()}

    def load_state_dict(self, state: dict) -> None:
        self.state = {k: [int(x) for x in state[k]] for k in ("harmful", "retain")}


# ------------------------------------------------------------------------------------------- collate
def collate(
    data: TrainData,
    indices: list[int],
    *,
    pad_id: int,
    multipliers: dict[str, float] | None = None,
    lmp_overrides: dict[str, str] | None = None,
) -> dict[str, torch.Tensor]:
    """Right-padded micro-batch: input_ids / attention_mask [B, T] (long), w [B, T] (float: mask weight x
    sample weight x MWCS multiplier; 0 outside the mask and on padding), harmful [B] (bool)."""
    rows = [data.samples[i] for i in indices]
    T = max(len(s.input_ids) for s in rows)
    B = len(rows)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    att = torch.zeros((B, T), dtype=torch.long)
    w = torch.zeros((B, T), dtype=torch.float32)
    n_over = 0
    for b, s in enumerate(rows):
        ids[b, : len(s.input_ids)] = torch.tensor(s.input_ids, dtype=torch.long)
        att[b, : len(s.input_ids)] = 1
        spans = s.spans
        pol = (lmp_overrides or {}).get(s.priority_class)
        if pol and pol in s.override_spans:
            spans, n_over = s.override_spans[pol], n_over + 1
        sw = s.sample_weight * (multipliers or {}).get(s.priority_class, 1.0)
        for a, e, mw in spans:
            w[b, a:e] = mw * sw
    return {
        "input_ids": ids, "attention_mask": att, "w": w,
        "harmful": torch.tensor([s.harmful for s in rows], dtype=torch.bool),
        "n_overridden": torch.tensor(n_over),
    }
