"""What `renders` and `lossmasks` do besides the build that `bench/etl_b.py` times: the blocking checks,
the validation of both outputs and the mask previews, on the real shared AgentDojo + TAU2 traces.

Why: a materialization's wall time is these too, and their memory is freed while the next asset runs
(polars' jemalloc thread gives it back to the system: ~0.3 s of kernel time per 3 GB, which stalled the
`lossmasks` build by 0.1-0.4 s in 5 of 22 builds before the boundary check stopped copying every trace's
ids per span). Each item prints its seconds and the growth of the process's peak resident memory
(`VmHWM`, reset before each item through /proc/self/clear_refs; memory the allocators kept from an earlier
item is reused without growing it, so an item run after a large one can read low); each changed item runs beside its
earlier form (the reference) in this process, with the ratio:
  - renders_assistant_boundaries: `boundary_problems` vs the reference that carried `input_ids` through
    the explode of the spans, on the renders and again with the spans of 1 render in 7 shifted by a token
    (so that both find problems to compare);
  - the inline mask preview: `inline_preview_markdown` vs its earlier form, which made every trace's ids
    a Python list before rendering the same page.
Each compared pair's results are checked equal ("RESULTS DIFFER" otherwise).

    .venv/bin/python bench/etl_b_checks.py [--limit 0] [--repeat 3]

--limit picks that many traces spread over the sets as `bench/etl_b.py` does (0 = all 3,152).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from etl_cores import _median  # a sibling bench script (stdlib only at import)

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _peak_mb() -> float | None:
    try:
        for ln in open("/proc/self/status"):
            if ln.startswith("VmHWM:"):
                return int(ln.split()[1]) / 1024
    except OSError:
        pass
    return None


def _reset_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident size (Linux >= 4.0)
    except OSError:
        pass


def measure(fn, repeat: int) -> tuple[float, float | None, object]:
    """Median seconds over ``repeat`` calls, the largest peak-memory growth of a call, the last result."""
    times, grow, out = [], None, None
    for _ in range(repeat):
        _reset_peak()
        before = _peak_mb()
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
        after = _peak_mb()
        if before is not None and after is not None:
            grow = max(grow or 0.0, after - before)
    return _median(times), grow, out


def reference_boundary_problems(renders):
    """The check as it was: every span row carried its trace's whole `input_ids` (the baseline)."""
    import polars as pl

    from cb_core.lossmask import ASSISTANT, EOM_ID, EOT_ID, START_HEADER_ID

    sp = (renders.select("trace_id", "input_ids", "n_tokens", "truncated", "spans").explode("spans")
          .drop_nulls("spans").unnest("spans").filter(pl.col("role") == ASSISTANT))
    k = pl.col("kind")
    tok_at = lambda pos: pl.col("input_ids").list.get(pos, null_on_oob=True)  # noqa: E731
    per = sp.group_by("trace_id", "message_index").agg(
        has_msg=(k == "message").any(),
        cut=(pl.col("truncated") & (k == "message") & (pl.col("token_end") >= pl.col("n_tokens"))).any(),
        header_ok=((k == "header") & (tok_at(pl.col("token_start")) == START_HEADER_ID)).any(),
        end_ok=((k == "end_token") & (pl.col("token_end") - pl.col("token_start") == 1)
                & tok_at(pl.col("token_start")).is_in([EOT_ID, EOM_ID])).any(),
    )
    per = per.filter(pl.col("has_msg") & ~pl.col("cut"))
    return pl.concat([
        per.filter(~pl.col("header_ok")).select("trace_id", "message_index", pl.lit("header not found").alias("problem")),
        per.filter(~pl.col("end_ok")).select("trace_id", "message_index",
                                             pl.lit("end token (128009/128008) not found").alias("problem")),
    ]).sort("trace_id", "message_index", "problem")


def reference_inline_preview_markdown(lossmasks, renders, tokenizer, samples: int) -> str:
    """`cb_core.preview.inline_preview_markdown` as it was (the baseline): every trace's ids made a Python
    list, then the same page (ties in length taken in input order, as now, so the outputs compare)."""
    import polars as pl

    from cb_core.preview import inline_samples_markdown

    ids_of = dict(zip(renders["trace_id"].to_list(), renders["input_ids"].to_list()))
    picks = {pol: lossmasks.filter(pl.col("policy") == pol).sort("n_tokens", maintain_order=True).head(samples)
             for pol in lossmasks["policy"].unique(maintain_order=True).to_list()}
    return inline_samples_markdown(picks, ids_of, tokenizer)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--limit", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import polars as pl
    from etl_b import load_traces

    from cb_assets.resources import ModelResource
    from cb_core.lossmask import LOSSMASK_SCHEMA, bad_span_rows, boundary_problems, build_lossmasks, lossmask_stats
    from cb_core.preview import inline_preview_markdown, mask_preview_html, preview_markdown
    from cb_core.render import render_traces
    from cb_core.schemas import LossmaskModel, RenderModel

    traces = load_traces(args.limit)
    model = ModelResource()
    tok = model.tokenizer()
    rcfg = model.model_profile().render_config()
    rcfg.max_length = 32768  # no trace quarantined as too long: every one is checked
    renders, _ = render_traces(traces, tok, rcfg, num_workers=1)
    masks, rejected = build_lossmasks(renders, traces)
    assert masks.schema == LOSSMASK_SCHEMA
    print(f"{renders.height} renders ({int(renders['n_tokens'].sum())} tokens, "
          f"{int(renders['spans'].list.len().sum())} spans), {masks.height} lossmask rows; "
          f"median of {args.repeat} calls each")

    def show(name: str, fn, ref=None) -> object:
        s, mb, out = measure(fn, args.repeat)
        line = f"  {name}: {s:.3f} s, peak memory +{mb:.0f} MB" if mb is not None else f"  {name}: {s:.3f} s"
        if ref is not None:
            rs, rmb, rout = measure(ref, args.repeat)
            line += f"; the reference {rs:.3f} s" + (f", +{rmb:.0f} MB" if rmb is not None else "")
            line += f": {rs / max(s, 1e-9):.1f}x faster"
            if hasattr(out, "sort"):
                same = out.sort(out.columns).equals(rout.sort(rout.columns))
            else:
                same = out == rout
            line += "" if same else "  (RESULTS DIFFER)"
        print(line, flush=True)
        return out

    print("renders:")
    show("renders_schema (pandera RenderModel)", lambda: RenderModel.validate(renders).height)
    show("renders_assistant_boundaries", lambda: boundary_problems(renders), lambda: reference_boundary_problems(renders))
    shifted = renders.with_columns(
        pl.when(pl.int_range(pl.len()) % 7 == 0)
        .then(pl.col("spans").list.eval(pl.element().struct.with_fields(pl.field("token_start") + 1)))
        .otherwise(pl.col("spans"))
    )
    n_bad = show("  the same, 1 render in 7 with shifted spans", lambda: boundary_problems(shifted),
                 lambda: reference_boundary_problems(shifted)).height
    print(f"    ({n_bad} problem rows found by both)")
    print("lossmasks:")
    show("validation (pandera LossmaskModel)", lambda: LossmaskModel.validate(masks).height)
    show("lossmasks_spans_in_sequence", lambda: int(bad_span_rows(masks).sum()))
    stats = show("per-policy stats", lambda: lossmask_stats(masks, rejected))
    show("mask_preview.html", lambda: len(mask_preview_html(tok, masks, renders, samples_per_policy=3)))
    show("inline mask preview (Markdown)", lambda: inline_preview_markdown(masks, renders, tok, 3),
         lambda: reference_inline_preview_markdown(masks, renders, tok, 3))
    show("preview summary (Markdown)", lambda: len(preview_markdown(stats, "mask_preview.html", masks, renders, tok)))


if __name__ == "__main__":
    main()
