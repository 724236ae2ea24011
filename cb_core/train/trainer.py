"""The circuit-breaker training loop: LoRA (peft) on a causal LM, losses from ``cb_core.train.losses``.

Read top to bottom: ``Trainer.fit`` is the loop. Design points (each one a bug of the system this replaces):

* Base representations come from the same model under ``disable_adapter()`` (no second copy in memory).
* Hidden states are read with forward hooks at ``hidden_states[l]`` (0 = embeddings, l = output of decoder
  layer l - 1) and the decoder-layer list is cut to the deepest target layer for every forward that needs no
  logits; the LM head never runs on all positions: KL / CE apply ``lm_head`` to the final hidden states
  gathered at the masked positions only.
* Gradient accumulation is real: k micro-batches, one optimizer step; every term is normalised by the token
  count of the whole step (all k micro-batches on all ranks), so k x size, r ranks x size and one batch of
  k x r x size give the same gradient.
* Data parallelism is PyTorch DDP (``torchrun``; gloo on CPU, NCCL on GPU): ``no_sync`` for the first k - 1
  micro-batches, the loss multiplied by the world size because DDP averages gradients across ranks.
* Exact resume: adapter (safetensors), optimizer, scheduler, RNG states, sampler position, step and the EMA
  centroid are checkpointed; everything is loaded with ``torch.load(weights_only=True)`` / safetensors.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

from cb_core.train import losses as L
from cb_core.train.config import TrainConfig
from cb_core.train.data import BalancedSampler, TrainData, collate

CHECKPOINT_RE = re.compile(r"^step_(\d{6})$")
RANK_LINKS = ("best", "second_best", "third_best")


# ------------------------------------------------------------------------------------------ model parts
def llama_parts(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(LlamaModel backbone, lm_head) of a causal LM, a PeftModel around one included."""
    from peft import PeftModel

    lm = model.get_base_model() if isinstance(model, PeftModel) else model  # never PeftModel.__getattr__
    return lm.model, lm.lm_head


def add_lora(model: nn.Module, cfg: TrainConfig) -> nn.Module:
    """Wrap ``model`` in a peft LoRA on the configured projections of ``layers_to_transform``; only LoRA
    parameters train."""
    from peft import LoraConfig, get_peft_model

    from cb_core.model import peft_wrap_quiet

    lc = cfg.lora
    n_layers = model.config.num_hidden_layers
    layers = lc.layers_to_transform
    if layers is not None:
        layers = [int(x) for x in layers if 0 <= int(x) < n_layers]
        if not layers:
            raise ValueError(f"lora.layers_to_transform {lc.layers_to_transform}: no layer of a {n_layers}-layer model")
    for p in model.parameters():
        p.requires_grad_(False)
    pcfg = LoraConfig(
        r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout, target_modules=list(lc.target_modules),
        layers_to_transform=layers, layers_pattern="layers" if layers is not None else None, bias="none",
    )
    with peft_wrap_quiet():
        peft_model = get_peft_model(model, pcfg)
    if cfg.model.gradient_checkpointing:
        peft_model.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return peft_model


@contextlib.contextmanager
def cut_layers(backbone: nn.Module, n: int):
    """Run only the first ``n`` decoder layers (the rest never execute)."""
    full = backbone.layers
    if n >= len(full):
        yield
        return
    backbone.layers = nn.ModuleList(list(full)[:n])
    try:
        yield
    finally:
        backbone.layers = full


def forward_hidden(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, layers: list[int], need_final: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Representations ``hidden_states[l]`` for l in ``layers`` -> [L, B, T, D], and the final (normed) hidden
    states [B, T, D] when ``need_final`` (else None; the layer list is cut at max(layers))."""
    backbone, _ = llama_parts(model)
    caps: dict[int, torch.Tensor] = {}

    def grab(idx):
        def hook(_m, _i, out):
            caps[idx] = out[0] if isinstance(out, tuple) else out
        return hook

    mods = {0: backbone.embed_tokens, **{l: backbone.layers[l - 1] for l in layers if l >= 1}}
    handles = [mods[l].register_forward_hook(grab(l)) for l in set(layers)]
    try:
        with cut_layers(backbone, len(backbone.layers) if need_final else max(layers)):
            out = backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return torch.stack([caps[l] for l in layers]), (out.last_hidden_state if need_final else None)


class AdapterForward(nn.Module):
    """The adapter's forward for one micro-batch (what DDP wraps): harmful rows cut at the deepest target
    layer, benign rows at full depth only when logits are needed; final states gathered at ``pos``."""

    def __init__(self, peft_model: nn.Module, layers: list[int]):
        super().__init__()
        self.peft = peft_model
        self.layers = list(layers)

    def forward(self, h_ids, h_att, b_ids, b_att, pos_b=None, pos_t=None):
        h_reps, _ = forward_hidden(self.peft, h_ids, h_att, self.layers, need_final=False)
        need = pos_b is not None
        b_reps, fin = forward_hidden(self.peft, b_ids, b_att, self.layers, need_final=need)
        return h_reps, b_reps, (fin[pos_b, pos_t] if need else None)


# ---------------------------------------------------------------------------------------- distributed
@dataclass
class Dist:
    rank: int = 0
    world: int = 1

    @property
    def on(self) -> bool:
        return self.world > 1

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        if self.on:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def barrier(self) -> None:
        if self.on:
            dist.barrier()


def init_distributed() -> Dist:
    """torchrun sets WORLD_SIZE/RANK; gloo on CPU, NCCL when CUDA is available."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size())


# ------------------------------------------------------------------------------------------ utilities
def lr_lambda(warmup: int) -> Callable[[int], float]:
    """Linear warm-up over ``warmup`` steps, then constant."""
    return lambda s: min(1.0, (s + 1) / warmup) if warmup > 0 else 1.0


def coherence_stats(text: str) -> dict[str, Any]:
    """Longest run of one word repeated in a row, and the number of distinct words."""
    words = re.findall(r"\w+", text.lower())
    run = best = 0
    prev = None
    for w in words:
        run = run + 1 if w == prev else 1
        best, prev = max(best, run), w
    return {"words": len(words), "distinct_words": len(set(words)), "max_repeat_run": best}


class NonFiniteLoss(FloatingPointError):
    pass


# ---------------------------------------------------------------------------------------------- trainer
class Trainer:
    """Train one adapter. ``run_dir`` holds checkpoints/, the history and the exported adapter."""

    def __init__(self, cfg: TrainConfig, model: nn.Module, data: TrainData, run_dir: str | Path, *,
                 pad_id: int = 0, schedule=None, dist_ctx: Dist | None = None, log: Callable[[str], None] = print,
                 on_metrics: Callable[[dict], None] | None = None):
        self.cfg, self.data, self.run_dir = cfg, data, Path(run_dir)
        self.pad_id, self.schedule, self.d = pad_id, schedule, dist_ctx or Dist()
        self.log, self.on_metrics = log, on_metrics
        self.layers = list(cfg.loss.target_layers)
        n_layers = model.config.num_hidden_layers
        if max(self.layers) > n_layers:
            raise ValueError(f"loss.target_layers {self.layers}: the model has {n_layers} layers "
                             f"(hidden_states[0..{n_layers}])")
        torch.manual_seed(cfg.train.seed + self.d.rank)
        self.model = add_lora(model, cfg)
        self.model.train()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.device = next(self.model.parameters()).device
        self.fwd = AdapterForward(self.model, self.layers)
        ddp_kw = {"device_ids": [self.device.index]} if self.device.type == "cuda" else {}
        self.ddp = (torch.nn.parallel.DistributedDataParallel(self.fwd, find_unused_parameters=True, **ddp_kw)
                    if self.d.on else self.fwd)
        self.opt = torch.optim.AdamW(self.params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_lambda(cfg.train.warmup_steps))
        self.sampler = BalancedSampler(data.harmful, data.retain, cfg.train.seed)
        self.step, self.mu, self.history, self.scale = 0, None, [], None
        self.resumed_step = 0  # the step fit() started from (a checkpoint's), so timings count only this process's steps
        self.directions = None
        if cfg.loss.mode == "legacy_schema":
            self.directions = L.random_directions(cfg.train.seed, self.layers, model.config.hidden_size).to(
                next(model.parameters()).device)
        self.needs_logits = (cfg.loss.mode == "legacy_schema" or (cfg.loss.mode == "triplet_full" and cfg.loss.gamma_kl > 0)
                             or (cfg.loss.mode == "legacy_cb" and cfg.loss.use_kl))
        _, self.lm_head = llama_parts(self.model)
        self.ckpt_dir = self.run_dir / "checkpoints"

    # -------------------------------------------------------------------------------------- batches
    def step_batches(self, step: int) -> list[tuple[dict, dict]]:
        """This rank's k micro-batches (harmful part, benign part) for ``step``: the sampler draws the whole
        step (k x world x per-rank counts) and each rank takes its slice, so world size and accumulation never
        change which samples a step sees."""
        c, k, W = self.cfg, self.cfg.train.grad_accum, self.d.world
        nh = c.harmful_per_micro()
        nr = c.train.batch_size - nh
        H, R = self.sampler.step_indices(nh * k * W, nr * k * W)
        mult = {pc: self.schedule.multiplier(pc, step) for pc in self.schedule.class_weights} if self.schedule else None
        lmp = self.schedule.lmp_overrides(step) if self.schedule else None
        out = []
        for j in range(k):
            s = j * W + self.d.rank
            kw = dict(pad_id=self.pad_id, multipliers=mult, lmp_overrides=lmp)
            out.append((self._to(collate(self.data, H[s * nh:(s + 1) * nh], **kw)),
                        self._to(collate(self.data, R[s * nr:(s + 1) * nr], **kw))))
        return out

    def _to(self, batch: dict) -> dict:
        return {k: (v.to(self.device) if k != "n_overridden" else v) for k, v in batch.items()}

    # ---------------------------------------------------------------------------------------- losses
    def micro_loss(self, hb: dict, bb: dict, n: dict[str, torch.Tensor], cs: float, cr: float):
        """Loss of one micro-batch, normalised by the step's global token counts ``n``; returns
        (loss, {term: value}, {stat: sum}) — term values add up over micro-batches and ranks."""
        lc = self.cfg.loss
        w_h, w_b = hb["w"], bb["w"]
        pos = L.shifted_positions(w_b) if self.needs_logits else None
        h_new, b_new, fin = self.ddp(hb["input_ids"], hb["attention_mask"], bb["input_ids"], bb["attention_mask"],
                                     *(pos[:2] if pos else (None, None)))
        with torch.no_grad(), self.model.disable_adapter():
            h_orig, _ = forward_hidden(self.model, hb["input_ids"], hb["attention_mask"], self.layers, False)
            b_orig, fin0 = forward_hidden(self.model, bb["input_ids"], bb["attention_mask"], self.layers, self.needs_logits)
            base_logits = self.lm_head(fin0[pos[0], pos[1]]) if pos else None
        logits = self.lm_head(fin) if pos else None
        terms: dict[str, torch.Tensor] = {}
        if lc.mode == "triplet_full":
            mu = self.mu
            if lc.centroid in ("batch", "batch_live"):
                if L.n_samples(w_h) < 2 and lc.centroid == "batch":
                    raise ValueError("loss.centroid=batch: a micro-batch with < 2 harmful samples (see loss.centroid=ema)")
                mu = L.centroid(h_new if lc.centroid == "batch_live" else h_new.detach(), w_h)
            t = L.triplet_terms(
                b_new, b_orig, h_new, h_orig, mu, w_b, w_h, margin_benign=self.scale["margin_benign"],
                margin_harmful=self.scale["margin_harmful"], benign_pos_distance=lc.benign_pos_distance,
                benign_neg_distance=lc.benign_neg_distance, harmful_pos_distance=lc.harmful_pos_distance,
                harmful_neg_distance=lc.harmful_neg_distance, mix_l2_weight=lc.mix_l2_weight,
                mix_cos_weight=lc.mix_cos_weight, n_b=n["benign"], n_h=n["harmful"])
            terms["loss_ret"], terms["loss_rr"] = t["benign"], t["harmful"]
            loss = lc.alpha_benign * t["benign"] + lc.beta_harmful * t["harmful"]
            if lc.gamma_kl > 0:
                terms["loss_kl"] = L.kl_base_adapter(base_logits, logits, pos[2], lc.kl_temperature, n["kl"])
                loss = loss + lc.gamma_kl * terms["loss_kl"]
        elif lc.mode == "legacy_cb":
            terms["loss_rr"] = L.rerouting_relu_cos(h_new, h_orig, w_h, n["harmful"])
            terms["loss_ret"] = L.retain_l2(b_new, b_orig, w_b, n["benign"])
            loss = cs * terms["loss_rr"] + cr * terms["loss_ret"]
            if lc.use_kl:
                terms["loss_kl"] = L.kl_base_adapter(base_logits, logits, pos[2], lc.kl_temperature, n["kl"])
                loss = loss + lc.gamma_kl * terms["loss_kl"]
        else:  # legacy_schema
            terms["loss_rr"] = L.reroute_to_direction(h_new, self.directions, w_h, n["harmful"])
            labels = bb["input_ids"][pos[0], pos[1] + 1]
            terms["loss_ret"] = L.cross_entropy_masked(logits, labels, pos[2], n["kl"])
            loss = cs * terms["loss_rr"] + cr * terms["loss_ret"]
        ind_h, ind_b = (w_h > 0).float(), (w_b > 0).float()
        with torch.no_grad():
            stats = {
                "rr_cos_sum": (torch.nn.functional.cosine_similarity(h_new.float(), h_orig.float(), dim=-1) * ind_h).sum() / len(self.layers),
                "ret_cos_sum": (torch.nn.functional.cosine_similarity(b_new.float(), b_orig.float(), dim=-1) * ind_b).sum() / len(self.layers),
            }
            if lc.mode == "triplet_full":
                cs_, cn = L.centroid_sums(h_new.detach(), w_h)
                stats["mu_sum"], stats["mu_n"] = cs_, cn
        terms["loss"] = loss
        return loss, terms, stats

    def step_counts(self, micro) -> dict[str, torch.Tensor]:
        """Global token counts of the step: harmful / benign masked tokens, benign shifted positions."""
        t = torch.zeros(5, device=self.device)
        for hb, bb in micro:
            t += torch.tensor(device=self.device, data=[float(L.token_count(hb["w"])), float(L.token_count(bb["w"])),
                               float((bb["w"][:, 1:] > 0).sum()), float(hb["attention_mask"].sum() + bb["attention_mask"].sum()),
                               float(hb["n_overridden"] + bb["n_overridden"])])
        self.d.sum_(t)
        return {"harmful": t[0], "benign": t[1], "kl": t[2], "tokens": t[3], "overridden": t[4]}

    @torch.no_grad()
    def init_scale(self, micro) -> None:
        """Before step 1 (base model, all ranks): μ₀ = centroid of the harmful representations, and the
        distance scale: mean d_n(b, μ₀) over benign tokens and d_p(h, μ₀) over harmful tokens. With
        ``loss.margin_scale`` the margins are that scale times the factor (else the configured margins)."""
        lc, reps = self.cfg.loss, []
        s, n = 0, 0
        with self.model.disable_adapter():
            for hb, bb in micro:
                h, _ = forward_hidden(self.model, hb["input_ids"], hb["attention_mask"], self.layers, False)
                b, _ = forward_hidden(self.model, bb["input_ids"], bb["attention_mask"], self.layers, False)
                a, c = L.centroid_sums(h, hb["w"])
                s, n = s + a, n + c
                reps.append((h, b, hb["w"], bb["w"]))
        mu = self.d.sum_(s) / self.d.sum_(torch.as_tensor(n, dtype=torch.float32)).clamp_min(1e-12)
        acc = torch.zeros(4, device=self.device)
        for h, b, wh, wb in reps:
            m = mu[:, None, None, :]
            dh = L.distance(lc.harmful_pos_distance, h, m, lc.mix_l2_weight, lc.mix_cos_weight)
            db = L.distance(lc.benign_neg_distance, b, m, lc.mix_l2_weight, lc.mix_cos_weight)
            acc += torch.stack([(dh * (wh > 0)).sum() / len(self.layers), (wh > 0).sum().float(),
                                (db * (wb > 0)).sum() / len(self.layers), (wb > 0).sum().float()])
        acc = self.d.sum_(acc)
        scale = {"d_harmful_to_mu": float(acc[0] / acc[1].clamp_min(1)), "d_benign_to_mu": float(acc[2] / acc[3].clamp_min(1))}
        if lc.margin_scale is not None:
            margins = (lc.margin_scale * scale["d_benign_to_mu"], lc.margin_scale * scale["d_harmful_to_mu"])
        else:
            margins = (lc.margin_benign, lc.margin_harmful)
        self.scale = {**scale, "margin_benign": margins[0], "margin_harmful": margins[1]}
        if lc.centroid == "ema":
            self.mu = mu
        self.log(f"distance scale before step 1: {self.scale}")

    # ------------------------------------------------------------------------------------------ loop
    def fit(self) -> list[dict]:
        cfg, total = self.cfg, self.cfg.total_steps
        self.resume()
        self.resumed_step = self.step
        k, t_start, tokens_seen = cfg.train.grad_accum, time.time(), 0.0
        while self.step < total:
            step, t0 = self.step, time.time()
            micro = self.step_batches(step)
            n = self.step_counts(micro)
            if cfg.loss.mode == "triplet_full" and self.scale is None:
                self.init_scale(micro)
            cs, cr = L.coefficients(cfg.loss.schedule, cfg.loss.alpha, step, cfg.train.steps)
            if cfg.loss.weighting == "single_alpha":
                cr = 1.0
            self.opt.zero_grad(set_to_none=True)
            sums: dict[str, torch.Tensor] = {}
            for j, (hb, bb) in enumerate(micro):
                sync = contextlib.nullcontext() if (j == k - 1 or not self.d.on) else self.ddp.no_sync()
                with sync:
                    loss, terms, stats = self.micro_loss(hb, bb, n, cs, cr)
                    (loss * self.d.world).backward()
                for name, v in {**{kk: v.detach() for kk, v in terms.items()}, **stats}.items():
                    sums[name] = sums.get(name, 0) + v.detach()
            flat = {kk: self.d.sum_(torch.as_tensor(v, dtype=torch.float32).clone()) for kk, v in sums.items()}
            for name in [x for x in ("loss_rr", "loss_ret", "loss_kl", "loss") if x in flat]:
                if not torch.isfinite(flat[name]).all():
                    raise NonFiniteLoss(f"step {step}: term {name} is {flat[name].item()} (non-finite); run stopped")
            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.train.max_grad_norm)
            if not torch.isfinite(grad_norm):
                raise NonFiniteLoss(f"step {step}: term grad_norm is {grad_norm.item()} (non-finite gradients); run stopped")
            lr = self.opt.param_groups[0]["lr"]
            self.opt.step()
            self.sched.step()
            if "mu_sum" in flat and cfg.loss.centroid == "ema":
                self.mu = L.ema_update(self.mu, flat["mu_sum"] / flat["mu_n"].clamp_min(1e-12), cfg.loss.centroid_decay)
            self.step = step + 1
            dt = time.time() - t0
            tokens_seen += float(n["tokens"])
            m = {"step": self.step, "train/loss": float(flat["loss"]), "train/loss_rr": float(flat.get("loss_rr", 0.0)),
                 "train/loss_ret": float(flat.get("loss_ret", 0.0)), "train/loss_kl": float(flat.get("loss_kl", 0.0)),
                 # NaN (not measured) on a step without a masked token of the kind, never a cos-sim of 0
                 "rr/cos_sim_mean": float(flat["rr_cos_sum"] / n["harmful"]) if n["harmful"] > 0 else float("nan"),
                 "ret/cos_sim_mean": float(flat["ret_cos_sum"] / n["benign"]) if n["benign"] > 0 else float("nan"),
                 "train/grad_norm": float(grad_norm), "lr": lr, "cs": cs, "cr": cr,
                 "mask/harmful_tokens": float(n["harmful"]), "mask/benign_tokens": float(n["benign"]),
                 "mask/overridden_samples": float(n["overridden"]), "tokens_per_s": float(n["tokens"]) / max(dt, 1e-9),
                 "step_time_s": dt}
            self.history.append(m)
            if self.on_metrics:
                self.on_metrics(m)
            if self.step % cfg.log.every == 0 or self.step == total:
                el = time.time() - t_start
                eta = self.eta(el)
                self.log(f"step {self.step}/{total} loss {m['train/loss']:.4f} rr {m['train/loss_rr']:.4f} "
                         f"ret {m['train/loss_ret']:.4f} kl {m['train/loss_kl']:.4f} cos_h {m['rr/cos_sim_mean']:.3f} "
                         f"cos_b {m['ret/cos_sim_mean']:.3f} gn {m['train/grad_norm']:.3f} "
                         f"{tokens_seen / max(el, 1e-9):.0f} tok/s ETA {eta:.0f}s")
            if self.step % cfg.train.checkpoint_every == 0 or self.step == total:
                self.save_checkpoint()
            if cfg.train.throttle_s:
                time.sleep(cfg.train.throttle_s)
        return self.history

    # ------------------------------------------------------------------------------------ checkpoints
    def eta(self, elapsed: float) -> float:
        """Seconds left, from this process's own steps: a resumed run's restored history took no time here (per
        step over the whole history, the ETA after resuming at step 20 of 40 was a fifth of the truth at step 25)."""
        return elapsed / max(self.step - self.resumed_step, 1) * (self.cfg.total_steps - self.step)

    def seconds_restored(self) -> float:
        """Step time of the steps a resumed run restored from its checkpoint (ran in an earlier process)."""
        return float(sum(h.get("step_time_s", 0.0) for h in self.history if h["step"] <= self.resumed_step))

    def lora_state(self) -> dict[str, torch.Tensor]:
        from peft import get_peft_model_state_dict

        return {k: v.detach().clone().contiguous() for k, v in get_peft_model_state_dict(self.model).items()}

    def save_checkpoint(self) -> Path:
        """checkpoints/step_NNNNNN/: adapter (safetensors, peft layout), trainer_state.pt (optimizer,
        scheduler, sampler, step, centroid, metric history), rng_rank{r}.pt; written to a temp dir, renamed."""
        final = self.ckpt_dir / f"step_{self.step:06d}"
        tmp = self.ckpt_dir / f".tmp_step_{self.step:06d}"
        if self.d.rank == 0:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
            self.model.save_pretrained(str(tmp))
            torch.save({"optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(),
                        "sampler": self.sampler.state_dict(), "step": self.step,
                        "mu": self.mu if self.mu is not None else torch.zeros(0),
                        "history": json.dumps(self.history), "scale": json.dumps(self.scale)}, tmp / "trainer_state.pt")
        self.d.barrier()  # tmp exists
        stage = tmp if self.d.rank == 0 else self.ckpt_dir / f".rng_rank{self.d.rank}_{self.step:06d}"
        stage.mkdir(parents=True, exist_ok=True)
        torch.save({"torch": torch.get_rng_state()}, stage / f"rng_rank{self.d.rank}.pt")
        self.d.barrier()
        if self.d.rank == 0:
            for r in range(1, self.d.world):
                src = self.ckpt_dir / f".rng_rank{r}_{self.step:06d}"
                os.replace(src / f"rng_rank{r}.pt", tmp / f"rng_rank{r}.pt")
                src.rmdir()
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            self.rank_checkpoints()
        self.d.barrier()
        return final

    def rank_checkpoints(self) -> None:
        """Rank checkpoints by the mean selection metric since the previous checkpoint (lower is better);
        keep the best ``keep_checkpoints`` and the latest, link best / second_best / third_best."""
        idx_path = self.ckpt_dir / "index.json"
        index = json.loads(idx_path.read_text()) if idx_path.exists() else []
        prev = max([e["step"] for e in index if e["step"] < self.step], default=0)
        window = [h[self.cfg.train.selection_metric] for h in self.history if prev < h["step"] <= self.step]
        index = [e for e in index if e["step"] != self.step]
        index.append({"step": self.step, "path": f"step_{self.step:06d}",
                      "metric": float(sum(window) / len(window)) if window else None})
        ranked = sorted([e for e in index if e["metric"] is not None], key=lambda e: (e["metric"], -e["step"]))
        keep = {e["step"] for e in ranked[: self.cfg.train.keep_checkpoints]} | {self.step}
        for e in index:
            if e["step"] not in keep:
                shutil.rmtree(self.ckpt_dir / e["path"], ignore_errors=True)
        index = [e for e in index if e["step"] in keep]
        for rank, e in enumerate(ranked):
            e["rank"] = rank + 1 if e["step"] in keep else None
        tmp = idx_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(sorted(index, key=lambda e: e["step"]), indent=1))
        os.replace(tmp, idx_path)
        kept_ranked = [e for e in ranked if e["step"] in keep]
        for name in RANK_LINKS:
            link = self.run_dir / name
            if link.is_symlink() or link.exists():
                link.unlink()
        for name, e in zip(RANK_LINKS, kept_ranked):
            (self.run_dir / name).symlink_to(Path("checkpoints") / e["path"])

    def latest_checkpoint(self) -> Path | None:
        if not self.ckpt_dir.is_dir():
            return None
        done = sorted(p for p in self.ckpt_dir.iterdir() if CHECKPOINT_RE.match(p.name) and (p / "trainer_state.pt").is_file())
        return done[-1] if done else None

    def resume(self) -> bool:
        """Load the latest complete checkpoint, if any (a half-written one is a .tmp dir and is ignored)."""
        ck = self.latest_checkpoint()
        if ck is None:
            return False
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        set_peft_model_state_dict(self.model, load_file(str(ck / "adapter_model.safetensors")))
        st = torch.load(ck / "trainer_state.pt", weights_only=True)
        self.opt.load_state_dict(st["optimizer"])
        self.sched.load_state_dict(st["scheduler"])
        self.sampler.load_state_dict(st["sampler"])
        self.step = int(st["step"])
        self.mu = st["mu"] if st["mu"].numel() else None
        self.history = json.loads(st["history"])
        self.scale = json.loads(st["scale"])
        rng = ck / f"rng_rank{self.d.rank}.pt"
        if rng.is_file():
            torch.set_rng_state(torch.load(rng, weights_only=True)["torch"])
        self.log(f"resumed from {ck.name} (step {self.step})")
        return True

    # ---------------------------------------------------------------------------------------- export
    def export_adapter(self, out_dir: Path) -> Path:
        if self.d.rank == 0:
            tmp = out_dir.with_name(out_dir.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            self.model.save_pretrained(str(tmp))
            shutil.rmtree(out_dir, ignore_errors=True)
            os.replace(tmp, out_dir)
        return out_dir

    # ----------------------------------------------------------------------------------- probes/checks
    @torch.no_grad()
    def probe(self, n_samples: int = 8) -> dict[str, Any]:
        """Adapter vs base on a fixed set of samples: harmful / retain cos-sim at the target layers and
        KL(base ‖ adapter) at the retain masked positions."""
        self.model.eval()
        g = torch.Generator().manual_seed(self.cfg.train.seed + 99)
        pick = lambda idx: [idx[i] for i in torch.randperm(len(idx), generator=g)[:n_samples].tolist()]  # noqa: E731
        hb = self._to(collate(self.data, pick(self.data.harmful), pad_id=self.pad_id))
        bb = self._to(collate(self.data, pick(self.data.retain), pad_id=self.pad_id))
        pos = L.shifted_positions(bb["w"])
        h_new, _ = forward_hidden(self.model, hb["input_ids"], hb["attention_mask"], self.layers, False)
        b_new, fin = forward_hidden(self.model, bb["input_ids"], bb["attention_mask"], self.layers, True)
        with self.model.disable_adapter():
            h_orig, _ = forward_hidden(self.model, hb["input_ids"], hb["attention_mask"], self.layers, False)
            b_orig, fin0 = forward_hidden(self.model, bb["input_ids"], bb["attention_mask"], self.layers, True)
        kl = L.kl_base_adapter(self.lm_head(fin0[pos[0], pos[1]]), self.lm_head(fin[pos[0], pos[1]]),
                               (pos[2] > 0).float(), 1.0)
        self.model.train()
        n_h, n_b, n_kl = int(L.token_count(hb["w"])), int(L.token_count(bb["w"])), int(pos[0].numel())
        # over zero masked tokens a probe is not measured (None), never a cos-sim or KL of 0
        return {"harmful_cos_sim": float(L.cos_sim_mean(h_new, h_orig, hb["w"])) if n_h else None,
                "retain_cos_sim": float(L.cos_sim_mean(b_new, b_orig, bb["w"])) if n_b else None,
                "kl_benign": float(kl) if n_kl else None, "n_harmful": hb["w"].shape[0], "n_retain": bb["w"].shape[0],
                "harmful_tokens": n_h, "retain_tokens": n_b, "kl_positions": n_kl}

    @torch.no_grad()
    def generations(self, tokenizer, n: int = 3, max_new_tokens: int = 24) -> list[dict[str, Any]]:
        """Greedy continuations of a few retain prompts (the tokens before their first masked token)."""
        self.model.eval()
        out = []
        for i in self.data.retain[:n]:
            s = self.data.samples[i]
            cut = s.spans[0][0] if s.spans else len(s.input_ids)
            ids = torch.tensor([s.input_ids[: max(cut, 1)]], device=self.device)
            texts = []
            for ctx in (contextlib.nullcontext(), self.model.disable_adapter()):  # adapter, then base for reference
                with ctx:
                    gen = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                              max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=self.pad_id)
                texts.append(tokenizer.decode(gen[0, ids.shape[1]:], skip_special_tokens=True) if tokenizer is not None else "")
            base = coherence_stats(texts[1])
            out.append({"trace_id": s.trace_id, "text": texts[0], **coherence_stats(texts[0]), "base_text": texts[1],
                        "base_max_repeat_run": base["max_repeat_run"], "base_distinct_words": base["distinct_words"]})
        self.model.train()
        return out
