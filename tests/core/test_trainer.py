"""The trainer on a real tiny LlamaForCausalLM (random weights) with synthetic renders/lossmasks frames:
LoRA-only gradients, the hidden-state convention and the cut forward, a 30-step run that learns, real
gradient accumulation, NaN stops, checkpoint ranking, exact resume after SIGKILL and 2-process DDP (gloo)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest
import torch

from cb_core.train.config import from_dict
from cb_core.train.data import BalancedSampler, build_train_data, collate
from cb_core.train.trainer import NonFiniteLoss, Trainer, forward_hidden, llama_parts

torch.set_num_threads(1)  # tiny matmuls on a shared 2-core machine: threads only contend
PROJECT_ROOT = Path(__file__).resolve().parents[2]


def synthetic_frames(n: int = 16, T: int = 16, seed: int = 0) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame]:
    """(train_split, renders, lossmasks): harmful rows draw tokens from one id range, retain rows from another;
    the mask is the second half (the 'assistant turn'); lossmasks also hold a `full_sequence` row per trace."""
    g = torch.Generator().manual_seed(seed)
    rows, rend, lm = [], [], []
    for i in range(n):
        harm = i % 2 == 0
        lo, hi = (1000, 3000) if harm else (5000, 9000)
        ids = torch.randint(lo, hi, (T,), generator=g).tolist()
        tid = f"t{i:03d}"
        pc = "harmful_flip" if harm else ("benign_twin" if i % 4 == 1 else "tool_capability")
        spans = [{"token_start": T // 2, "token_end": T, "weight": 1.0}]
        rows.append({"id": tid, "category": "harmful" if harm else "retain", "priority_class": pc,
                     "policy": "assistant_only", "mask_spans": spans, "sample_weight": 1.0})
        rend.append({"trace_id": tid, "input_ids": ids})
        lm.append({"trace_id": tid, "policy": "full_sequence",
                   "mask_spans": [{"token_start": 0, "token_end": T, "weight": 1.0}]})
    return pl.DataFrame(rows), pl.DataFrame(rend), pl.DataFrame(lm)


def tiny_cfg(**over):
    raw = {
        "loss": {"target_layers": [2, 4], "gamma_kl": 0.5},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "layers_to_transform": [0, 1, 2, 3]},
        "train": {"steps": 30, "batch_size": 4, "lr": 3e-3, "warmup_steps": 2, "checkpoint_every": 100, "seed": 0},
        "data": {"mwcs_schedule": None},
        "log": {"every": 10, "wandb": False, "post_checks": False},
    }
    for k, v in over.items():
        sec, f = k.split(".")
        raw.setdefault(sec, {})[f] = v
    return from_dict(raw)


@pytest.fixture(scope="module")
def frames():
    return synthetic_frames()


@pytest.fixture(scope="module")
def data(frames):
    ts, rd, lm = frames
    return build_train_data(ts, rd, lm, max_length=64, override_policies={"full_sequence"})


def fresh_model(tok, **over):
    from cb_core.model import tiny_llama

    return tiny_llama(tok, seed=0, **over)


def lora_weights(trainer) -> dict[str, torch.Tensor]:
    return trainer.lora_state()


# ------------------------------------------------------------------------------------------ data
def test_dense_masks_overrides_and_multipliers(data):
    b = collate(data, [0, 1], pad_id=0)
    assert b["w"].shape == (2, 16) and b["w"][:, :8].sum() == 0 and torch.all(b["w"][:, 8:] == 1.0)
    b = collate(data, [0, 1], pad_id=0, multipliers={"harmful_flip": 2.0}, lmp_overrides={"benign_twin": "full_sequence"})
    assert torch.all(b["w"][0, 8:] == 2.0) and b["w"][0, :8].sum() == 0  # harmful_flip x2, own mask
    assert torch.all(b["w"][1] == 1.0) and int(b["n_overridden"]) == 1  # benign_twin: full_sequence mask


@pytest.mark.parametrize("how", ["sample_weight", "mask_weight"])
def test_a_class_with_zero_loss_weight_everywhere_is_an_error(frames, how):
    """All harmful samples at weight 0 (e.g. `harmful_flip: 0.0` in the MWCS class weights) trained silently
    with loss_rr 0 at every step; it is an error naming the classes and where to give them a weight."""
    ts, rd, _ = frames
    harmful = pl.col("category") == "harmful"
    if how == "sample_weight":
        ts = ts.with_columns(pl.when(harmful).then(0.0).otherwise(pl.col("sample_weight")).alias("sample_weight"))
    else:
        zero = pl.lit([{"token_start": 8, "token_end": 16, "weight": 0.0}])
        ts = ts.with_columns(pl.when(harmful).then(zero).otherwise(pl.col("mask_spans")).alias("mask_spans"))
    with pytest.raises(ValueError, match=r"all 8 harmful sample\(s\) have zero loss weight.*\['harmful_flip'\]"
                                         r".*class_weights"):
        build_train_data(ts, rd, max_length=64)
    # one live harmful sample is enough
    live = ts.with_columns(pl.when(pl.col("id") == "t000").then(1.0).otherwise(pl.col("sample_weight"))
                           .alias("sample_weight"))
    if how == "sample_weight":
        assert len(build_train_data(live, rd, max_length=64).harmful) == 8


def test_probe_over_no_masked_token_is_not_measured(llama_tokenizer, data):
    import copy

    d = copy.deepcopy(data)
    for i in d.retain:  # no retain token left to probe (the trainer itself would refuse such data)
        d.samples[i].spans = [(0, 1, 0.0)]
    tr = Trainer(tiny_cfg(), fresh_model(llama_tokenizer), d, "/nonexistent", pad_id=0)
    p = tr.probe()
    assert p["retain_cos_sim"] is None and p["kl_benign"] is None and p["retain_tokens"] == 0
    assert isinstance(p["harmful_cos_sim"], float) and p["harmful_tokens"] > 0


def test_window_keeps_the_mask_and_sampler_drops_nothing(frames):
    ts, rd, _ = frames
    d = build_train_data(ts, rd, max_length=6)
    s = d.samples[0]
    assert len(s.input_ids) == 6 and s.spans == [(0, 6, 1.0)]  # the window ends where the mask ends
    assert s.input_ids == rd["input_ids"][0].to_list()[10:16]
    smp = BalancedSampler(list(range(5)), list(range(5, 8)), seed=3)
    seen_h = smp.take("harmful", 5)
    assert sorted(seen_h) == list(range(5))  # one epoch = every harmful sample once
    state = smp.state_dict()
    a = smp.take("harmful", 7)
    smp2 = BalancedSampler(list(range(5)), list(range(5, 8)), seed=3)
    smp2.load_state_dict(state)
    assert smp2.take("harmful", 7) == a  # the state is all a resume needs


# ---------------------------------------------------------------------------------- model plumbing
def test_hidden_state_convention_and_cut_forward(llama_tokenizer, tiny_model):
    ids = torch.randint(1000, 9000, (2, 12))
    att = torch.ones_like(ids)
    with torch.no_grad():
        ref = tiny_model.model(input_ids=ids, attention_mask=att, output_hidden_states=True).hidden_states
        calls = {"layer3": 0, "lm_head": 0}
        h3 = tiny_model.model.layers[3].register_forward_hook(lambda *a: calls.__setitem__("layer3", calls["layer3"] + 1))
        hl = tiny_model.lm_head.register_forward_hook(lambda *a: calls.__setitem__("lm_head", calls["lm_head"] + 1))
        try:
            reps, fin = forward_hidden(tiny_model, ids, att, [0, 1, 3], need_final=False)
        finally:
            h3.remove(), hl.remove()
    for i, l in enumerate([0, 1, 3]):  # hidden_states[l]: 0 = embeddings, l = output of decoder layer l - 1
        assert torch.allclose(reps[i], ref[l], atol=1e-6)
    assert fin is None and calls == {"layer3": 0, "lm_head": 0}  # layers past the deepest target never ran
    assert len(tiny_model.model.layers) == 4  # restored


def test_gradients_reach_only_lora_parameters(llama_tokenizer, data):
    cfg = tiny_cfg(**{"lora.layers_to_transform": [0, 1]})
    tr = Trainer(cfg, fresh_model(llama_tokenizer), data, "/nonexistent", pad_id=0)
    micro = tr.step_batches(0)
    n = tr.step_counts(micro)
    tr.init_scale(micro)
    loss, terms, _ = tr.micro_loss(*micro[0], n, 1.0, 1.0)
    loss.backward()
    with_grad = {k for k, p in tr.model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert with_grad and all("lora_" in k for k in with_grad)
    assert all(".layers.0." in k or ".layers.1." in k for k in with_grad)  # layers_to_transform
    assert any("lora_B" in k for k in with_grad)
    frozen = [k for k, p in tr.model.named_parameters() if "lora_" not in k]
    assert all(dict(tr.model.named_parameters())[k].grad is None for k in frozen)
    # the base pass really is the base: adapter disabled gives the original model's states
    _, lm_head = llama_parts(tr.model)
    assert not any(p.requires_grad for p in lm_head.parameters())


def test_lora_wrap_and_adapter_load_leave_out_the_deprecation_noise_only(llama_tokenizer, tmp_path):
    """peft reads transformers' deprecated ``is_gradient_checkpointing`` on every wrap; training and eval logs
    stay free of that FutureWarning; any other warning inside a wrap and that one outside it still show, and
    the filters are put back."""
    import warnings

    from cb_core.evaluate.models import load_adapter_model
    from cb_core.model import peft_wrap_quiet
    from cb_core.train.trainer import add_lora

    before = list(warnings.filters)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        model = add_lora(fresh_model(llama_tokenizer), tiny_cfg())
        model.save_pretrained(str(tmp_path / "adapter"))
        load_adapter_model(fresh_model(llama_tokenizer), tmp_path / "adapter")
        warnings.warn("`is_gradient_checkpointing` is deprecated: outside a wrap it still shows", FutureWarning)
        with peft_wrap_quiet():
            warnings.warn("another deprecation inside a wrap still shows", FutureWarning)
    texts = [str(w.message) for w in seen]
    assert "another deprecation inside a wrap still shows" in texts
    assert [t for t in texts if "is_gradient_checkpointing" in t] == [
        "`is_gradient_checkpointing` is deprecated: outside a wrap it still shows"]
    assert warnings.filters == before


def test_thirty_steps_lower_the_objective_and_the_harmful_cos_sim(llama_tokenizer, data, tmp_path):
    tr = Trainer(tiny_cfg(), fresh_model(llama_tokenizer), data, tmp_path, pad_id=0, log=lambda m: None)
    start = tr.probe()
    hist = tr.fit()
    end = tr.probe()
    first = sum(h["train/loss"] for h in hist[:3]) / 3
    last = sum(h["train/loss"] for h in hist[-5:]) / 5
    assert len(hist) == 30 and last < 0.5 * first, (first, last)
    assert start["harmful_cos_sim"] == pytest.approx(1.0, abs=1e-5)  # LoRA B = 0 at start: adapter == base
    assert end["harmful_cos_sim"] < 0.8 and end["retain_cos_sim"] > end["harmful_cos_sim"]
    assert hist[-1]["rr/cos_sim_mean"] < hist[0]["rr/cos_sim_mean"]
    assert tr.scale["margin_harmful"] == pytest.approx(0.5 * tr.scale["d_harmful_to_mu"])


def test_accumulation_equals_one_big_batch(llama_tokenizer, data, tmp_path):
    """k = 2 micro-batches of 2 (one optimizer step each time) == one batch of 4, for 3 steps, with KL on."""
    out = {}
    for name, (bs, k) in {"big": (4, 1), "accum": (2, 2)}.items():
        cfg = tiny_cfg(**{"train.steps": 3, "train.batch_size": bs, "train.grad_accum": k})
        tr = Trainer(cfg, fresh_model(llama_tokenizer), data, tmp_path / name, pad_id=0, log=lambda m: None)
        tr.fit()
        out[name] = (lora_weights(tr), tr.history)
    for key, w in out["big"][0].items():
        # float32 sums in another order (2 micro-batches vs 1): equal to ~1e-6 of the weights, not bit-exact
        assert torch.allclose(w, out["accum"][0][key], rtol=1e-4, atol=1e-5), (key, (w - out["accum"][0][key]).abs().max())
    assert out["big"][1][-1]["train/loss"] == pytest.approx(out["accum"][1][-1]["train/loss"], rel=1e-4)
    assert any(w.abs().sum() > 0 for k, w in out["big"][0].items() if "lora_B" in k)  # it did train


def test_non_finite_loss_stops_naming_step_and_term(llama_tokenizer, frames, tmp_path):
    ts, rd, _ = frames
    ts = ts.with_columns(pl.when(pl.col("category") == "harmful").then(float("nan")).otherwise(1.0).alias("sample_weight"))
    d = build_train_data(ts, rd, max_length=64)
    cfg = tiny_cfg(**{"loss.margin_scale": None})
    tr = Trainer(cfg, fresh_model(llama_tokenizer), d, tmp_path, pad_id=0, log=lambda m: None)
    with pytest.raises(NonFiniteLoss, match=r"step 0: term loss_rr is nan"):
        tr.fit()


def test_checkpoints_ranked_with_links_and_in_process_resume(llama_tokenizer, data, tmp_path):
    cfg = tiny_cfg(**{"train.steps": 6, "train.checkpoint_every": 2, "train.keep_checkpoints": 2})
    a = Trainer(cfg, fresh_model(llama_tokenizer), data, tmp_path / "a", pad_id=0, log=lambda m: None)
    a.fit()
    index = json.loads((tmp_path / "a" / "checkpoints" / "index.json").read_text())
    ranked = sorted(index, key=lambda e: e["metric"])
    assert (tmp_path / "a" / "best").resolve().name == ranked[0]["path"]
    assert (tmp_path / "a" / "second_best").resolve().name == ranked[1]["path"]
    assert len(index) <= 3 and any(e["step"] == 6 for e in index)  # best 2 + the latest
    for p in (tmp_path / "a" / "checkpoints").glob("step_*"):
        assert (p / "adapter_model.safetensors").is_file()
    # resume from step 4 in a fresh trainer == the uninterrupted run
    b_dir = tmp_path / "b"
    cfg4 = tiny_cfg(**{"train.steps": 6, "train.checkpoint_every": 2})
    b = Trainer(cfg4, fresh_model(llama_tokenizer), data, b_dir, pad_id=0, log=lambda m: None)
    b.cfg.train.steps = 4
    b.fit()
    c = Trainer(tiny_cfg(**{"train.steps": 6, "train.checkpoint_every": 2}), fresh_model(llama_tokenizer), data, b_dir,
                pad_id=0, log=lambda m: None)
    c.fit()
    assert c.history[0]["step"] == 1 and len(c.history) == 6
    # timings count the restored steps as an earlier process's: train_seconds adds their step time, the ETA
    # divides by this process's steps only
    assert c.resumed_step == 4
    assert c.seconds_restored() > 0
    assert c.seconds_restored() == pytest.approx(sum(h["step_time_s"] for h in c.history[:4]))
    c.step = 5
    assert c.eta(2.0) == pytest.approx(2.0 / 1 * 1)  # 1 step here in 2 s, 1 step left (per history step: 0.4 s)
    wa, wc = lora_weights(a), lora_weights(c)
    assert all(torch.equal(wa[k], wc[k]) for k in wa)


# ----------------------------------------------------------------------------- subprocess workers
def write_root(root: Path) -> Path:
    ts, rd, lm = synthetic_frames()
    root.mkdir(parents=True, exist_ok=True)
    ts.write_parquet(root / "train_split.parquet")
    rd.write_parquet(root / "renders.parquet")
    lm.write_parquet(root / "lossmasks.parquet")
    return root


WORKER_OVERRIDES = [
    "model.profile=tiny", "model.max_length=64", "loss.target_layers=[2,4]", "lora.dropout=0.0",
    "lora.layers_to_transform=[0,1,2,3]", "lora.r=4", "data.mwcs_schedule=null", "log.wandb=false",
    "log.post_checks=false", "train.lr=3e-3", "train.warmup_steps=2",
]


def worker_env() -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS="1", CB_TORCH_THREADS="1", PYTHONHASHSEED="0")
    env["PYTHONPATH"] = str(PROJECT_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def test_worker_setting_error_is_one_line(tmp_path):
    """A wrong preset or override by hand: one line and exit 2, as `cb run` says it (it was a traceback)."""
    for args in (["--preset", "tny"], ["--preset", "tiny", "--override", "train.lrr=1"]):
        out = subprocess.run([sys.executable, "-m", "cb_core.train.worker", *args, "--run-dir", str(tmp_path / "r")],
                             capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-1500:]
        assert out.stderr.startswith("cb_core.train.worker: ")
    assert "known: [" in subprocess.run(
        [sys.executable, "-m", "cb_core.train.worker", "--preset", "tny", "--run-dir", str(tmp_path / "r")],
        capture_output=True, text=True, timeout=300).stderr


def worker_cmd(run_dir: Path, root: Path, extra: list[str], nproc: int = 1) -> list[str]:
    args = ["--preset", "tiny", "--run-dir", str(run_dir), "--data-root", str(root)]
    keys = {o.split("=", 1)[0] for o in extra}  # an extra override replaces the default one (a key given twice
    for o in [o for o in WORKER_OVERRIDES if o.split("=", 1)[0] not in keys] + extra:  # with 2 values is refused)
        args += ["--override", o]
    if nproc > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                "-m", "cb_core.train.worker", *args]
    return [sys.executable, "-m", "cb_core.train.worker", *args]


def adapter_tensors(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


@pytest.mark.slow
def test_resume_after_sigkill_equals_uninterrupted_run(tmp_path):
    root = write_root(tmp_path / "root")
    extra = ["train.steps=10", "train.checkpoint_every=3", "train.throttle_s=0.4"]
    env = worker_env()
    ref = tmp_path / "ref"
    subprocess.run(worker_cmd(ref, root, extra), env=env, check=True, capture_output=True, timeout=600)
    run = tmp_path / "killed"
    proc = subprocess.Popen(worker_cmd(run, root, extra), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    target = run / "checkpoints" / "step_000003" / "trainer_state.pt"
    deadline = time.time() + 300
    while not target.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(60) == -signal.SIGKILL  # it really was killed mid-run
    assert not (run / "adapter").exists()
    out = subprocess.run(worker_cmd(run, root, extra), env=env, check=True, capture_output=True, text=True, timeout=600)
    assert "resumed from step_00000" in out.stdout
    a, b = adapter_tensors(ref), adapter_tensors(run)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    hist_a = pl.read_parquet(ref / "history.parquet")
    hist_b = pl.read_parquet(run / "history.parquet")
    assert hist_a["train/loss"].to_list() == hist_b["train/loss"].to_list() and hist_a.height == 10
    for name in ("preset.yaml", "overrides.yaml", "config.yaml", "run_metadata.json", "console.log", "curves.png"):
        assert (run / name).is_file(), name
    meta = json.loads((run / "run_metadata.json").read_text())
    assert meta["PYTHONHASHSEED"] == "0" and meta["packages"]["torch"] and "cb_core.train.worker" in meta["command"]


@pytest.mark.slow
def test_a_run_folder_resumes_only_its_own_run(tmp_path):
    """Checkpoints written under other settings or other input tables are never resumed (that published the
    old weights under the new settings); logging and checkpoint cadence may change."""
    root = write_root(tmp_path / "root")
    env, run = worker_env(), tmp_path / "run"
    base = ["train.steps=2", "train.checkpoint_every=1"]
    subprocess.run(worker_cmd(run, root, base), env=env, check=True, capture_output=True, timeout=600)
    weights = (run / "adapter" / "adapter_model.safetensors").read_bytes()
    r = subprocess.run(worker_cmd(run, root, base + ["train.lr=0.5"]), env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 2 and "holds checkpoints of another run" in r.stderr
    assert "train.lr: 0.003 -> 0.5" in r.stderr and "Traceback" not in r.stderr
    assert (run / "adapter" / "adapter_model.safetensors").read_bytes() == weights  # nothing overwritten
    assert "0.003" in (run / "config.yaml").read_text()
    # another train_split: named, refused
    ts = pl.read_parquet(root / "train_split.parquet")
    ts.head(ts.height - 1).write_parquet(root / "train_split.parquet")
    r = subprocess.run(worker_cmd(run, root, base), env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode != 0 and "table:train_split" in r.stderr
    ts.write_parquet(root / "train_split.parquet")  # the same bytes again: the same run, which resumes
    out = subprocess.run(worker_cmd(run, root, base + ["log.every=2", "train.keep_checkpoints=1"]), env=env,
                         check=True, capture_output=True, text=True, timeout=600)
    assert "resumed from step_000002" in out.stdout
    # the headline rate is all tokens over all step time, and a warm-up longer than the run is said
    hist = pl.read_parquet(run / "history.parquet")
    final = json.loads((run / "final_metrics.json").read_text())
    assert final["tokens_per_s"] == pytest.approx(
        (hist["tokens_per_s"] * hist["step_time_s"]).sum() / hist["step_time_s"].sum())
    assert final["train_seconds"] >= hist["step_time_s"].sum()  # resumed at the end: not only the resume's time
    assert "warning: train.warmup_steps" not in out.stdout
    out = subprocess.run(worker_cmd(tmp_path / "warm", root, base + ["train.warmup_steps=5"]), env=env, check=True,
                         capture_output=True, text=True, timeout=600)
    assert "warning: train.warmup_steps=5 > 2 steps: the learning rate never reaches train.lr=0.003" in out.stdout
    # a swept mask policy the lossmasks table lacks for some samples: said in the log, not only in the stats
    out = subprocess.run(worker_cmd(tmp_path / "pol", root, base + ["data.mask_policy=assistant_only"]), env=env,
                         check=True, capture_output=True, text=True, timeout=600)
    assert "warning: data.mask_policy='assistant_only' has no mask for 16 of 16 sample(s)" in out.stdout
    # --fresh starts over where the settings changed
    out = subprocess.run(worker_cmd(run, root, base + ["train.lr=0.5"]) + ["--fresh"], env=env, check=True,
                         capture_output=True, text=True, timeout=600)
    assert "resumed" not in out.stdout and "0.5" in (run / "config.yaml").read_text()


@pytest.mark.slow
def test_two_process_ddp_equals_one_process_with_doubled_batch(tmp_path):
    root = write_root(tmp_path / "root")
    env = worker_env()
    common = ["train.steps=3", "train.checkpoint_every=100"]
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run(worker_cmd(one, root, common + ["train.batch_size=8"]), env=env, check=True, capture_output=True,
                   timeout=600)
    r = subprocess.run(worker_cmd(two, root, common + ["train.batch_size=4"], nproc=2), env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((two / "final_metrics.json").read_text())["world_size"] == 2
    a, b = adapter_tensors(one), adapter_tensors(two)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=5e-5), (k, (a[k] - b[k]).abs().max())  # Adam amplifies float noise
    assert max(float(a[k].abs().max()) for k in a if "lora_B" in k) > 1e-3  # moved far beyond the tolerance
    la = pl.read_parquet(one / "history.parquet")["train/loss"].to_list()
    lb = pl.read_parquet(two / "history.parquet")["train/loss"].to_list()
    assert la == pytest.approx(lb, rel=1e-4)  # global token normalisation: the same objective


def test_mwcs_weights_and_lmp_overrides_apply_per_step(llama_tokenizer, data):
    from cb_core.mixture import MixtureSchedule

    sched = MixtureSchedule.from_dict({
        "class_weights": {"harmful_flip": 1.0},
        "curriculum": {"type": "step", "phases": [
            {"name": "warm", "start_step": 0, "end_step": 2, "class_weights": {"harmful_flip": 3.0},
             "lmp_overrides": {"harmful_flip": "full_sequence"}}]},
    })
    tr = Trainer(tiny_cfg(), fresh_model(llama_tokenizer), data, "/nonexistent", pad_id=0, schedule=sched)
    (hb, bb), = tr.step_batches(0)
    assert torch.all(hb["w"] == 3.0)  # phase weight 3 / base 1, over the whole sequence (override)
    assert torch.all(bb["w"][:, :8] == 0)  # retain classes keep their own mask
    (hb, _), = tr.step_batches(5)
    # after the phase: its end weight holds (MixtureSchedule "step" semantics), the override has ended
    assert torch.all(hb["w"][:, 8:] == sched.class_weight("harmful_flip", 5)) and torch.all(hb["w"][:, :8] == 0)
