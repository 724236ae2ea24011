"""Train/eval split: stratified by dataset x category x subtype, grouped by pair_group."""
from __future__ import annotations

import math
from typing import Any

import polars as pl

from cb_core.curate.config import CurationConfig
from cb_core.curate.features import hash_unit


def _stratum_expr() -> pl.Expr:
    return pl.concat_str([pl.col("dataset"), pl.col("category"), pl.col("subtype").fill_null("")], separator="|")


def _eval_quotas(sizes: dict[str, int], fraction: float, seed: Any) -> dict[str, int]:
    """Eval groups per stratum, each stratum on its own: floor(fraction * n), plus one when the remainder
    (fraction * n - floor) exceeds sha256(seed:stratum) in [0, 1). A stratum's quota never depends on another
    stratum, so rows added to one (a new source, another dataset's rows) never move a group of another across
    the split; small strata still contribute (one group with probability fraction * n) and the overall share is
    `fraction` in expectation. (One largest-remainder pass over all strata matched the share exactly, but 26
    rows of a new dataset moved an XSTest task from eval to train.)"""
    quota = {}
    for k, n in sizes.items():
        exact = fraction * n
        q = int(math.floor(exact))
        if exact - q > hash_unit(seed, f"stratum:{k}"):
            q += 1
        quota[k] = min(q, n)
    return quota


def assign_split(mix: pl.DataFrame, cfg: CurationConfig) -> pl.DataFrame:
    """`split` column = train|eval. Groups (pair_group) are assigned whole; each group belongs to the
    smallest stratum (dataset|category|subtype) among its members; inside a stratum the groups are ranked by
    sha256(seed:pair_group) and the first `quota` go to eval (quotas: `_eval_quotas`)."""
    if mix.height == 0:
        return mix.with_columns(pl.lit(None, dtype=pl.String).alias("split"))
    groups = (
        mix.with_columns(_stratum_expr().alias("_stratum"))
        .group_by("pair_group")
        .agg(pl.col("_stratum").min())
    )
    groups = groups.with_columns(
        pl.Series("_u", [hash_unit(cfg.seed, g) for g in groups["pair_group"].to_list()], dtype=pl.Float64)
    ).sort("_stratum", "_u", "pair_group")
    sizes = dict(groups.group_by("_stratum").len().iter_rows())
    quota = _eval_quotas(sizes, cfg.eval_fraction, cfg.seed)
    groups = groups.with_columns(
        pl.int_range(pl.len()).over("_stratum").alias("_rank"),
        pl.col("_stratum").replace_strict(quota, return_dtype=pl.Int64).alias("_quota"),
    ).with_columns(
        pl.when(pl.col("_rank") < pl.col("_quota")).then(pl.lit("eval")).otherwise(pl.lit("train")).alias("_split")
    )
    return (
        mix.join(groups.select("pair_group", "_split"), on="pair_group", how="left")
        .with_columns(pl.col("_split").alias("split"))
        .drop("_split")
        .sort("id")
    )


def split(mix: pl.DataFrame, cfg: CurationConfig) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(train, eval), each sorted by id with the `split` column set."""
    s = assign_split(mix, cfg)
    return s.filter(pl.col("split") == "train"), s.filter(pl.col("split") == "eval")


def split_stats(train: pl.DataFrame, eval_: pl.DataFrame) -> dict[str, Any]:
    def strata(df: pl.DataFrame) -> dict[str, int]:
        if df.height == 0:
            return {}
        return dict(df.select(_stratum_expr().alias("s")).group_by("s").len().sort("s").iter_rows())

    return {
        "train": train.height,
        "eval": eval_.height,
        "eval_share": eval_.height / (train.height + eval_.height) if (train.height + eval_.height) else 0.0,
        "train_strata": strata(train),
        "eval_strata": strata(eval_),
        "pair_groups_in_both": len(set(train["pair_group"].to_list()) & set(eval_["pair_group"].to_list())),
    }


def _both(a: pl.DataFrame, col_a: str, b: pl.DataFrame, col_b: str) -> list:
    return sorted(set(a[col_a].to_list()) & set(b[col_b].to_list()))


def split_overlaps(train: pl.DataFrame, eval_: pl.DataFrame) -> dict[str, list]:
    """What train and eval share that they must not: pair groups (tasks), ids, identical message lists."""
    return {
        "pair_groups": _both(train, "pair_group", eval_, "pair_group"),
        "ids": _both(train, "id", eval_, "id"),
        "content_hashes": _both(train, "content_hash", eval_, "content_hash"),
    }


def eval_attack_overlaps(eval_attacks: pl.DataFrame, train: pl.DataFrame) -> dict[str, list]:
    """Eval attacks (or the traces they were cut from, or their pair groups) that the train split holds."""
    return {
        "ids": _both(eval_attacks, "id", train, "id"),
        "source_traces": _both(eval_attacks, "source_trace_id", train, "id"),
        "pair_groups": _both(eval_attacks, "pair_group", train, "pair_group"),
    }

