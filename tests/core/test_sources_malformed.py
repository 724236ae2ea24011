"""Malformed input that a mutation fuzz of every reader (about 1,400 corrupted copies of the real formats)
found mishandled: each case must end as one quarantined record naming its field, or a SourceError naming
the file; never another exception, a file dropped unread, or content changed without a word. The clean
base is the embedded demo sample, so these run without ../shared."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import polars as pl
import pytest

from cb_core.config import DatasetsConfig, resolve_source_paths
from cb_core.sources import SourceError, SourceResult, get_reader
from cb_core.sources.demo import write_demo_sources

DEEP = "[" * 100_000  # past any recursion limit, as a value inside one record


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> dict[str, Path]:
    return write_demo_sources(tmp_path_factory.mktemp("demo"))


def read(name: str, path: Path) -> SourceResult:
    return get_reader(name)(resolve_source_paths(path), getattr(DatasetsConfig.load(), name))


def copy(src: Path, dst: Path) -> Path:
    if src.is_dir():
        shutil.copytree(src, dst)
    else:
        dst.mkdir(parents=True, exist_ok=True)
        dst = dst / src.name
        shutil.copy(src, dst)
    return dst


def ultrachat_jsonl(demo, tmp_path: Path) -> Path:
    """The demo's UltraChat rows as JSONL (the reader takes both)."""
    f = tmp_path / "uc" / "train_sft.jsonl"
    f.parent.mkdir(parents=True)
    rows = pl.read_parquet(demo["ultrachat"]).head(6).to_dicts()
    f.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return f


def jsonl_file(name: str, demo, tmp_path: Path) -> Path:
    if name == "ultrachat":
        return ultrachat_jsonl(demo, tmp_path)
    if name == "agentdojo":
        return copy(demo["agentdojo"] / "agentdojo-demo-gpt.jsonl", tmp_path / "ad")
    return copy(demo["fujitsu_b4"], tmp_path / "b4")


def set_line(f: Path, lineno: int, edit) -> None:
    """Line `lineno` (1-based) parsed, changed by `edit(record)`, written back with json.dumps (ASCII
    escapes: a lone surrogate stays a \\ud800 escape in the file, as JSON allows)."""
    lines = f.read_text(encoding="utf-8").split("\n")
    rec = json.loads(lines[lineno - 1])
    edit(rec)
    lines[lineno - 1] = json.dumps(rec)
    f.write_text("\n".join(lines), encoding="utf-8")


# one record's field per JSONL reader: (line, how to reach the field, the field as the quarantine row names it)
FIELD = {
    "fujitsu_b4": (2, lambda r, v: r.__setitem__("combined_query", v), "combined_query"),
    "ultrachat": (2, lambda r, v: r["messages"][0].__setitem__("content", v), "messages[0].content"),
    "agentdojo": (3, lambda r, v: r["messages"][1].__setitem__("content", v), "messages[1].content"),
}


@pytest.mark.parametrize("name", list(FIELD))
@pytest.mark.parametrize("value, reason", [("\ud800 x", "lone surrogate"), (None, "nested deeper")])
def test_a_lone_surrogate_or_deep_nesting_is_one_quarantined_record(name, value, reason, demo, tmp_path):
    f = jsonl_file(name, demo, tmp_path)
    clean = read(name, f)
    line, put, field = FIELD[name]
    set_line(f, line, lambda r: put(r, value if value is not None else "DEEP"))
    if value is None:  # nesting json.dumps cannot write
        f.write_text(f.read_text().replace('"DEEP"', DEEP + "]" * len(DEEP)), encoding="utf-8")
    res = read(name, f)
    assert res.n_records == clean.n_records and res.good.height == clean.good.height - 1
    new = res.rejected.filter(pl.col("line") == line).to_dicts()
    assert len(new) == 1 and reason in new[0]["reason"] and new[0]["file"].endswith(f.name)
    if value is not None:
        assert new[0]["field"] == field and new[0]["raw"].encode("utf-8")  # storable, the line as written
    # every other record as before (same ids: the id hashes file, line and content)
    assert set(res.good["id"]) < set(clean.good["id"])


def test_tau2_a_lone_surrogate_quarantines_that_task_only(demo, tmp_path):
    root = copy(demo["tau2"], tmp_path / "tau2")
    clean = read("tau2", root)
    tf = root / "domains" / "mock" / "tasks.json"
    tasks = json.loads(tf.read_text())
    tasks[0]["user_scenario"]["instructions"] += "\ud800"
    tf.write_text(json.dumps(tasks, indent=1))
    res = read("tau2", root)
    row = res.rejected.filter((pl.col("file") == str(tf)) & (pl.col("line") == 1)).to_dicts()
    assert len(row) == 1 and row[0]["field"] == "user_scenario.instructions" and "lone surrogate" in row[0]["reason"]
    assert "\\ud800" in row[0]["raw"] and row[0]["raw"].encode("utf-8")
    assert res.n_records == clean.n_records and res.good.height == clean.good.height - 1


def test_tau2_whole_file_problems_name_the_file(demo, tmp_path):
    root = copy(demo["tau2"], tmp_path / "tau2")
    tf = root / "domains" / "mock" / "tasks.json"
    text = tf.read_text()
    tf.write_text(text.replace('"id"', '"deep": ' + DEEP + "]" * len(DEEP) + ', "id"', 1))
    with pytest.raises(SourceError, match="nested deeper") as err:
        read("tau2", root)
    assert str(err.value.file) == str(tf)
    # invalid UTF-8 in a key msgspec skips: the file is refused as the standard library refuses it
    tf.write_bytes(text.replace('"id"', '"\xffid"', 1).encode("latin-1"))
    with pytest.raises(SourceError, match="not valid UTF-8") as err:
        read("tau2", root)
    assert str(err.value.file) == str(tf)
    tf.write_text(text)
    schemas = json.loads((root / "tool_schemas.json").read_text())
    schemas["mock"]["agent_tools"][0] = {"function": "oops"}
    (root / "tool_schemas.json").write_text(json.dumps(schemas))
    with pytest.raises(SourceError, match=r"mock.agent_tools\[0\] has no function name") as err:
        read("tau2", root)
    assert str(err.value.file) == str(root / "tool_schemas.json") and err.value.field == "mock.agent_tools[0]"


@pytest.mark.parametrize("name", ["fujitsu_b4", "ultrachat", "tau2", "llmail_inject"])
def test_a_byte_order_mark_is_not_data(name, demo, tmp_path):
    if name in ("fujitsu_b4", "ultrachat"):
        target = path = jsonl_file(name, demo, tmp_path)
    else:
        path = copy(demo[name], tmp_path / name)
        target = path / ("domains/mock/tasks.json" if name == "tau2" else "scenarios.json")
    clean = read(name, path)
    target.write_bytes(b"\xef\xbb\xbf" + target.read_bytes())
    res = read(name, path)
    assert res.rejected.equals(clean.rejected) and res.good.equals(clean.good)


def test_ultrachat_a_corrupt_parquet_page_is_a_source_error(demo, tmp_path):
    f = copy(demo["ultrachat"], tmp_path / "uc")
    data = bytearray(f.read_bytes())
    mid = len(data) // 2
    data[mid:mid + 64] = bytes(64)  # the footer (at the end) still reads: only the pages are broken
    f.write_bytes(bytes(data))
    pl.read_parquet_schema(f)
    with pytest.raises(SourceError, match="as Parquet") as err:
        read("ultrachat", f)
    assert str(err.value.file) == str(f)


def test_xstest_completions_are_never_dropped_unread(demo, tmp_path):
    root = copy(demo["xstest"], tmp_path / "xs")
    clean = read("xstest", root)
    comp = next((root / "completions").glob("*.csv"))
    text = comp.read_text()
    comp.write_text("\n" + text)  # a blank first line: still the completions file it was
    res = read("xstest", root)
    assert res.good.height == clean.good.height and res.meta["completion_files"] == clean.meta["completion_files"]
    head, rest = text.split("\n", 1)
    comp.write_text(head.upper() + "\n" + rest)
    with pytest.raises(SourceError, match="lacks column") as err:
        read("xstest", root)
    assert str(err.value.file) == str(comp)
    comp.write_text("  \n\n")
    with pytest.raises(SourceError, match="completions/") as err:
        read("xstest", root)
    assert str(err.value.file) == str(comp)


@pytest.mark.parametrize("field, value", [("user_query", 123), ("emails", "one e-mail as a string"),
                                          ("emails", ["ok", 7]), ("position", "middle")])
def test_llmail_scenario_fields_of_the_wrong_type_name_file_and_field(field, value, demo, tmp_path):
    root = copy(demo["llmail_inject"], tmp_path / "ll")
    sf = root / "scenarios.json"
    scen = json.loads(sf.read_text())
    scen["scenario_1"][field] = value
    sf.write_text(json.dumps(scen))
    with pytest.raises(SourceError, match=f"scenario_1.{field}") as err:
        read("llmail_inject", root)
    assert str(err.value.file) == str(sf) and err.value.field == f"scenario_1.{field}"


def test_llmail_a_csv_field_past_the_csv_modules_default_limit_is_read(demo, tmp_path):
    root = copy(demo["llmail_inject"], tmp_path / "ll")
    clean = read("llmail_inject", root)
    jobs = root / "jobs_data.csv"
    text = jobs.read_text(encoding="utf-8")
    body = "Dear Administrator"
    assert text.count(body) >= 1
    jobs.write_text(text.replace(body, body + " pad" * 50_000, 1), encoding="utf-8")  # a 200 kB body
    res = read("llmail_inject", root)
    assert res.good.height == clean.good.height and res.rejected.height == clean.rejected.height
    assert max(len(m[3]["content"]) for m in res.good["messages"].to_list()) > 200_000


def test_agentdojo_ids_do_not_depend_on_line_ends(demo, tmp_path):
    f = copy(demo["agentdojo"] / "agentdojo-demo-gpt.jsonl", tmp_path / "lf")
    lf = read("agentdojo", f)
    crlf = copy(f, tmp_path / "crlf")
    crlf.write_bytes(f.read_bytes().replace(b"\n", b"\r\n"))
    bare = copy(f, tmp_path / "bare")
    bare.write_bytes(f.read_bytes().rstrip(b"\n"))
    for other in (crlf, bare):
        assert read("agentdojo", other).good["id"].to_list() == lf.good["id"].to_list()


def test_agentdojo_a_file_of_blank_lines_among_others_is_a_source_error(demo, tmp_path):
    root = copy(demo["agentdojo"], tmp_path / "ad")
    blank = root / "agentdojo-blank.jsonl"
    blank.write_text("\n  \n\n")
    with pytest.raises(SourceError, match="holds no records") as err:
        read("agentdojo", root)
    assert Path(err.value.file).name == blank.name
