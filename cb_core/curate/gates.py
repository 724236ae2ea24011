"""Merge gates on the training mix (ratio, true adversarial-safe count, duplicate ids, tool schemas)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import polars as pl

from cb_core.curate.config import CurationConfig
from cb_core.curate.features import called_tools, tool_names
from cb_core.curate.mix import adv_flag_mask, adv_safe_mask, mix_stats


@dataclass
class GateResult:
    name: str
    passed: bool
    value: Any
    threshold: Any
    examples: list = field(default_factory=list)
    description: str = ""


# The merge gates `gate_results` returns, in order (the Dagster layer makes one blocking check of each).
GATE_NAMES = ("dr_ds_ratio", "adversarial_safe_count", "no_duplicate_ids", "tool_schemas_present")


def gate_results(mix: pl.DataFrame, cfg: CurationConfig) -> list[GateResult]:
    """Merge gates; thresholds come from the profile (the demo profile sets smaller ones, never skips).
    Each description says what was verified on pass and what was found on failure."""
    g = cfg.gates
    st = mix_stats(mix)
    out = []
    ratio = st["dr_ds_ratio"]
    ok = ratio is not None and ratio >= g.min_dr_ds_ratio
    out.append(
        GateResult(
            "dr_ds_ratio",
            ok,
            ratio,
            g.min_dr_ds_ratio,
            [] if ratio is not None else [{"reason": "no harmful samples in the mix"}],
            (
                f"retain:harmful = {st['retain']}:{st['harmful']} = {ratio:.2f} >= {g.min_dr_ds_ratio}"
                if ok
                else "no harmful sample in the mix: the ratio is not measured"
                if ratio is None
                else f"retain:harmful = {st['retain']}:{st['harmful']} = {ratio:.2f} is below {g.min_dr_ds_ratio}"
            ),
        )
    )
    adv, flagged = st["adversarial_safe"], st["adversarial_safe_flagged_not_counted"]
    ok = adv >= g.min_adversarial_safe
    not_counted = []
    if flagged:
        rows = mix.filter(adv_flag_mask(mix) & ~adv_safe_mask(mix)).sort("id")
        not_counted = [{"id": i, "reason": "flagged adversarial-safe, injection not in context"}
                       for i in rows["id"].to_list()[:5]]
    extra = f"; {flagged} row(s) flagged adversarial-safe without a reached injection not counted" if flagged else ""
    out.append(
        GateResult(
            "adversarial_safe_count",
            ok,
            adv,
            g.min_adversarial_safe,
            not_counted,
            (
                f"{adv} adversarial-safe samples (read the injection, did the expected thing) "
                + (f">= {g.min_adversarial_safe}" if ok else f"found, below the required {g.min_adversarial_safe}"
                   f" (gates.min_adversarial_safe of curation profile '{cfg.profile}'; the `adversarial_safe`"
                   " generation asset adds such rows)")
                + extra
            ),
        )
    )
    dup = mix.filter(pl.col("id").is_duplicated())
    n_dup = dup["id"].n_unique() if dup.height else 0
    out.append(
        GateResult(
            "no_duplicate_ids",
            n_dup <= g.max_duplicate_ids,
            n_dup,
            g.max_duplicate_ids,
            sorted(set(dup["id"].to_list()))[:5],
            f"{mix.height} ids checked, {n_dup} appear more than once (allowed: {g.max_duplicate_ids})",
        )
    )
    bad = []
    n_calling = 0
    for tid, msgs, tools in zip(mix["id"].to_list(), mix["messages"].to_list(), mix["tools"].to_list()):
        called = called_tools(msgs)
        if not called:
            continue
        n_calling += 1
        names = tool_names(tools)
        if not names:
            bad.append({"id": tid, "reason": "tool calls but no tool schemas", "called": sorted(map(str, called))})
            continue
        missing = sorted({str(c) for c in called if c not in names})
        if missing:
            bad.append({"id": tid, "reason": "called tool(s) without a schema", "missing": missing})
    out.append(
        GateResult(
            "tool_schemas_present",
            (not bad) or not g.require_tool_schemas,
            len(bad),
            0 if g.require_tool_schemas else None,
            bad[:5],
            (
                f"all {n_calling} samples with tool calls offer a schema for every tool they call"
                if not bad
                else f"{len(bad)} of {n_calling} samples with tool calls call a tool their `tools` do not offer"
                + ("" if g.require_tool_schemas else " (not required by this profile)")
            ),
        )
    )
    return out
