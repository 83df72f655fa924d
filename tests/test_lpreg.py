"""Lp-Reg (lpreg.py, spec ../shared/specs/lpreg.md): the min-p proxy (reference and the loop's chunked
version), the token selection on hand-built batches (exact indices, k rules, the logp < proxy filter,
global over ranks and micro-batches), the per-token loss (on-policy gradient identity, k3 values, clamp,
reductions, clip forms), the config switches, the method in the loop, and (slow) the memory of the proxy."""

import functools
import json
import math
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import lpreg
import train
from conftest import one_step_per_micro_batch_budget, policy_loss
from data import collate
from distributed import to_device
from forward import _chunk_stats, slice_batch, token_fields
from grpo import Normaliser

QUICK = ["--no-final-eval", "--no-progress", "--no-tensorboard"]
ROOT = Path(__file__).resolve().parents[1]


def _load(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), AutoTokenizer.from_pretrained(path)


def _log(values):
    return torch.log(torch.tensor(values, dtype=torch.float64)).to(torch.float32)


def full_proxy(z, targets, kappa=0.02, T=1.0, order="raw", tau=None):
    """lpreg.proxy_logp applied once on full raw logits z [..., V] (any leading shape), targets [...]: the
    reference the chunked loop path is compared with. tau=None: min-p with κ; tau set: the fixed-τ ablation."""
    raw = z.float().reshape(-1, z.shape[-1])
    logits = raw if T == 1.0 else raw / T  # the same tensor at T = 1, as the forward passes it
    out = lpreg.proxy_logp(raw, logits, torch.logsumexp(logits, dim=-1), targets.reshape(-1), kappa=kappa, tau=tau,
                           filter_logits=order)
    return out.reshape(targets.shape)


def proxy_fns(kappa=0.02, order="raw", tau=None):
    """The field functions the loop's forward gets for the proxy (as LpReg.token_field_fns builds them)."""
    return {"minp_proxy_logp": functools.partial(lpreg.proxy_logp, kappa=kappa, tau=tau, filter_logits=order)}


# ---------------------------------------------------------------------------------------------------
# The proxy distribution (Eq. 5)
# ---------------------------------------------------------------------------------------------------


def test_proxy_hand_case_keep_set_renormalisation_and_sentinel():
    # p = (0.5, 0.3, 0.195, 0.005): κ·p_max = 0.01 keeps the first three, Z = 0.995
    logits = _log([0.5, 0.3, 0.195, 0.005]).expand(4, 4)
    proxy = full_proxy(logits, torch.arange(4), kappa=0.02)
    expected = [math.log(0.5 / 0.995), math.log(0.3 / 0.995), math.log(0.195 / 0.995), lpreg.FILTERED_LOGP]
    torch.testing.assert_close(proxy, torch.tensor(expected), atol=1e-6, rtol=1e-6)
    # the kept proxy probabilities sum to 1, and each is ≥ p
    kept = proxy[:3].exp()
    assert float(kept.sum()) == pytest.approx(1.0, abs=1e-6)
    assert (kept >= torch.tensor([0.5, 0.3, 0.195])).all()


def test_proxy_boundary_is_inclusive_argmax_alone_and_uniform():
    # p_v = κ·p_max exactly (logit difference ln κ, the same fp32 number the threshold adds): kept (`≥`)
    logits = torch.tensor([[0.0, math.log(0.02), math.log(0.0199)]])
    assert full_proxy(logits, torch.tensor([1]))[0] > lpreg.FILTERED_LOGP
    assert full_proxy(logits, torch.tensor([2]))[0] == lpreg.FILTERED_LOGP
    # the sampled token is the argmax and every other token is below κ·p_max: proxy log-prob 0
    peaked = torch.tensor([[10.0, 0.0, -1.0, 2.0]])
    assert full_proxy(peaked, torch.tensor([0]))[0].item() == pytest.approx(0.0, abs=1e-6)
    # uniform: Z = 1 and the proxy equals logp
    uniform = torch.zeros(1, 7)
    assert full_proxy(uniform, torch.tensor([3]))[0].item() == pytest.approx(-math.log(7), abs=1e-6)
    # κ → 0 keeps everything: proxy = logp for every token
    logits = torch.randn(5, 11, generator=torch.Generator().manual_seed(0))
    targets = torch.arange(5)
    logp = torch.log_softmax(logits, -1).gather(-1, targets[:, None])[:, 0]
    torch.testing.assert_close(full_proxy(logits, targets, kappa=1e-30), logp)


def test_fixed_tau_reference_and_the_loop():
    logits = _log([0.5, 0.3, 0.15, 0.05]).unsqueeze(0).expand(4, 4)
    proxy = full_proxy(logits, torch.arange(4), tau=0.1)  # keeps p ≥ 0.1: Z = 0.95
    expected = [math.log(0.5 / 0.95), math.log(0.3 / 0.95), math.log(0.15 / 0.95), lpreg.FILTERED_LOGP]
    torch.testing.assert_close(proxy, torch.tensor(expected), atol=1e-6, rtol=1e-6)
    # forward._chunk_stats with the fixed-τ field function of the config (identity LM head: h are the
    # logits) gives the same
    fns = lpreg.LpReg(lpreg.LpRegConfig(lp_filter="fixed", lp_tau=0.1)).token_field_fns()
    loop = _chunk_stats(logits.clone(), lambda h: h, torch.arange(4), 1.0, set(), field_fns=fns)["minp_proxy_logp"]
    torch.testing.assert_close(loop, proxy, atol=1e-5, rtol=1e-5)


class _Identity(torch.nn.Module):
    def forward(self, h):
        return h


@pytest.mark.parametrize("kappa", [0.02, 0.3])
def test_loop_chunk_stats_match_the_reference_on_hand_built_logits(kappa):
    """forward._chunk_stats with an identity LM head sees the logits directly (and with a temperature)."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(9, 50, generator=g) * 3
    logits[0, :] = 0.0  # uniform row
    logits[1, 7] = logits[1].max() + math.log(kappa) + 20  # a far argmax
    logits[2, 3] = logits[2].max()
    logits[2, 4] = logits[2, 3] + math.log(kappa)  # exactly on the boundary
    targets = torch.tensor([5, 7, 4, 0, 1, 2, 3, 4, 5])
    for temperature in (1.0, 0.7):
        for order in lpreg.FILTER_LOGITS:  # the keep test on the raw (default) or the tempered logits
            out = _chunk_stats(logits, _Identity(), targets, temperature, set(), field_fns=proxy_fns(kappa, order))
            ref = full_proxy(logits, targets, kappa, T=temperature, order=order)
            torch.testing.assert_close(out["minp_proxy_logp"], ref, atol=1e-5, rtol=1e-5)
    assert (ref == lpreg.FILTERED_LOGP).any() and (ref > lpreg.FILTERED_LOGP).any()


def test_proxy_at_temperature_filters_the_raw_logits_then_tempers():
    """Spec L6 / official order at T ≠ 1: K = {v : z_v − z_max ≥ ln κ} on the RAW logits, then the proxy
    renormalises softmax(z/T) over K. Raw differences (0, −3, −5) against ln 0.02 = −3.912:
      T = 0.5: raw keeps {0, 1}; tempered (0, −6, −10) would keep {0} only;
      T = 2:   raw keeps {0, 1}; tempered (0, −1.5, −2.5) would keep all three."""
    z = torch.tensor([[0.0, -3.0, -5.0]]).expand(3, 3)
    targets = torch.arange(3)
    for T, tempered_keeps in ((0.5, [True, False, False]), (2.0, [True, True, True])):
        zt = [0.0, -3.0 / T, -5.0 / T]
        kept_mass = math.exp(zt[0]) + math.exp(zt[1])  # renormalise over K = {0, 1} (raw order)
        expected = [zt[0] - math.log(kept_mass), zt[1] - math.log(kept_mass), F]
        ref = full_proxy(z, targets, 0.02, T=T)
        loop = _chunk_stats(z.clone(), _Identity(), targets, T, set(), field_fns=proxy_fns(0.02))["minp_proxy_logp"]
        for got in (ref, loop):
            torch.testing.assert_close(got, torch.tensor(expected), atol=1e-6, rtol=1e-6)
        # the switch keeps the earlier order (keep test on z/T)
        loop_t = _chunk_stats(z.clone(), _Identity(), targets, T, set(),
                              field_fns=proxy_fns(0.02, "tempered"))["minp_proxy_logp"]
        assert (loop_t > F).tolist() == tempered_keeps
        torch.testing.assert_close(loop_t, full_proxy(z, targets, 0.02, T, "tempered"))
    # fixed τ = 0.04, raw order: softmax(z) = (0.947, 0.047, 0.006) keeps {0, 1} at any T; at T = 0.5 the
    # tempered softmax(z/T) = (0.9975, 0.0025, 0.00005) would keep the argmax alone
    for order, keeps in (("raw", [True, True, False]), ("tempered", [True, False, False])):
        fixed = _chunk_stats(z.clone(), _Identity(), targets, 0.5, set(),
                             field_fns=proxy_fns(0.02, order, tau=0.04))["minp_proxy_logp"]
        assert (fixed > F).tolist() == keeps
        torch.testing.assert_close(fixed, full_proxy(z, targets, T=0.5, order=order, tau=0.04))
    with pytest.raises(ValueError):
        lpreg.LpReg(lpreg.LpRegConfig(lp_filter_logits="logits"))
    fn = lpreg.LpReg(lpreg.LpRegConfig(lp_filter_logits="tempered")).token_field_fns()["minp_proxy_logp"]
    assert fn.keywords["filter_logits"] == "tempered"


def test_loop_token_fields_match_the_reference_on_a_tiny_model(tiny_model_dir):
    """The chunked proxy from the training forward (chunks of 3 rows) = the reference on full logits."""
    model, tok = _load(tiny_model_dir)
    prompts = [tok("3 5 7>22:")["input_ids"], tok("1 2>3:")["input_ids"]]
    responses = [tok("5*3=15,15+7=22")["input_ids"] + [tok.eos_token_id], tok("1+2=3")["input_ids"]]
    batch = collate(prompts, responses, tok.pad_token_id, tok.eos_token_id)
    kappa = 0.9  # the random model is nearly uniform: a high κ filters some tokens
    fields = token_fields(model, batch, 1.0, set(), with_grad=True, chunk_rows=3,
                          field_fns=lpreg.LpReg(lpreg.LpRegConfig(kappa=kappa)).token_field_fns())
    ids, attn, P = batch["input_ids"], batch["attention_mask"], batch["prompt_len"]
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attn, position_ids=(attn.cumsum(-1) - 1).clamp(min=0)).logits
    ref = full_proxy(logits[:, P - 1:-1], ids[:, P:], kappa) * batch["response_mask"]
    torch.testing.assert_close(fields["minp_proxy_logp"], ref, atol=1e-4, rtol=1e-5)
    m = batch["response_mask"].bool()
    assert (fields["minp_proxy_logp"][m] == lpreg.FILTERED_LOGP).any()
    kept = m & (fields["minp_proxy_logp"] > lpreg.FILTERED_LOGP)
    assert (fields["minp_proxy_logp"][kept] >= fields["logp"].detach()[kept] - 1e-6).all()  # π_proxy ≥ p


# ---------------------------------------------------------------------------------------------------
# Token selection (Eq. 6 conditions; spec L1–L4, L10)
# ---------------------------------------------------------------------------------------------------
F = lpreg.FILTERED_LOGP


def _batch():
    """Three responses: A = −1, −0.5 (Neg), +1. Row 1 ends with padding whose logp (−9) is the lowest."""
    logp = torch.tensor([[-0.1, -5.0, -0.2, -3.0, -0.3, -0.4],
                         [-0.5, -4.0, -0.6, -2.0, -0.7, -9.0],
                         [-6.0, -0.1, -0.1, -0.1, -0.1, -0.1]])
    proxy = torch.tensor([[-0.05, F, -0.1, -2.9, -0.2, -0.3],  # (0,1) is noise: filtered
                          [-0.4, -4.0, -0.5, -1.9, -0.6, 0.0],  # (1,1): Z = 1, proxy = logp (strict <)
                          [-5.9, -0.05, -0.05, -0.05, -0.05, -0.05]])
    mask = torch.ones(3, 6)
    mask[1, 5] = 0.0
    return logp, torch.tensor([-1.0, -0.5, 1.0]), mask, proxy


def _where(selected):
    return [tuple(x) for x in selected.nonzero().tolist()]


def test_selection_exact_indices_and_proxy_filter():
    logp, adv, mask, proxy = _batch()
    # |Neg| = 11. ρ = 0.4 → k = 4: Low = −5, −4, −3, −2; (0,1) is filtered and (1,1) has proxy = logp
    assert _where(lpreg.select_tokens(logp, adv, mask, proxy, rho=0.4)) == [(0, 3), (1, 3)]
    # ρ = 0.2 → k = 2: Low = {−5, −4}, both fail the filter: nothing is selected
    assert _where(lpreg.select_tokens(logp, adv, mask, proxy, rho=0.2)) == []
    # ρ = 0.05 → k = 0: nothing; ρ = 1: every Neg token below its proxy; padding and A > 0 never
    assert _where(lpreg.select_tokens(logp, adv, mask, proxy, rho=0.05)) == []
    everything = lpreg.select_tokens(logp, adv, mask, proxy, rho=1.0)
    assert _where(everything) == [(0, 0), (0, 2), (0, 3), (0, 4), (0, 5), (1, 0), (1, 2), (1, 3), (1, 4)]
    # positive samples (L10 switch): ρ_pos = 0.2 of 6 Pos tokens → k = 1: the −6 token, below its proxy
    both = lpreg.select_tokens(logp, adv, mask, proxy, rho=0.4, rho_pos=0.2)
    assert _where(both) == [(0, 3), (1, 3), (2, 0)]


def test_selection_skip_small_k_with_min_k_two():
    logp = -torch.arange(1.0, 11.0).unsqueeze(0)  # 10 Neg tokens, logp −1 … −10
    proxy, adv, mask = logp + 0.01, torch.tensor([-1.0]), torch.ones(1, 10)
    assert _where(lpreg.select_tokens(logp, adv, mask, proxy, rho=0.1)) == [(0, 9)]  # k = 1
    assert _where(lpreg.select_tokens(logp, adv, mask, proxy, rho=0.1, min_k=2)) == []  # code skips k = 1
    assert _where(lpreg.select_tokens(logp, adv, mask, proxy, rho=0.2, min_k=2)) == [(0, 8), (0, 9)]
    # floor(0.29·100) is 29, not the 28 of binary rounding
    assert lpreg.lowest_count(100, 0.29) == 29 and lpreg.lowest_count(11, 0.4) == 4


def test_selection_over_all_tokens_uses_the_paper_quantile():
    logp, adv, mask, proxy = _batch()
    valid = logp[mask.bool()]
    # 17 valid tokens, q = 0.3: position 4.8 between −2 and −0.7 → δ = −0.96
    delta = lpreg.global_quantile(valid, 0.3)
    assert delta == pytest.approx(torch.quantile(valid.double(), 0.3).item()) == pytest.approx(-0.96)
    sel = lpreg.select_tokens(logp, adv, mask, proxy, rho=0.3, over="all")
    assert _where(sel) == [(0, 3), (1, 3)]  # the −6 token is below δ but has A > 0


def test_selection_bounds_on_random_batches():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        logp = -torch.rand(8, 30, generator=g) * 6
        proxy = torch.where(torch.rand(8, 30, generator=g) < 0.2, torch.full_like(logp, F),
                            logp + torch.rand(8, 30, generator=g) * 0.5)
        adv = torch.randn(8, generator=g)
        mask = (torch.rand(8, 30, generator=g) < 0.8).float()
        neg = mask.bool() & (adv[:, None] < 0)
        sel = lpreg.select_tokens(logp, adv, mask, proxy, rho=0.1)
        assert int(sel.sum()) <= math.floor(0.1 * int(neg.sum()))
        assert not (sel & ~neg).any()  # only valid tokens with A < 0
        assert not (sel & (proxy == F)).any()  # never a filtered token
        assert (logp[sel] < proxy[sel]).all()
        # the selected tokens are the lowest of Neg: every unselected Neg token below the proxy ranks higher
        # than the k-th lowest, or was among the lowest and failed the filter
        k = math.floor(0.1 * int(neg.sum()))
        if k:
            kth = torch.sort(logp[neg]).values[k - 1]
            assert (logp[sel] <= kth).all()


class _ThreadRanks:
    """In-process stand-in for distributed.Dist with `world` ranks running in threads (gather_objects, sum)."""

    def __init__(self, world):
        self.world, self.slots, self.barrier = world, [None] * world, threading.Barrier(world)

    def rank_view(self, rank):
        ranks = self

        class View:
            enabled, world = True, ranks.world

            def __init__(self):
                self.rank = rank

            def gather_objects(self, obj):
                ranks.slots[rank] = obj
                ranks.barrier.wait()
                out = list(ranks.slots)
                ranks.barrier.wait()
                return out

            def sum(self, value):
                return float(sum(self.gather_objects(float(value))))

        return View()


@pytest.mark.parametrize("over", ["neg", "all"])
def test_selection_is_global_across_ranks(over):
    """Rows split over 3 ranks select exactly what one process selects on all rows (spec L2), ties included."""
    g = torch.Generator().manual_seed(4)
    logp = -torch.randint(1, 12, (9, 16), generator=g).float()  # many ties
    proxy = logp + 0.1
    adv = torch.tensor([-1.0, 1.0, -0.5] * 3)
    mask = (torch.rand(9, 16, generator=g) < 0.9).float()
    whole = lpreg.select_tokens(logp, adv, mask, proxy, rho=0.15, over=over)
    assert int(whole.sum()) > 0
    ranks, parts = _ThreadRanks(3), [None] * 3

    def run(r):
        rows = slice(3 * r, 3 * r + 3)
        parts[r] = lpreg.select_tokens(logp[rows], adv[rows], mask[rows], proxy[rows], rho=0.15, over=over,
                                       dist=ranks.rank_view(r))

    threads = [threading.Thread(target=run, args=(r,)) for r in range(3)]
    [t.start() for t in threads]
    [t.join(timeout=30) for t in threads]
    assert torch.equal(torch.cat(parts), whole)


# ---------------------------------------------------------------------------------------------------
# The per-token loss (Eq. 6; L7–L9)
# ---------------------------------------------------------------------------------------------------


def _mb(logp, adv, proxy, selected, mask=None):
    mask = torch.ones_like(logp) if mask is None else mask
    return {"logp": logp, "old_logp": logp.detach(), "response_mask": mask, "advantages": adv,
            "minp_proxy_logp": proxy, "lp_selected": selected.float(), "group_size": 2,
            "truncated": torch.zeros(logp.shape[0], dtype=torch.bool)}


def test_on_policy_gradient_identity_and_loss_value():
    """∂L/∂logp = −(A + β(1/Z − 1))/N on S and −A/N elsewhere; L = (−Σ m·A + β Σ_S k3)/N."""
    z_sel, beta = 0.8, 1.0
    logp = _log([[0.3, 0.05, 0.6, 0.2], [0.5, 0.1, 0.4, 0.7]]).requires_grad_(True)
    adv = torch.tensor([-1.0, 0.5])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 0.0]])
    selected = torch.zeros(2, 4, dtype=torch.bool)
    selected[0, 1] = True
    proxy = (logp.detach() - math.log(z_sel)).clone()  # π_proxy = p/Z on every kept token
    method = lpreg.LpReg()
    loss, stats = method.loss(_mb(logp, adv, proxy, selected, mask), Normaliser.of(mask))
    loss.backward()
    N = 7.0
    expected = -adv[:, None].expand(2, 4) / N * mask
    expected[0, 1] = -(-1.0 + beta * (1 / z_sel - 1)) / N
    torch.testing.assert_close(logp.grad, expected)
    k3 = 1 / z_sel - 1 + math.log(z_sel)
    value = (-(adv[:, None] * mask).sum() + beta * k3) / N
    assert loss.item() == pytest.approx(value.item(), abs=1e-6)
    assert stats["lp_selected_count"] == 1.0 and stats["lp_k3_sum"] == pytest.approx(k3, rel=1e-4)
    assert stats["clip_low_count"] == 0.0 and stats["clip_high_count"] == 0.0


def test_k3_value_at_z_099_and_nonnegativity():
    logp = torch.tensor([[math.log(0.3)]], requires_grad=True)
    proxy = logp.detach() - math.log(0.99)
    _, k3, _, _ = lpreg.lpreg_token_loss(logp, logp.detach(), proxy, torch.tensor([-1.0]), torch.ones(1, 1))
    assert k3.item() == pytest.approx(5.07e-5, rel=2e-3)
    d = torch.linspace(-5, 2.5, 31)
    k3 = lpreg.lpreg_token_loss(torch.zeros(1, 31), torch.zeros(1, 31), d[None], torch.tensor([-1.0]),
                                torch.ones(1, 31))[1][0]
    assert (k3 >= 0).all() and k3[(d == 0).nonzero()].item() == 0.0
    assert (k3[d != 0] > 0).all()


def test_clamp_beyond_d_2_6109():
    """π_proxy/π_θ > 13.61: k3 = 10 and its gradient is 0; just below, the gradient is 1 − e^d."""
    logp = torch.zeros(1, 2, requires_grad=True)
    proxy = torch.tensor([[2.62, 2.60]])
    per_token, k3, _, _ = lpreg.lpreg_token_loss(logp, logp.detach(), proxy, torch.tensor([0.0]),
                                                  torch.ones(1, 2, dtype=torch.bool))
    per_token.sum().backward()
    assert k3[0, 0].item() == 10.0 and k3[0, 1].item() < 10.0
    assert logp.grad[0, 0].item() == 0.0
    assert logp.grad[0, 1].item() == pytest.approx(1 - math.exp(2.60), rel=1e-5)


def test_reductions_to_the_plain_clipped_loss_with_bounds_0_10():
    """β = 0, ρ = 0, or nothing selected: the loss and gradient of policy_loss with ε = 1 / 9, off-policy
    (ratios far outside [0, 10]) included: S holds only A < 0 tokens, where the max-form already is −Aρ."""
    g = torch.Generator().manual_seed(2)
    base_logp = -torch.rand(4, 6, generator=g) * 3
    old = base_logp + torch.randn(4, 6, generator=g) * 1.5
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5])
    mask = (torch.rand(4, 6, generator=g) < 0.8).float()
    proxy = base_logp + 0.3  # every token below its proxy
    selected = lpreg.select_tokens(base_logp, adv, mask, proxy, rho=0.5)
    assert selected.any()
    ref_logp = base_logp.clone().requires_grad_(True)
    ref, _ = policy_loss(ref_logp, old, adv, mask, eps_low=1.0, eps_high=9.0, agg="token-mean")
    ref.backward()
    cases = ((lpreg.LpRegConfig(beta=0.0), selected), (lpreg.LpRegConfig(rho=0.0, lp_scope="microbatch"), selected),
             (lpreg.LpRegConfig(), torch.zeros(4, 6, dtype=torch.bool)))
    for cfg, sel in cases:
        logp = base_logp.clone().requires_grad_(True)
        mb = _mb(logp, adv, proxy, sel, mask)
        mb["old_logp"] = old
        loss, stats = lpreg.LpReg(cfg).loss(mb, Normaliser.of(mask))
        loss.backward()
        assert loss.item() == pytest.approx(ref.item(), abs=1e-6)
        torch.testing.assert_close(logp.grad, ref_logp.grad)
    # with β = 1 the same selection changes the loss
    logp = base_logp.clone().requires_grad_(True)
    mb = _mb(logp, adv, proxy, selected, mask)
    mb["old_logp"] = old
    assert lpreg.LpReg().loss(mb, Normaliser.of(mask))[0].item() > ref.item() + 1e-4


def test_clipping_no_cap_for_negative_and_paper_form():
    """A > 0 and ρ > 10: gradient 0. A < 0: no upper cap (−Aρ) in the PPO form; capped at 10 in the paper form."""
    logp = torch.zeros(2, 1, requires_grad=True)
    old = torch.full((2, 1), -math.log(20.0))  # ρ = 20
    adv = torch.tensor([1.0, -1.0])
    per_token, _, low, high = lpreg.lpreg_token_loss(logp, old, logp.detach(), adv, torch.zeros(2, 1))
    per_token.sum().backward()
    assert per_token[0].item() == pytest.approx(-10.0) and logp.grad[0].item() == 0.0 and high[0].item()
    assert per_token[1].item() == pytest.approx(20.0, rel=1e-5) and logp.grad[1].item() == pytest.approx(20.0, rel=1e-5)
    logp.grad = None
    per_token, _, _, high = lpreg.lpreg_token_loss(logp, old, logp.detach(), adv, torch.zeros(2, 1),
                                                   clip_form="paper")
    per_token.sum().backward()
    assert per_token[1].item() == pytest.approx(10.0) and logp.grad[1].item() == 0.0 and high[1].item()


def test_selected_positive_tokens_keep_their_clip():
    """L10 switch: a selected A > 0 token with ρ = 20 keeps the clipped −10·A, plus β·k3."""
    logp = torch.zeros(1, 1, requires_grad=True)
    old = torch.full((1, 1), -math.log(20.0))
    proxy = torch.full((1, 1), 0.1)
    per_token, k3, _, _ = lpreg.lpreg_token_loss(logp, old, proxy, torch.tensor([1.0]), torch.ones(1, 1))
    assert per_token.item() == pytest.approx(-10.0 + k3.item())


def test_the_k3_term_is_not_divided_by_the_selected_count():
    """L9: doubling the number of selected tokens doubles the regulariser (same token-mean denominator)."""
    logp = torch.full((1, 10), math.log(0.1))
    proxy = logp - math.log(0.5)
    adv = torch.tensor([0.0])
    one, two = torch.zeros(1, 10), torch.zeros(1, 10)
    one[0, 0] = 1
    two[0, :2] = 1
    l1, _ = lpreg.LpReg().loss(_mb(logp.clone().requires_grad_(True), adv, proxy, one), Normaliser.of(torch.ones(1, 10)))
    l2, _ = lpreg.LpReg().loss(_mb(logp.clone().requires_grad_(True), adv, proxy, two), Normaliser.of(torch.ones(1, 10)))
    k3 = 1 / 0.5 - 1 + math.log(0.5)
    assert l1.item() == pytest.approx(k3 / 10, rel=1e-5) and l2.item() == pytest.approx(2 * k3 / 10, rel=1e-5)


def test_prepare_update_writes_the_selection_field_for_its_rows():
    logp, adv, mask, proxy = _batch()
    batch = {"response_mask": mask, "truncated": torch.zeros(3, dtype=torch.bool), "advantages": adv,
             "fields": {"old_logp": logp, "minp_proxy_logp": proxy}}
    method = lpreg.LpReg(lpreg.LpRegConfig(rho=0.4))
    method.prepare_update(batch, [0, 1, 2], lpreg._OneProcess())
    assert _where(batch["fields"]["lp_selected"].bool()) == [(0, 3), (1, 3)]
    # an optimisation batch of rows 0 and 2 only (--mini-batches): |Neg| = 6 → k = 2 → (0,1) filtered, (0,3)
    method.prepare_update(batch, [0, 2], lpreg._OneProcess())
    assert _where(batch["fields"]["lp_selected"][[0, 2]].bool()) == [(0, 3)]


def _select_and_loss(cfg, logp, old, proxy, adv, mask):
    """The batch-scope pipeline as the loop runs it on a mini-batch after the first: prepare_update with
    π_θ's detached "cur_logp" next to π_old's fields, then loss; returns (loss, ∂loss/∂logp, selection)."""
    batch = {"response_mask": mask, "truncated": torch.zeros(mask.shape[0], dtype=torch.bool), "advantages": adv,
             "fields": {"old_logp": old, "cur_logp": logp.detach().clone(), "minp_proxy_logp": proxy}}
    method = lpreg.LpReg(cfg)
    method.prepare_update(batch, list(range(mask.shape[0])), lpreg._OneProcess())
    lp = logp.detach().clone().requires_grad_(True)
    mb = {"logp": lp, "old_logp": old, "response_mask": mask, "advantages": adv, "minp_proxy_logp": proxy,
          "lp_selected": batch["fields"]["lp_selected"], "truncated": batch["truncated"]}
    loss, _ = method.loss(mb, Normaliser.of(mask))
    loss.backward()
    return loss.detach(), lp.grad, batch["fields"]["lp_selected"].bool()


def test_off_policy_selection_ranks_by_the_current_logp_issue_repro():
    """Spec L4: rank by the detached CURRENT log-prob (the official loss ranks each micro-batch by it);
    the proxy stays π_old's (L5). π_old ranks tokens 0, 1 lowest; π_θ ranks 6, 7 lowest."""
    logp = torch.tensor([[-5.0, -5.1, -5.2, -5.3, -5.4, -5.5, -5.6, -5.7]])
    old = logp.clone()
    old[0, 0], old[0, 1] = -5.9, -5.8
    proxy = logp + torch.linspace(0.1, 0.8, 8)
    cfg = lpreg.LpRegConfig(rho=0.25, lp_min_k=2)
    loss, grad, selected = _select_and_loss(cfg, logp, old, proxy, torch.tensor([-1.0]), torch.ones(1, 8))
    assert _where(selected) == [(0, 6), (0, 7)]
    assert loss.item() == pytest.approx(1.401581, abs=1e-6)  # the official code's value (ours was 1.312491)
    # on S the gradient is ρ/N·(−A) + (1 − π_proxy/π_θ)/N = (1 − e^d)/8 + 1/8 with d = 0.7, 0.8
    torch.testing.assert_close(grad[0, 6:], (2 - torch.exp(torch.tensor([0.7, 0.8]))) / 8)


def _reference_lpreg(logp, old, proxy, adv, mask, rho, min_k, beta=1.0, eps_low=1.0, eps_high=9.0):
    """Spec "Token selection" + "Per-token loss", written out: Neg = valid ∧ A < 0, k = ⌊ρ|Neg|⌋ (none if
    k < min_k), Low = the k Neg tokens with the smallest detached CURRENT logp, S = Low ∧ logp < proxy;
    ℓ = max(−Aρ, −A·clip(ρ, 1 − ε_low, 1 + ε_high)) off S, −Aρ + β·k3 on S; token-mean."""
    lp = logp.detach()
    a = adv[:, None].expand_as(lp)
    neg = mask.bool() & (a < 0)
    k = int(math.floor(rho * int(neg.sum()) + 1e-9))
    selected = torch.zeros_like(neg)
    if k >= max(min_k, 1):
        where = neg.nonzero()
        lowest = where[torch.argsort(lp[neg])[:k]]
        selected[lowest[:, 0], lowest[:, 1]] = True
        selected &= (lp < proxy) & (proxy > F)
    ratio = torch.exp(logp - old)
    off = torch.maximum(-a * ratio, -a * torch.clamp(ratio, 1 - eps_low, 1 + eps_high))
    d = torch.clamp(proxy - logp, -20, 20)
    k3 = torch.clamp(torch.exp(d) - d - 1, -10, 10)
    per_token = torch.where(selected, -a * ratio + beta * k3, off)
    return (per_token * mask).sum() / mask.sum(), selected


def test_off_policy_random_cases_match_the_spec_reference():
    """768 random off-policy mini-batches (π_θ ≠ π_old): selection, loss and gradient = the reference."""
    g = torch.Generator().manual_seed(14)
    differ = 0
    for case in range(768):
        S, T = 4, 8
        old = -torch.rand(S, T, generator=g) * 6
        logp = old + torch.randn(S, T, generator=g) * 0.7  # the parameters moved since π_old
        proxy = old + torch.rand(S, T, generator=g) * 0.5  # π_old's proxy: ≥ π_old's logp where kept
        proxy[torch.rand(S, T, generator=g) < 0.1] = F
        adv = torch.randn(S, generator=g)
        mask = (torch.rand(S, T, generator=g) < 0.9).float()
        rho, min_k = (0.1, 0.25, 0.5)[case % 3], 1 + case % 2
        loss, grad, selected = _select_and_loss(lpreg.LpRegConfig(rho=rho, lp_min_k=min_k), logp, old, proxy,
                                                adv, mask)
        lp = logp.clone().requires_grad_(True)
        ref_loss, ref_selected = _reference_lpreg(lp, old, proxy, adv, mask, rho, min_k)
        ref_loss.backward()
        if not (torch.equal(selected, ref_selected) and torch.allclose(loss, ref_loss, atol=1e-6)
                and torch.allclose(grad, lp.grad, atol=1e-7)):
            differ += 1
    assert differ == 0, f"{differ} of 768 off-policy cases differ from the reference"


# ---------------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------------


def test_defaults_and_config_errors(tmp_path, capsys):
    c = lpreg.LpRegConfig()
    assert (c.kappa, c.rho, c.beta, c.eps_low, c.eps_high, c.agg, c.kl_coef) == \
        (0.02, 0.01, 1.0, 1.0, 9.0, "token-mean", 0.0)
    assert lpreg.LpReg().needs() == set() and "minp_proxy_logp" in lpreg.LpReg().token_field_fns()
    assert lpreg.LpReg().needs_batch_fields  # the default batch scope (set per instance from lp_scope)
    assert not lpreg.LpReg(lpreg.LpRegConfig(lp_scope="microbatch")).needs_batch_fields
    for bad in ({"kappa": 0.0}, {"rho": 1.5}, {"beta": -1.0}, {"lp_percentile_over": "pos"},
                {"lp_scope": "rank"}, {"lp_min_k": 0}, {"lp_clip_form": "dual"}, {"lp_filter": "topk"},
                {"lp_tau": 0.0}):
        with pytest.raises(ValueError):
            lpreg.LpRegConfig(**bad)
    fn = lpreg.LpReg(lpreg.LpRegConfig(lp_filter="fixed", lp_tau=0.1)).token_field_fns()["minp_proxy_logp"]
    assert fn.func is lpreg.proxy_logp and fn.keywords == {"kappa": 0.02, "tau": 0.1, "filter_logits": "raw"}
    # the default min-p filter passes no τ
    assert lpreg.LpReg().token_field_fns()["minp_proxy_logp"].keywords == {"kappa": 0.02, "tau": None,
                                                                          "filter_logits": "raw"}
    assert train.main(["--method", "lpreg", "--lp-scope", "gpu", "--out", str(tmp_path / "x")]) == 2
    assert "lp_scope" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------
# In the loop
# ---------------------------------------------------------------------------------------------------


def test_lpreg_trains_on_the_toy_and_logs_its_metrics(toy_model_dir, tmp_path, monkeypatch):
    seen = []
    original = lpreg.LpReg.loss
    monkeypatch.setattr(lpreg.LpReg, "loss",
                        lambda self, mb, norm: seen.append("lp_selected" in mb and "minp_proxy_logp" in mb)
                        or original(self, mb, norm))
    out = tmp_path / "r"
    assert train.main(["--method", "lpreg", "--steps", "2", "--prompts-per-step", "4", "--group-size", "4",
                       "--rho", "0.1", "--out", str(out), *QUICK]) == 0
    assert seen and all(seen)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "lp_selected" in r]
    assert len(train_rows) == 2
    for r in train_rows:
        assert 0 <= r["lp_selected"] <= 0.1 and 0 <= r["lp_filtered"] <= 1 and r["lp_k3"] >= 0
        assert r["lp_n_selected"] == int(r["lp_n_selected"])
    assert any(r["lp_n_selected"] > 0 for r in train_rows)
    cfg = json.loads((out / "config.json").read_text())["method"]
    assert (cfg["rho"], cfg["kappa"], cfg["eps_low"], cfg["eps_high"]) == (0.1, 0.02, 1.0, 9.0)


def test_selection_is_global_over_micro_batches(toy_model_dir, tmp_path, monkeypatch):
    """One micro-batch and many micro-batches (both select in the no-grad prepass over the whole rollout
    batch) select the same tokens and give the same update; the micro-batch scope switch selects per
    micro-batch instead."""
    params, logged = one_step_per_micro_batch_budget(lpreg.LpReg, ["--method", "lpreg", "--rho", "0.1"], tmp_path,
                                                     monkeypatch)
    original = lpreg.LpReg.loss
    assert logged[10**6]["lp_n_selected"] == logged[200]["lp_n_selected"] > 0
    assert logged[10**6]["lp_k3"] == pytest.approx(logged[200]["lp_k3"], rel=1e-4, abs=1e-9)
    for k, v in params[10**6].items():
        torch.testing.assert_close(v, params[200][k], atol=3e-5, rtol=1e-3)
    # the official per-micro-batch scope: k = floor(ρ·|Neg_mb|) of each micro-batch, none where k < 2
    budgets = []

    def spy(self, mb, norm):
        neg = int((mb["response_mask"].bool() & (mb["advantages"][:, None] < 0)).sum())
        budgets.append(lpreg.lowest_count(neg, 0.1) if lpreg.lowest_count(neg, 0.1) >= 2 else 0)
        assert "lp_selected" not in mb  # no batch-level selection in this scope
        return original(self, mb, norm)

    monkeypatch.setattr(lpreg.LpReg, "loss", spy)
    out = tmp_path / "micro"
    assert train.main(["--method", "lpreg", "--steps", "1", "--prompts-per-step", "4", "--group-size", "4",
                       "--rho", "0.1", "--micro-batch-tokens", "200", "--seed", "3", "--lp-scope", "microbatch",
                       "--lp-min-k", "2", "--out", str(out), *QUICK]) == 0
    micro = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert len(budgets) > 1 and 0 <= micro["lp_n_selected"] <= sum(budgets)


def test_second_mini_batch_selects_by_the_current_policy(toy_model_dir, tmp_path, monkeypatch):
    """--mini-batches 2 (off-policy, spec L4/L5): the selection of each mini-batch ranks by the current
    policy's log-probs, checked against a manual forward with the parameters of that moment; on the second
    mini-batch they differ from π_old's (the first optimiser step moved them), while the proxy stays π_old's."""
    ranked, manual = [], []
    original_select, original_update = lpreg.select_tokens, train.Trainer.update

    def select(logp, advantages, mask, proxy_logp, *args, **kwargs):
        ranked.append((logp.clone(), mask.clone(), proxy_logp.clone()))
        return original_select(logp, advantages, mask, proxy_logp, *args, **kwargs)

    def update(self, batch, rows):
        with torch.no_grad():
            mb = to_device(slice_batch(batch, rows), self.device)
            logp = token_fields(self.model, mb, self.cfg.temperature, set(), with_grad=False)["logp"].cpu()
        t = logp.shape[1]
        fields = batch["fields"]
        manual.append((logp, fields["old_logp"][rows][:, :t].clone(), fields["minp_proxy_logp"][rows][:, :t].clone()))
        return original_update(self, batch, rows)

    monkeypatch.setattr(lpreg, "select_tokens", select)
    monkeypatch.setattr(train.Trainer, "update", update)
    out = tmp_path / "mini"
    assert train.main(["--method", "lpreg", "--steps", "1", "--prompts-per-step", "4", "--group-size", "4",
                       "--rho", "0.1", "--mini-batches", "2", "--seed", "3", "--out", str(out), *QUICK]) == 0
    assert len(ranked) == len(manual) == 2
    for k, ((logp, mask, proxy), (current, old, old_proxy)) in enumerate(zip(ranked, manual)):
        t = current.shape[1]
        m = mask[:, :t].bool()
        assert m.any()
        torch.testing.assert_close(logp[:, :t][m], current[m], atol=1e-5, rtol=1e-5)  # π_θ's, as it is now
        torch.testing.assert_close(proxy[:, :t][m], old_proxy[m])  # π_old's proxy (L5)
        moved = float((old - current)[m].abs().max())
        assert (moved < 1e-5) if k == 0 else (moved > 1e-4), (k, moved)  # mini-batch 2: π_θ ≠ π_old


# ---------------------------------------------------------------------------------------------------
# Memory (slow): the proxy adds little to the chunked log-prob pass at V = 151,936
# ---------------------------------------------------------------------------------------------------
_MEMORY_SCRIPT = textwrap.dedent("""
    import resource, sys, torch
    sys.path.insert(0, {root!r})
    import forward, lpreg
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=151936, hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         tie_word_embeddings=True)).eval()
    S, P, T = 8, 16, 512  # 4,096 response tokens
    ids = torch.randint(0, 151936, (S, P + T))
    batch = {{"input_ids": ids, "attention_mask": torch.ones_like(ids), "prompt_len": P,
              "response_mask": torch.ones(S, T), "prompt_mask": torch.ones(S, P)}}
    field_fns = lpreg.LpReg().token_field_fns() if {proxy} else None  # the min-p proxy: Lp-Reg's field function
    forward.token_fields(model, batch, 1.0, set(), with_grad=False, chunk_rows=512, field_fns=field_fns)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)  # KiB on Linux
""")


def _peak_rss_kib(proxy: bool) -> int:
    script = _MEMORY_SCRIPT.format(root=str(ROOT), proxy=repr(bool(proxy)))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return int(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_proxy_peak_memory_is_close_to_the_plain_logp_pass():
    plain = _peak_rss_kib(False)
    proxy = _peak_rss_kib(True)
    print(f"peak RSS: plain logp pass {plain / 1024:.0f} MiB, with the min-p proxy {proxy / 1024:.0f} MiB, "
          f"ratio {proxy / plain:.3f}")
    assert proxy <= 1.3 * plain


def test_prepare_update_reports_the_proxy_regime_by_hand():
    """lp/removed_mass, lp/frac_Z_below_*, lp/shift_per_beta on a hand-made batch (on-policy: old = current).

    One response of 4 tokens with A < 0, ρ = 0.5: |Neg| = 4, k = 2, the two lowest-logp tokens are positions
    1 and 3. Their Z (kept mass) are 0.5 and 0.8, so Lp-Reg's shift per unit β is mean(1/Z − 1) =
    mean(1, 0.25) = 0.625. Positions 0 and 2 have Z = 1 and 0.95: removed mass mean(0, 0.5, 0.05, 0.2) = 0.1875."""
    logp = torch.log(torch.tensor([[0.9, 0.1, 0.6, 0.2]]))
    z = torch.tensor([[1.0, 0.5, 0.95, 0.8]])
    batch = {"response_mask": torch.ones(1, 4), "truncated": torch.zeros(1, dtype=torch.bool),
             "advantages": torch.tensor([-1.0]),
             "fields": {"old_logp": logp, "minp_proxy_logp": logp - torch.log(z)}}
    method = lpreg.LpReg(lpreg.LpRegConfig(rho=0.5))
    method.prepare_update(batch, [0], None)
    assert batch["fields"]["lp_selected"].tolist() == [[0.0, 1.0, 0.0, 1.0]]
    metrics = {k: s / n for k, (s, n) in batch["method_metrics"].items()}
    assert metrics["lp/removed_mass"] == pytest.approx(0.1875)
    assert metrics["lp/frac_Z_below_0.99"] == pytest.approx(0.75) and metrics["lp/frac_Z_below_0.9"] == pytest.approx(0.5)
    assert metrics["lp/shift_per_beta"] == pytest.approx(0.625, rel=1e-5)
