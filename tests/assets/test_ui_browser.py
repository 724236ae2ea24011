"""The Dagster UI in a real browser: `dagster dev` on loopback against a temp DAGSTER_HOME (demo data), driven by
Playwright through Debian's /usr/bin/chromium (no browser download).

Checks: the asset graph shows the tiers; a materialization of `lossmasks` (or `traces` while ETL_B is absent),
with its upstream, launched from the page succeeds; an asset check's result page opens; a bad row planted in
stored `traces` and re-checked from the page ("Execute all" on the checks tab: checks only, no
materialization) shows as a failed check with its failing rows counted. Screenshots land in
$CB_ARTIFACTS_DIR/screenshots (default <repo>/artifacts/screenshots). Every process started is stopped by PID.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser

PROJECT_ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = os.environ.get("CB_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
SERVER_START_S = 120
RUN_TIMEOUT_S = 150

if not Path(CHROMIUM).exists():
    pytest.skip(f"{CHROMIUM} not present (apt-get install chromium)", allow_module_level=True)
playwright_sync = pytest.importorskip("playwright.sync_api", reason="playwright python package not installed")


# ------------------------------------------------------------------------------------------- helpers
def _artifacts() -> Path:
    d = Path(os.environ.get("CB_ARTIFACTS_DIR", PROJECT_ROOT / "artifacts")) / "screenshots"
    d.mkdir(parents=True, exist_ok=True)
    return d


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _descendants(pid: int) -> list[int]:
    """All descendant PIDs of `pid` (via /proc), deepest last."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the process group (and every descendant by PID), then SIGKILL whatever is left."""
    pids = [proc.pid, *_descendants(proc.pid)]
    for sig, grace in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)  # the group we created with start_new_session
        except ProcessLookupError:
            pass
        for pid in pids[1:]:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        try:
            proc.wait(timeout=grace)
            alive = [p for p in pids[1:] if Path(f"/proc/{p}").exists() and not _zombie(p)]
            if not alive:
                return
        except subprocess.TimeoutExpired:
            continue


def _zombie(pid: int) -> bool:
    try:
        return (Path(f"/proc/{pid}") / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def _graphql(base: str, query: str, variables: dict | None = None) -> dict:
    body = json.dumps({"query": query, "variables": variables or {}}).encode()
    req = urllib.request.Request(f"{base}/graphql", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())["data"]


RUNS_QUERY = """{ runsOrError(limit: 20) { ... on Runs { results { runId status
  assetSelection { path } assetCheckSelection { name assetKey { path } } } } } }"""


def _runs(base: str) -> list[dict]:
    return _graphql(base, RUNS_QUERY)["runsOrError"]["results"]


def _wait_new_run(base: str, known: set[str], timeout: float = 30) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        new = [r for r in _runs(base) if r["runId"] not in known]
        if new:
            return new[0]
        time.sleep(0.5)
    raise AssertionError("no run was launched from the page")


def _wait_run_done(base: str, run_id: str, timeout: float = RUN_TIMEOUT_S) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        run = next(r for r in _runs(base) if r["runId"] == run_id)
        if run["status"] in ("SUCCESS", "FAILURE", "CANCELED"):
            return run
        time.sleep(1)
    raise AssertionError(f"run {run_id} did not finish in {timeout}s")


def _visible_text(page, text: str):
    return page.locator(f'text="{text}" >> visible=true').first


# ------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def dagster_server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ui")
    home = tmp / "dagster_home"
    home.mkdir()
    shutil.copy(PROJECT_ROOT / "dagster_home" / "dagster.yaml", home / "dagster.yaml")
    data = tmp / "cb_data"
    data.mkdir()
    env = {k: v for k, v in os.environ.items()
           if not ((k.startswith("CB_") and k.endswith("_PATH")) or k in ("CB_DATASETS", "CB_DATA_ROOT"))}
    env.update(DAGSTER_HOME=str(home), CB_DATA_ROOT=str(data), PYTHONUNBUFFERED="1")
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    log = open(tmp / "dagster_dev.log", "wb")
    dagster = PROJECT_ROOT / ".venv" / "bin" / "dagster"
    cmd = [str(dagster) if dagster.exists() else "dagster", "dev", "-m", "cb_assets.definitions",
           "-h", "127.0.0.1", "-p", str(port)]
    proc = subprocess.Popen(cmd, cwd=PROJECT_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + SERVER_START_S
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"dagster dev exited: {(tmp / 'dagster_dev.log').read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{base}/server_info", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.time() > deadline:
                raise AssertionError(f"webserver not up in {SERVER_START_S}s")
            time.sleep(1)
        # the code location must be loaded before the page can list assets
        while time.time() < deadline:
            ws = _graphql(base, "{ workspaceOrError { ... on Workspace { locationEntries { name "
                                "loadStatus locationOrLoadError { __typename } } } } }")
            entries = ws["workspaceOrError"]["locationEntries"]
            if entries and all(e["loadStatus"] == "LOADED" for e in entries):
                assert all(e["locationOrLoadError"]["__typename"] == "RepositoryLocation" for e in entries), entries
                break
            time.sleep(1)
        yield {"base": base, "data_root": data, "log": tmp / "dagster_dev.log"}
    finally:
        _stop(proc)
        log.close()


@pytest.fixture(scope="module")
def page(dagster_server, tmp_path_factory):
    profile = tmp_path_factory.mktemp("chromium_profile")
    with playwright_sync.sync_playwright() as p:
        ctx = p.chromium.launch_persistent_context(
            str(profile), executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True,
            viewport={"width": 1600, "height": 1000},
        )
        try:
            pg = ctx.new_page()
            pg.set_default_timeout(30_000)
            # first visit of a fresh instance shows a "Join the Dagster community" dialog: dismiss it when seen
            pg.add_locator_handler(
                pg.get_by_text("Join the Dagster community"),
                lambda _: pg.get_by_role("button", name="Skip").click(),
            )
            yield pg
        finally:
            ctx.close()


def _tiers() -> tuple[list[str], str]:
    """(tier assets present in the definitions, the asset to materialize)."""
    from cb_assets.definitions import defs

    keys = {k.to_user_string() for k in defs.resolve_asset_graph().get_all_asset_keys()}
    tiers = [t for t in ("traces", "renders", "lossmasks") if t in keys]
    return tiers, ("lossmasks" if "lossmasks" in keys else "traces")


# ------------------------------------------------------------------------------------------- the test
def test_ui_graph_materialize_and_checks(dagster_server, page):
    base, shots = dagster_server["base"], _artifacts()
    tiers, target = _tiers()
    assert "traces" in tiers

    # 1. the asset graph shows the tiers: the global lineage (groups), then the tiers filtered + expanded
    page.goto(f"{base}/asset-groups", wait_until="domcontentloaded")
    page.get_by_role("button", name="Materialize all").wait_for()
    for group in ("raw", "etl_a"):
        _visible_text(page, group).wait_for()
    page.wait_for_timeout(1000)
    page.screenshot(path=str(shots / "00_lineage.png"))
    query = " or ".join(f'key:"{t}"' for t in tiers)
    page.goto(f"{base}/asset-groups~{urllib.parse.quote(query, safe='')}/", wait_until="domcontentloaded")
    page.get_by_role("button", name="Materialize all").wait_for()
    page.wait_for_timeout(1000)
    for _ in range(10):  # expand collapsed group boxes so the asset nodes render
        folded = page.locator('[aria-label="unfold_more"]')
        if not folded.count():
            break
        folded.first.click()
        page.wait_for_timeout(400)
    for tier in tiers:
        _visible_text(page, tier).wait_for()
    page.screenshot(path=str(shots / "01_asset_graph_tiers.png"))

    # 2. select the target with everything upstream and launch "Materialize all" from the page
    # (without the GPU-tagged generation parents: the instance's SLURM launcher would send those to sbatch)
    selection = f'+key:"{target}" and not tag:"cb/compute"="gpu"'
    page.goto(f"{base}/asset-groups~{urllib.parse.quote(selection, safe='')}/", wait_until="domcontentloaded")
    page.get_by_role("button", name="Materialize all").wait_for()
    page.wait_for_timeout(1500)
    page.screenshot(path=str(shots / "02_selection.png"))
    known = {r["runId"] for r in _runs(base)}
    page.get_by_role("button", name="Materialize all").click()
    # the UI warns that the generation tiers were never materialized (they load as empty tables): confirm
    page.get_by_text("have not been materialized yet").wait_for()
    page.screenshot(path=str(shots / "02b_missing_upstream.png"))
    page.get_by_role("button", name="Confirm").click()
    page.get_by_text("Launched run").wait_for()
    run = _wait_new_run(base, known)
    assert [target] in [a["path"] for a in run["assetSelection"]]
    page.goto(f"{base}/runs/{run['runId']}", wait_until="domcontentloaded")
    done = _wait_run_done(base, run["runId"])
    page.reload(wait_until="domcontentloaded")
    page.get_by_text("Success").first.wait_for()
    try:
        page.get_by_text("Loading run logs").wait_for(state="hidden", timeout=15_000)
    except playwright_sync.TimeoutError:
        pass  # the screenshot is evidence only; the status above is the assertion
    page.screenshot(path=str(shots / "03_run_success.png"), full_page=True)
    assert done["status"] == "SUCCESS", f"run {run['runId']} ended {done['status']}; log {dagster_server['log']}"
    assert (dagster_server["data_root"] / f"{target}.parquet").exists()
    if target == "lossmasks":  # the mask preview opens from the asset page in one click
        page.goto(f"{base}/assets/lossmasks", wait_until="domcontentloaded")
        row = page.locator("tr", has=page.get_by_text("mask_preview", exact=True)).first
        row.get_by_text("[Show Markdown]").click()
        page.get_by_role("dialog").locator("strong").nth(1).wait_for(state="visible")  # a masked span
        page.screenshot(path=str(shots / "03b_mask_preview.png"))
        page.get_by_role("button", name="Close").click()

    # 3. an asset check's result page
    from cb_assets.definitions import defs

    checks = sorted(k.name for k in defs.resolve_asset_graph().asset_check_keys
                    if k.asset_key.to_user_string() == target)
    assert checks, f"{target} has no asset checks"
    page.goto(f"{base}/assets/{target}?view=checks", wait_until="domcontentloaded")
    page.get_by_text(checks[0], exact=True).first.click()
    page.get_by_text("Evaluation result").wait_for()
    page.get_by_text("Passed").first.wait_for()
    page.screenshot(path=str(shots / "04_check_result.png"), full_page=True)

    # 4. plant a bad row in stored traces; re-run its checks from the page (checks only); see the failure counted
    import polars as pl

    path = dagster_server["data_root"] / "traces.parquet"
    good = pl.read_parquet(path)
    pl.concat([good, good.head(1)]).write_parquet(path)  # duplicate id
    page.goto(f"{base}/assets/traces?view=checks", wait_until="domcontentloaded")
    known = {r["runId"] for r in _runs(base)}
    page.get_by_role("button", name="Execute all").click()
    run = _wait_new_run(base, known)
    assert not run["assetSelection"], "re-checking must not re-materialize"
    assert "traces_unique_ids" in {c["name"] for c in run["assetCheckSelection"]}
    _wait_run_done(base, run["runId"])
    page.reload(wait_until="domcontentloaded")
    page.get_by_text("traces_unique_ids", exact=True).first.click()
    page.get_by_text("Evaluation result").wait_for()
    page.get_by_text("Failed").first.wait_for()
    page.get_by_text("failing_rows", exact=True).first.wait_for()
    page.screenshot(path=str(shots / "05_failed_check.png"), full_page=True)
    latest = _graphql(
        base,
        """{ assetNodeOrError(assetKey: {path: ["traces"]}) { ... on AssetNode { assetChecksOrError {
             ... on AssetChecks { checks { name executionForLatestMaterialization { status
               evaluation { metadataEntries { label ... on IntMetadataEntry { intValue } } } } } } } } } }""",
    )
    checks_now = {c["name"]: c for c in latest["assetNodeOrError"]["assetChecksOrError"]["checks"]}
    uid = checks_now["traces_unique_ids"]["executionForLatestMaterialization"]
    assert uid["status"] == "FAILED"  # a checks-only run executes locally, never through sbatch
    meta = {m["label"]: m.get("intValue") for m in uid["evaluation"]["metadataEntries"]}
    assert meta["failing_rows"] == 2


def test_ui_leaderboard_tradeoff_plot(dagster_server, page):
    """The leaderboard's trade-off plot opens on its asset page: a sweep registered and ranked (per-point
    eval_scores tables written as the point runs leave them) in the server's instance, then the page shows the PNG."""
    import dagster as dg
    import polars as pl
    import yaml

    from cb_assets.definitions import defs
    from cb_core.evaluate.scores import SCORES_SCHEMA

    base, shots, data = dagster_server["base"], _artifacts(), dagster_server["data_root"]
    home = data.parent / "dagster_home"
    manifest = data.parent / "ui_sweep.yaml"
    manifest.write_text(yaml.safe_dump({"name": "ui", "preset": "stage1", "grid": {"alpha": [5, 10, 15]}}))
    old = {k: os.environ.get(k) for k in ("CB_DATA_ROOT", "DAGSTER_HOME")}
    os.environ.update(CB_DATA_ROOT=str(data), DAGSTER_HOME=str(home))
    try:
        inst = dg.DagsterInstance.from_config(str(home))
        res = defs.resolve_job_def("sweep").execute_in_process(
            instance=inst, run_config={"ops": {"sweep_points": {"config": {"manifest": str(manifest)}}}})
        keys = res.output_for_node("sweep_points")["key"].to_list()
        for i, key in enumerate(keys):
            rows = [{"model": m, "metric": metric, "n": 20, "value": v, "ci_low": None, "ci_high": None}
                    for m, vals in (("base", (0.5, 0.9, 0.1)), ("adapter", (0.1 + 0.1 * i, 0.8 + 0.05 * i, 0.1)))
                    for metric, v in zip(("tool_flip_asr", "capability_retention", "xstest_over_refusal"), vals)]
            (data / "sweeps" / key).mkdir(parents=True, exist_ok=True)
            pl.DataFrame(rows, schema=SCORES_SCHEMA).write_parquet(data / "sweeps" / key / "eval_scores.parquet")
        assert defs.resolve_job_def("sweep_rank").execute_in_process(instance=inst).success
        inst.dispose()
    finally:
        for k, v in old.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    page.goto(f"{base}/assets/leaderboard", wait_until="domcontentloaded")
    # the asset page's metadata table: Markdown values open in one click ("[Show Markdown]")
    row = page.locator("tr", has=page.get_by_text("tradeoff_plot", exact=True)).first
    row.get_by_text("[Show Markdown]").click()
    img = page.locator('img[alt="ASR vs capability"]').first
    img.wait_for(state="visible")
    assert img.get_attribute("src").startswith("data:image/png;base64,")
    assert img.evaluate("e => e.naturalWidth") > 100
    page.screenshot(path=str(shots / "06_leaderboard_plot.png"), full_page=True)
