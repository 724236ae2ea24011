"""Leaderboard, best_config and release_report through real Dagster runs, on eval_scores tables written per point
(synthetic values with a known answer: the GPU work of the points is replaced by its output files, nothing else).

Also: the Pareto front and ranking as pure functions, the CSV round trip with lists, seed statistics by hand,
and the sweep sensor's decisions."""
import json
import statistics

import dagster as dg
import polars as pl
import pytest
import yaml

from cb_core.evaluate.pipeline import EvaluationSettings
from cb_core.evaluate.scores import SCORES_SCHEMA
from cb_core.sweep.leaderboard import best_from_csv, pareto_mask, read_csv_rows, to_csv
from cb_core.sweep.release import report_markdown, seed_stats

BASE = {"tool_flip_asr": 0.50, "capability_retention": 0.90, "xstest_over_refusal": 0.08}
# (alpha, layers) -> adapter (asr, capability, over-refusal); None = the point failed (no eval_scores)
VALUES = {
    (5, (10, 20)): (0.10, 0.50, 0.08),      # lowest ASR, but capability 0.50 < 0.85 x 0.90: gate fails
    (5, (8, 16, 24)): (0.20, 0.88, 0.10),   # meets both gates: the best
    (10, (10, 20)): (0.15, 0.85, 0.20),     # over-refusal +12 points > 5: gate fails
    (10, (8, 16, 24)): (0.25, 0.80, 0.08),  # meets gates, worse ASR; dominated by the best
    (15, (10, 20)): None,
    (15, (8, 16, 24)): None,
}


def scores_table(adapter: dict[str, float], base: dict[str, float] = BASE, n: int = 40) -> pl.DataFrame:
    rows = []
    for model, vals in (("base", base), ("adapter", adapter)):
        for metric, v in vals.items():
            rows.append({"model": model, "metric": metric, "n": n, "value": v, "ci_low": max(0.0, v - 0.1),
                         "ci_high": min(1.0, v + 0.1)})
    return pl.DataFrame(rows, schema=SCORES_SCHEMA)


@pytest.fixture
def sweep_env(data_root, tmp_path):
    from cb_assets.definitions import defs

    manifest = tmp_path / "lb.yaml"
    manifest.write_text(yaml.safe_dump({"name": "lbtest", "preset": "stage1", "overrides": {"train.steps": 7},
                                        "grid": {"alpha": [5, 10, 15], "layers": [[10, 20], [8, 16, 24]]},
                                        "final": {"overrides": {"train.steps": 99}}}))
    inst = dg.DagsterInstance.ephemeral()
    res = defs.resolve_job_def("sweep").execute_in_process(
        instance=inst, run_config={"ops": {"sweep_points": {"config": {"manifest": str(manifest)}}}})
    assert res.success
    return defs, inst, data_root, res.output_for_node("sweep_points")


def _write_point_scores(root, points: pl.DataFrame) -> dict:
    keys = {}
    for r in points.iter_rows(named=True):
        ov = dict(o.split("=", 1) for o in r["overrides"])
        alpha, layers = int(ov["loss.alpha"]), tuple(json.loads(ov["loss.target_layers"]))
        keys[(alpha, layers)] = r["key"]
        v = VALUES[(alpha, layers)]
        if v is None:
            continue
        d = root / "sweeps" / r["key"]
        d.mkdir(parents=True)
        scores_table(dict(zip(BASE, v))).write_parquet(d / "eval_scores.parquet")
    return keys


def test_points_registered_as_partitions(sweep_env):
    _, inst, root, points = sweep_env
    assert points.height == 6
    assert set(inst.get_dynamic_partitions("sweep_points")) == set(points["key"].to_list())
    stored = pl.read_parquet(root / "sweep_points.parquet")
    assert stored.height == 6 and all("train.steps=7" in o for o in stored["overrides"].to_list())


def test_a_sweep_registered_again_is_its_manifest_as_it_is_now(sweep_env, tmp_path):
    """A grid value taken out of the manifest is no longer a point (it was kept, then run and ranked); points of
    other sweeps stay."""
    defs, inst, root, points = sweep_env
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump({"name": "othersweep", "preset": "stage1", "grid": {"alpha": [3]}}))
    smaller = tmp_path / "lb_small.yaml"
    smaller.write_text(yaml.safe_dump({"name": "lbtest", "preset": "stage1", "overrides": {"train.steps": 7},
                                       "grid": {"alpha": [5], "layers": [[10, 20], [8, 16, 24]]}}))
    for m in (other, smaller):
        res = defs.resolve_job_def("sweep").execute_in_process(
            instance=inst, run_config={"ops": {"sweep_points": {"config": {"manifest": str(m)}}}})
        assert res.success
    stored = pl.read_parquet(root / "sweep_points.parquet")
    kept = stored.filter(pl.col("sweep") == "lbtest")
    assert kept.height == 2 and all("loss.alpha=5" in o for o in kept["overrides"].to_list())
    assert set(kept["key"]) < set(points["key"])  # the same values keep their keys
    assert stored.filter(pl.col("sweep") == "othersweep").height == 1


def test_leaderboard_best_point_read_back_from_csv(sweep_env):
    defs, inst, root, points = sweep_env
    keys = _write_point_scores(root, points)
    res = defs.resolve_job_def("sweep_rank").execute_in_process(instance=inst)
    assert res.success
    lb = pl.read_parquet(root / "leaderboard.parquet")
    assert lb.height == 4  # the two failed points are left out (and listed as not finished)
    best_key = keys[(5, (8, 16, 24))]
    assert lb.filter(pl.col("rank") == 1)["key"].to_list() == [best_key]
    assert lb.filter(pl.col("key") == keys[(10, (8, 16, 24))])["rank"].to_list() == [2]
    gated_out = lb.filter(pl.col("rank").is_null())["key"].to_list()
    assert sorted(gated_out) == sorted([keys[(5, (10, 20))], keys[(10, (10, 20))]])
    assert lb.filter(pl.col("key") == keys[(5, (10, 20))])["gate_capability"][0] == "failed"
    assert lb.filter(pl.col("key") == keys[(10, (10, 20))])["gate_over_refusal"][0] == "failed"
    # CSV: the layers list holds commas; the best point and its layers come back intact
    best = best_from_csv(root / "leaderboard.csv")
    assert best["key"] == best_key and best["layers"] == [8, 16, 24] and best["alpha"] == 5
    assert best["tool_flip_asr"] == pytest.approx(0.20) and best["base_tool_flip_asr"] == pytest.approx(0.50)
    rows = read_csv_rows(root / "leaderboard.csv")
    assert {tuple(r["layers"]) for r in rows} == {(10, 20), (8, 16, 24)}
    # Pareto: the dominated point is off the front
    front = set(lb.filter(pl.col("pareto"))["key"].to_list())
    assert keys[(10, (8, 16, 24))] not in front and best_key in front
    png = root / "leaderboard.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    mat = inst.get_latest_materialization_event(dg.AssetKey("leaderboard")).asset_materialization
    assert mat.metadata["tradeoff_plot"].value.startswith("![ASR vs capability](data:image/png;base64,")
    assert mat.metadata["best"].value == best_key
    assert sorted(mat.metadata["not_finished"].value) == sorted([keys[(15, (10, 20))], keys[(15, (8, 16, 24))]])
    # best_config: the best point, one final partition per seed
    bc = pl.read_parquet(root / "best_config.parquet")
    assert bc["best_key"].unique().to_list() == [best_key] and bc["seed"].to_list() == [101, 555, 888]
    assert set(inst.get_dynamic_partitions("final_seeds")) == {f"{best_key}-seed{s}" for s in (101, 555, 888)}
    assert all("loss.target_layers=[8, 16, 24]" in o for o in bc["overrides"].to_list())
    assert all("train.steps=99" in o for o in bc["overrides"].to_list())  # the manifest's final.overrides

    # another selection metric (higher is better) changes the ranking
    res = defs.resolve_job_def("sweep_rank").execute_in_process(
        instance=inst, run_config={"ops": {"leaderboard": {"config": {"metric": "capability_retention"}}}})
    lb2 = pl.read_parquet(root / "leaderboard.parquet")
    assert lb2.filter(pl.col("rank") == 1)["key"].to_list() == [best_key]  # 0.88 > 0.80 among the gated
    assert lb2.filter(pl.col("rank") == 2)["key"].to_list() == [keys[(10, (8, 16, 24))]]


def test_best_config_says_when_points_tie(sweep_env):
    defs, inst, root, points = sweep_env
    keys = _write_point_scores(root, points)
    tied = keys[(10, (8, 16, 24))]  # scored like the best point: the two tie at rank 1
    scores_table(dict(zip(BASE, VALUES[(5, (8, 16, 24))]))).write_parquet(root / "sweeps" / tied / "eval_scores.parquet")
    assert defs.resolve_job_def("sweep_rank").execute_in_process(instance=inst).success
    mat = inst.get_latest_materialization_event(dg.AssetKey("best_config")).asset_materialization
    assert sorted(mat.metadata["tied_at_rank_1"].value) == sorted([tied, keys[(5, (8, 16, 24))]])
    assert mat.metadata["best"].value == min(tied, keys[(5, (8, 16, 24))])


def test_release_report_mean_std_over_seeds(sweep_env):
    defs, inst, root, points = sweep_env
    _write_point_scores(root, points)
    assert defs.resolve_job_def("sweep_rank").execute_in_process(instance=inst).success
    bc = pl.read_parquet(root / "best_config.parquet")
    asr = {101: 0.20, 555: 0.30, 888: 0.16}
    for key, seed in zip(bc["key"], bc["seed"]):
        d = root / "sweeps" / "final" / key
        d.mkdir(parents=True)
        scores_table({"tool_flip_asr": asr[seed], "capability_retention": 0.9, "xstest_over_refusal": 0.1}) \
            .write_parquet(d / "eval_scores.parquet")
    assert defs.resolve_job_def("sweep_release").execute_in_process(instance=inst).success
    stats = pl.read_parquet(root / "release_report.parquet")
    row = stats.filter((pl.col("model") == "adapter") & (pl.col("metric") == "tool_flip_asr")).row(0, named=True)
    assert row["mean"] == pytest.approx(statistics.mean(asr.values()))
    assert row["std"] == pytest.approx(statistics.stdev(asr.values()))
    assert row["seeds"] == 3 and row["n"] == 120
    base = stats.filter((pl.col("model") == "base") & (pl.col("metric") == "tool_flip_asr")).row(0, named=True)
    assert base["mean"] == pytest.approx(0.5) and base["std"] == pytest.approx(0.0)
    md = (root / "release_report.md").read_text()
    assert f"| tool_flip_asr | {statistics.mean(asr.values()):.3f} ± {statistics.stdev(asr.values()):.3f} |" in md
    assert "seeds 101, 555, 888" in md


def test_release_report_base_of_a_metric_against_the_base_is_the_reference():
    """The base's output difference from itself (0) and cos-sim with itself (1) read as results: `0.000 ± 0.000`
    beside the adapter's, where the demo summary says "(the reference)"."""
    rows = [{"seed": s, "model": m, "metric": k, "n": 8, "value": v}
            for s in (1, 2) for m, k, v in (("adapter", "output_difference_rate", 0.25), ("base", "output_difference_rate", 0.0),
                                            ("adapter", "tool_flip_asr", 0.1), ("base", "tool_flip_asr", 0.2))]
    md = report_markdown(seed_stats(pl.DataFrame(rows)), best={"key": "k", "preset": "tiny"}, seeds=[1, 2])
    assert "| output_difference_rate | 0.250 ± 0.000 | (the reference) | 2 | 16 |" in md
    assert "| tool_flip_asr | 0.100 ± 0.000 | 0.200 ± 0.000 | 2 | 16 |" in md


def test_seed_stats_by_hand_and_not_measured():
    df = pl.DataFrame({"seed": [1, 2, 1, 2], "model": ["adapter"] * 4, "metric": ["a", "a", "b", "b"],
                       "n": [10, 10, 0, 0], "value": [0.2, 0.4, None, None]})
    st = seed_stats(df)
    a = st.filter(pl.col("metric") == "a").row(0, named=True)
    assert a["mean"] == pytest.approx(0.3) and a["std"] == pytest.approx(statistics.stdev([0.2, 0.4]))
    b = st.filter(pl.col("metric") == "b").row(0, named=True)
    assert b["seeds"] == 0 and b["mean"] is None


def test_pareto_and_csv_units():
    assert pareto_mask([0.1, 0.2, 0.3, None], [0.5, 0.9, 0.8, 1.0]) == [True, True, False, False]
    assert pareto_mask([0.1, 0.1], [0.5, 0.5]) == [True, True]  # ties dominate nobody
    df = pl.DataFrame({"key": ["a,b"], "layers": [[10, 20]], "note": ['say "hi", then']})
    back = read_csv_rows(to_csv(df))
    assert back == [{"key": "a,b", "layers": [10, 20], "note": 'say "hi", then'}]


def test_sweep_sensor_plan():
    from cb_assets.assets.sweeps import plan

    pts = [{"key": k, "sweep": "s", "continue_on_error": True} for k in ("p1", "p2", "p3")]
    todo, why = plan(pts, {}, {}, [], {}, set())
    assert todo == [("sweep_point", "p1"), ("sweep_point", "p2"), ("sweep_point", "p3")]
    todo, why = plan(pts, {"p1": "FAILURE", "p2": "STARTED", "p3": "SUCCESS"}, {}, [], {}, set())
    assert todo == [] and "still running" in why
    todo, why = plan(pts, {"p1": "FAILURE", "p2": "SUCCESS", "p3": "SUCCESS"}, {}, [], {}, set())
    assert todo == [("sweep_rank", "rank:s:p2,p3")]  # one failed point never loses the others
    todo, _ = plan(pts, {"p1": "FAILURE", "p2": "SUCCESS", "p3": "SUCCESS"}, {"rank:s:p2,p3": "SUCCESS"},
                   ["f1", "f2"], {}, set())
    assert todo == [("final_seed", "f1"), ("final_seed", "f2")]
    todo, _ = plan(pts, {"p1": "FAILURE", "p2": "SUCCESS", "p3": "SUCCESS"}, {"rank:s:p2,p3": "SUCCESS"}, ["f1", "f2"],
                   {"f1": "SUCCESS", "f2": "FAILURE"}, set())
    assert todo == [("sweep_release", "release:f1,f2")]
    strict = [{**p, "continue_on_error": False} for p in pts]
    todo, why = plan(strict, {"p1": "FAILURE"}, {}, [], {}, set())
    assert todo == [] and "continue_on_error is false" in why and "nothing to rank" in why
    # what did finish before the failure is ranked, as the in-process runner does (it waited forever)
    todo, why = plan(strict, {"p1": "SUCCESS", "p2": "FAILURE"}, {}, [], {}, set())
    assert todo == [("sweep_rank", "rank:s:p1")] and "1 point(s) not launched" in why
    todo, why = plan(strict, {"p1": "SUCCESS", "p2": "FAILURE"}, {"rank:s:p1": "FAILURE"}, [], {}, set())
    assert todo == [] and why.startswith("ranking failure")  # not "waiting for best_config" forever
    done = {k: "SUCCESS" for k in ("p1", "p2", "p3")}
    assert plan(pts, done, {"rank:s:p1,p2,p3": "STARTED"}, [], {}, set())[1].startswith("waiting")
    # every final seed failed: said, not "sweep complete"
    todo, why = plan(pts, done, {"rank:s:p1,p2,p3": "SUCCESS"}, ["f1"], {"f1": "FAILURE"}, set())
    assert todo == [] and why.startswith("every final seed failed")
    # ranked in-process without --final: a daemon started later leaves the opt-in seeds alone
    todo, why = plan(pts, done, {"rank:s:p1,p2,p3": "SUCCESS"}, ["f1"], {}, set(), {"rank:s:p1,p2,p3"})
    assert todo == [] and "without final seeds" in why
    # a 60-point sweep's ranking key is ~800 characters: its tag still matches the plan's key
    many = [{"key": f"point{i:02d}-abcdef", "sweep": "s", "continue_on_error": True} for i in range(60)]
    ok = {p["key"]: "SUCCESS" for p in many}
    (job, key), = plan(many, ok, {}, [], {}, set())[0]
    assert job == "sweep_rank" and len(key) <= 200
    assert plan(many, ok, {key: "SUCCESS"}, ["f1"], {}, set())[0] == [("final_seed", "f1")]
    assert plan(pts, {k: "FAILURE" for k in ("p1", "p2", "p3")}, {}, [], {}, set())[0] == []


def test_sweep_sensor_says_when_no_point_is_registered_here(tmp_path, monkeypatch):
    """A data root whose sweep was registered under another DAGSTER_HOME (a fresh instance, `dagster dev` with the
    project's dagster_home after an in-process sweep) skipped with "every point run failed ([])"."""
    from cb_assets.assets.sweeps import sweep_sensor
    from cb_assets.definitions import defs

    monkeypatch.setenv("CB_DATA_ROOT", str(tmp_path))
    pl.DataFrame({"key": ["s-a1-0000", "s-a2-0000"], "sweep": ["s", "s"], "registered_at": [1.0, 1.0]}) \
        .write_parquet(tmp_path / "sweep_points.parquet")
    with dg.DagsterInstance.ephemeral() as inst:
        ctx = dg.build_sensor_context(instance=inst, repository_def=defs.get_repository_def())
        out = sweep_sensor(ctx)
    assert isinstance(out, dg.SkipReason), out
    assert "none of its 2 point(s) is registered in this Dagster instance" in out.skip_message
    assert "every point run failed" not in out.skip_message


def test_sweep_sensor_launches_each_registered_point(sweep_env):
    from cb_assets.assets.sweeps import sweep_sensor

    defs, inst, root, points = sweep_env
    ctx = dg.build_sensor_context(instance=inst, repository_def=defs.get_repository_def())
    reqs = sweep_sensor(ctx)
    assert sorted(r.partition_key for r in reqs) == sorted(points["key"].to_list())
    r = reqs[0]
    assert r.job_name == "sweep_point" and r.run_key == f"sweep_point:{r.partition_key}"
    assert r.tags["cb/sweep"] == "lbtest" and r.tags["cb/data_root_lock"] == "shared"


def test_sweep_point_runs_route_to_slurm_with_one_request():
    """Every asset of a point run / final seed run is GPU-tagged with the same SLURM request, so the launcher
    sends the run to sbatch as one job (conflicting values in one run are refused by the launcher)."""
    from cb_assets.definitions import defs
    from cb_core import slurm

    graph = defs.resolve_asset_graph()
    for job in ("sweep_point", "final_seed"):
        keys = defs.resolve_job_def(job).asset_layer.selected_asset_keys
        tags = [dict(graph.get(k).tags or {}) for k in keys]
        assert tags and all(t.get("cb/compute") == "gpu" for t in tags), job
        assert slurm.merge_tag_options(tags)["gres"] == "gpu:1"
    for job in ("sweep", "sweep_rank", "sweep_release"):
        keys = defs.resolve_job_def(job).asset_layer.selected_asset_keys
        assert all((graph.get(k).tags or {}).get("cb/compute") != "gpu" for k in keys), job


def test_in_process_rerun_skips_points_that_stand(data_root, tmp_path, monkeypatch):
    """Re-running a sweep in-process trained and scored every point again; now a point whose latest run
    succeeded, whose results are there and whose training inputs are unchanged is skipped (and still ranked),
    a point with results gone or changed inputs runs again, saying why, and ``rerun`` runs them all. Real
    Dagster runs; the GPU work of a point is replaced by its output files (fingerprint, adapter, scores)."""
    from cb_assets import cli
    from cb_assets.assets import sweeps
    from cb_assets.assets.sweeps import rank_run_key
    from cb_core.train import RUNS_DIR
    from cb_core.train.config import load_train_config
    from cb_core.train.worker import run_fingerprint

    trained: list[str] = []

    def fake_train(context, key, preset, overrides, out, root):
        cfg, _, _ = load_train_config(preset, overrides)
        ck = root / RUNS_DIR / key / "checkpoints" / "step_000001"
        ck.mkdir(parents=True, exist_ok=True)
        (ck / "trainer_state.pt").write_bytes(b"")
        (ck.parent.parent / "fingerprint.json").write_text(json.dumps(run_fingerprint(cfg, root), default=str))
        out.mkdir(parents=True, exist_ok=True)
        (out / "adapter_config.json").write_text("{}")
        trained.append(key)
        return {}

    def fake_eval(context, adapter_path, preset, overrides, eval_overrides, out, root):
        asr = 0.1 + 0.05 * len(list(out.parent.glob("*/eval_scores.parquet")))
        scores_table({"tool_flip_asr": asr, "capability_retention": 0.9, "xstest_over_refusal": 0.08}) \
            .write_parquet(out / "eval_scores.parquet")
        return {}

    monkeypatch.setattr(sweeps, "train_point", fake_train)
    monkeypatch.setattr(sweeps, "evaluate_point", fake_eval)
    manifest = tmp_path / "rr.yaml"
    manifest.write_text(yaml.safe_dump({"name": "rrtest", "preset": "stage1", "grid": {"alpha": [5, 10, 15]}}))
    inst = dg.DagsterInstance.ephemeral()

    def run(**kw):
        trained.clear()
        logs: list[str] = []
        status = cli.run_sweep_in_process(str(manifest), instance=inst, log=logs.append, **kw)
        return status, logs

    status, _ = run()
    keys = sorted(pl.read_parquet(data_root / "sweep_points.parquet")["key"].to_list())
    assert sorted(trained) == keys and all(status[k] == "SUCCESS" for k in keys) and status["rank"] == "SUCCESS"
    first = {r.tags["dagster/partition"]: r.run_id
             for r in inst.get_runs(filters=dg.RunsFilter(tags={"cb/sweep": "rrtest", "cb/sweep_stage": "point"}))}

    status, logs = run()
    assert trained == [] and all(status[k] == "SUCCESS" for k in keys) and status["rank"] == "SUCCESS"
    for k in keys:  # one line per skipped point, naming the run that stands
        assert [ln for ln in logs if ln.startswith(f"point {k}: not run again, run {first[k]} succeeded")], logs
    ranked = inst.get_runs(filters=dg.RunsFilter(tags={"cb/sweep": "rrtest", "cb/sweep_stage": "rank"}))[0]
    assert ranked.tags["cb/run_key"] == rank_run_key("rrtest", keys)  # the skipped points are ranked
    assert pl.read_parquet(data_root / "leaderboard.parquet").height == 3

    gone, changed, kept = keys
    (data_root / "sweeps" / gone / "eval_scores.parquet").unlink()
    fp = data_root / RUNS_DIR / changed / "fingerprint.json"
    fp.write_text(json.dumps({**json.loads(fp.read_text()), "table:train_split": "another split"}))
    status, logs = run()
    assert sorted(trained) == [gone, changed] and all(status[k] == "SUCCESS" for k in keys)
    assert any(ln.startswith(f"point {gone}: running again: run {first[gone]} succeeded but ") for ln in logs)
    assert any(ln.startswith(f"point {changed}: running again: its training inputs or settings changed since run "
                             f"{first[changed]} (table:train_split: 'another split' -> None)") for ln in logs)
    assert any(ln.startswith(f"point {kept}: not run again") for ln in logs)

    # the evaluation's inputs moved (a new eval_split): every point is scored again, saying so
    (data_root / "eval_split.parquet").write_bytes(b"another eval split")
    status, logs = run()
    assert sorted(trained) == keys and all(status[k] == "SUCCESS" for k in keys)
    assert all(any(ln.startswith(f"point {k}: running again: its evaluation inputs or settings changed since run ")
                   and "table:eval_split" in ln for ln in logs) for k in keys), logs
    status, logs = run()  # and then stand again
    assert trained == []
    limit = EvaluationSettings.load().eval.limit
    monkeypatch.setenv("CB_EVAL_LIMIT", "3")  # an evaluation setting: the line names it, old and new value
    status, logs = run()
    assert sorted(trained) == keys
    assert all(any(ln.startswith(f"point {k}: running again: its evaluation inputs or settings changed since run ")
                   and f"(settings.eval.limit: {limit!r} -> 3)" in ln for ln in logs) for k in keys), logs

    status, logs = run(rerun=True)
    assert sorted(trained) == keys and not any("not run again" in ln for ln in logs)
    assert [ln for ln in logs if ln.startswith("point ") and ": running" in ln][-1].endswith("(3 of 3)")

    # with the final seeds: a line before and after each, and around ranking and the release report (the seeds
    # of a real sweep each train a whole adapter: minutes of silence before)
    status, logs = run(final=True)
    finals = pl.read_parquet(data_root / "best_config.parquet")["key"].to_list()
    assert finals and all(status[k] == "SUCCESS" for k in finals) and status["release"] == "SUCCESS", status
    for i, k in enumerate(finals, 1):
        assert f"final seed {k}: running ({i} of {len(finals)})" in logs and f"final seed {k}: SUCCESS" in logs
    assert logs[-1] == "release report: SUCCESS" and "ranking: SUCCESS" in logs


def test_scores_without_an_eval_fingerprint_do_not_stand(data_root, monkeypatch):
    """Scores written before eval_fingerprint.json existed (e.g. before eval_attacks carried
    preparatory_calls and eval_scores injection_followed_rate) stood whatever the evaluation inputs had become:
    a re-run sweep kept them. What they were scored on is unknown, so they are scored again."""
    from types import SimpleNamespace

    from cb_assets.assets.sweeps import EVAL_FINGERPRINT, eval_fingerprint, point_dir, point_stands

    key = "rr-a5"
    d = point_dir(key, data_root)
    (d / "adapter").mkdir(parents=True)
    (d / "adapter" / "adapter_config.json").write_text("{}")
    scores_table({"tool_flip_asr": 0.1}).write_parquet(d / "eval_scores.parquet")
    run = SimpleNamespace(status=dg.DagsterRunStatus.SUCCESS, run_id="r1")
    stands, why = point_stands(key, "tiny", [], run, data_root, {})
    assert not stands and EVAL_FINGERPRINT in why and "r1" in why
    (d / EVAL_FINGERPRINT).write_text(json.dumps(eval_fingerprint({}, data_root)))
    assert point_stands(key, "tiny", [], run, data_root, {})[0]


def test_eval_fingerprint_holds_what_the_scores_depend_on(data_root, monkeypatch):
    """A gate threshold edited in evaluation.yaml made every point score again, though the leaderboard applies
    the gates when it ranks; the live-AgentDojo settings count only while live evaluation is on."""
    import dataclasses

    from cb_assets.assets import sweeps
    from cb_core.evaluate.pipeline import EvaluationSettings

    fp = sweeps.eval_fingerprint({"limit": 4}, data_root)
    assert "gates" not in fp["settings"] and not any(k.startswith("live_") for k in fp["settings"])
    assert fp["settings"]["eval"]["limit"] == 4 and set(fp) >= {"table:eval_attacks", "table:eval_split"}
    live = EvaluationSettings.load()
    live = dataclasses.replace(live, live_agentdojo=True)
    monkeypatch.setattr(sweeps, "point_eval_settings", lambda ov: live)
    assert sweeps.eval_fingerprint({}, data_root)["settings"]["live_suites"] == list(live.live_suites)
