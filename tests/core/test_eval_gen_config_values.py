"""configs/evaluation.yaml and configs/generation.yaml are checked when loaded: a bad value, an unknown key or a
bad CB_EVAL_LIMIT / CB_GEN_* variable is a ConfigError naming the file actually read (CB_CONFIG_DIR) and the
key, or the variable; the shipped files (and the sweep manifests' eval sections) load."""
from __future__ import annotations

import shutil

import pytest

from cb_core.config import PROJECT_ROOT, ConfigError, display_path, load_yaml
from cb_core.evaluate.pipeline import EVAL_RULES, EvaluationSettings
from cb_core.evaluate.scores import GateConfig
from cb_core.generate.completions import GenerationConfig

ENV_VARS = ("CB_EVAL_LIMIT", "CB_GEN_MODE", "CB_GEN_LIMIT", "CB_GEN_BACKEND")


@pytest.fixture
def cfg_dir(tmp_path, monkeypatch):
    """A copy of configs/ in use through CB_CONFIG_DIR, with none of the CB_* overrides set."""
    d = tmp_path / "configs"
    shutil.copytree(PROJECT_ROOT / "configs", d)
    monkeypatch.setenv("CB_CONFIG_DIR", str(d))
    for var in ENV_VARS:
        monkeypatch.delenv(var, raising=False)
    return d


def _edit(cfg_dir, file: str, old: str, new: str) -> str:
    p = cfg_dir / file
    text = p.read_text()
    assert old in text, old
    p.write_text(text.replace(old, new, 1))
    return display_path(p)


def _set_section(cfg_dir, file: str, section: str, value: str) -> str:
    """Replace the top-level ``section:`` block (its header and indented lines) by ``section: value``."""
    p = cfg_dir / file
    out, skipping = [], False
    for line in p.read_text().splitlines(keepends=True):
        if line.startswith(f"{section}:"):
            out.append(f"{section}: {value}\n")
            skipping = True
        elif skipping and (line.startswith(" ") or not line.strip()):
            continue
        else:
            skipping = False
            out.append(line)
    p.write_text("".join(out))
    return display_path(p)


def _load_eval(env=None) -> EvaluationSettings:
    return EvaluationSettings.from_dict(load_yaml("evaluation.yaml"), env=env or {})


# ------------------------------------------------------------------------------------------ shipped files
def test_shipped_files_load(monkeypatch):
    for var in ENV_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.delenv("CB_CONFIG_DIR", raising=False)
    s = _load_eval()
    assert (s.eval.limit, s.eval.max_tokens, s.live_agentdojo, s.live_suites) == (None, 96, False, ("banking",))
    assert s.gates == GateConfig()
    assert EvaluationSettings.load() == s
    assert GateConfig.from_dict(load_yaml("evaluation.yaml")["gates"]) == GateConfig()
    g = GenerationConfig.load()
    assert (g.mode, g.batch_size, g.limit, g.llm_judge.enabled) == ("both", 8, None, False)
    d = GenerationConfig.load(demo=True)
    assert (d.limit, d.n, d.random_weights) == (24, 2, "skip")
    e = GenerationConfig.load(env={"CB_GEN_MODE": "ds", "CB_GEN_LIMIT": "5", "CB_GEN_BACKEND": "transformers"},
                              temperature={"ds_completions": 1.0}, model={"dr_completions": "tiny"})
    assert (e.mode, e.limit, e.temperature["ds_completions"], e.model["dr_completions"]) == ("ds", 5, 1.0, "tiny")
    assert _load_eval(env={"CB_EVAL_LIMIT": "3"}).eval.limit == 3


@pytest.mark.parametrize("sweep", sorted((PROJECT_ROOT / "configs" / "sweeps").glob("*.yaml")), ids=lambda p: p.stem)
def test_sweep_eval_sections_pass_the_eval_rules(sweep):
    for k, v in (load_yaml(sweep).get("eval") or {}).items():
        EVAL_RULES[k](v, f"{sweep.name}: eval.{k}")


# ------------------------------------------------------------------------------------------ evaluation.yaml
EVAL_BAD = [
    # flags: a quoted 'false' / 'no' is a text (truthy), not a boolean
    ("enabled: false", "enabled: 'false'", "live_agentdojo.enabled"),
    ("enabled: false", "enabled: 'no'", "live_agentdojo.enabled"),
    ("forced_call: true", "forced_call: 'no'", "eval.forced_call"),
    ("enforce_eager: false", "enforce_eager: 0", "eval.enforce_eager"),
    # lists: one text is not a list of suites
    ("suites: [banking]", "suites: banking", "live_agentdojo.suites"),
    # unknown keys and sections (typos would leave the default in force)
    ("max_iters: 4", "max_iter: 4", "max_iter"),
    ("representation_limit: 16", "representation_limt: 4", "representation_limt"),
    ("live_agentdojo:", "nosuch_section: {a: 1}\nlive_agentdojo:", "nosuch_section"),
    ("  seed: 0\n", "  sead: 0\n", "sead"),
    ("min_capability_ratio: 0.85", "min_capability_rato: 0.85", "min_capability_rato"),
    # eval.* types and ranges
    ("limit: null ", "limit: '16'", "eval.limit"),
    ("limit: null ", "limit: 0", "eval.limit"),
    ("temperature: 0.0", "temperature: '0.5'", "eval.temperature"),
    ("temperature: 0.0", "temperature: -1", "eval.temperature"),
    ("batch_size: 8", "batch_size: abc", "eval.batch_size"),
    ("batch_size: 8", "batch_size: true", "eval.batch_size"),
    ("max_tokens: 96", "max_tokens: -5", "eval.max_tokens"),
    ("gpu_memory_utilization: 0.4", "gpu_memory_utilization: 7", "eval.gpu_memory_utilization"),
    ("tensor_parallel_size: 1", "tensor_parallel_size: 0", "eval.tensor_parallel_size"),
    ("backend: transformers", "backend: tgi", "eval.backend"),
    ("dtype: auto", "dtype: fp7", "eval.dtype"),
    ("representation_limit: 16", "representation_limit: -2", "representation_limit"),
    ("limit: 2 ", "limit: '2'", "live_agentdojo.limit"),
    ("max_iters: 4", "max_iters: 0", "live_agentdojo.max_iters"),
    # gates: finite numbers in range
    ("min_relative_asr_reduction: 0.5", "min_relative_asr_reduction: .nan", "gates.min_relative_asr_reduction"),
    ("min_capability_ratio: 0.85", "min_capability_ratio: -3", "gates.min_capability_ratio"),
    ("min_output_difference: 0.10", "min_output_difference: 5", "gates.min_output_difference"),
    ("max_over_refusal_increase: 0.05", "max_over_refusal_increase: '0.05'", "gates.max_over_refusal_increase"),
]


@pytest.mark.parametrize("old,new,key", EVAL_BAD, ids=[c[1].splitlines()[0][:40] for c in EVAL_BAD])
def test_evaluation_bad_value_names_file_and_key(cfg_dir, old, new, key):
    shown = _edit(cfg_dir, "evaluation.yaml", old, new)
    with pytest.raises(ConfigError) as e:
        _load_eval()
    msg = str(e.value)
    assert shown in msg and key in msg, msg
    assert msg.startswith(shown)  # the file actually read ($CB_CONFIG_DIR), not a hard-coded configs/...


@pytest.mark.parametrize("section,value", [("gates", "[0.5, 0.85]"), ("live_agentdojo", "true"), ("eval", "'fast'")])
def test_evaluation_section_of_wrong_shape(cfg_dir, section, value):
    shown = _set_section(cfg_dir, "evaluation.yaml", section, value)
    with pytest.raises(ConfigError) as e:
        _load_eval()
    assert shown in str(e.value) and section in str(e.value) and "mapping" in str(e.value), str(e.value)


@pytest.mark.parametrize("value", ["-1", "0", "abc", "2.5"])
def test_bad_cb_eval_limit_names_the_variable(value):
    with pytest.raises(ConfigError, match="CB_EVAL_LIMIT"):
        EvaluationSettings.from_dict({}, env={"CB_EVAL_LIMIT": value})


def test_gates_alone_name_the_file_read(cfg_dir):
    with pytest.raises(ConfigError) as e:
        GateConfig.from_dict({"min_capability_ratio": float("nan")})
    assert display_path(cfg_dir / "evaluation.yaml") in str(e.value) and "gates.min_capability_ratio" in str(e.value)
    with pytest.raises(ConfigError, match="gates"):
        GateConfig.from_dict([0.5])


# ------------------------------------------------------------------------------------------ generation.yaml
GEN_BAD = [
    ("enabled: false", "enabled: 'false'", "llm_judge.enabled"),
    ("enabled: false", "enabld: false", "enabld"),
    ("max_tokens: 4\n", "max_tokens: -4\n", "llm_judge.max_tokens"),
    ("model: null           # profile", "model: nosuch_profile", "llm_judge.model"),
    ("ds_completions: 0.7", "ds_completions: .nan", "temperature.ds_completions"),
    ("ds_completions: 0.7", "ds_completions: hot", "temperature.ds_completions"),
    ("dr_completions: 0.3", "dr_completions: -1", "temperature.dr_completions"),
    ("ds_completions: 0.7", "ds_complet: 0.7", "ds_complet"),
    ("top_p: 1.0", "top_p: 5", "top_p"),
    ("seed: 0 ", "seed: abc", "seed"),
    ("batch_size: 8  ", "batch_size: true", "batch_size"),
    ("batch_size: 8  ", "batch_size: '8'", "batch_size"),
    ("batch_size: 8  ", "batch_size: abc", "batch_size"),
    ("limit: null ", "limit: '5'", "limit"),
    ("limit: null ", "limit: -1", "limit"),
    ("tensor_parallel_size: 1", "tensor_parallel_size: 0", "tensor_parallel_size"),
    ("ds_completions: null", "ds_completions: nosuch_profile", "model.ds_completions"),
    ("mode: both", "mode: all", "mode"),
    ("random_weights: run", "random_weights: maybe", "random_weights"),
    ("attacker_args: all", "attacker_args: some", "attacker_args"),
    ("shard_size: 32", "shard_sise: 32", "shard_sise"),
    ("  limit: 24", "  limit: many", "demo.limit"),
    ("  shard_size: 8", "  shard_sise: 8", "shard_sise"),
]


@pytest.mark.parametrize("old,new,key", GEN_BAD, ids=[c[1].splitlines()[0][:40] for c in GEN_BAD])
def test_generation_bad_value_names_file_and_key(cfg_dir, old, new, key):
    shown = _edit(cfg_dir, "generation.yaml", old, new)
    with pytest.raises(ConfigError) as e:
        GenerationConfig.load(env={})
    msg = str(e.value)
    assert shown in msg and key in msg, msg
    assert msg.startswith(shown)


@pytest.mark.parametrize("section,value", [("llm_judge", "[a]"), ("demo", "[a]"), ("temperature", "0.7"),
                                           ("model", "tiny")])
def test_generation_section_of_wrong_shape(cfg_dir, section, value):
    shown = _set_section(cfg_dir, "generation.yaml", section, value)
    with pytest.raises(ConfigError) as e:
        GenerationConfig.load(env={})
    assert shown in str(e.value) and section in str(e.value) and "mapping" in str(e.value), str(e.value)


@pytest.mark.parametrize("var,value", [
    ("CB_GEN_MODE", "bogus"), ("CB_GEN_LIMIT", "abc"), ("CB_GEN_LIMIT", "-3"), ("CB_GEN_BACKEND", "tgi"),
])
def test_bad_cb_gen_variable_names_the_variable(var, value):
    with pytest.raises(ConfigError, match=var):
        GenerationConfig.load(env={var: value})


@pytest.mark.parametrize("override", [{"mode": "all"}, {"batch_size": 0}, {"top_p": 0.0},
                                      {"temperature": {"ds_completions": -0.5}}, {"model": {"ds_completions": "x"}}])
def test_bad_override_names_the_setting(override):
    key = next(iter(override))
    with pytest.raises(ConfigError, match=key):
        GenerationConfig.load(env={}, **override)
