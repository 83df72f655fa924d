"""SENT (curriculum.py): semantic entropy, clustering, stages and their schedule, token sets and β, the
loss reductions of the spec ("Properties a test can check"), the cached SE pass, and end-to-end runs on
the toy (sent, resume across a stage boundary, DSDR + the SE curriculum)."""

import json
import math
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import train
from config import TrainConfig, resolve_defaults
from curriculum import (
    SENT, TIER_HIGH, TIER_LOW, CurriculumSampler, SENTConfig, answer_clusters, compute_semantic_entropy,
    release_token_loss, sample_weights, semantic_entropy, sent_token_sets, stage_split, stage_starts,
    tier_betas,
)
from data import load_prompts
from distributed import Dist, reduce_stats, to_device
from forward import slice_batch, token_fields
from grpo import GRPOConfig, Method, Normaliser, k3_kl
from rollout import load_policy

QUICK = ["--no-final-eval", "--no-progress", "--no-tensorboard"]


# ====================================================================================================
# Semantic entropy (§1, S2–S4)
# ====================================================================================================


def test_se_is_zero_for_one_cluster_whatever_the_weights():
    assert semantic_entropy([0] * 8, [0.9, 0.1, 0.3, 0.5, 0.2, 0.7, 0.01, 1.0]) == 0.0
    ids = answer_clusters([None] * 8, "countdown")  # all unparseable: one shared "none" cluster
    assert semantic_entropy(ids, np.ones(8)) == 0.0


def test_se_of_equally_weighted_clusters_is_ln_k():
    assert semantic_entropy([0, 0, 1, 1, 2, 2, 3, 3]) == pytest.approx(1.386294, abs=1e-6)
    assert semantic_entropy(list(range(8))) == pytest.approx(2.079442, abs=1e-6)
    assert semantic_entropy(list(range(8))) == pytest.approx(math.log(8), abs=1e-12)
    # weights 0.75 / 0.25: −(0.75 ln 0.75 + 0.25 ln 0.25)
    assert semantic_entropy([0, 1], [0.75, 0.25]) == pytest.approx(0.562335, abs=1e-6)
    assert semantic_entropy([0, 0, 0, 1], [0.25, 0.25, 0.25, 0.25]) == pytest.approx(0.562335, abs=1e-6)


def test_se_is_order_invariant_bounded_and_modes_agree_for_equal_weights():
    rng = np.random.default_rng(0)
    ids = [0, 1, 1, 2, 0, 3, 1, 1]
    w = rng.uniform(0.05, 1.0, size=8)
    perm = rng.permutation(8)
    assert semantic_entropy(ids, w) == pytest.approx(semantic_entropy([ids[i] for i in perm], w[perm]), abs=1e-12)
    assert 0 <= semantic_entropy(ids, w) <= math.log(4) + 1e-12
    same = np.full(8, -0.7)  # equal mean log-probs → equal weights
    assert semantic_entropy(ids, sample_weights(same, "prob")) == \
        pytest.approx(semantic_entropy(ids, sample_weights(same, "count")), abs=1e-12)


def test_weights_are_length_normalised_probabilities():
    assert np.allclose(sample_weights([-0.5, -2.0], "prob"), [math.exp(-0.5), math.exp(-2.0)])
    assert np.array_equal(sample_weights([-0.5, -2.0], "count"), [1.0, 1.0])


def test_clusters_by_final_value_and_unparseable_share_one_cluster():
    answers = ["15", "15", "7", None, "15", None, "7", "3"]
    ids = answer_clusters(answers, "countdown")
    assert ids == [0, 0, 1, 2, 0, 2, 1, 3]
    # S3 switch: every unparseable answer its own cluster → more clusters, higher SE
    single = answer_clusters(answers, "countdown", none_as_singletons=True)
    assert len(set(single)) == 5 and single[3] != single[5]
    assert [single[i] for i in (0, 1, 2, 4, 6, 7)] == [ids[i] for i in (0, 1, 2, 4, 6, 7)]
    assert semantic_entropy(single) > semantic_entropy(ids)
    # P = (3, 2, 2, 1)/8 by hand
    p = np.array([3, 2, 2, 1]) / 8
    assert semantic_entropy(ids) == pytest.approx(float(-(p * np.log(p)).sum()), abs=1e-12)


# ====================================================================================================
# Curriculum (§2, S5–S6)
# ====================================================================================================


def test_quantile_stages_partition_and_are_monotone_in_se():
    rng = np.random.default_rng(1)
    se = np.round(rng.uniform(0, 2, size=101), 1)  # rounded: many ties
    stages = stage_split(se, 2)
    assert sorted(stages[0] + stages[1]) == list(range(101))
    assert abs(len(stages[0]) - len(stages[1])) <= 1
    assert max(se[stages[0]]) <= min(se[stages[1]])
    for s in stages:  # ascending SE, ties in dataset order (stable sort)
        keys = [(se[i], i) for i in s]
        assert keys == sorted(keys)
    three = stage_split(se, 3)
    assert [len(s) for s in three] == [33, 34, 34]
    assert max(se[three[0]]) <= min(se[three[1]]) and max(se[three[1]]) <= min(se[three[2]])


def test_threshold_stages():
    se = [0.0, 1.2, 0.5, 0.7, 2.0]
    assert stage_split(se, 2, "threshold", [0.7]) == [[0, 2], [3, 1, 4]]
    assert stage_split(se, 2, "threshold", 0.7) == [[0, 2], [3, 1, 4]]  # the CLI parses "0.7" to a float


def test_stage_schedule():
    assert stage_starts(4, 2) == [0, 2]
    assert stage_starts(5, 2) == [0, 2]  # ⌊5/2⌋; the last stage takes the remainder
    assert stage_starts(100, 3) == [0, 33, 66]
    assert stage_starts(10, 2, [3, 7]) == [0, 3]


def test_sampler_yields_only_the_current_stage_and_switches_at_the_boundary():
    stages = [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9, 10]]
    total = 7
    sampler = CurriculumSampler(stages, stage_starts(total, 2), seed=3)
    seen = []
    for step in range(total):
        sampler.set_step(step)
        seen.append(sampler.next_indices(4))
    boundary = total // 2
    for step, idx in enumerate(seen):
        assert set(idx) <= set(stages[0] if step < boundary else stages[1]), (step, idx)
    # within a stage: whole passes, each a permutation, reshuffled from pass to pass
    first = [i for idx in seen[:boundary] for i in idx]  # 12 draws from 5 prompts: 2 passes + 2
    assert sorted(first[:5]) == stages[0] and sorted(first[5:10]) == stages[0]
    s1 = CurriculumSampler([list(range(40)), [40]], [0, 10], seed=0)
    assert s1.next_indices(40) != s1.next_indices(40)


def test_sampler_state_round_trip_across_the_boundary_is_exact():
    stages = [list(range(0, 7)), list(range(7, 20))]
    straight = CurriculumSampler(stages, [0, 2], seed=5)
    a = []
    for step in range(5):
        straight.set_step(step)
        a.append(straight.next_indices(3))
    first = CurriculumSampler(stages, [0, 2], seed=5)
    b = []
    for step in range(2):
        first.set_step(step)
        b.append(first.next_indices(3))
    state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint keeps
    resumed = CurriculumSampler(stages, [0, 2], seed=5)
    resumed.load_state_dict(state)
    for step in range(2, 5):
        resumed.set_step(step)
        b.append(resumed.next_indices(3))
    assert a == b and straight.state_dict() == resumed.state_dict()


def test_empty_stage_is_refused():
    with pytest.raises(ValueError, match="stage"):
        CurriculumSampler([[0, 1], []], [0, 1], seed=0)


# ====================================================================================================
# Token sets and β (§3, S8–S10)
# ====================================================================================================


def _constructed_batch():
    """2 sequences, 6 positions, 10 valid tokens (row 0: 6, row 1: 4)."""
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]], dtype=torch.float32)
    entropy = torch.tensor([[0.10, 0.90, 0.20, 0.30, 0.05, 0.40], [1.50, 0.25, 0.35, 0.15, 9.0, 9.0]])
    logp = torch.tensor([[-0.1, -2.0, -0.3, -0.05, -0.2, -0.6], [-3.0, -0.4, -0.01, -1.0, 0.0, 0.0]])
    adv = torch.tensor([1.0, -1.0])
    return entropy, logp, adv, mask


def test_t_low_size_and_entropy_order():
    entropy, logp, adv, mask = _constructed_batch()
    sets = sent_token_sets(entropy, logp, adv, mask)
    low = sets["low"]
    assert int(low.sum()) == 8  # max(1, ⌊0.8·10⌋)
    assert not (low & ~mask.bool()).any()
    outside = mask.bool() & ~low
    assert entropy[low].max() <= entropy[outside].min()
    # the two highest-entropy valid tokens (0.90, 1.50) are free
    assert not low[0, 1] and not low[1, 0]


def test_covariance_is_centred_over_t_low_and_ranks_t_hc():
    entropy, logp, adv, mask = _constructed_batch()
    sets = sent_token_sets(entropy, logp, adv, mask)
    low = sets["low"]
    a = adv.unsqueeze(-1).expand_as(logp)
    lp_low, a_low = logp[low].double(), a[low].double()
    assert float((lp_low - lp_low.mean()).sum()) == pytest.approx(0.0, abs=1e-12)
    expected = (lp_low - lp_low.mean()) * (a_low - a_low.mean())
    assert torch.allclose(sets["cov"][low], expected)
    assert not sets["cov"][~low].any()
    # T_hc: |T_low| = 8 → max(1, ⌊0.002·8⌋) = 1 token, the largest covariance
    assert int(sets["high"].sum()) == 1
    assert sets["cov"][sets["high"]].item() == pytest.approx(float(expected.max()))
    # by hand: T_low logp = [-0.1,-0.3,-0.05,-0.2,-0.6 | -0.4,-0.01,-1.0] (row 0 positions 0,2,3,4,5; row 1
    # positions 1,2,3), μ_lp = −2.66/8 = −0.3325; A = [1]*5 + [-1]*3, μ_A = 0.25. Row 0's best is
    # 0.75·(−0.05 + 0.3325) = 0.211875; row 1's −1.0 gives −1.25·(−1.0 + 0.3325) = 0.834375: the largest.
    assert sets["high"][1, 3]
    assert sets["cov"][1, 3].item() == pytest.approx(0.834375) and sets["cov"][0, 3].item() == pytest.approx(0.211875)
    # a larger ρ_cov takes the next ranks, always inside T_low
    top3 = sent_token_sets(entropy, logp, adv, mask, rho_cov=0.4)["high"]  # ⌊0.4·8⌋ = 3
    assert int(top3.sum()) == 3 and not (top3 & ~low).any()
    order = torch.argsort(expected, descending=True)[:3]
    assert torch.allclose(torch.sort(sets["cov"][top3]).values, torch.sort(expected[order]).values)


def test_t_hc_size_at_scale():
    g = torch.Generator().manual_seed(0)
    S, T = 10, 625  # |V| = 6250 → |T_low| = 5000 → |T_hc| = 10
    sets = sent_token_sets(torch.rand(S, T, generator=g), -torch.rand(S, T, generator=g),
                           torch.randn(S, generator=g), torch.ones(S, T))
    assert int(sets["low"].sum()) == 5000 and int(sets["high"].sum()) == 10
    assert not (sets["high"] & ~sets["low"]).any()


def test_beta_assignment():
    entropy, logp, adv, mask = _constructed_batch()
    sets = sent_token_sets(entropy, logp, adv, mask, rho_cov=0.25)  # |T_hc| = 2
    beta = tier_betas(sets["tier"], 0.2, 0.05)
    assert torch.isin(beta[mask.bool()], torch.tensor([0.0, 0.05, 0.2])).all()
    assert not beta[~sets["low"]].any()  # outside T_low (incl. padding): 0
    assert int((beta == torch.tensor(0.2)).sum()) == 2 == int(sets["high"].sum())
    assert torch.all(beta[sets["low"] & ~sets["high"]] == 0.05)
    assert int((beta == 0.05).sum()) == 6
    # release: β_low on the bottom-k covariance tokens of T_low only (S10)
    rel = sent_token_sets(entropy, logp, adv, mask, rho_cov=0.25, release=True)
    rbeta = tier_betas(rel["tier"], 0.2, 0.05)
    assert int((rbeta == torch.tensor(0.2)).sum()) == 2 and int((rbeta == 0.05).sum()) == 2
    bottom = rel["cov"][rbeta == 0.05]
    assert float(bottom.max()) <= float(rel["cov"][rel["low"] & (rbeta == 0)].min())


def test_cov_center_all():
    entropy, logp, adv, mask = _constructed_batch()
    sets = sent_token_sets(entropy, logp, adv, mask, cov_center="all")
    v = mask.bool()
    a = adv.unsqueeze(-1).expand_as(logp)
    lp, aa = logp.double(), a.double()
    expected = (lp - lp[v].mean()) * (aa - aa[v].mean())
    assert torch.allclose(sets["cov"][sets["low"]], expected[sets["low"]])


def _release_coefficients(entropy, logp, advantages, mask, rho_cov):
    """The release's coefficient map, written out from zldscr0/SENT `compute_policy_loss_low_entropy_kl_cov_v2`
    (on the intended low-entropy tokens, see release_token_loss): T_low = torch.topk(entropy, ⌊0.8·|V|⌋,
    largest=False); Cov = (A − mean)(logp − mean) over T_low in fp32; 0.2 on torch.topk(Cov, k) and then
    0.05 on torch.topk(Cov, k, largest=False), written last."""
    valid = mask.bool()
    a = advantages.unsqueeze(-1).expand_as(logp)
    low = torch.topk(entropy[valid], max(1, int(int(valid.sum()) * 0.8)), largest=False).indices
    cells = valid.reshape(-1).nonzero().squeeze(-1)[low]
    low_a, low_lp = a[valid].detach().float()[low], logp[valid].detach().float()[low]
    cov = (low_a - low_a.mean()) * (low_lp - low_lp.mean())
    k = max(1, int(len(cov) * rho_cov))
    coef = torch.zeros(logp.numel())
    coef[cells[torch.topk(cov, k, largest=True).indices]] = 0.2
    coef[cells[torch.topk(cov, k, largest=False).indices]] = 0.05
    return coef.view_as(logp)


@pytest.mark.parametrize("rho_cov", [0.0002, 0.25])
def test_release_tiers_when_top_and_bottom_covariance_sets_overlap(rho_cov):
    """A constant over T_low (one all-correct group: A = 0) makes every Cov_t 0, so the top-k and bottom-k
    sets coincide. The release writes 0.05 last: 0.05 wins, with torch.topk's choice among the ties."""
    g = torch.Generator().manual_seed(3)
    S, T = 4, 9
    entropy, logp = torch.rand(S, T, generator=g), -torch.rand(S, T, generator=g) * 3
    mask = torch.ones(S, T)
    mask[2, 6:] = 0
    adv = torch.zeros(S)
    rel = sent_token_sets(entropy, logp, adv, mask, rho_cov=rho_cov, release=True)
    beta = tier_betas(rel["tier"], 0.2, 0.05) * mask
    expected = _release_coefficients(entropy, logp, adv, mask, rho_cov)
    assert torch.equal(beta, expected)
    k = max(1, int(int(rel["low"].sum()) * rho_cov))
    assert int((beta == 0.05).sum()) == k and not (beta == 0.2).any()  # full overlap: no 0.2 left
    assert torch.equal(rel["high"], beta == 0.2)
    # paper mode is unchanged: T_hc (0.2) and the rest of T_low (0.05), no bottom set
    paper = tier_betas(sent_token_sets(entropy, logp, adv, mask, rho_cov=rho_cov)["tier"], 0.2, 0.05) * mask
    assert int((paper == 0.2).sum()) == k and int((paper == 0.05).sum()) == int(rel["low"].sum()) - k


# ====================================================================================================
# Loss (§4) and its reductions
# ====================================================================================================


def _mb(seed=0, on_policy=False, ref_equal=False):
    g = torch.Generator().manual_seed(seed)
    S, T = 4, 7
    logp = (-torch.rand(S, T, generator=g) * 2).requires_grad_(True)
    shift = 0 if on_policy else torch.randn(S, T, generator=g) * 0.3  # ratios outside [0.8, 1.2] too
    old = (logp.detach() + shift)
    ref = logp.detach().clone() if ref_equal else logp.detach() + torch.randn(S, T, generator=g) * 0.5
    mask = torch.ones(S, T)
    mask[1, 5:] = 0
    mask[3, 2:] = 0
    return {"logp": logp, "old_logp": old, "ref_logp": ref, "response_mask": mask, "advantages": torch.randn(S, generator=g),
            "entropy": torch.rand(S, T, generator=g), "truncated": torch.zeros(S, dtype=torch.bool), "group_size": 4}


def _loss_and_grad(method, mb):
    mb = dict(mb)
    mb["logp"] = mb["logp"].detach().clone().requires_grad_(True)
    loss, _ = method.loss(mb, Normaliser.of(mb["response_mask"]))
    loss.backward()
    return loss.detach(), mb["logp"].grad


@pytest.mark.parametrize("scope", ["microbatch", "batch"])
def test_zero_betas_give_the_grpo_token_mean_loss_exactly(scope):
    mb = _mb()
    sent = SENT(SENTConfig(beta_high=0.0, beta_low=0.0, sent_scope=scope))
    if scope == "batch":  # the tiers come from prepare_update; here the batch is this micro-batch
        mb["sent_tier"] = sent_token_sets(mb["entropy"], mb["old_logp"], mb["advantages"], mb["response_mask"])["tier"]
    grpo = Method(GRPOConfig(agg="token-mean", eps_low=0.2, eps_high=0.2))
    l_sent, g_sent = _loss_and_grad(sent, mb)
    l_grpo, g_grpo = _loss_and_grad(grpo, mb)
    assert torch.equal(l_sent, l_grpo) and torch.equal(g_sent, g_grpo)


def test_kl_is_inactive_at_step_zero_and_active_elsewhere():
    """π_θ = π_ref: value and gradient of β·k3 are 0, so SENT equals the clipped base exactly."""
    grpo = Method(GRPOConfig(agg="token-mean"))
    sent = SENT(SENTConfig(sent_scope="microbatch"))
    mb = _mb(ref_equal=True)
    l_s, g_s = _loss_and_grad(sent, mb)
    l_g, g_g = _loss_and_grad(grpo, mb)
    assert torch.equal(l_s, l_g) and torch.equal(g_s, g_g)
    # with π_ref ≠ π_θ: the extra gradient is β_t(1 − π_ref/π_θ)/N on each token
    mb = _mb(seed=1)
    l_s, g_s = _loss_and_grad(sent, mb)
    l_g, g_g = _loss_and_grad(grpo, mb)
    # micro-batch scope: the tiers come from the current policy's detached logp (S11)
    tier = sent_token_sets(mb["entropy"], mb["logp"].detach(), mb["advantages"], mb["response_mask"], rho_cov=0.002)["tier"]
    beta = tier_betas(tier * mb["response_mask"], 0.2, 0.05)
    delta = mb["ref_logp"] - mb["logp"].detach()
    expected = beta * (1 - torch.exp(delta)) * mb["response_mask"] / mb["response_mask"].sum()
    assert torch.allclose(g_s - g_g, expected, atol=1e-7)
    kl = k3_kl(mb["logp"].detach(), mb["ref_logp"])
    assert float(l_s - l_g) == pytest.approx(float((beta * kl * mb["response_mask"]).sum() / mb["response_mask"].sum()), abs=1e-6)


def test_term_size_diagnostics_by_hand():
    """sent/* stats: the token-side term per tier next to the advantages, token-means over the N valid tokens
    (reduce_stats), from the loss's own tensors. 2 sequences, 5 valid tokens, tiers set by hand (batch scope):

        row 0: T_hc δ = ln 2 | β_low δ = −ln 2 | free δ = ln 2      A = +1.5      (δ = ref_logp − logp)
        row 1: β_low δ = 0   | β_low δ = ln 2  | padding            A = −0.5
    k3(ln 2) = 1 − ln 2, k3(−ln 2) = ln 2 − 1/2, k3(0) = 0; ∂k3/∂logp = 1 − e^δ = −1, +1/2, 0."""
    ln2 = math.log(2.0)
    logp = torch.tensor([[-1.0, -0.5, -2.0], [-0.3, -1.2, -0.7]], requires_grad=True)
    delta = torch.tensor([[ln2, -ln2, ln2], [0.0, ln2, ln2]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    tier = torch.tensor([[TIER_HIGH, TIER_LOW, 0], [TIER_LOW, TIER_LOW, TIER_LOW]], dtype=torch.float32)
    mb = {"logp": logp, "old_logp": logp.detach(), "ref_logp": logp.detach() + delta, "response_mask": mask,
          "advantages": torch.tensor([1.5, -0.5]), "truncated": torch.zeros(2, dtype=torch.bool), "sent_tier": tier}
    sent = SENT(SENTConfig())  # β_high = 0.2, β_low = 0.05, batch scope: the tiers come from mb["sent_tier"]
    _, stats = sent.loss(mb, Normaliser.of(mask))
    out = reduce_stats(stats, Dist(), float(mask.sum()))
    assert out["sent/frac_high"] == pytest.approx(1 / 5) and out["sent/frac_low"] == pytest.approx(3 / 5)
    assert out["sent/kl_high"] == pytest.approx(0.2 * (1 - ln2) / 5)  # 0.012274
    assert out["sent/kl_low"] == pytest.approx(0.05 * ((ln2 - 0.5) + 0.0 + (1 - ln2)) / 5)  # = 0.05·0.5/5 = 0.005
    assert out["sent/grad_high"] == pytest.approx(0.2 * 1.0 / 5)  # 0.04
    assert out["sent/grad_low"] == pytest.approx(0.05 * (0.5 + 0.0 + 1.0) / 5)  # 0.015
    assert out["sent/adv_abs"] == pytest.approx((3 * 1.5 + 2 * 0.5) / 5)  # 1.1
    # the term's share of the loss and of its gradient, as autograd sees them (SENT − its β = 0 base)
    l_s, g_s = _loss_and_grad(sent, mb)
    l_0, g_0 = _loss_and_grad(SENT(SENTConfig(beta_high=0.0, beta_low=0.0)), mb)
    assert float(l_s - l_0) == pytest.approx(out["sent/kl_high"] + out["sent/kl_low"], abs=1e-7)
    assert float((g_s - g_0).abs().sum()) == pytest.approx(out["sent/grad_high"] + out["sent/grad_low"], abs=1e-7)
    # micro-batches add up: the rows one at a time give the same reduced values
    parts = {}
    for r in (0, 1):
        one = {k: (v[r:r + 1] if torch.is_tensor(v) and v.dim() else v) for k, v in mb.items()}
        _, st = sent.loss(one, Normaliser(5.0, 2.0, 3, 1))
        for k, v in st.items():
            parts[k] = parts.get(k, 0.0) + v
    assert reduce_stats(parts, Dist(), 5.0) == pytest.approx(out)
    # past k3's clamp (δ > 2.6109: k3 = 10) the gradient is 0, and so is the logged one
    far = dict(mb, ref_logp=logp.detach() + torch.tensor([[3.0, 0.0, 0.0], [0.0, 0.0, 0.0]]))
    _, st = sent.loss(far, Normaliser.of(mask))
    far_out = reduce_stats(st, Dist(), 5.0)
    assert far_out["sent/kl_high"] == pytest.approx(0.2 * 10 / 5) and far_out["sent/grad_high"] == 0.0


def test_release_compat_at_ratio_one():
    """ρ = 1: the |Δlogp| term has value 0 and gradient 0; L = −token-mean(A) + 0.001·token-mean(k3)."""
    mb = _mb(seed=2, on_policy=True)
    sent = SENT(SENTConfig(release_compat=True))
    assert sent.cfg.scope == "microbatch" and sent.cfg.cov_fraction == 0.0002
    loss, grad = _loss_and_grad(sent, mb)
    m = mb["response_mask"]
    a = mb["advantages"].unsqueeze(-1).expand_as(m)
    kl = k3_kl(mb["logp"].detach(), mb["ref_logp"])
    expected = -(a * m).sum() / m.sum() + 0.001 * (kl * m).sum() / m.sum()
    assert float(loss) == pytest.approx(float(expected), abs=1e-6)
    # gradient: −A/N from the surrogate and 0.001(1 − π_ref/π_θ)/N from k3, nothing from the penalty
    delta = mb["ref_logp"] - mb["logp"].detach()
    g_expected = (-a + 0.001 * (1 - torch.exp(delta))) * m / m.sum()
    assert torch.allclose(grad, g_expected, atol=1e-7)
    # off-policy the penalty is c·|Δlogp| on the selected tokens (unclipped surrogate: ρ A, no min)
    lp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    per_token, _ = release_token_loss(lp, torch.tensor([[-1.5, -2.0]]), lp.detach(), torch.tensor([2.0]),
                                      torch.tensor([[0.2, 0.05]]))
    assert torch.allclose(per_token.detach(), torch.tensor([[-2.0 * math.exp(0.5) + 0.2 * 0.5, -2.0]]))


def _release_reference_loss(mb, rho_cov):
    """The release's micro-batch loss from the CURRENT forward (its entropy and detached logp), π_old only
    in the ratio and the |Δlogp| penalty: −A·ρ + c·|logp − old_logp|, token-mean, + 0.001·token-mean(k3)."""
    logp, old, m = mb["logp"], mb["old_logp"], mb["response_mask"]
    coef = _release_coefficients(mb["cur_entropy"], logp, mb["advantages"], m, rho_cov)
    a = mb["advantages"].unsqueeze(-1).expand_as(logp)
    per_token = -a * torch.exp(logp - old) + coef * (logp - old).abs()
    d = torch.clamp(mb["ref_logp"] - logp, -20, 20)
    k3 = torch.clamp(torch.exp(d) - d - 1, -10, 10)
    return (per_token * m).sum() / m.sum() + 0.001 * (k3 * m).sum() / m.sum()


def test_release_off_policy_uses_the_current_forward_and_matches_the_release():
    """--release-compat on an update after the first (π_θ ≠ π_old): T_low and the covariance come from the
    current forward's entropy ("cur_entropy") and detached logp, not from π_old's prepass ("entropy",
    "old_logp"), as the release recomputes both in every micro-batch; overlaps get 0.05."""
    differ, max_diff = 0, 0.0
    for case in range(96):
        mb = _mb(seed=100 + case)
        g = torch.Generator().manual_seed(case)
        mb["cur_entropy"] = (mb["entropy"] + torch.randn(mb["entropy"].shape, generator=g) * 0.2).abs()
        if case % 4 == 0:  # one all-correct group in the micro-batch: A = 0, Cov ≡ 0 (overlap)
            mb["advantages"] = torch.zeros_like(mb["advantages"])
        rho_cov = (None, 0.25, 0.5)[case % 3]
        sent = SENT(SENTConfig(release_compat=True, rho_cov=rho_cov))
        loss, grad = _loss_and_grad(sent, mb)
        ref_mb = dict(mb, logp=mb["logp"].detach().clone().requires_grad_(True))
        ref = _release_reference_loss(ref_mb, sent.cfg.cov_fraction)
        ref.backward()
        diff = float((grad - ref_mb["logp"].grad).abs().max())
        max_diff = max(max_diff, diff)
        differ += not (diff <= 1e-7 and float(loss) == pytest.approx(float(ref.detach()), abs=1e-6))
    assert differ == 0, f"{differ} of 96 cases differ (max |Δgrad| {max_diff:.2e})"


def test_batch_scope_prepare_update_selects_over_the_whole_batch():
    """prepare_update over all rows gives the tiers of one selection over all valid tokens of the batch."""
    entropy, logp, adv, mask = _constructed_batch()
    batch = {"response_mask": mask, "truncated": torch.zeros(2, dtype=torch.bool), "advantages": adv,
             "fields": {"entropy": entropy, "old_logp": logp}}
    sent = SENT(SENTConfig(rho_cov=0.25))
    assert sent.needs_batch_fields and {"entropy", "ref_logp"} <= sent.needs() and sent.curriculum() is sent.cfg
    sent.prepare_update(batch, [0, 1], Dist())
    direct = sent_token_sets(entropy, logp, adv, mask, rho_cov=0.25)["tier"]
    assert torch.equal(batch["fields"]["sent_tier"], direct)
    assert int((direct == TIER_HIGH).sum()) == 2 and int((direct == TIER_LOW).sum()) == 6
    # two mini-batches: each one selects over its own rows
    batch["fields"].pop("sent_tier")
    sent.prepare_update(batch, [1], Dist())
    alone = sent_token_sets(entropy[1:], logp[1:], adv[1:], mask[1:], rho_cov=0.25)["tier"]
    assert torch.equal(batch["fields"]["sent_tier"][1], alone[0]) and not batch["fields"]["sent_tier"][0].any()


def test_config_validation_and_cli_errors(tmp_path, capsys):
    for bad in ({"low_frac": 0.0}, {"beta_high": -1.0}, {"cov_center": "x"}, {"sent_scope": "x"},
                {"se_weights": "x"}, {"stage_split": "threshold"}, {"stage_steps": [1]}, {"se_samples": 1}):
        with pytest.raises(ValueError):
            SENTConfig(**bad)
    assert train.main(["--method", "sent", "--cov-center", "x", "--out", str(tmp_path / "x")]) == 2
    assert train.main(["--method", "grpo", "--curriculum", "bogus", "--out", str(tmp_path / "y")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "cov_center" in err[0] and "--curriculum" in err[1]


# ====================================================================================================
# The SE pass (cached, resumable) and end to end on the toy
# ====================================================================================================


def _ctx(model_dir, run_dir, n_chunk=4):
    cfg = resolve_defaults(TrainConfig(model=model_dir, out=str(run_dir), gen_batch_prompts=n_chunk,
                                       progress=False, max_new_tokens=40))
    model, tok = load_policy(model_dir, torch.device("cpu"))
    return types.SimpleNamespace(cfg=cfg, dist=Dist(), examples=load_prompts(cfg), tokenizer=tok,
                                 model=model, ref_model=None, device=torch.device("cpu"), run_dir=Path(run_dir),
                                 start_step=0)


def test_se_pass_is_cached_and_resumes_after_an_interruption(toy_model_dir, tmp_path, capsys):
    ctx = _ctx(toy_model_dir, tmp_path / "r")
    ccfg = SENTConfig(se_max_prompts=12)
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    se = compute_semantic_entropy(ctx, ccfg)
    assert torch.equal(torch.rand(3), before)  # the global RNG is restored: training is unaffected
    assert se.shape == (12,) and np.all(se >= 0) and np.all(se <= math.log(8) + 1e-12)
    out = capsys.readouterr().out
    assert "12 prompts x M=8 samples = 96 rollouts" in out and "ETA" in out
    (cache,) = (tmp_path / "r" / "se_cache").glob("se-*.jsonl")
    lines = cache.read_text().splitlines()
    assert len(lines) == 13  # the key + one record per prompt
    rec = json.loads(lines[1])
    assert len(rec["answers"]) == len(rec["clusters"]) == len(rec["mean_logp"]) == 8
    # cached: nothing is sampled again (the model is not even touched)
    ctx.model = None
    assert np.array_equal(compute_semantic_entropy(ctx, ccfg), se)
    # interrupted after 2 of 3 chunks, with a half-written line: the pass resumes and gives the same SE
    cache.write_text("\n".join(lines[:9]) + "\n" + lines[9][:20])
    ctx = _ctx(toy_model_dir, tmp_path / "r")
    assert np.array_equal(compute_semantic_entropy(ctx, ccfg), se)
    assert "4 prompts x M=8" in capsys.readouterr().out
    # switches that only re-weight the cached samples need no new samples
    ctx.model = None
    count = compute_semantic_entropy(ctx, SENTConfig(se_max_prompts=12, se_weights="count"))
    single = compute_semantic_entropy(ctx, SENTConfig(se_max_prompts=12, none_as_singletons=True))
    assert np.all(single >= se - 1e-12)  # splitting the "none" cluster refines the partition: SE can only rise
    assert np.all((count >= 0) & (count <= math.log(8) + 1e-12)) and not np.array_equal(count, se)


def _params(ckpt: Path) -> dict:
    return load_file(str(ckpt / "model.safetensors"))


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_sent_runs_end_to_end_on_the_toy(toy_model_dir, tmp_path):
    out = tmp_path / "r"
    assert train.main(["--method", "sent", "--steps", "2", "--prompts-per-step", "4", "--group-size", "4",
                       "--out", str(out), "--se-max-prompts", "16", *QUICK]) == 0
    rows = _metrics(out)
    assert [r["step"] for r in rows] == [1, 2]
    for key in ("sent_low", "sent_n_hc", "sent_beta", "sent_kl", "entropy", "clip_frac_low"):
        assert key in rows[0], key
    n = rows[0]["response_length"] * 16
    assert rows[0]["sent_low"] == pytest.approx(max(1, math.floor(0.8 * n)) / n)
    assert rows[0]["sent_n_hc"] == max(1, math.floor(0.002 * math.floor(0.8 * n)))
    assert rows[0]["sent_kl"] == 0.0  # step 0: π_θ = π_ref
    for key in ("sent/frac_high", "sent/frac_low", "sent/kl_high", "sent/kl_low", "sent/grad_high", "sent/grad_low"):
        assert key in rows[1], key
    assert rows[0]["sent/kl_low"] == rows[0]["sent/grad_high"] == 0.0 and rows[0]["sent/adv_abs"] >= 0.0
    assert rows[0]["sent/frac_high"] + rows[0]["sent/frac_low"] == pytest.approx(rows[0]["sent_low"])
    summary = json.loads((out / "semantic_entropy.json").read_text())
    assert len(summary["se"]) == 16 and summary["stage_starts"] == [0, 1]
    assert sorted(summary["stages"][0] + summary["stages"][1]) == list(range(16))
    state = torch.load(out / "checkpoints" / "step_000002" / "trainer_state.pt", weights_only=False)
    assert state["sampler"]["stage"] == 1


@pytest.mark.parametrize("stage_steps,restart", [("2,2", False), ("1,3", True)])
def test_resume_across_a_stage_boundary_is_bit_exact(toy_model_dir, tmp_path, stage_steps, restart):
    """4 steps straight == 2 steps + --resume + 2 steps. Boundary at step 2 (the first resumed step), or
    at step 1 with S7's stage restart (π_ref ← policy, fresh optimiser), which --resume must restore."""
    common = ["--method", "sent", "--prompts-per-step", "4", "--group-size", "4", "--save-every", "2",
              "--seed", "1", "--se-max-prompts", "16", "--stage-steps", stage_steps,
              "--stage-restart" if restart else "--no-stage-restart", *QUICK]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert train.main(common + ["--steps", "4", "--out", str(straight)]) == 0
    assert train.main(common + ["--steps", "2", "--out", str(resumed)]) == 0
    mid = torch.load(resumed / "checkpoints" / "step_000002" / "trainer_state.pt", weights_only=False)
    assert mid["sampler"]["stage"] == int(restart)
    if restart:  # the new reference is the policy after step 1, saved for --resume
        ref = _params(resumed / "reference" / "step_000001")
        init = load_file(str(Path(toy_model_dir) / "model.safetensors"))
        assert any(not torch.equal(ref[k], init[k]) for k in ref)
        # the first update of stage 2 (logged as step 2) starts with π_θ = π_ref: k3 is exactly 0 again
        assert _metrics(resumed)[1]["sent_kl"] == 0.0
    assert train.main(common + ["--steps", "4", "--out", str(resumed), "--resume"]) == 0
    a, b = _params(straight / "checkpoints" / "step_000004"), _params(resumed / "checkpoints" / "step_000004")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sa = torch.load(straight / "checkpoints" / "step_000004" / "trainer_state.pt", weights_only=False)
    sb = torch.load(resumed / "checkpoints" / "step_000004" / "trainer_state.pt", weights_only=False)
    assert sa["sampler"] == sb["sampler"] and sa["sampler"]["stage"] == 1
    drop = ("time_generate", "time_score", "time_update", "time_step", "rollout_tokens_per_s")  # wall-clock
    strip = lambda rows: [{k: v for k, v in r.items() if k not in drop} for r in rows]
    assert strip(_metrics(straight)) == strip(_metrics(resumed))


def test_second_mini_batch_tiers_come_from_the_current_policy(toy_model_dir, tmp_path, monkeypatch):
    """Batch scope with --mini-batches 2: T_low and the covariance of each mini-batch use the current
    policy's entropy and logp (S11 over S8's "from the prepass"), checked against a manual forward with the
    parameters of that moment; on the second mini-batch these differ from π_old's prepass values."""
    import curriculum

    seen, manual = [], []
    original_sets, original_update = curriculum.sent_token_sets, train.Trainer.update

    def sets(entropy, logp, *args, **kwargs):
        seen.append((entropy.clone(), logp.clone()))
        return original_sets(entropy, logp, *args, **kwargs)

    def update(self, batch, rows):
        with torch.no_grad():
            mb = to_device(slice_batch(batch, rows), self.device)
            f = token_fields(self.model, mb, self.cfg.temperature, {"entropy"}, with_grad=False)
        m = mb["response_mask"].bool().cpu()  # mask_truncated is off: every response token counts
        t = m.shape[1]
        fields = batch["fields"]
        manual.append((f["entropy"].cpu()[m], f["logp"].cpu()[m], fields["entropy"][rows][:, :t][m],
                       fields["old_logp"][rows][:, :t][m]))
        return original_update(self, batch, rows)

    monkeypatch.setattr(curriculum, "sent_token_sets", sets)
    monkeypatch.setattr(train.Trainer, "update", update)
    out = tmp_path / "mini"
    assert train.main(["--method", "sent", "--no-se-curriculum", "--steps", "1", "--prompts-per-step", "4",
                       "--group-size", "4", "--mini-batches", "2", "--seed", "3", "--out", str(out), *QUICK]) == 0
    assert len(seen) == len(manual) == 2
    for k, ((entropy, logp), (cur_h, cur_lp, old_h, old_lp)) in enumerate(zip(seen, manual)):
        torch.testing.assert_close(entropy[0].float(), cur_h, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(logp[0].float(), cur_lp, atol=1e-5, rtol=1e-5)
        moved = float((old_lp - cur_lp).abs().max())
        assert (moved < 1e-5) if k == 0 else (moved > 1e-4 and not torch.allclose(old_h, cur_h)), (k, moved)


def test_dsdr_with_the_semantic_entropy_curriculum(toy_model_dir, tmp_path):
    """--curriculum semantic-entropy works with another method (default curriculum settings)."""
    import toy

    data = tmp_path / "countdown16.jsonl"
    data.write_text("".join(json.dumps({k: ex[k] for k in ("id", "task", "numbers", "target", "prompt", "answer")})
                            + "\n" for ex in toy.load_split("train")[:16]))
    out = tmp_path / "dsdr"
    assert train.main(["--method", "dsdr", "--curriculum", "semantic-entropy", "--dataset", str(data),
                       "--steps", "2", "--prompts-per-step", "4", "--group-size", "4", "--out", str(out),
                       *QUICK]) == 0
    summary = json.loads((out / "semantic_entropy.json").read_text())
    assert len(summary["se"]) == 16 and [len(s) for s in summary["stages"]] == [8, 8]
    state = torch.load(out / "checkpoints" / "step_000002" / "trainer_state.pt", weights_only=False)
    assert state["sampler"]["stage"] == 1
    assert "dsdr/d" in _metrics(out)[0]


def test_token_side_alone_keeps_the_default_prompt_order(toy_model_dir, tmp_path):
    out = tmp_path / "r"
    assert train.main(["--method", "sent", "--no-se-curriculum", "--steps", "1", "--prompts-per-step", "4",
                       "--group-size", "4", "--out", str(out), *QUICK]) == 0
    state = torch.load(out / "checkpoints" / "step_000001" / "trainer_state.pt", weights_only=False)
    assert state["sampler"] == {"epoch": 0, "pos": 4} and not (out / "se_cache").exists()
    assert "sent_low" in _metrics(out)[0]
