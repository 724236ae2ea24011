"""Circuit-breaker losses as small pure functions (no model, no optimizer): each is checkable by hand.

Conventions (used by every function here and by the trainer):

* **Hidden states** follow ``hidden_states[l]``: index 0 is the embedding output, index ``l >= 1`` the output
  of decoder layer ``l - 1`` (0-based), i.e. what ``LlamaModel(..., output_hidden_states=True).hidden_states[l]``
  holds for ``l < num_layers``. A target layer ``10`` therefore means "after 10 decoder layers". (The system
  this replaces indexed the decoder-layer list directly and was off by one.)
* Stacked representations have shape ``[L, B, T, D]`` (target layers, batch, tokens, hidden).
* Token weights ``w`` have shape ``[B, T]``: dense loss mask x mask weight x sample weight (x MWCS multiplier);
  0 outside the mask. A *masked mean* is over **tokens**: ``sum(w * x) / n`` with ``n`` the number of masked
  tokens (``(w > 0).sum()`` unless the caller passes a global count: with gradient accumulation and data
  parallelism the trainer passes the token count of the whole optimizer step, so k micro-batches on r ranks
  give exactly the gradient of one batch of k x r x size). Layer terms are averaged over the target layers.
* Logits shift: the logit at position ``t`` predicts token ``t + 1``; a masked token ``t + 1`` is scored with
  the logits at ``t`` (:func:`shifted_positions`).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

DISTANCES = ("l2", "cosine", "mix")
LOSS_MODES = ("triplet_full", "legacy_cb", "legacy_schema")
SCHEDULES = ("reference", "legacy_horizon", "stage2", "constant")
CENTROIDS = ("ema", "batch", "batch_live")  # batch_live: the old, non-detached batch mean (seed_compat only)


# ------------------------------------------------------------------------------------------- reductions
def token_count(w: torch.Tensor) -> torch.Tensor:
    """Number of masked tokens of a weight map ``w`` [B, T] (weights > 0)."""
    return (w > 0).sum()


def masked_mean(x: torch.Tensor, w: torch.Tensor, n: torch.Tensor | float | None = None) -> torch.Tensor:
    """Weighted mean over masked tokens, averaged over leading layer dims.

    x: [..., B, T] per-token values (e.g. [L, B, T]); w: [B, T]; n: token count (default ``token_count(w)``).
    Returns a scalar: ``sum(x * w) / (n * prod(leading dims))``; 0 when ``n == 0`` (a term with no token)."""
    lead = math.prod(x.shape[:-2]) if x.dim() > 2 else 1
    n = token_count(w) if n is None else n
    n = torch.as_tensor(n, dtype=x.dtype, device=x.device)
    total = (x * w).sum()
    return torch.where(n > 0, total / (n.clamp_min(1) * lead), total * 0)


# -------------------------------------------------------------------------------------------- distances
def l2_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """‖a − b‖₂ over the last dim. a, b: [..., D] -> [...]."""
    return torch.linalg.vector_norm((a - b).float(), dim=-1)


def cosine_distance(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """1 − cos(a, b) over the last dim, in [0, 2]. a, b: [..., D] -> [...]."""
    return 1.0 - F.cosine_similarity(a.float(), b.float(), dim=-1, eps=eps)


def distance(kind: str, a: torch.Tensor, b: torch.Tensor, w_l2: float = 1.0, w_cos: float = 1.0) -> torch.Tensor:
    """``l2``, ``cosine`` (1 − cos) or ``mix`` = w_l2·L2 + w_cos·(1 − cos). a, b: [..., D] -> [...]."""
    if kind == "l2":
        return l2_distance(a, b)
    if kind == "cosine":
        return cosine_distance(a, b)
    if kind == "mix":
        return w_l2 * l2_distance(a, b) + w_cos * cosine_distance(a, b)
    raise ValueError(f"unknown distance {kind!r} (known: {DISTANCES})")


# -------------------------------------------------------------------------------------------- centroid
def centroid_sums(h: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ_tokens w·h per layer [L, D], Σ w []) of representations h [L, B, T, D] under weights w [B, T];
    sums, so micro-batches and ranks can be added before dividing."""
    return torch.einsum("lbtd,bt->ld", h.float(), w.float()), w.float().sum()


def centroid(h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Weighted token mean of h [L, B, T, D] under w [B, T] -> μ [L, D]."""
    s, n = centroid_sums(h, w)
    return s / n.clamp_min(1e-12)


def ema_update(mu: torch.Tensor | None, batch_mu: torch.Tensor, decay: float) -> torch.Tensor:
    """Detached running mean: μ ← decay·μ + (1 − decay)·batch_μ (the first batch initialises it). [L, D]."""
    batch_mu = batch_mu.detach()
    return batch_mu.clone() if mu is None else decay * mu + (1.0 - decay) * batch_mu


def n_samples(w: torch.Tensor) -> int:
    """Number of samples (rows) of w [B, T] with at least one masked token."""
    return int((w > 0).any(dim=-1).sum())


def check_centroid_config(centroid_mode: str, harmful_per_step: int) -> None:
    """A batch-mean centroid needs ≥ 2 harmful samples per step, else μ = h_new and d(h_new, μ) = 0."""
    if centroid_mode not in CENTROIDS:
        raise ValueError(f"loss.centroid: unknown centroid {centroid_mode!r} (known: {CENTROIDS})")
    if centroid_mode == "batch" and harmful_per_step < 2:
        raise ValueError(
            f"loss.centroid=batch needs >= 2 harmful samples per optimizer micro-batch, the configuration gives "
            f"{harmful_per_step}: with one sample the centroid equals the sample (d(h_new, mu) = 0). Use "
            "loss.centroid=ema (a detached running mean) or raise train.batch_size / train.harmful_fraction."
        )


# --------------------------------------------------------------------------------------- triplet_full
def triplet_terms(
    b_new: torch.Tensor,
    b_orig: torch.Tensor,
    h_new: torch.Tensor,
    h_orig: torch.Tensor,
    mu: torch.Tensor,
    w_b: torch.Tensor,
    w_h: torch.Tensor,
    *,
    margin_benign: float,
    margin_harmful: float,
    benign_pos_distance: str = "l2",
    benign_neg_distance: str = "cosine",
    harmful_pos_distance: str = "cosine",
    harmful_neg_distance: str = "cosine",
    mix_l2_weight: float = 1.0,
    mix_cos_weight: float = 1.0,
    n_b: torch.Tensor | float | None = None,
    n_h: torch.Tensor | float | None = None,
) -> dict[str, torch.Tensor]:
    """Triplet hinges per masked token, averaged over tokens and target layers.

    b_*: benign reps [L, B, T, D] (adapter / base), h_*: harmful reps [L, B, T, D], mu: centroid [L, D],
    w_b / w_h: [B, T] token weights of the benign / harmful rows (0 elsewhere).
      L_benign  = ReLU(d_p(b_new, b_orig) − d_n(b_new, μ) + m_b)   (stay home, keep away from the centroid)
      L_harmful = ReLU(d_p(h_new, μ) − d_n(h_new, h_orig) + m_h)   (join the centroid, leave home)
    Returns {"benign", "harmful"} scalars plus the hinge-active fractions {"benign_active", "harmful_active"}."""
    d = lambda kind, a, b: distance(kind, a, b, mix_l2_weight, mix_cos_weight)  # noqa: E731
    m = mu[:, None, None, :]
    hinge_b = F.relu(d(benign_pos_distance, b_new, b_orig) - d(benign_neg_distance, b_new, m) + margin_benign)
    hinge_h = F.relu(d(harmful_pos_distance, h_new, m) - d(harmful_neg_distance, h_new, h_orig) + margin_harmful)
    return {
        "benign": masked_mean(hinge_b, w_b, n_b),
        "harmful": masked_mean(hinge_h, w_h, n_h),
        "benign_active": masked_mean((hinge_b > 0).float(), (w_b > 0).float()).detach(),
        "harmful_active": masked_mean((hinge_h > 0).float(), (w_h > 0).float()).detach(),
    }


# ------------------------------------------------------------------------------------------- legacy_cb
def rerouting_relu_cos(h_new: torch.Tensor, h_orig: torch.Tensor, w_h: torch.Tensor, n_h=None) -> torch.Tensor:
    """Reference rerouting term: mean over harmful masked tokens and layers of ReLU(cos(h_adapter, h_base)).
    h_*: [L, B, T, D]; w_h: [B, T]."""
    cos = F.cosine_similarity(h_new.float(), h_orig.float(), dim=-1)  # [L, B, T]
    return masked_mean(F.relu(cos), w_h, n_h)


def retain_l2(b_new: torch.Tensor, b_orig: torch.Tensor, w_b: torch.Tensor, n_b=None) -> torch.Tensor:
    """Reference retain term: mean over benign masked tokens and layers of ‖b_adapter − b_base‖₂. [L, B, T, D]."""
    return masked_mean(l2_distance(b_new, b_orig), w_b, n_b)


# ---------------------------------------------------------------------------------------- legacy_schema
def random_directions(seed: int, layers: Sequence[int], dim: int) -> torch.Tensor:
    """One fixed unit vector per target layer, drawn once per run from the seed. -> [L, D].
    (A fresh vector per step made the old term a constant ≈ sqrt(2 / (pi * d)).)"""
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + 17)
    out = []
    for layer in layers:
        g.manual_seed(int(seed) * 1_000_003 + 17 + int(layer))
        v = torch.randn(dim, generator=g)
        out.append(v / v.norm())
    return torch.stack(out)


def reroute_to_direction(h_new: torch.Tensor, direction: torch.Tensor, w_h: torch.Tensor, n_h=None) -> torch.Tensor:
    """Mean over harmful masked tokens and layers of 1 − cos(h_adapter, r_l). h_new: [L, B, T, D]; r: [L, D]."""
    return masked_mean(cosine_distance(h_new, direction[:, None, None, :]), w_h, n_h)


# ------------------------------------------------------------------------------------------ logit terms
def shifted_positions(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Positions whose logits predict a masked token: (batch idx [N], logit position t [N], weight of token
    t + 1 [N]). w: [B, T]. Token 0 is never predicted (no logit before it)."""
    nxt = w[:, 1:]
    b, t = torch.nonzero(nxt > 0, as_tuple=True)
    return b, t, nxt[b, t]


def kl_base_adapter(
    base_logits: torch.Tensor, adapter_logits: torch.Tensor, w: torch.Tensor, temperature: float = 1.0, n=None
) -> torch.Tensor:
    """KL(base ‖ adapter) per position at temperature τ, times τ² (gradient scale independent of τ),
    weighted mean over positions. logits: [N, V] at the shifted masked positions; w: [N]."""
    lp_base = F.log_softmax(base_logits.float() / temperature, dim=-1)
    lp_adapter = F.log_softmax(adapter_logits.float() / temperature, dim=-1)
    kl = (lp_base.exp() * (lp_base - lp_adapter)).sum(-1) * temperature**2  # [N]
    n = torch.as_tensor(w.numel() if n is None else n, dtype=kl.dtype)
    return torch.where(n > 0, (kl * w).sum() / n.clamp_min(1), kl.sum() * 0)


def cross_entropy_masked(logits: torch.Tensor, labels: torch.Tensor, w: torch.Tensor, n=None) -> torch.Tensor:
    """Next-token CE at the shifted masked positions, weighted mean. logits: [N, V]; labels, w: [N]."""
    ce = F.cross_entropy(logits.float(), labels, reduction="none")
    n = torch.as_tensor(w.numel() if n is None else n, dtype=ce.dtype)
    return torch.where(n > 0, (ce * w).sum() / n.clamp_min(1), ce.sum() * 0)


# ------------------------------------------------------------------------------------------- schedules
def coefficients(schedule: str, alpha: float, step: int, total: int) -> tuple[float, float]:
    """(c_s, c_r): rerouting and retain coefficients at ``step`` of ``total``.

    reference      c_s = α(1 − t/2T), c_r = α·t/2T   (the published circuit-breaker recipe)
    legacy_horizon c_s = α(1 − t/T),  c_r = α·t/T    (the old default: horizon T instead of 2T)
    stage2         c_s = α·max(0, 1 − p/2), c_r = 0.5 + 0.5p with p = t/T
    constant       c_s = α, c_r = 1"""
    t, T = float(step), float(max(total, 1))
    if schedule == "reference":
        p = t / (2 * T)
        return alpha * (1 - p), alpha * p
    if schedule == "legacy_horizon":
        p = t / T
        return alpha * (1 - p), alpha * p
    if schedule == "stage2":
        p = t / T
        return alpha * max(0.0, 1 - p / 2), 0.5 + 0.5 * p
    if schedule == "constant":
        return alpha, 1.0
    raise ValueError(f"unknown coefficient schedule {schedule!r} (known: {SCHEDULES})")


def cos_sim_mean(a: torch.Tensor, b: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Diagnostic: mean cos(a, b) over masked tokens and layers (rr/cos_sim_mean, ret/cos_sim_mean)."""
    with torch.no_grad():
        return masked_mean(F.cosine_similarity(a.float(), b.float(), dim=-1), (w > 0).float())
