"""XSTest (Röttger et al.) -> `borderline` retain traces.

Accepted shapes: the xstest folder (resolve gives its top-level `xstest_prompts.csv`; `completions/*.csv`
beside it are found from there), the folder itself, the prompts CSV alone, completion CSVs alone, or a glob
over any of them. A CSV is recognised by its header: `id, prompt, type, label, ...` = prompts;
`id, type, prompt, completion, ..., final_label` = completions. Other files are skipped (`meta["skipped_files"]`).

* Every prompt -> a **skeleton** trace (user message only), subtype = f"{label}:{type}" (e.g. `safe:homonyms`,
  `unsafe:contrast_homonyms`), so curation can tell the safe prompts from their unsafe contrasts.
* Every completion row with `final_label == 1_full_compliance` to a SAFE prompt -> a **complete** trace
  (user = the completion row's prompt, assistant = the completion), subtype `safe:<type>`, and the answering
  model (the file's stem) in `provenance.generation_params`. The prompt's label comes from the prompts file
  by id (`v2-12` -> `12`); without one, types starting `contrast_` are unsafe (XSTest's convention).
  Refusals, partial refusals and answers to unsafe prompts are not traces; their numbers are in
  `meta["completions_not_used"]`.

CSV facts handled: CRLF line ends, quoted fields with embedded quotes and newlines, non-ASCII text.
Line numbers are physical 1-based lines where the record starts (header = line 1), also for records that
span several lines. Quarantined (file, line, field, reason, raw row as JSON): empty id/prompt/completion,
a label other than safe/unsafe, an unknown final_label; a file that cannot be parsed or lacks a required
column is quarantined whole (line 0).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import polars as pl

from cb_core.schemas import make_trace, message, reject
from cb_core.sources import SourceError, SourceResult

DATASET = "xstest"
PROMPT_COLS = ("id", "prompt", "type", "label")
COMPLETION_COLS = ("id", "type", "prompt", "completion", "final_label")
FINAL_LABELS = ("1_full_compliance", "2_full_refusal", "3_partial_refusal")


def _header(path: Path) -> list[str]:
    with open(path, encoding="utf-8-sig", errors="replace", newline="") as f:
        first = f.readline()
    return [c.strip().strip('"') for c in first.rstrip("\r\n").split(",")]


def _classify(paths: list[Path]) -> tuple[list[Path], list[Path], list[str]]:
    """(prompt CSVs, completion CSVs, skipped names), deduplicated and sorted."""
    cands: set[Path] = set()
    for p in paths:
        p = Path(p)
        if p.is_dir():
            cands.update(p.glob("*.csv"))
            cands.update(p.glob("completions/*.csv"))
        elif p.suffix.lower() == ".csv":
            cands.add(p)
            cands.update(p.parent.glob("completions/*.csv"))  # beside a prompts file
        else:
            cands.add(p)
    prompts, completions, skipped = [], [], []
    for c in sorted(cands, key=lambda x: str(x)):
        if c.suffix.lower() != ".csv":
            skipped.append(c.name)
            continue
        head = set(_header(c))
        if "final_label" in head or "completion" in head:
            completions.append(c)
        elif "label" in head or "prompt" in head:
            prompts.append(c)
        else:
            skipped.append(c.name)
    # completion files given alone: pick up the prompts file one level up for the labels
    if completions and not prompts:
        for c in completions:
            guess = c.parent.parent / "xstest_prompts.csv"
            if guess.is_file() and guess not in prompts:
                prompts.append(guess)
    return prompts, completions, skipped


def _read_csv(path: Path, required: tuple[str, ...], bad: list[dict]) -> tuple[list[dict], list[int]] | None:
    """Rows as dicts (all strings) plus each record's physical start line; None (file quarantined) on failure."""
    try:
        df = pl.read_csv(path, infer_schema=False, encoding="utf8-lossy")
    except (pl.exceptions.PolarsError, OSError, ValueError) as e:
        bad.append(reject(dataset=DATASET, file=str(path), line=0, reason=f"unparsable CSV: {e}", raw=""))
        return None
    missing = [c for c in required if c not in df.columns]
    if missing:
        bad.append(reject(dataset=DATASET, file=str(path), line=0, field=missing[0],
                          reason=f"CSV lacks column(s) {missing}; has {df.columns}", raw=",".join(df.columns)))
        return None
    # record k starts at line 2 + sum over earlier records of (1 + their embedded newlines)
    span = pl.sum_horizontal([pl.col(c).str.count_matches("\n").fill_null(0) for c in df.columns]) + 1
    starts = df.select((span.cum_sum() - span + 2).alias("s")).get_column("s").to_list()
    return df.to_dicts(), starts


def read(paths: list[Path], cfg: dict[str, Any]) -> SourceResult:
    cfg = cfg or {}
    prompt_files, completion_files, skipped = _classify([Path(p) for p in paths])
    if not prompt_files and not completion_files:
        raise SourceError(
            f"xstest: no prompts or completions CSV among {[str(p) for p in paths]} "
            "(set CB_XSTEST_PATH to the folder holding xstest_prompts.csv)"
        )
    good: list[dict] = []
    bad: list[dict] = []
    labels: dict[str, str] = {}
    n_prompts = 0
    for pf in prompt_files:
        got = _read_csv(pf, PROMPT_COLS, bad)
        if got is None:
            continue
        rows, starts = got
        fname = str(pf)
        for row, line in zip(rows, starts):
            pid, prompt, label, typ = (row.get(k) or "" for k in ("id", "prompt", "label", "type"))
            label = label.strip().lower()
            problem = None
            if not pid.strip():
                problem = ("id", "empty id")
            elif not prompt.strip():
                problem = ("prompt", "empty prompt")
            elif label not in ("safe", "unsafe"):
                problem = ("label", f"label {row.get('label')!r} is not safe/unsafe")
            if problem:
                bad.append(reject(dataset=DATASET, file=fname, line=line, field=problem[0], reason=problem[1],
                                  raw=json.dumps(row, ensure_ascii=False)))
                continue
            labels[pid.strip()] = label
            good.append(
                make_trace(
                    dataset=DATASET,
                    source_locator=f"{fname}:{line}",
                    completeness="skeleton",
                    messages=[message("user", prompt)],
                    tools=None,
                    category="retain",
                    priority_class="borderline",
                    subtype=f"{label}:{typ.strip()}",
                )
            )
            n_prompts += 1
    used = not_used = 0
    for cf in completion_files:
        got = _read_csv(cf, COMPLETION_COLS, bad)
        if got is None:
            continue
        rows, starts = got
        fname = str(cf)
        model = cf.stem
        for row, line in zip(rows, starts):
            cid, prompt, completion, typ, final = (
                row.get(k) or "" for k in ("id", "prompt", "completion", "type", "final_label")
            )
            cid, typ, final = cid.strip(), typ.strip(), final.strip()
            label = labels.get(cid) or labels.get(cid.rsplit("-", 1)[-1])
            if label is None:
                label = "unsafe" if typ.startswith("contrast_") else "safe"
            problem = None
            if not cid:
                problem = ("id", "empty id")
            elif final not in FINAL_LABELS:
                problem = ("final_label", f"final_label {row.get('final_label')!r} is not one of {FINAL_LABELS}")
            elif final == "1_full_compliance" and label == "safe":
                if not prompt.strip():
                    problem = ("prompt", "empty prompt")
                elif not completion.strip():
                    problem = ("completion", "empty completion")
            if problem:
                bad.append(reject(dataset=DATASET, file=fname, line=line, field=problem[0], reason=problem[1],
                                  raw=json.dumps(row, ensure_ascii=False)))
                continue
            if final != "1_full_compliance" or label != "safe":
                not_used += 1
                continue
            good.append(
                make_trace(
                    dataset=DATASET,
                    source_locator=f"{fname}:{line}",
                    completeness="complete",
                    messages=[message("user", prompt), message("assistant", completion)],
                    tools=None,
                    category="retain",
                    priority_class="borderline",
                    subtype=f"safe:{typ}",
                    generation_params={"completion_model": model, "final_label": final},
                )
            )
            used += 1
    return SourceResult.from_rows(
        good,
        bad,
        prompt_files=[p.name for p in prompt_files],
        completion_files=[c.name for c in completion_files],
        prompts=n_prompts,
        completions_used=used,
        completions_not_used=not_used,
        skipped_files=skipped,
    )
