"""Each circuit-breaker loss against values computed by hand on small tensors (incl. the centroid and
margin flaws of the old implementation and their fixes)."""
from __future__ import annotations

import math

import pytest
import torch

from cb_core.train import losses as L
from cb_core.train.config import TrainConfigError, from_dict, load_train_config


def t(*rows):
    return torch.tensor(rows, dtype=torch.float32)


def one(v):
    """One representation [L=1, B=1, T=1, D]."""
    return torch.tensor(v, dtype=torch.float32).view(1, 1, 1, -1)


W1 = torch.ones(1, 1)


def test_masked_mean_is_over_tokens_and_layers():
    x = torch.tensor([[[1.0, 2.0, 3.0]], [[5.0, 7.0, 9.0]]])  # [L=2, B=1, T=3]
    w = t([1.0, 0.0, 2.0])  # token 0 weight 1, token 2 weight 2 (e.g. a sample weight)
    # (1*1 + 3*2 + 5*1 + 9*2) / (2 tokens * 2 layers) = 30 / 4
    assert L.masked_mean(x, w).item() == pytest.approx(7.5)
    assert L.masked_mean(x, w, n=5).item() == pytest.approx(3.0)  # a global token count from the trainer
    assert L.masked_mean(x, torch.zeros(1, 3)).item() == 0.0  # no token: 0, not NaN


def test_distances():
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    assert L.l2_distance(a, b).item() == pytest.approx(math.sqrt(2))
    assert L.cosine_distance(a, b).item() == pytest.approx(1.0)
    assert L.cosine_distance(a, -a).item() == pytest.approx(2.0)
    assert L.distance("mix", a, b, w_l2=0.5, w_cos=2.0).item() == pytest.approx(0.5 * math.sqrt(2) + 2.0)
    assert L.l2_distance(torch.tensor([3.0, 4.0]), torch.zeros(2)).item() == pytest.approx(5.0)
    with pytest.raises(ValueError, match="unknown distance"):
        L.distance("manhattan", a, b)


def test_triplet_benign_and_harmful_hinges_by_hand():
    b_new = b_orig = one([1.0, 0.0])
    mu = torch.tensor([[0.0, 1.0]])
    h_new, h_orig = one([0.0, 2.0]), one([1.0, 0.0])
    kw = dict(benign_pos_distance="cosine", benign_neg_distance="cosine", harmful_pos_distance="cosine",
              harmful_neg_distance="l2")
    out = L.triplet_terms(b_new, b_orig, h_new, h_orig, mu, W1, W1, margin_benign=0.5, margin_harmful=3.0, **kw)
    # benign: relu(d_cos(b, b) - d_cos(b, mu) + 0.5) = relu(0 - 1 + 0.5) = 0 (hinge off)
    assert out["benign"].item() == pytest.approx(0.0) and out["benign_active"].item() == 0.0
    # harmful: relu(d_cos(h_new, mu) - |h_new - h_orig| + 3) = relu(0 - sqrt(5) + 3)
    assert out["harmful"].item() == pytest.approx(3 - math.sqrt(5))
    out = L.triplet_terms(b_new, b_orig, h_new, h_orig, mu, W1, W1, margin_benign=1.5, margin_harmful=2.0, **kw)
    assert out["benign"].item() == pytest.approx(0.5)
    assert out["harmful"].item() == pytest.approx(0.0)  # sqrt(5) > 2: the harmful hinge switches off


def test_old_margins_keep_the_objective_linear_and_measured_margins_switch_off():
    """seed_compat margins (500 / 1500, raw L2): both ReLUs always active, the loss is linear in the distances
    and its gradient never vanishes; margins on the measured scale let the hinge switch off."""
    cfg, _, _ = load_train_config("seed_compat")
    lc = cfg.loss
    assert (lc.margin_benign, lc.margin_harmful) == (500.0, 1500.0) and lc.margin_scale is None
    h_orig = one([1.0, 0.0])
    mu = torch.tensor([[0.0, 1.0]])
    h_new = one([0.0, 1.2]).requires_grad_(True)  # rerouted: next to the centroid, away from home
    kw = dict(harmful_pos_distance="l2", harmful_neg_distance="l2", benign_pos_distance="l2", benign_neg_distance="l2")
    old = L.triplet_terms(h_orig, h_orig, h_new, h_orig, mu, W1, W1, margin_benign=500, margin_harmful=1500, **kw)
    d_p, d_n = 0.2, math.hypot(-1.0, 1.2)
    assert old["harmful"].item() == pytest.approx(d_p - d_n + 1500, rel=1e-6)
    assert old["benign"].item() == pytest.approx(0 - math.sqrt(2) + 500, rel=1e-6)
    old["harmful"].backward()
    assert h_new.grad.abs().sum() > 0  # still pushing, forever
    # margin on the measured scale: m = 0.5 x d(h_orig, mu) = 0.5 * sqrt(2): the hinge is 0 once h_new left
    m = 0.5 * L.l2_distance(h_orig, mu[:, None, None, :]).item()
    new = L.triplet_terms(h_orig, h_orig, h_new.detach(), h_orig, mu, W1, W1, margin_benign=m, margin_harmful=m, **kw)
    assert new["harmful"].item() == 0.0 and new["benign"].item() == 0.0
    start = L.triplet_terms(h_orig, h_orig, h_orig, h_orig, mu, W1, W1, margin_benign=m, margin_harmful=m, **kw)
    assert start["harmful"].item() == pytest.approx(math.sqrt(2) + m)  # active at the start


def test_centroid_flaw_and_fixes():
    h = one([2.0, 1.0]).requires_grad_(True)
    # old behaviour (batch_live): one harmful sample -> mu == h_new, d(h_new, mu) == 0, no gradient from d_p
    mu_live = L.centroid(h, W1)
    assert torch.equal(mu_live, h.view(1, 2))
    d_p = L.l2_distance(h, mu_live[:, None, None, :])
    assert d_p.item() == 0.0
    # weighted token mean over tokens of two samples: (1*[0,0] + 3*[4,8]) / 4
    hh = torch.tensor([[[[0.0, 0.0]], [[4.0, 8.0]]]])  # [L=1, B=2, T=1, D=2]
    assert L.centroid(hh, t([1.0], [3.0])).tolist() == [[3.0, 6.0]]
    # EMA: detached, first batch initialises, then decay * mu + (1 - decay) * batch
    mu = L.ema_update(None, h.view(1, 2), 0.9)
    assert not mu.requires_grad and mu.tolist() == [[2.0, 1.0]]
    mu = L.ema_update(mu, torch.tensor([[12.0, -9.0]]), 0.9)
    assert mu.flatten().tolist() == pytest.approx([3.0, 0.0], abs=1e-6)
    assert L.n_samples(t([0.0, 1.0], [0.0, 0.0])) == 1
    with pytest.raises(ValueError, match=">= 2 harmful"):
        L.check_centroid_config("batch", 1)
    L.check_centroid_config("batch", 2)
    L.check_centroid_config("ema", 1)


def test_degenerate_centroid_configuration_is_rejected():
    with pytest.raises(TrainConfigError, match="loss.centroid.*>= 2 harmful"):
        from_dict({"loss": {"centroid": "batch"}, "train": {"batch_size": 2, "harmful_fraction": 0.5}})
    from_dict({"loss": {"centroid": "batch"}, "train": {"batch_size": 4, "harmful_fraction": 0.5}})


def test_legacy_cb_terms():
    h_orig = torch.tensor([[[[1.0, 1.0], [1.0, 0.0]]]])  # [1, 1, 2, 2]
    h_new = torch.tensor([[[[1.0, 0.0], [-1.0, 0.0]]]])
    # token 0: relu(cos 45°) = 1/sqrt(2); token 1: relu(-1) = 0 -> mean over 2 tokens
    assert L.rerouting_relu_cos(h_new, h_orig, torch.ones(1, 2)).item() == pytest.approx(1 / math.sqrt(2) / 2)
    b_new, b_orig = one([3.0, 4.0]), one([0.0, 0.0])
    assert L.retain_l2(b_new, b_orig, W1).item() == pytest.approx(5.0)


def test_legacy_schema_direction_is_fixed_per_run_and_layer():
    r1 = L.random_directions(7, [10, 20], 16)
    assert r1.shape == (2, 16) and torch.allclose(r1.norm(dim=-1), torch.ones(2))
    assert torch.equal(r1, L.random_directions(7, [10, 20], 16))  # drawn once from the seed: fixed
    assert not torch.allclose(r1[0], r1[1]) and not torch.allclose(r1, L.random_directions(8, [10, 20], 16))
    h = r1.view(2, 1, 1, 16) * 3.0  # already along the direction: 1 - cos = 0
    assert L.reroute_to_direction(h, r1, W1).item() == pytest.approx(0.0, abs=1e-6)
    assert L.reroute_to_direction(-h, r1, W1).item() == pytest.approx(2.0)


def test_shifted_positions_and_kl_with_temperature():
    w = t([0.0, 0.0, 1.0, 2.0])  # tokens 2 and 3 masked -> predicted by the logits at 1 and 2
    b, pos, wt = L.shifted_positions(w)
    assert b.tolist() == [0, 0] and pos.tolist() == [1, 2] and wt.tolist() == [1.0, 2.0]
    assert L.shifted_positions(t([1.0, 0.0]))[1].numel() == 0  # token 0 has no logit before it
    base = torch.tensor([[0.0, 0.0]])
    adapter = torch.tensor([[math.log(3.0), 0.0]])  # q = (0.75, 0.25)
    kl = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    assert L.kl_base_adapter(base, adapter, torch.ones(1)).item() == pytest.approx(kl)
    # temperature 2: q = softmax(log(3)/2, 0) = (sqrt3, 1)/(sqrt3+1), times tau^2 = 4
    q = math.sqrt(3) / (math.sqrt(3) + 1)
    kl2 = 4 * (0.5 * math.log(0.5 / q) + 0.5 * math.log(0.5 / (1 - q)))
    assert L.kl_base_adapter(base, adapter, torch.ones(1), temperature=2.0).item() == pytest.approx(kl2)
    assert L.kl_base_adapter(base, base, torch.ones(1)).item() == pytest.approx(0.0)
    # weighted mean over positions with a global count
    two = L.kl_base_adapter(base.repeat(2, 1), adapter.repeat(2, 1), torch.tensor([1.0, 3.0]), n=4)
    assert two.item() == pytest.approx(kl)


def test_cross_entropy_masked():
    logits = torch.tensor([[0.0, math.log(3.0)]])
    assert L.cross_entropy_masked(logits, torch.tensor([1]), torch.ones(1)).item() == pytest.approx(-math.log(0.75))


def test_coefficient_schedules():
    assert L.coefficients("reference", 10, 50, 100) == pytest.approx((7.5, 2.5))
    assert L.coefficients("legacy_horizon", 10, 50, 100) == pytest.approx((5.0, 5.0))
    assert L.coefficients("stage2", 10, 50, 100) == pytest.approx((7.5, 0.75))
    assert L.coefficients("stage2", 0.5, 100, 100) == pytest.approx((0.25, 1.0))
    assert L.coefficients("reference", 10, 0, 100) == pytest.approx((10.0, 0.0))
    with pytest.raises(ValueError, match="unknown coefficient schedule"):
        L.coefficients("cosine", 1, 0, 1)
