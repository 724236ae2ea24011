"""The embedded demo sample: deterministic, fast, in each real raw format, parsed by every reader."""
from __future__ import annotations

import ast
import csv
import importlib
import json
import re
import time
from pathlib import Path

import polars as pl
import pytest

from cb_core.config import DatasetsConfig, resolve_source_paths
from cb_core.sources.demo import write_demo_sources
from cb_core.schemas import DATASETS, QuarantineModel, TraceModel
from cb_core.sources import READERS, get_reader


# The counts each reader must reproduce on the demo sample (independent of the seed).
DEMO_EXPECTED = {
    "fujitsu_b4": {"records": 60, "empty_injection": 8},
    "agentdojo": {
        "files": 2,
        "traces": 80,  # header lines not counted
        "attacked": 40,
        "security_true_attacked": 13,  # 11 real successes + 2 provider errors
        "with_attacker_call": 11,  # of those, with the attacker's call
        "provider_errors": 2,
        "empty_messages": 1,
        "complied_security_false": 2,  # attacker's call after the injection, but AgentDojo's goal check failed
        "harmful": 13,  # 11 + 2: every attacker call after the injection
        "resisted": 22,  # read the injection, no attacker call
        "not_reached": 2,  # attacked, but the agent never called the tool returning the injection
        "benign": 40,
        "benign_target_call": 1,  # a benign banking run whose bill asks to pay the attacker's IBAN
        "benign_success": 28,
    },
    "llmail_inject": {"jobs": 60, "succeeded": 8, "right_call_detected": 8},
    "tau2": {"airline": 13, "telecom": 12, "mock": 8},  # kept skeletons per domain
    # 2 telecom tasks whose first action needs ids the prompt does not hold; 3 airline and 1 mock task without
    # an expected action (their first move is not given); 1 mock task that starts after a conversation
    # (initial_state.message_history) a one-turn skeleton would drop
    "tau2_excluded": 7,
    "ultrachat": {"rows": 60},
    "xstest": {"prompts": 40, "safe_prompts": 24, "completions": 40, "safe_full_compliance": 18,
               "unsafe_full_refusal": 12},
}


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> dict[str, Path]:
    return write_demo_sources(tmp_path_factory.mktemp("demo"), seed=0)


def _read(dataset: str, path: Path):
    try:
        importlib.import_module(f"cb_core.sources.{READERS[dataset]}")
    except ModuleNotFoundError:
        pytest.skip(f"reader cb_core.sources.{READERS[dataset]} not written yet")
    cfg = getattr(DatasetsConfig.load(), dataset)
    res = get_reader(dataset)(resolve_source_paths(path), cfg)
    TraceModel.validate(res.good)
    QuarantineModel.validate(res.rejected)
    return res


def lab(df: pl.DataFrame, field: str) -> list:
    return df.get_column("labels").struct.field(field).to_list()


def test_same_seed_byte_identical_and_fast(tmp_path):
    t = time.perf_counter()
    a = write_demo_sources(tmp_path / "a", seed=0)
    elapsed = time.perf_counter() - t
    write_demo_sources(tmp_path / "b", seed=0)
    ta, tb = _tree(tmp_path / "a"), _tree(tmp_path / "b")
    assert ta == tb
    assert len(ta) >= 17
    assert elapsed < 1.0
    assert set(a) == set(DATASETS)
    # another seed changes content, not structure
    write_demo_sources(tmp_path / "c", seed=1)
    tc = _tree(tmp_path / "c")
    assert tc.keys() == ta.keys() and tc != ta
    # rewriting in place keeps the bytes (atomic writes, skipped when unchanged)
    write_demo_sources(tmp_path / "a", seed=0)
    assert _tree(tmp_path / "a") == ta


def test_demo_files_follow_the_real_shapes(demo):
    # AgentDojo: header line without messages, then {index, messages, metadata, annotations}
    files = resolve_source_paths(demo["agentdojo"])
    assert [f.name for f in files] == ["agentdojo-demo-gemini (1).jsonl", "agentdojo-demo-gpt.jsonl"]
    for f in files:
        lines = f.read_text(encoding="utf-8").splitlines()
        head = json.loads(lines[0])
        assert set(head) == {"metadata"} and head["metadata"]["benchmark"] == "agent-dojo"
        recs = [json.loads(x) for x in lines[1:]]
        assert all(set(r) == {"index", "messages", "metadata", "annotations"} for r in recs)
        assert all(set(r["metadata"]) == {"suite_name", "model", "success", "security", "user_task_id",
                                          "injection_task_id", "attack_type", "hierarchy_path", "name"}
                   for r in recs)
    gem = [json.loads(x) for x in files[0].read_text().splitlines()[1:]]
    tool_ids = {m["tool_call_id"] for r in gem for m in r["messages"] if m["role"] == "tool"}
    assert tool_ids == {""}
    # LLMail: CSV columns, Python-repr objectives, scenario JSON shape
    ll = Path(demo["llmail_inject"])
    with open(ll / "jobs_data.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["job_id", "scenario", "subject", "body", "scheduled_time", "started_time",
                             "completed_time", "output", "objectives"]
    objs = [ast.literal_eval(r["objectives"]) for r in rows]
    assert sum(all(o.values()) for o in objs) == DEMO_EXPECTED["llmail_inject"]["succeeded"]
    assert any("\n" in r["body"] for r in rows)
    scen = json.loads((ll / "scenarios.json").read_text())
    assert set(scen) == {"scenario_1", "scenario_2", "scenario_3", "scenario_4"}
    assert all(set(v) == {"emails", "position", "user_query", "task"} for v in scen.values())
    assert set(json.loads((ll / "system_prompt.json").read_text())) == {"email_client", "tool_prompt"}
    for level in ("level1", "level2", "level3", "level4", "fp_tests"):
        assert json.loads((ll / "emails" / f"{level}.json").read_text())["emails"]
    # XSTest completions have CRLF line ends, prompts LF (as the real files)
    xs = Path(demo["xstest"])
    assert b"\r\n" in (xs / "completions" / "demo-model.csv").read_bytes()
    assert b"\r\n" not in (xs / "xstest_prompts.csv").read_bytes()
    # UltraChat parquet columns
    uc = pl.read_parquet(demo["ultrachat"])
    assert uc.columns == ["prompt", "prompt_id", "messages"] and uc.height == 60


def test_demo_fujitsu_b4(demo):
    res = _read("fujitsu_b4", demo["fujitsu_b4"])
    exp = DEMO_EXPECTED["fujitsu_b4"]
    assert res.rejected.height == 0 and res.good.height == exp["records"]
    assert set(lab(res.good, "category")) == {"harmful"}
    ta = res.good["tool_attack"].to_list()
    users = [m[1]["content"] for m in res.good["messages"].to_list()]
    assert all(t["injection_span"] is not None for t in ta)
    assert all(u[t["injection_span"]["char_start"]:t["injection_span"]["char_end"]].strip() == t["injection_text"].strip()
               for u, t in zip(users, ta))
    raw = [json.loads(x) for x in Path(demo["fujitsu_b4"]).read_text().splitlines()]
    assert sum(r["malicious_injection"] == "" for r in raw) == exp["empty_injection"]


def test_demo_agentdojo(demo):
    res = _read("agentdojo", demo["agentdojo"])
    exp = DEMO_EXPECTED["agentdojo"]
    assert res.n_records == exp["traces"]
    g = res.good
    # rejected (severity excluded): the provider errors (security True, no attacker call) and the empty run
    assert res.rejected.height == exp["provider_errors"] + exp["empty_messages"]
    assert set(res.rejected["severity"]) == {"excluded"}
    assert sum(lab(g, "attack_present")) == exp["harmful"] + exp["resisted"]
    assert sum(lab(g, "attack_succeeded")) == exp["with_attacker_call"]
    assert lab(g, "category").count("harmful") == exp["harmful"] == sum(lab(g, "attacker_call_made"))
    assert lab(g, "priority_class").count("injection_resisted") == exp["resisted"]
    assert lab(g, "injection_reached").count(False) == exp["not_reached"]
    assert lab(g, "priority_class").count("tool_capability") == exp["benign"] + exp["not_reached"]
    assert res.meta["records_attacked"] == exp["attacked"]
    assert res.meta["records_benign_success"] == exp["benign_success"]


def test_demo_agentdojo_one_task_per_prompt(demo):
    """As in real AgentDojo, a task is one prompt: prompts that differ only in their numbers share a task id (and so
    a pair group), and no two prompts share one, in both files and across seeds."""
    for seed in (0, 1):
        root = demo["agentdojo"] if seed == 0 else write_demo_sources(demo["agentdojo"].parent / "s1", seed=1)["agentdojo"]
        g = _read("agentdojo", root).good
        prompts = [re.sub(r"\d+", "#", next(m["content"] for m in ms if m["role"] == "user"))
                   for ms in g["messages"].to_list()]
        pairs = set(zip(prompts, g["pair_group"].to_list()))
        assert len(pairs) == len({p for p, _ in pairs}) == len({grp for _, grp in pairs}) >= 15


def test_demo_llmail(demo):
    res = _read("llmail_inject", demo["llmail_inject"])
    exp = DEMO_EXPECTED["llmail_inject"]
    assert res.rejected.height == 0 and res.good.height == exp["jobs"]
    assert sum(lab(res.good, "attack_succeeded")) == exp["succeeded"]
    assert all(lab(res.good, "attack_present"))


def test_demo_tau2(demo):
    res = _read("tau2", demo["tau2"])
    assert res.rejected.height == DEMO_EXPECTED["tau2_excluded"]
    assert set(res.rejected["severity"]) == {"excluded"}
    assert res.meta["tasks_per_domain"] == DEMO_EXPECTED["tau2"]
    tel = res.good.filter(pl.col("labels").struct.field("subtype") == "telecom")
    # the expected behaviour is the first assistant action (user-side device actions left out)
    assert set(tel["tool_attack"].struct.field("expected_tool")) == {"enable_roaming"}
    assert all(len(ms) == 2 for ms in tel["messages"].to_list())


def test_demo_ultrachat(demo):
    res = _read("ultrachat", demo["ultrachat"])
    assert res.rejected.height == 0 and res.good.height == DEMO_EXPECTED["ultrachat"]["rows"]
    assert set(res.good["completeness"]) == {"complete"}
    assert all(ms[-1]["role"] == "assistant" for ms in res.good["messages"].to_list())


def test_demo_xstest(demo):
    res = _read("xstest", demo["xstest"])
    exp = DEMO_EXPECTED["xstest"]
    # the completions that are not retain data are kept in quarantine, excluded by policy, none malformed
    not_used = exp["completions"] - exp["safe_full_compliance"] - exp["unsafe_full_refusal"]
    assert res.rejected.height == not_used == res.meta["completions_not_used"]
    assert set(res.rejected["severity"]) == {"excluded"} and set(res.rejected["field"]) == {"final_label"}
    g = res.good
    assert (g["completeness"] == "skeleton").sum() == exp["prompts"]
    comp = g.filter(pl.col("completeness") == "complete")
    assert lab(comp, "priority_class").count("borderline") == exp["safe_full_compliance"]
    assert lab(comp, "priority_class").count("refusal") == exp["unsafe_full_refusal"]
    sk_sub = lab(g.filter(pl.col("completeness") == "skeleton"), "subtype")
    assert sum(s.startswith("safe:") for s in sk_sub) == exp["safe_prompts"]


def test_demo_ids_unique_across_sources(demo):
    ids = []
    for ds in DATASETS:
        ids += _read(ds, demo[ds]).good["id"].to_list()
    assert len(ids) == len(set(ids))
    assert len(ids) >= 300
