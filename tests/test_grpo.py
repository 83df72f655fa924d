"""Unit tests of grpo.py against the hand-computed properties of specs/grpo.md ("Properties a test can
check"): group advantages, the clipped surrogate and its gradients, exact aggregation under
micro-batching and data parallelism, k3, DAPO's extras, the presets and the Method hooks.

Everything runs on tiny CPU tensors (float64 where a tight tolerance matters)."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from grpo import (
    AGGREGATIONS,
    PRESETS,
    GRPOConfig,
    Method,
    Normaliser,
    aggregate,
    clipped_surrogate,
    group_advantages,
    informative_groups,
    k3_kl,
    overlong_penalty,
)
from conftest import policy_loss  # reference loss (clipped_surrogate + aggregate) to check the training code against

F64 = torch.float64


def _leaf(values, dtype=F64):
    return torch.tensor(values, dtype=dtype, requires_grad=True)


# ===================================================================================================
# 1. Group advantages
# ===================================================================================================
def test_advantages_g8_one_correct():
    r = torch.tensor([1.0] + [0.0] * 7)
    a = group_advantages(r, 8)
    assert a.shape == r.shape and a.dtype == torch.float32
    assert a[0].item() == pytest.approx(2.474867, abs=2e-6)
    assert torch.allclose(a[1:], torch.full((7,), -0.353553), atol=2e-6)
    # hand formula: μ = 1/8, unbiased σ = sqrt(1/8)
    sigma = math.sqrt(1 / 8)
    assert a[0].item() == pytest.approx((7 / 8) / (sigma + 1e-6), rel=1e-6)


def test_advantages_g8_four_correct():
    r = torch.tensor([1.0, 0, 1, 0, 0, 1, 1, 0])
    a = group_advantages(r, 8)
    expected = torch.where(r > 0, torch.tensor(0.935413), torch.tensor(-0.935413))
    assert torch.allclose(a, expected, atol=2e-6)


def test_advantages_dr_grpo_no_std():
    r = torch.tensor([0.0, 0, 0, 1, 0, 0, 0, 0])
    a = group_advantages(r, 8, scale="none")
    expected = torch.tensor([-0.125, -0.125, -0.125, 0.875, -0.125, -0.125, -0.125, -0.125])
    assert torch.equal(a, expected)


def test_advantages_use_unbiased_std_not_population():
    r = torch.tensor([1.0] + [0.0] * 7)
    a = group_advantages(r, 8)
    pop_sigma = math.sqrt(7 / 64)  # population (n) std: numpy's default, which the spec forbids
    pop_value = (7 / 8) / (pop_sigma + 1e-6)  # ≈ 2.6458
    assert pop_value == pytest.approx(2.645751, abs=1e-5)
    assert abs(a[0].item() - pop_value) > 0.1
    assert a[0].item() == pytest.approx(2.474867, abs=2e-6)


def test_advantages_all_equal_are_exactly_zero():
    for value in (0.0, 1.0, 0.37):
        a = group_advantages(torch.full((8,), value), 8)
        assert torch.equal(a, torch.zeros(8))
    # mixed batch: the degenerate groups are exactly 0, the informative one is not
    r = torch.tensor([1.0, 1, 1, 1, 0, 1, 0, 0, 0, 0, 0, 0])
    a = group_advantages(r, 4)
    assert torch.equal(a[:4], torch.zeros(4)) and torch.equal(a[8:], torch.zeros(4))
    # [0, 1, 0, 0]: μ = 1/4, unbiased σ = 1/2
    assert torch.allclose(a[4:8], torch.tensor([-0.5, 1.5, -0.5, -0.5]), atol=1e-5)


def test_advantages_batch_scale():
    r = torch.tensor([1.0, 0, 0, 0, 1, 1, 0, 0])
    a = group_advantages(r, 4, scale="batch")
    # 3 ones and 5 zeros: unbiased batch variance = (3·(5/8)² + 5·(3/8)²)/7 = 15/56
    sigma = math.sqrt(15 / 56)
    mu = torch.tensor([0.25] * 4 + [0.5] * 4)
    expected = (r - mu) / (sigma + 1e-6)
    assert torch.allclose(a, expected, atol=1e-6)
    # it differs from the per-group z-score
    assert not torch.allclose(a, group_advantages(r, 4, scale="group"), atol=1e-3)


def test_advantages_group_size_below_two_raises():
    with pytest.raises(ValueError):
        group_advantages(torch.tensor([1.0, 0.0]), 1)
    with pytest.raises(ValueError):
        group_advantages(torch.tensor([1.0, 0.0]), 2, scale="bogus")


def test_advantages_flat_and_2d_agree():
    g = torch.Generator().manual_seed(0)
    r = torch.randint(0, 2, (3, 4), generator=g).float()
    r[0] = torch.tensor([1.0, 0, 0, 1])
    flat = group_advantages(r.flatten(), 4)
    two_d = group_advantages(r, 4)
    assert two_d.shape == (3, 4) and flat.shape == (12,)
    assert torch.equal(two_d.flatten(), flat)
    # groups are contiguous: group 0 of the flat tensor is row 0 of the 2-D one
    assert torch.equal(flat[:4], group_advantages(r[0], 4))


def test_advantages_integer_rewards_give_float():
    a = group_advantages(torch.tensor([1, 0, 0, 0]), 4)
    assert a.dtype == torch.float32
    assert a[0].item() == pytest.approx(0.75 / (0.5 + 1e-6), rel=1e-6)


@settings(max_examples=40, deadline=None)
@given(
    st.integers(min_value=2, max_value=8),
    st.integers(min_value=1, max_value=4),
    st.sampled_from(["group", "batch", "none"]),
    st.data(),
)
def test_advantages_sum_to_zero_per_group(group_size, n_groups, scale, data):
    values = data.draw(st.lists(st.sampled_from([0.0, 1.0, 0.5, -0.25]),
                                min_size=group_size * n_groups, max_size=group_size * n_groups))
    r = torch.tensor(values, dtype=F64)
    a = group_advantages(r, group_size, scale=scale).reshape(n_groups, group_size)
    assert torch.allclose(a.sum(dim=1), torch.zeros(n_groups, dtype=F64), atol=1e-9)
    for row, adv in zip(r.reshape(n_groups, group_size), a):
        if torch.all(row == row[0]):
            assert torch.equal(adv, torch.zeros_like(adv))


# ===================================================================================================
# 2. Clipped surrogate and on-policy gradients
# ===================================================================================================
# a ragged batch: 3 sequences, T = 4, lengths 4, 2, 3
RAGGED_MASK = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]], dtype=F64)
RAGGED_ADV = torch.tensor([1.5, -0.5, 0.25], dtype=F64)
RAGGED_LOGP = [[-1.0, -2.0, -0.5, -3.0], [-0.1, -0.7, -9.0, -9.0], [-2.2, -0.3, -1.1, -9.0]]


def _on_policy_grad(agg, max_len=None):
    logp = _leaf(RAGGED_LOGP)
    norm = Normaliser.of(RAGGED_MASK, max_len)
    loss, metrics = policy_loss(logp, logp.detach(), RAGGED_ADV, RAGGED_MASK, agg=agg, norm=norm)
    loss.backward()
    assert metrics == {"clip_frac_low": 0.0, "clip_frac_high": 0.0}
    return loss, logp.grad


def test_on_policy_gradient_token_mean():
    loss, grad = _on_policy_grad("token-mean")
    n = 9.0
    expected = -RAGGED_ADV[:, None] / n * RAGGED_MASK
    assert torch.allclose(grad, expected, atol=1e-12)
    # ρ = 1 so ℓ = −A: loss = −Σ_i T_i A_i / N
    assert loss.item() == pytest.approx(-(4 * 1.5 + 2 * -0.5 + 3 * 0.25) / n, abs=1e-12)


def test_on_policy_gradient_seq_mean_token_mean():
    loss, grad = _on_policy_grad("seq-mean-token-mean")
    s, lengths = 3.0, torch.tensor([4.0, 2.0, 3.0], dtype=F64)
    expected = -RAGGED_ADV[:, None] / (s * lengths[:, None]) * RAGGED_MASK
    assert torch.allclose(grad, expected, atol=1e-12)
    assert loss.item() == pytest.approx(-RAGGED_ADV.sum().item() / s, abs=1e-12)


def test_on_policy_gradient_seq_mean_token_sum_norm():
    loss, grad = _on_policy_grad("seq-mean-token-sum-norm", max_len=10)
    s, l_max = 3.0, 10.0
    expected = -RAGGED_ADV[:, None] / (s * l_max) * RAGGED_MASK
    assert torch.allclose(grad, expected, atol=1e-12)
    # padding gets exactly zero gradient
    assert torch.equal(grad[RAGGED_MASK == 0], torch.zeros(3, dtype=F64))
    # the default L_max of Normaliser.of is the padded width T
    _, grad_t = _on_policy_grad("seq-mean-token-sum-norm")
    assert torch.allclose(grad_t, -RAGGED_ADV[:, None] / (s * 4.0) * RAGGED_MASK, atol=1e-12)


def test_unknown_aggregation_raises():
    with pytest.raises(ValueError):
        aggregate(torch.zeros(2, 2), torch.ones(2, 2), "sum", Normaliser(4, 2, 2))


def _one_token(ratio, adv, eps_low=0.2, eps_high=0.2, dual_clip_c=None):
    logp = _leaf([[-1.0]])
    old = (logp.detach() - math.log(ratio))
    loss, low, high = clipped_surrogate(logp, old, torch.tensor([adv], dtype=F64), eps_low, eps_high,
                                        dual_clip_c)
    loss.sum().backward()
    return loss.item(), logp.grad.item(), bool(low.item()), bool(high.item())


def test_clip_high_positive_advantage():
    a = 2.0
    loss, grad, low, high = _one_token(1.5, a, eps_low=0.2, eps_high=0.28)
    assert loss == pytest.approx(-1.28 * a, abs=1e-12)
    assert grad == 0.0
    assert high and not low


def test_clip_low_negative_advantage():
    a = -2.0
    loss, grad, low, high = _one_token(0.5, a, eps_low=0.2, eps_high=0.28)
    assert loss == pytest.approx(-0.8 * a, abs=1e-12)
    assert grad == 0.0
    assert low and not high


def test_negative_advantage_large_ratio_is_not_clipped():
    a = -2.0
    loss, grad, low, high = _one_token(1.5, a)
    assert loss == pytest.approx(-1.5 * a, abs=1e-12)
    # ∂(−ρA)/∂logp = −ρA = 3
    assert grad == pytest.approx(-1.5 * a, abs=1e-12)
    assert not low and not high


def test_inside_trust_region_gradient_is_minus_rho_a():
    loss, grad, low, high = _one_token(1.1, 2.0)
    assert loss == pytest.approx(-2.2, abs=1e-12) and grad == pytest.approx(-2.2, abs=1e-12)
    assert not low and not high


def test_dual_clip_bounds_negative_advantage_loss():
    a = -2.0
    # without dual clip the loss is −ρA = 10
    loss, grad, _, _ = _one_token(5.0, a)
    assert loss == pytest.approx(10.0, abs=1e-12) and grad == pytest.approx(10.0, abs=1e-12)
    # with c = 3: ℓ = min(−ρA, −cA) = 6 and the gradient vanishes
    loss, grad, _, _ = _one_token(5.0, a, dual_clip_c=3.0)
    assert loss == pytest.approx(-3.0 * a, abs=1e-12)
    assert grad == 0.0
    # below the bound, dual clip changes nothing
    loss, grad, _, _ = _one_token(1.5, a, dual_clip_c=3.0)
    assert loss == pytest.approx(-1.5 * a, abs=1e-12) and grad == pytest.approx(3.0, abs=1e-12)
    # positive advantages are never dual-clipped
    loss, grad, _, _ = _one_token(5.0, 1.0, eps_high=10.0, dual_clip_c=3.0)
    assert loss == pytest.approx(-5.0, abs=1e-12) and grad == pytest.approx(-5.0, abs=1e-12)


def test_policy_loss_clip_fractions():
    ratios = torch.tensor([[1.5, 1.0, 1.1, 1.5],   # A > 0: only token 0 is above 1.28 (token 3 is padding)
                           [0.5, 0.7, 1.0, 1.5]],  # A < 0: tokens 0 and 1 are below 0.8
                          dtype=F64)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]], dtype=F64)
    adv = torch.tensor([1.0, -1.0], dtype=F64)
    logp = torch.full((2, 4), -1.0, dtype=F64)
    old = logp - ratios.log()
    _, metrics = policy_loss(logp, old, adv, mask, eps_low=0.2, eps_high=0.28)
    assert metrics["clip_frac_high"] == pytest.approx(1 / 7)
    assert metrics["clip_frac_low"] == pytest.approx(2 / 7)
    # with a symmetric clip token (0, 2) = 1.1 is still inside; the bound is 1.2 < 1.5
    _, metrics = policy_loss(logp, old, adv, mask, eps_low=0.2, eps_high=0.2)
    assert metrics["clip_frac_high"] == pytest.approx(1 / 7)


def test_policy_loss_default_norm_is_one_shot_token_mean():
    logp = _leaf(RAGGED_LOGP)
    loss, _ = policy_loss(logp, logp.detach(), RAGGED_ADV, RAGGED_MASK)
    loss_explicit, _ = policy_loss(logp, logp.detach(), RAGGED_ADV, RAGGED_MASK, agg="token-mean",
                                   norm=Normaliser(9.0, 3.0, 4, 1))
    assert loss.item() == pytest.approx(loss_explicit.item(), abs=1e-15)


# ===================================================================================================
# 3. Aggregation is partition-invariant (micro-batches and simulated data-parallel ranks)
# ===================================================================================================
def _random_batch(seed=0, s=8, t=7, d=5):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, t + 1, (s,), generator=g)
    lengths[0] = t
    mask = (torch.arange(t)[None, :] < lengths[:, None]).to(F64)
    feats = torch.randn(s, t, d, generator=g, dtype=F64)
    base = -torch.rand(s, t, generator=g, dtype=F64) * 3
    # old_logp off-policy enough that some tokens are clipped
    theta0 = torch.randn(d, generator=g, dtype=F64) * 0.1
    old = (base + feats @ theta0 + torch.randn(s, t, generator=g, dtype=F64) * 0.3).detach()
    adv = torch.randn(s, generator=g, dtype=F64)
    return feats, base, theta0, old, adv, mask


def _loss_and_grad(theta0, feats, base, old, adv, mask, rows_per_call, agg, norm, world):
    """Sum the micro-batch losses of each rank, backprop per rank, average gradients over ranks."""
    rank_rows = torch.arange(feats.shape[0]).chunk(world)
    grads, losses = [], []
    for rows in rank_rows:
        theta = theta0.clone().requires_grad_(True)  # each rank holds its own replica
        total = torch.zeros((), dtype=F64)
        for mb in rows.split(rows_per_call):
            logp = base[mb] + feats[mb] @ theta
            loss, _ = policy_loss(logp, old[mb], adv[mb], mask[mb], eps_low=0.2, eps_high=0.28,
                                  agg=agg, norm=norm)
            loss.backward()  # gradients accumulate over micro-batches
            total = total + loss.detach()
        grads.append(theta.grad.clone())
        losses.append(total)
    return sum(losses) / world, sum(grads) / world  # DDP averages over ranks


@pytest.mark.parametrize("agg", AGGREGATIONS)
def test_partition_invariance(agg):
    feats, base, theta0, old, adv, mask = _random_batch(seed=1)
    l_max = 11
    s = feats.shape[0]
    one_norm = Normaliser(float(mask.sum()), float(s), l_max, 1)
    ref_loss, ref_grad = _loss_and_grad(theta0, feats, base, old, adv, mask, s, agg, one_norm, 1)
    # sanity: the one-shot loss equals the spec's formula
    theta = theta0.clone().requires_grad_(True)
    per_token, low, high = clipped_surrogate(base + feats @ theta, old, adv, 0.2, 0.28)
    assert (low | high)[mask.bool()].any()  # the batch exercises clipping
    if agg == "token-mean":
        formula = (per_token * mask).sum() / mask.sum()
    elif agg == "seq-mean-token-mean":
        formula = ((per_token * mask).sum(1) / mask.sum(1)).mean()
    else:
        formula = (per_token * mask).sum() / (s * l_max)
    assert ref_loss.item() == pytest.approx(formula.item(), abs=1e-12)
    assert ref_grad.abs().max() > 1e-3

    for world in (1, 2):
        norm = Normaliser(float(mask.sum()), float(s), l_max, world)
        for rows_per_call in (1, 3, s // world):
            loss, grad = _loss_and_grad(theta0, feats, base, old, adv, mask, rows_per_call, agg, norm,
                                        world)
            assert loss.item() == pytest.approx(ref_loss.item(), abs=1e-12), (world, rows_per_call)
            assert torch.allclose(grad, ref_grad, atol=1e-12), (world, rows_per_call)


@pytest.mark.parametrize("agg", AGGREGATIONS)
def test_local_normaliser_is_not_partition_invariant(agg):
    """Control: normalising each micro-batch by its own counts (the classic bug) changes the result."""
    feats, base, theta0, old, adv, mask = _random_batch(seed=2)
    s = feats.shape[0]
    glob = Normaliser(float(mask.sum()), float(s), 7, 1)
    ref_loss, _ = _loss_and_grad(theta0, feats, base, old, adv, mask, s, agg, glob, 1)
    wrong = torch.zeros((), dtype=F64)
    for mb in torch.arange(s).split(3):
        logp = base[mb] + feats[mb] @ theta0
        loss, _ = policy_loss(logp, old[mb], adv[mb], mask[mb], eps_high=0.28, agg=agg,
                              norm=Normaliser.of(mask[mb], 7))
        wrong = wrong + loss
    assert abs(wrong.item() - ref_loss.item()) > 1e-6


# ===================================================================================================
# 4. k3 KL
# ===================================================================================================
def test_k3_zero_at_reference():
    logp = _leaf([-0.3, -2.0, -5.0])
    k3 = k3_kl(logp, logp.detach().clone())
    assert torch.equal(k3.detach(), torch.zeros(3, dtype=F64))
    k3.sum().backward()
    assert torch.equal(logp.grad, torch.zeros(3, dtype=F64))


def test_k3_positive_and_gradient():
    logp = _leaf([-1.0, -1.0, -2.0, -0.5])
    ref = torch.tensor([-1.5, -0.2, -1.0, -3.0], dtype=F64)
    k3 = k3_kl(logp, ref)
    delta = ref - logp.detach()
    assert torch.all(k3 > 0)
    assert torch.allclose(k3.detach(), delta.exp() - delta - 1, atol=1e-12)
    k3.sum().backward()
    assert torch.allclose(logp.grad, 1 - delta.exp(), atol=1e-12)


def test_k3_gradient_does_not_flow_into_ref():
    logp = _leaf([-1.0])
    ref = _leaf([-0.5])
    k3_kl(logp, ref).sum().backward()
    assert ref.grad is None
    assert logp.grad.item() == pytest.approx(1 - math.exp(0.5), abs=1e-12)


def test_k3_clamped_at_ten():
    # exp(δ) − δ − 1 = 10 at δ ≈ 2.6109; below it the value is not clamped
    logp = _leaf([-4.0, -4.0])
    ref = torch.tensor([-1.0, -4.0 + 2.6], dtype=F64)  # δ = 3 and δ = 2.6
    k3 = k3_kl(logp, ref)
    assert k3[0].item() == 10.0
    assert k3[1].item() == pytest.approx(math.exp(2.6) - 3.6, abs=1e-12)
    assert k3[1].item() < 10.0
    k3.sum().backward()
    assert logp.grad[0].item() == 0.0
    assert logp.grad[1].item() == pytest.approx(1 - math.exp(2.6), abs=1e-12)


# ===================================================================================================
# 5. DAPO extras
# ===================================================================================================
def test_overlong_penalty_values():
    lengths = torch.tensor([10, 80, 81, 90, 95, 100])
    pen = overlong_penalty(lengths, 100, 20)
    assert torch.allclose(pen, torch.tensor([0.0, 0.0, -0.05, -0.5, -0.75, -1.0]), atol=1e-6)
    assert pen[0].item() == 0.0 and pen[1].item() == 0.0
    # factor scales the ramp
    assert overlong_penalty(torch.tensor([90]), 100, 20, factor=2.0).item() == pytest.approx(-1.0)


def test_informative_groups():
    correct = torch.tensor([0, 0, 0, 0,  1, 1, 1, 1,  0, 1, 0, 0,  1, 1, 1, 0])
    assert informative_groups(correct, 4).tolist() == [False, False, True, True]
    assert informative_groups(torch.tensor([True, False, True, True]), 2).tolist() == [True, False]
    assert informative_groups(torch.zeros(6), 3).tolist() == [False, False]
    assert informative_groups(torch.ones(6), 3).tolist() == [False, False]


def test_degenerate_batch_gives_zero_pg_gradient():
    correct = torch.tensor([1.0, 1, 1, 1, 0, 0, 0, 0])
    assert not informative_groups(correct, 4).any()
    logp = _leaf([[-1.0, -2.0, -0.5]] * 8)
    mask = torch.ones(8, 3, dtype=F64)
    mask[3, 2] = 0
    for cfg in PRESETS.values():
        method = Method(cfg)
        adv = method.advantages({"group_size": 4}, correct).to(F64)
        assert torch.equal(adv, torch.zeros(8, dtype=F64))
        loss, _ = policy_loss(logp, logp.detach(), adv, mask, cfg.eps_low, cfg.eps_high, agg=cfg.agg)
        (grad,) = torch.autograd.grad(loss, logp)
        assert loss.item() == 0.0
        assert torch.equal(grad, torch.zeros_like(grad))


# ===================================================================================================
# 6. Presets
# ===================================================================================================
@pytest.mark.parametrize("name, eps_low, eps_high, agg, scale, dyn, overlong", [
    ("grpo", 0.2, 0.2, "seq-mean-token-mean", "group", False, False),
    ("dapo", 0.2, 0.28, "token-mean", "group", True, True),
    ("dr_grpo", 0.2, 0.2, "seq-mean-token-sum-norm", "none", False, False),
])
def test_presets_match_spec_table(name, eps_low, eps_high, agg, scale, dyn, overlong):
    cfg = PRESETS[name]
    assert (cfg.eps_low, cfg.eps_high, cfg.agg, cfg.adv_scale) == (eps_low, eps_high, agg, scale)
    assert cfg.kl_coef == 0.0
    assert cfg.dynamic_sampling is dyn and cfg.overlong_shaping is overlong
    assert cfg.dual_clip_c is None and cfg.mask_truncated is False
    assert cfg.adv_eps == 1e-6 and cfg.max_gen_batches == 4
    assert cfg.overlong_buffer == 0.2 and cfg.overlong_factor == 1.0
    assert cfg.agg in AGGREGATIONS


def test_default_config_is_grpo_preset():
    assert GRPOConfig() == PRESETS["grpo"]
    assert Method().cfg == PRESETS["grpo"]


# ===================================================================================================
# 7. Method hooks
# ===================================================================================================
def test_shape_rewards_dapo_adds_overlong_term():
    batch = {"correct": torch.tensor([1, 1, 0, 1]), "lengths": torch.tensor([50, 90, 100, 80]),
             "max_new_tokens": 100, "group_size": 2}
    shaped = Method(PRESETS["dapo"]).shape_rewards(batch)
    assert torch.allclose(shaped, torch.tensor([1.0, 0.5, -1.0, 1.0]), atol=1e-6)
    plain = Method(PRESETS["grpo"]).shape_rewards(batch)
    assert torch.equal(plain, torch.tensor([1.0, 1.0, 0.0, 1.0]))
    assert batch["correct"].tolist() == [1, 1, 0, 1]  # not modified in place


def test_method_advantages_match_group_advantages():
    r = torch.tensor([1.0, 0, 0, 0, 1, 1, 0, 1])
    batch = {"group_size": 4}
    assert torch.equal(Method().advantages(batch, r), group_advantages(r, 4))
    assert torch.equal(Method(PRESETS["dr_grpo"]).advantages(batch, r), group_advantages(r, 4, "none"))


def _micro_batch(seed=3):
    g = torch.Generator().manual_seed(seed)
    logp = (-torch.rand(4, 5, generator=g, dtype=F64) * 3).requires_grad_(True)
    old = (logp.detach() + torch.randn(4, 5, generator=g, dtype=F64) * 0.3)
    ref = logp.detach() + torch.randn(4, 5, generator=g, dtype=F64) * 0.5
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 1, 0], [1, 0, 0, 0, 0]], dtype=F64)
    adv = torch.tensor([0.7, -1.2, 0.3, 0.2], dtype=F64)
    truncated = torch.tensor([True, False, False, False])
    return {"logp": logp, "old_logp": old, "advantages": adv, "response_mask": mask, "truncated": truncated,
            "ref_logp": ref}


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_method_loss_equals_policy_loss(preset):
    cfg = PRESETS[preset]
    mb = _micro_batch()
    norm = Normaliser(float(mb["response_mask"].sum()) + 7, 6.0, 9, 2)  # part of a larger batch on 2 ranks
    loss, stats = Method(cfg).loss(mb, norm)
    expected, metrics = policy_loss(mb["logp"], mb["old_logp"], mb["advantages"], mb["response_mask"],
                                    cfg.eps_low, cfg.eps_high, cfg.agg, norm)
    assert loss.item() == pytest.approx(expected.item(), abs=1e-12)
    (g1,) = torch.autograd.grad(loss, mb["logp"])
    (g2,) = torch.autograd.grad(expected, mb["logp"])
    assert torch.allclose(g1, g2, atol=1e-12)
    n_valid = float(mb["response_mask"].sum())
    assert stats["clip_low_count"] / n_valid == pytest.approx(metrics["clip_frac_low"])
    assert stats["clip_high_count"] / n_valid == pytest.approx(metrics["clip_frac_high"])
    assert "kl_sum" not in stats


def test_needs_ref_logp_only_with_kl():
    assert "ref_logp" not in Method().needs()
    for cfg in PRESETS.values():
        assert "ref_logp" not in Method(cfg).needs()
    assert "ref_logp" in Method(GRPOConfig(kl_coef=0.04)).needs()


@pytest.mark.parametrize("agg", AGGREGATIONS)
def test_method_loss_adds_beta_k3(agg):
    beta = 0.04
    cfg = GRPOConfig(kl_coef=beta, agg=agg)
    mb = _micro_batch()
    norm = Normaliser.of(mb["response_mask"], 8)
    loss, stats = Method(cfg).loss(mb, norm)
    pg, _ = policy_loss(mb["logp"], mb["old_logp"], mb["advantages"], mb["response_mask"], agg=agg, norm=norm)
    kl = aggregate(k3_kl(mb["logp"], mb["ref_logp"]), mb["response_mask"], agg, norm)
    assert kl.item() > 0
    assert loss.item() == pytest.approx((pg + beta * kl).item(), abs=1e-12)
    (g1,) = torch.autograd.grad(loss, mb["logp"])
    (g2,) = torch.autograd.grad(pg + beta * kl, mb["logp"])
    assert torch.allclose(g1, g2, atol=1e-12)
    k3 = k3_kl(mb["logp"], mb["ref_logp"]).detach()
    assert stats["kl_sum"] == pytest.approx(float((k3 * mb["response_mask"]).sum()))


def test_mask_truncated_zeros_truncated_rows():
    mb = _micro_batch()
    mb["old_logp"] = mb["logp"].detach()  # on-policy, so no valid token is clipped
    norm = Normaliser.of(mb["response_mask"])
    cfg = GRPOConfig(agg="token-mean", mask_truncated=True)
    loss, _ = Method(cfg).loss(mb, norm)
    (grad,) = torch.autograd.grad(loss, mb["logp"])
    assert torch.equal(grad[0], torch.zeros(5, dtype=F64))  # row 0 is truncated
    assert grad[1:][mb["response_mask"][1:] > 0].abs().min() > 0
    kept = mb["response_mask"].clone()
    kept[0] = 0
    expected, _ = policy_loss(mb["logp"], mb["old_logp"], mb["advantages"], kept, agg="token-mean", norm=norm)
    assert loss.item() == pytest.approx(expected.item(), abs=1e-12)
    # off by default: the truncated row contributes
    loss_off, _ = Method(GRPOConfig(agg="token-mean")).loss(mb, norm)
    assert abs(loss_off.item() - loss.item()) > 1e-6
