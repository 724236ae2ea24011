"""`tiny_agent_model`: the small tool-calling Llama the project fine-tunes itself (CPU demo/test model)."""

import dagster as dg
import polars as pl

from cb_assets.tags import cpu_tags


@dg.asset(
    group_name="models",
    kinds={"pytorch"},
    tags=cpu_tags(),
    description="Tiny agent (configs/models/tiny_agent.yaml): a small Llama with the real Llama-3 tokenizer, "
    "full-parameter SFT on assistant turns of demo traces drawn with seeds other than the pipeline's, so it "
    "writes Llama-3.1 tool calls and follows some injections. Built once, cached by config + data digest; "
    "figures are measured on the pipeline's own demo skeletons (held out).",
)
def tiny_agent_model(context: dg.AssetExecutionContext) -> pl.DataFrame:
    from cb_core.generate import tiny_agent as ta

    path = ta.tiny_agent_dir(log=context.log.info)
    info = ta.build_info(path)
    fig = info["figures"]
    context.add_output_metadata({
        "path": dg.MetadataValue.path(str(path)),
        "cache_key": info["key"],
        "data_digest": info["data_digest"],
        "size_mb": round(info["size_bytes"] / 2**20, 1),
        "n_params": info["n_params"],
        "n_params_non_embedding": info["n_params_non_embedding"],
        "steps": info["steps"],
        "corpus_examples": info["corpus_examples"],
        "build_s": info["build_s"],
        "parse_rate": fig["parse_rate"],
        "attacker_call_rate": fig["attacker_call_rate"],
        "policy_agreement": fig["policy_agreement"],
        "figures": dg.MetadataValue.json(fig),
        "config": dg.MetadataValue.json(info["config"]),
    })
    return pl.DataFrame([{
        "path": str(path), "cache_key": info["key"], "data_digest": info["data_digest"],
        "size_bytes": info["size_bytes"], "steps": info["steps"], "parse_rate": fig["parse_rate"],
        "attacker_call_rate": fig["attacker_call_rate"],
    }])
