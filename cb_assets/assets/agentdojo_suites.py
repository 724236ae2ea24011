"""`raw_agentdojo_suites`: real AgentDojo skeletons built offline from the `agentdojo` package's task suites."""

import dagster as dg

from cb_assets.tags import cpu_tags
from cb_assets.validation import validate_or_fail
from cb_core.schemas import QuarantineModel, TraceModel, empty_quarantine, empty_traces
from cb_core.sources import SourceError, SourceResult


class AgentDojoSuitesConfig(dg.Config):
    suites: list[str] = ["workspace", "travel", "banking", "slack"]
    benchmark_version: str = "v1.2.2"
    attack: str = "important_instructions"
    limit: int | None = None  # at most this many cases (all by default: 949 for v1.2.2)


@dg.asset(
    group_name="raw",
    kinds={"polars"},
    tags=cpu_tags("A"),
    description="AgentDojo attacked skeletons from the `agentdojo` package (optional extra): every user task x "
    "injection task, ground truth run in the attack-injected environment up to the first injected tool result; "
    "expected tool from the user task's ground truth, attacker call from the injection task's. dataset "
    "`agentdojo`, labels.subtype = suite, pair_group `agentdojo:<suite>:<user_task_id>`. Empty (with a note) "
    "when the package is not installed.",
)
def raw_agentdojo_suites(context: dg.AssetExecutionContext, config: AgentDojoSuitesConfig) -> SourceResult:
    from cb_core.sources import agentdojo_suites as ads

    try:
        result = ads.read_suites(config.suites, version=config.benchmark_version, attack_name=config.attack,
                                 limit=config.limit)
    except SourceError as err:
        if "not installed" in str(err):
            context.add_output_metadata({"installed": False, "note": str(err), "traces": 0})
            return SourceResult(empty_traces(), empty_quarantine())
        raise dg.Failure(f"raw_agentdojo_suites: {err}") from err
    validate_or_fail(TraceModel, result.good, "raw_agentdojo_suites")
    validate_or_fail(QuarantineModel, result.rejected, "raw_agentdojo_suites quarantine")
    context.add_output_metadata({
        "installed": True,
        "agentdojo_version": ads.package_version() or "",
        "traces": result.good.height,
        "rejected": result.rejected.height,
        **{k: v for k, v in result.meta.items() if isinstance(v, (int, float, str, bool))},
    })
    return result
