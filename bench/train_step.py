"""Training-step benchmark: what the trainer's design choices save, measured in one process.

Variants of one circuit-breaker step (triplet_full + KL, the same micro-batch, LoRA on every layer):
  ours           cut forward (decoder layers up to the deepest target layer for harmful rows), base states
                 under ``disable_adapter()``, ``lm_head`` on the masked benign positions only;
  (a) 2nd copy   base states from a second frozen model copy (the old loop's extra model);
  (b) full logits the full causal-LM forward (``lm_head`` on every position: [B, T, vocab]) for both passes;
  (c) all hidden  (b) with ``output_hidden_states=True`` (every layer's states kept), what the old code did
                 through ``PeftModel.__getattr__``.
Reported per variant: tokens/s (best of --repeat) and peak memory per step. On CPU the peak is the bytes of
tensors autograd saves for backward plus the parameters the variant adds (torch has no CPU allocator peak);
on CUDA it is ``torch.cuda.max_memory_allocated``. Ratios are against ``ours`` from the same process.

    .venv/bin/python bench/train_step.py [--batch 4] [--seq 256] [--repeat 3] [--json out.json]
    .venv/bin/python bench/train_step.py --gpu-8b        # when a GPU is lent: 8B-shaped random Llama (bf16,
                                                        # LoRA as in stage2), tokens/s and MFU at 2k and 8k
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from cb_core.train import losses as L  # noqa: E402
from cb_core.train.config import from_dict  # noqa: E402
from cb_core.train.trainer import add_lora, forward_hidden, llama_parts  # noqa: E402


class SavedBytes:
    """Bytes of tensors autograd saves for backward during a step (CPU activation-memory proxy)."""

    def __init__(self):
        self.total = 0

    def pack(self, t):
        self.total += t.numel() * t.element_size()
        return t

    def ctx(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)


def make_batch(B: int, T: int, vocab: int, device):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, min(vocab, 120000), (2, B, T), generator=g).to(device)
    att = torch.ones(B, T, dtype=torch.long, device=device)
    w = torch.zeros(B, T, device=device)
    w[:, T // 2:] = 1.0  # the 'assistant half' masked
    return ids[0], ids[1], att, w


def step(variant: str, model, frozen, layers, batch, margins=(0.3, 0.3)):
    h_ids, b_ids, att, w = batch
    backbone, lm_head = llama_parts(model)
    mu = None
    if variant == "ours":
        h_new, _ = forward_hidden(model, h_ids, att, layers, False)
        b_new, fin = forward_hidden(model, b_ids, att, layers, True)
        b, t, wt = L.shifted_positions(w)
        logits = lm_head(fin[b, t])
        with torch.no_grad(), model.disable_adapter():
            h_orig, _ = forward_hidden(model, h_ids, att, layers, False)
            b_orig, fin0 = forward_hidden(model, b_ids, att, layers, True)
            base_logits = lm_head(fin0[b, t])
    elif variant == "second_copy":
        h_new, _ = forward_hidden(model, h_ids, att, layers, False)
        b_new, fin = forward_hidden(model, b_ids, att, layers, True)
        b, t, wt = L.shifted_positions(w)
        logits = lm_head(fin[b, t])
        with torch.no_grad():
            h_orig, _ = forward_hidden(frozen, h_ids, att, layers, False)
            b_orig, fin0 = forward_hidden(frozen, b_ids, att, layers, True)
            base_logits = llama_parts(frozen)[1](fin0[b, t])
    else:  # full logits, optionally every hidden state
        keep_all = variant == "all_hidden"

        def run(ids):
            out = model(input_ids=ids, attention_mask=att, output_hidden_states=True, use_cache=False)
            hs = out.hidden_states
            reps = torch.stack([hs[l] for l in layers])
            if not keep_all:
                del hs
            return reps, out.logits

        h_new, _ = run(h_ids)
        b_new, full = run(b_ids)
        b, t, wt = L.shifted_positions(w)
        logits = full[b, t]
        with torch.no_grad(), model.disable_adapter():
            h_orig, _ = run(h_ids)
            b_orig, full0 = run(b_ids)
            base_logits = full0[b, t]
    mu = L.centroid(h_orig, w)
    terms = L.triplet_terms(b_new, b_orig, h_new, h_orig, mu, w, w, margin_benign=margins[0], margin_harmful=margins[1])
    loss = terms["benign"] + terms["harmful"] + 0.5 * L.kl_base_adapter(base_logits, logits, wt)
    loss.backward()
    return loss


def bench(model, frozen, layers, batch, repeat: int, device) -> dict[str, dict]:
    out = {}
    tokens = batch[0].numel() * 2
    extra_params = sum(p.numel() * p.element_size() for p in frozen.parameters())
    variants = ("ours", "second_copy", "full_logits", "all_hidden")
    for variant in variants:  # warm-up: allocator and kernels, so the first variant is not penalised
        model.zero_grad(set_to_none=True)
        step(variant, model, frozen, layers, batch)
    for variant in variants:
        best, peak = float("inf"), 0
        for _ in range(repeat):
            model.zero_grad(set_to_none=True)
            saved = SavedBytes()
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            with saved.ctx():
                step(variant, model, frozen, layers, batch)
            if device.type == "cuda":
                torch.cuda.synchronize()
                peak = max(peak, torch.cuda.max_memory_allocated())
            else:
                peak = max(peak, saved.total + (extra_params if variant == "second_copy" else 0))
            best = min(best, time.perf_counter() - t0)
        out[variant] = {"tokens_per_s": tokens / best, "step_s": best, "peak_mb": peak / 2**20}
    return out


def report(res: dict, label: str) -> None:
    base = res["ours"]
    print(f"\n{label}")
    print(f"{'variant':<14}{'tokens/s':>12}{'peak MB':>12}{'speed vs ours':>16}{'memory vs ours':>16}")
    for k, v in res.items():
        print(f"{k:<14}{v['tokens_per_s']:>12.0f}{v['peak_mb']:>12.1f}{v['tokens_per_s'] / base['tokens_per_s']:>16.2f}"
              f"{v['peak_mb'] / max(base['peak_mb'], 1e-9):>16.2f}")


def tiny(args) -> dict:
    from cb_core.model import tiny_llama
    from cb_core.tokenizer import llama3_tokenizer

    torch.set_num_threads(args.threads)
    tok = llama3_tokenizer()
    base = tiny_llama(tok, seed=0)
    frozen = copy.deepcopy(base)
    cfg = from_dict({"loss": {"target_layers": [2]}, "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
                     "train": {"batch_size": 4}})
    model = add_lora(base, cfg)
    batch = make_batch(args.batch, args.seq, base.config.vocab_size, torch.device("cpu"))
    res = bench(model, frozen, [2], batch, args.repeat, torch.device("cpu"))
    report(res, f"tiny Llama (4 layers, hidden 128, vocab {base.config.vocab_size}), target layer [2], "
                f"batch {args.batch} x {args.seq} tokens x 2 (harmful + benign), CPU {args.threads} thread(s)")
    return res


def gpu_8b(args) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    dev = torch.device("cuda")
    cfg8 = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0,
                       tie_word_embeddings=False)
    with torch.device(dev):
        torch.set_default_dtype(torch.bfloat16)
        base = LlamaForCausalLM(cfg8)
        torch.set_default_dtype(torch.float32)
    base.eval()
    tcfg = from_dict({"model": {"gradient_checkpointing": True}, "loss": {"target_layers": [15]},
                      "lora": {"r": 16, "alpha": 32, "dropout": 0.05, "layers_to_transform": list(range(21))},
                      "train": {"batch_size": 8}})
    model = add_lora(base, tcfg)
    n_params = sum(p.numel() for p in base.parameters())
    out = {}
    for T in (2048, 8192):
        batch = make_batch(1, T, cfg8.vocab_size, dev)
        step("ours", model, None, [15], batch)  # warm-up
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        for _ in range(args.repeat):
            model.zero_grad(set_to_none=True)
            step("ours", model, None, [15], batch)
        torch.cuda.synchronize()
        dt = (time.perf_counter() - t0) / args.repeat
        tokens = 2 * T
        # model FLOPs: adapter pass fwd + bwd (activation grads) ≈ 6N per token + base pass 2N (no grad);
        # the benign rows run all layers (KL), the harmful rows 15/32 of them (cut forward); ignoring attention
        frac = (1.0 + 15 / 32) / 2
        flops = 8 * n_params * frac * tokens
        peak_tflops = float(os.environ.get("CB_PEAK_TFLOPS", "989"))  # H100/H200 dense bf16
        out[T] = {"tokens_per_s": tokens / dt, "mfu": flops / dt / (peak_tflops * 1e12),
                  "peak_gb": torch.cuda.max_memory_allocated() / 2**30}
        print(f"8B-shaped, seq {T}: {out[T]['tokens_per_s']:.0f} tokens/s, MFU {out[T]['mfu']:.1%}, peak {out[T]['peak_gb']:.1f} GB")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--gpu-8b", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    res = gpu_8b(args) if args.gpu_8b else tiny(args)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
