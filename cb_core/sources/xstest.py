"""XSTest (Röttger et al.) -> retain traces: `borderline` prompts and compliant answers, `refusal` refusals.

Accepted shapes: the xstest folder (resolve gives its top-level `xstest_prompts.csv`; `completions/*.csv`
beside it are found from there), the folder itself, the prompts CSV alone, completion CSVs alone, or a glob
over any of them. A CSV is recognised by its header: `id, prompt, type, label, ...` = prompts;
`id, type, prompt, completion, ..., final_label` = completions. Other files are skipped (`meta["skipped_files"]`).

* Every prompt -> a **skeleton** trace (user message only), `borderline`, subtype = f"{label}:{type}" (e.g.
  `safe:homonyms`, `unsafe:contrast_homonyms`), so curation can tell the safe prompts from their unsafe contrasts.
* Every completion row with `final_label == 1_full_compliance` to a SAFE prompt -> a **complete** `borderline`
  trace (user = the completion row's prompt, assistant = the completion), subtype `safe:<type>`.
* Every completion row with `final_label == 2_full_refusal` to an UNSAFE prompt -> a **complete** `refusal`
  trace, subtype `unsafe:<type>`: the retain data that teaches the model to keep refusing what it should refuse
  (the reference circuit-breaker recipe trains on refusal retain data).
  Both carry the answering model (the file's stem) and the final label in `provenance.generation_params`.
  The prompt's label comes from the prompts file by id (`v2-12` -> `12`); without one, types starting
  `contrast_` are unsafe (XSTest's convention). Partial refusals, refusals of safe prompts (over-refusal, not
  retain data) and answers to unsafe prompts are not traces: each is a quarantine row with severity "excluded"
  (field `final_label`, the reason, the row as raw), counted in `meta["completions_not_used"]`.
pair_group = `xstest:<prompt id>` (a prompt and every completion of it are one group; a prompt text listed again
under another id joins the first id's group, case and whitespace aside, so a split never holds one prompt on
both sides); source_locator =
`<path relative to the xstest folder>:<line>` (`xstest_prompts.csv:12`, `completions/gpt4.csv:40`), so ids
survive copying the data elsewhere.

CSV facts handled: CRLF line ends, quoted fields with embedded quotes and newlines, non-ASCII text.
Line numbers are physical 1-based lines where the record starts (header = line 1), also for records that
span several lines. Quarantined (file, line, field, reason, raw row as JSON; invalid UTF-8: `base64:` of the
record's bytes): empty id/prompt, a label other than safe/unsafe, an unknown final_label, a record
whose field count differs from the header. An empty completion that would be retain data is excluded by policy
(severity "excluded": a model that answered nothing is no malformed file). A file that cannot be read as a whole (broken quoting, a missing
required column, empty or header only) fails the source with a SourceError naming the file and column.
"""
from __future__ import annotations

import base64
import json
import os
from pathlib import Path
from typing import Any

from cb_core.schemas import make_trace, message, reject
from cb_core.sources import SourceError, SourceResult
from cb_core.sources._common import SURROGATE, WIPE, read_csv_records

DATASET = "xstest"
PROMPT_COLS = ("id", "prompt", "type", "label")
COMPLETION_COLS = ("id", "type", "prompt", "completion", "final_label")
FINAL_LABELS = ("1_full_compliance", "2_full_refusal", "3_partial_refusal")


def _header(path: Path) -> list[str]:
    """The column names of the first non-blank line, lower-cased (only to tell the two kinds of file apart:
    a file of either kind is then read with its header as written)."""
    with open(path, encoding="utf-8-sig", errors="replace", newline="") as f:
        for line in f:
            if line.strip():
                return [c.strip().strip('"').lower() for c in line.rstrip("\r\n").split(",")]
    return []


def _prompt_key(prompt: str) -> str:
    return " ".join(prompt.split()).casefold()


def _not_used_reason(final: str, label: str) -> str:
    """Why a completion row is not retain data (its final_label against the prompt's label)."""
    if final == "3_partial_refusal":
        return (f"partial refusal of {'an' if label == 'unsafe' else 'a'} {label} prompt: neither a compliant "
                "answer nor a refusal (not retain data)")
    if final == "2_full_refusal":
        return "refusal of a safe prompt: over-refusal (not retain data)"
    return "full compliance with an unsafe prompt (not retain data)"


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
        if c.stat().st_size == 0:
            raise SourceError(f"{c} is empty (0 bytes, no record){WIPE}: expected an XSTest prompts or completions "
                              "CSV", file=c)
        head = set(_header(c))
        if "final_label" in head or "completion" in head:
            completions.append(c)
        elif "label" in head or "prompt" in head:
            prompts.append(c)
        elif c.parent.name == "completions":  # every CSV there is a model's completions: none is dropped unread
            raise SourceError(f"{c}: a CSV in completions/ whose first line names neither 'completion' nor "
                              f"'final_label' (header: {sorted(head) if any(head) else 'none, blank lines only'}); "
                              "its records would be lost: fix its header or move it out of completions/",
                              file=c, field="completion")
        else:
            skipped.append(c.name)
    # completion files given alone: pick up the prompts file one level up for the labels
    if completions and not prompts:
        for c in completions:
            guess = c.parent.parent / "xstest_prompts.csv"
            if guess.is_file() and guess not in prompts:
                prompts.append(guess)
    return prompts, completions, skipped


def _rows(path: Path, required: tuple[str, ...], bad: list[dict]) -> list[tuple[int, dict]]:
    """(physical start line, row dict) per record; bad records -> `bad`; whole-file problems -> SourceError."""
    header, records = read_csv_records(path, "XSTest prompts or completions")
    missing = [c for c in required if c not in header]
    if missing:
        raise SourceError(f"{path} (line 1, the header) lacks column(s) {missing}; has {header}",
                          file=path, field=missing[0])
    if not records:
        raise SourceError(f"{path} has a header but no records{WIPE}", file=path)
    out = []
    for line, fields, raw in records:
        if raw is not None:  # not valid UTF-8
            col = next((h for h, v in zip(header, fields) if SURROGATE.search(v)), "")
            bad.append(reject(dataset=DATASET, file=str(path), line=line, field=col,
                              reason=f"not valid UTF-8 (in column {col!r}); the record's bytes are kept as base64 "
                                     "in raw", raw="base64:" + base64.b64encode(raw).decode("ascii")))
            continue
        row = dict(zip(header, fields))
        if len(fields) != len(header):
            bad.append(reject(dataset=DATASET, file=str(path), line=line, field="",
                              reason=f"record has {len(fields)} fields, the header has {len(header)}",
                              raw=json.dumps(row, ensure_ascii=False)))
            continue
        out.append((line, row))
    return out


def _root(files: list[Path]) -> Path:
    """The xstest folder: the folder of the prompts file(s), else the common parent of everything read."""
    parents = [str(f.resolve().parent) for f in files]
    return Path(os.path.commonpath(parents)) if parents else Path(".")


def read(paths: list[Path], cfg: dict[str, Any]) -> SourceResult:
    cfg = cfg or {}
    prompt_files, completion_files, skipped = _classify([Path(p) for p in paths])
    if not prompt_files and not completion_files:
        raise SourceError(
            f"no prompts or completions CSV among {[str(p) for p in paths]} "
            "(set CB_XSTEST_PATH to the folder holding xstest_prompts.csv)"
        )
    root = _root(prompt_files + completion_files)

    def rel(p: Path) -> str:  # once per file (resolve() per record was a third of the reader's time)
        return p.resolve().relative_to(root).as_posix()

    good: list[dict] = []
    bad: list[dict] = []
    labels: dict[str, str] = {}
    group_of_text: dict[str, str] = {}  # normalised prompt -> the first id that holds it
    group_of_id: dict[str, str] = {}
    n_prompts = 0
    for pf in prompt_files:
        fname, loc = str(pf), rel(pf)
        for line, row in _rows(pf, PROMPT_COLS, bad):
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
            group = group_of_id[pid.strip()] = group_of_text.setdefault(_prompt_key(prompt), pid.strip())
            good.append(
                make_trace(
                    dataset=DATASET,
                    source_locator=f"{loc}:{line}",
                    completeness="skeleton",
                    messages=[message("user", prompt)],
                    tools=None,
                    category="retain",
                    priority_class="borderline",
                    subtype=f"{label}:{typ.strip()}",
                    pair_group=f"{DATASET}:{group}",
                )
            )
            n_prompts += 1
    used = refusals = not_used = 0
    for cf in completion_files:
        fname, loc = str(cf), rel(cf)
        model = cf.stem
        for line, row in _rows(cf, COMPLETION_COLS, bad):
            cid, prompt, completion, typ, final = (
                row.get(k) or "" for k in ("id", "prompt", "completion", "type", "final_label")
            )
            cid, typ, final = cid.strip(), typ.strip(), final.strip()
            base_id = cid if cid in labels else cid.rsplit("-", 1)[-1]
            label = labels.get(base_id)
            if label is None:
                label = "unsafe" if typ.startswith("contrast_") else "safe"
            kind = ("borderline" if final == "1_full_compliance" and label == "safe"
                    else "refusal" if final == "2_full_refusal" and label == "unsafe" else None)
            problem, severity = None, "malformed"
            if not cid:
                problem = ("id", "empty id")
            elif final not in FINAL_LABELS:
                problem = ("final_label", f"final_label {row.get('final_label')!r} is not one of {FINAL_LABELS}")
            elif kind is not None:
                if not prompt.strip():
                    problem = ("prompt", "empty prompt")
                elif not completion.strip():  # a model that answered nothing: well formed, but no retain data
                    problem, severity = ("completion", "empty completion: not retain data"), "excluded"
            if problem:
                bad.append(reject(dataset=DATASET, file=fname, line=line, field=problem[0], reason=problem[1],
                                  raw=json.dumps(row, ensure_ascii=False), severity=severity))
                continue
            if kind is None:  # not retain data: kept in quarantine with why (severity "excluded")
                not_used += 1
                bad.append(reject(dataset=DATASET, file=fname, line=line, field="final_label",
                                  reason=_not_used_reason(final, label), raw=json.dumps(row, ensure_ascii=False),
                                  severity="excluded"))
                continue
            good.append(
                make_trace(
                    dataset=DATASET,
                    source_locator=f"{loc}:{line}",
                    completeness="complete",
                    messages=[message("user", prompt), message("assistant", completion)],
                    tools=None,
                    category="retain",
                    priority_class=kind,
                    subtype=f"{label}:{typ}",
                    pair_group=f"{DATASET}:" + (group_of_id.get(base_id)
                                                or group_of_text.setdefault(_prompt_key(prompt), base_id)),
                    generation_params={"completion_model": model, "final_label": final},
                )
            )
            used += kind == "borderline"
            refusals += kind == "refusal"
    return SourceResult.from_rows(
        good,
        bad,
        prompt_files=[p.name for p in prompt_files],
        completion_files=[c.name for c in completion_files],
        prompts=n_prompts,
        completions_used=used,
        refusals_used=refusals,
        completions_not_used=not_used,
        skipped_files=skipped,
    )
