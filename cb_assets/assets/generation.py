"""Generation: `ds_completions`, `dr_completions`, `adversarial_safe` -- the assistant turn written for the
skeletons in `traces`, judged, kept or rejected (cb_core.generate.completions does the work).

GPU work in production (tags `cb/compute: gpu` + SLURM requests, so launched runs go to SLURM); on CPU they
run with the profile's model (`tiny_agent` in the demo). Each returns a SourceResult: the kept trace_v1 rows
as `<table>.parquet`, every rejected sample with its judge outcome as `<table>.rejected.parquet`. Raw
completions are sharded under `$CB_DATA_ROOT/_shards/<table>/`, so a killed run resumes where it stopped.
`renders` and `lossmasks` take these tables as inputs; a table never materialized reads as an empty trace
table there (the IO manager's `GENERATED_ASSETS` rule), and their metadata says so.
"""

from pathlib import Path

import dagster as dg
import polars as pl

from cb_assets.resources import DatasetsResource, ModelResource
from cb_assets.tags import gpu_tags
from cb_assets.validation import validate_or_fail
from cb_core.generate.completions import GENERATION_SCHEMA, GenerationConfig, ModelHandle, generate_table
from cb_core.model import load_profile
from cb_core.io import data_root
from cb_core.schemas import TRACE_SCHEMA, TraceModel
from cb_core.sources import SourceResult

GENERATION_GROUP = "generation"
GPU_TAGS = gpu_tags("04.00.00")

DESCRIPTIONS = {
    "ds_completions": "Harmful (DS) completions: attacked skeletons (injection where it sits), temperature 0.7; "
    "kept only when the model calls the attacker's tool with the attacker's arguments (harmful / harmful_flip).",
    "dr_completions": "Retain (DR) completions: benign twins (injection cut out) and benign skeletons (TAU2, "
    "XSTest safe prompts), temperature 0.3; kept when the model does the expected thing.",
    "adversarial_safe": "Adversarial-safe completions: attacked skeletons, temperature 0.1; kept when the model "
    "still does the expected thing with the injection in context (retain / adversarial_safe).",
}


class GenerationAssetConfig(dg.Config):
    """configs/generation.yaml keys; a set field overrides the file (per-table values for this table)."""

    config_file: str = "generation.yaml"
    mode: str | None = None  # ds | dr | both
    backend: str | None = None  # transformers | vllm
    model: str | None = None  # model profile for this table (default: the file's, else the run's CB_MODEL)
    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    batch_size: int | None = None
    shard_size: int | None = None
    limit: int | None = None
    n: int | None = None
    seed: int | None = None
    attacker_args: str | None = None  # all | any | ignore
    random_weights: str | None = None  # run | skip (the demo block skips random-weight profiles)

    def resolve(self, table: str, demo: bool = False) -> GenerationConfig:
        return GenerationConfig.load(
            self.config_file, demo=demo, mode=self.mode, backend=self.backend, top_p=self.top_p, max_tokens=self.max_tokens,
            batch_size=self.batch_size, shard_size=self.shard_size, limit=self.limit, n=self.n, seed=self.seed,
            attacker_args=self.attacker_args, random_weights=self.random_weights,
            temperature=None if self.temperature is None else {table: self.temperature},
            model=None if self.model is None else {table: self.model},
        )


_HANDLES: dict[str, ModelHandle] = {}


def _handle(profile: str) -> ModelHandle:
    """Loaded models are reused across the three assets of one run (same process)."""
    if profile not in _HANDLES:
        _HANDLES[profile] = ModelHandle.from_profile(profile)
    return _HANDLES[profile]


def _md_yields(stats: dict) -> str:
    lines = ["| dataset | outcome | samples | kept |", "|---|---|---:|---:|"]
    lines += [f"| {r['dataset']} | {r['outcome']} | {r['n']} | {r['kept']} |" for r in stats["by_dataset_outcome"]]
    lines += ["", "| dataset | samples | kept | yield |", "|---|---:|---:|---:|"]
    lines += [f"| {d} | {v['samples']} | {v['kept']} | {v['yield']:.1%} |" for d, v in stats["yield_by_dataset"].items()]
    return "\n".join(lines)


def _keep_previous(context: dg.AssetExecutionContext, table: str, why: str) -> SourceResult:
    """Not generated this run: the previous table (or an empty one) is published again, and why."""
    path = data_root() / f"{table}.parquet"
    prev = pl.read_parquet(path) if path.exists() else pl.DataFrame(schema=TRACE_SCHEMA)
    rej = data_root() / f"{table}.rejected.parquet"
    prev_rej = pl.read_parquet(rej) if rej.exists() else pl.DataFrame(schema=GENERATION_SCHEMA)
    context.log.info(f"{table}: not generated: {why}; previous table kept ({prev.height} rows)")
    context.add_output_metadata({"skipped": why, "previous_rows": prev.height})
    return SourceResult(good=prev, rejected=prev_rej)


def _generation_asset(table: str) -> dg.AssetsDefinition:
    @dg.asset(
        name=table,
        ins={"traces": dg.AssetIn("traces")},
        group_name=GENERATION_GROUP,
        kinds={"pytorch", "polars"},
        tags=GPU_TAGS,
        description=DESCRIPTIONS[table] + " Rejected samples with their judge outcome: "
        f"{table}.rejected.parquet. Resumable shards under $CB_DATA_ROOT/_shards/{table}/.",
    )
    def _asset(
        context: dg.AssetExecutionContext,
        config: GenerationAssetConfig,
        model: ModelResource,
        datasets: DatasetsResource,
        traces: pl.DataFrame,
    ) -> SourceResult:
        cfg = config.resolve(table, demo=datasets.selection().demo)
        profile = cfg.model.get(table) or model.profile_name()
        if not cfg.runs(table):
            return _keep_previous(context, table, f"mode={cfg.mode} does not generate this table")
        if cfg.random_weights == "skip" and load_profile(profile).model == "tiny":
            return _keep_previous(context, table, f"profile {profile} has random weights (its text is noise; "
                                  "random_weights: skip); set CB_MODEL=tiny_agent to generate on CPU")
        kept, records, stats = generate_table(table, traces, cfg, _handle(profile), log=context.log.info)
        validate_or_fail(TraceModel, kept, table)
        context.add_output_metadata({
            "model": stats["model"],
            "backend": stats["backend"],
            "prompts": stats["prompts"],
            "samples": stats["samples"],
            "kept": stats["kept"],
            "rejected": stats["rejected"],
            "yield": stats["yield"] if stats["yield"] is not None else "not measured (0 samples)",
            "prompt_too_long": stats["prompt_too_long"],
            "sampling": dg.MetadataValue.json(stats["sampling"]),
            "yields": dg.MetadataValue.md(_md_yields(stats)),
            "yield_by_dataset": dg.MetadataValue.json(stats["yield_by_dataset"]),
            "by_dataset_outcome": dg.MetadataValue.json(stats["by_dataset_outcome"]),
            "skipped_skeletons": dg.MetadataValue.json(stats["skipped"]),
            "shards": dg.MetadataValue.json({k: stats.get(k) for k in ("shards", "shards_loaded", "shards_generated")}),
            "shard_dir": dg.MetadataValue.path(stats["shard_dir"]),
            "completion_tokens": stats["completion_tokens"],
            "wall_s": stats["wall_s"],
        })
        return SourceResult(good=kept, rejected=records.filter(~pl.col("kept")))

    return _asset


ds_completions = _generation_asset("ds_completions")
dr_completions = _generation_asset("dr_completions")
adversarial_safe = _generation_asset("adversarial_safe")


def generated_inputs_status(tables: dict[str, pl.DataFrame], root: Path | None = None) -> dict[str, str]:
    """For downstream metadata: per generated table, its row count or "not materialized"."""
    root = root or data_root()
    return {
        name: (f"{df.height} rows" if (root / f"{name}.parquet").exists() else "not materialized")
        for name, df in tables.items()
    }


def with_generated(traces: pl.DataFrame, tables: dict[str, pl.DataFrame]) -> pl.DataFrame:
    """`traces` plus the generated trace tables (trace_v1), ids unique (traces win)."""
    parts = [traces.select(list(TRACE_SCHEMA)).cast(dict(TRACE_SCHEMA))]
    parts += [df.select(list(TRACE_SCHEMA)).cast(dict(TRACE_SCHEMA)) for df in tables.values() if df.height]
    if len(parts) == 1:
        return traces
    return pl.concat(parts, how="vertical").unique("id", keep="first", maintain_order=True)
