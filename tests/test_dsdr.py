"""dsdr.py against the properties of specs/dsdr.md (hand-computed values are the spec's)."""

import pytest
import torch

import dsdr
import train
from grpo import GRPOConfig, Method, Normaliser, group_advantages

G = 8


# ---- global scale: shaping and the advantages it produces -------------------------------------------


def _advantages(correct, d, lambda_d=0.001, eps=1e-6):
    correct = torch.tensor(correct, dtype=torch.float32)
    rewards = dsdr.shaped_rewards(correct.clone(), correct, torch.tensor(d), lambda_d)
    return group_advantages(rewards, len(d), "group", eps)


def test_all_correct_group_gets_z_scored_diversity():
    d = [0.1 * k for k in range(1, 9)]
    adv = _advantages([1] * 8, d)
    expected = [-1.423059, -1.016471, -0.609883, -0.203294, 0.203294, 0.609883, 1.016471, 1.423059]
    assert adv.tolist() == pytest.approx(expected, abs=2e-6)
    assert float(adv.std()) == pytest.approx(0.995934, abs=2e-6)
    assert torch.equal(torch.argsort(adv), torch.arange(8))  # ordered like d
    assert float(_advantages([1] * 8, d, eps=1e-4).max()) == pytest.approx(1.014643, abs=2e-6)  # TRL's ε
    assert torch.equal(_advantages([1] * 8, [0.4] * 8), torch.zeros(8))  # identical d: no signal


def test_mixed_group_is_a_tiny_perturbation_and_all_wrong_stays_zero():
    d = [0.3, 0.5, 0.2, 0.9, 0.1, 0.4, 0.6, 0.7]
    adv = _advantages([1, 1, 0, 0, 0, 0, 0, 0], d)
    plain = _advantages([1, 1, 0, 0, 0, 0, 0, 0], d, lambda_d=0.0)
    assert float(adv[0]) == pytest.approx(1.619966, abs=2e-6) and float(adv[1]) == pytest.approx(1.620398, abs=2e-6)
    assert float(plain[0]) == pytest.approx(1.620182, abs=2e-6)
    assert float((adv - plain).abs().max()) <= 2.2e-4
    assert torch.equal(_advantages([0] * 8, d), torch.zeros(8))


def test_shaping_bounds_and_sigma_clip():
    correct = torch.tensor([1.0, 0.0, 1.0, 0.0])
    d = torch.tensor([0.9, 0.9, 0.2, 0.0])
    r = dsdr.shaped_rewards(correct.clone(), correct, d, 0.001)
    assert r[1] == 0.0 and r[3] == 0.0  # incorrect: unchanged, exactly
    assert ((r[[0, 2]] >= 1.0) & (r[[0, 2]] <= 1.001)).all()
    assert float(dsdr.shaped_rewards(correct.clone(), correct, d, 0.001, sigma_d=0.5)[0]) == pytest.approx(1.0005)


# ---- coupling weights (Eq. 11) ----------------------------------------------------------------------


def test_coupling_weights_spec_values_and_edge_cases():
    d = torch.tensor([0.3, 0.5, 0.9, 0.1])
    w = dsdr.coupling_weights(d, torch.tensor([1, 1, 0, 0]), 4, tau=5.0)
    assert w.tolist() == pytest.approx([0.268941, 0.731059, 0.0, 0.0], abs=1e-6)
    assert dsdr.coupling_weights(d, torch.tensor([1, 1, 1, 0]), 4, tau=0.0).tolist() == pytest.approx(
        [1 / 3, 1 / 3, 1 / 3, 0.0])  # τ = 0: uniform over P
    assert dsdr.coupling_weights(d, torch.tensor([0, 0, 1, 0]), 4, tau=5.0).tolist() == [0, 0, 1.0, 0]
    assert dsdr.coupling_weights(d, torch.tensor([0, 0, 0, 0]), 4, tau=5.0).tolist() == [0, 0, 0, 0]  # no NaN
    peaked = dsdr.coupling_weights(d, torch.tensor([1, 1, 1, 1]), 4, tau=500.0)
    assert peaked.tolist() == pytest.approx([0, 0, 1, 0], abs=1e-6)  # one-hot on the max as τ grows


def test_coupling_weights_sum_to_one_per_group_with_a_correct_rollout():
    gen = torch.Generator().manual_seed(0)
    d = torch.rand(10 * G, generator=gen)
    correct = (torch.rand(10 * G, generator=gen) < 0.4).float()
    correct[:G] = 0  # one all-wrong group
    w = dsdr.coupling_weights(d, correct, G, 5.0).reshape(10, G)
    has = correct.reshape(10, G).bool().any(1)
    assert torch.allclose(w[has].sum(1), torch.ones(int(has.sum())))
    assert (w[~has] == 0).all() and (w[correct.reshape(10, G) == 0] == 0).all()


# ---- local scale (Eqs. 12–15): the gradient keeps ρ differentiable ----------------------------------


def test_local_term_gradient_is_rho_one_plus_logp():
    torch.manual_seed(0)
    S, T = 4, 5  # two prompts of G = 2
    logp = (-torch.rand(S, T) * 3).requires_grad_()
    mask = torch.ones(S, T)
    mask[1, 3:] = 0
    mask[2, 1:] = 0
    w = torch.tensor([0.25, 0.75, 1.0, 0.0])  # the last rollout is incorrect
    lam = 0.001
    norm = Normaliser.of(mask)
    loss = lam * dsdr.local_entropy_loss(logp, logp.detach(), mask, w, 2, norm)
    (grad,) = torch.autograd.grad(loss, logp)
    lengths = mask.sum(1, keepdim=True)
    expected = lam * (2 / S) * w[:, None] * (1 + logp.detach()) / lengths * mask
    assert torch.allclose(grad, expected, atol=1e-9)
    assert (grad[3] == 0).all()  # incorrect rollouts: no local gradient
    at_minus_one = torch.full((1, 3), -1.0, requires_grad=True)  # zero gradient at logp = −1
    g1 = torch.autograd.grad(dsdr.local_entropy_loss(at_minus_one, at_minus_one.detach(), torch.ones(1, 3),
                                                     torch.ones(1), 1, Normaliser.of(torch.ones(1, 3))), at_minus_one)[0]
    assert torch.allclose(g1, torch.zeros(1, 3))
    # the detached-ratio variant is a different regulariser: λ(G/S) w / T, without the (1 + logp) factor
    (detached,) = torch.autograd.grad(lam * dsdr.local_entropy_loss(logp, logp.detach(), mask, w, 2, norm, True), logp)
    assert torch.allclose(detached, lam * (2 / S) * w[:, None] / lengths * mask, atol=1e-9)
    assert not torch.allclose(detached, grad)
    assert float(loss.detach()) < 0  # its value is negative (log-probs are); adding it maximises J_local


def test_local_term_adds_up_over_micro_batches_and_ranks():
    torch.manual_seed(1)
    logp = -torch.rand(8, 6) * 2
    mask = (torch.rand(8, 6) > 0.2).float()
    mask[:, 0] = 1
    w = torch.rand(8)
    full = dsdr.local_entropy_loss(logp, logp, mask, w, 4, Normaliser.of(mask))
    # two "ranks" (W = 2), each with two micro-batches: the loop sums micro-batches, averages ranks
    norm = Normaliser(float(mask.sum()), 8.0, 6, world_size=2)
    parts = [dsdr.local_entropy_loss(logp[i:i + 2], logp[i:i + 2], mask[i:i + 2], w[i:i + 2], 4, norm)
             for i in range(0, 8, 2)]
    assert float(sum(parts) / 2) == pytest.approx(float(full), rel=1e-6)


# ---- diversity scores (Eqs. 4–9; eval.py reuses D_emb and D_eq as metrics) ---------------------------


class _FakeEncoder:
    """Embeds a text by a fixed table, so that scores can be computed by hand."""

    def __init__(self, table):
        self.table = table

    def encode(self, texts):
        return torch.nn.functional.normalize(torch.tensor([self.table[t] for t in texts], dtype=torch.float32), dim=-1)


def test_diversity_scores_hand_case_and_groups_are_separate():
    enc = _FakeEncoder({"a=1": [1, 0], "b=2": [0, 1], "c=3": [0, 1]})
    texts = ["a=1", "a=1", "b=2", "c=3"]  # two groups of 2
    s = dsdr.diversity_scores(texts, torch.tensor([1, 1, 1, 0]), 2, enc)
    assert s["d_emb"].tolist() == [0.0, 0.0, 0.0, 0.0]  # identical in group 1; parallel in group 2
    assert s["d_eq"].tolist() == [0.0, 0.0, 1.0, 1.0]  # group 2's formulas differ
    assert s["d"].tolist() == [0.0, 0.0, 0.5, 0.5]
    # "correct" comparison set: in group 2 only one rollout is correct → no peers → 0 (spec D1)
    # (an incorrect rollout is still scored against the correct peers, for logging; it gets no bonus)
    s = dsdr.diversity_scores(texts, torch.tensor([1, 1, 1, 0]), 2, enc, among="correct")
    assert s["d"].tolist() == [0.0, 0.0, 0.0, 0.5]
    with pytest.raises(ValueError, match="whole groups"):
        dsdr.diversity_scores(texts[:3], torch.ones(3), 2, enc)


def test_identical_texts_have_zero_d_with_the_real_encoder():
    texts = ["5*3=15,15+7=22"] * 4 + ["5*3=15,15+7=22", "7*2=14,14+8=22", "3+7=10,10*2=20", "8*3=24,24-2=22"]
    s = dsdr.diversity_scores(texts, torch.ones(8), 4)
    assert torch.allclose(s["d"][:4], torch.zeros(4), atol=1e-6)
    assert (s["d"][5:] > 0.1).all()


# ---- the method inside the loop's hooks -------------------------------------------------------------


def _batch(texts, correct, group_size):
    S = len(texts)
    return {"texts": texts, "correct": torch.tensor(correct, dtype=torch.float32), "group_size": group_size,
            "lengths": torch.full((S,), 5), "max_new_tokens": 16}


def test_reduces_to_the_base_loss_when_both_lambdas_are_zero(monkeypatch):
    monkeypatch.setattr(dsdr, "get_encoder", lambda *a, **k: pytest.fail("encoder loaded although unused"))
    cfg = dsdr.DSDRConfig(lambda_d=0.0, lambda_l=0.0)
    method, base = dsdr.DSDR(cfg), Method(GRPOConfig(eps_high=0.28, agg="token-mean"))  # DAPO without its extras
    batch = _batch(["x"] * 8, [1, 0, 1, 1, 0, 0, 0, 1], 4)
    r = method.shape_rewards(dict(batch))
    assert torch.equal(r, base.shape_rewards(dict(batch)))
    torch.manual_seed(0)
    logp = (-torch.rand(8, 6)).requires_grad_()
    mb = {"logp": logp, "old_logp": logp.detach() - 0.1 * torch.rand(8, 6), "response_mask": torch.ones(8, 6),
          "advantages": method.advantages(batch, r), "group_size": 4, "truncated": torch.zeros(8, dtype=torch.bool)}
    norm = Normaliser.of(mb["response_mask"])
    l1, _ = method.loss(mb, norm)
    g1 = torch.autograd.grad(l1, logp)[0]
    l2, _ = base.loss(mb, norm)
    g2 = torch.autograd.grad(l2, logp)[0]
    assert float(l1) == float(l2) and torch.equal(g1, g2)


def test_ablations_switch_off_what_the_paper_says(monkeypatch):
    batch = _batch(["5*3=15"] * 8, [1, 1, 0, 0, 1, 0, 0, 0], 4)
    # w/o GD: no bonus, no encoder, uniform weights over the correct rollouts
    monkeypatch.setattr(dsdr, "get_encoder", lambda *a, **k: pytest.fail("encoder loaded under w/o GD"))
    m = dsdr.DSDR(dsdr.DSDRConfig(global_diversity=False))
    b = dict(batch)
    assert torch.equal(m.shape_rewards(b), batch["correct"])
    assert b["per_seq"]["coupling_weights"].tolist() == [0.5, 0.5, 0, 0, 1.0, 0, 0, 0]
    # w/o GC: no local term, hence no weights attached
    monkeypatch.setattr(dsdr, "get_encoder", lambda *a, **k: _FakeEncoder({"5*3=15": [1.0, 0.0]}))
    b = dict(batch)
    dsdr.DSDR(dsdr.DSDRConfig(coupling=False)).shape_rewards(b)
    assert "per_seq" not in b and "dsdr/d" in b["method_metrics"]


def test_config_errors_are_one_line(tmp_path, capsys):
    assert train.main(["--method", "dsdr", "--diversity-among", "some", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "diversity_among" in err


def test_dsdr_trains_on_the_toy_and_logs_its_terms(toy_model_dir, tmp_path):
    import json

    out = tmp_path / "dsdr"
    assert train.main(["--method", "dsdr", "--steps", "2", "--prompts-per-step", "4", "--group-size", "4",
                       "--out", str(out), "--no-progress", "--no-tensorboard", "--no-final-eval"]) == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    for key in ("dsdr/d", "dsdr/d_emb", "dsdr/d_eq", "dsdr/d_correct", "dsdr/local_loss", "dsdr/w_max"):
        assert key in rows[0], key
    assert 0 <= rows[0]["dsdr/d"] <= 1 and rows[0]["dsdr/local_loss"] <= 0
    saved = json.loads((out / "config.json").read_text())["method"]
    # on the toy, DSDR's toy strength (docs/studies/toy) replaces the paper's λ_d = λ_ℓ = 0.001
    assert (saved["lambda_d"], saved["lambda_l"]) == (dsdr.DSDR.toy_overrides["lambda_d"], dsdr.DSDR.toy_overrides["lambda_l"])


def test_all_wrong_groups_are_not_embedded_and_scores_of_others_are_unchanged():
    calls = []

    class Counting(_FakeEncoder):
        def encode(self, texts):
            calls.append(list(texts))
            return super().encode(texts)

    enc = Counting({"a=1": [1, 0], "b=2": [0, 1], "c=3": [1, 1]})
    texts = ["a=1", "b=2", "c=3", "a=1"]
    correct = torch.tensor([1, 0, 0, 0])
    full = dsdr.diversity_scores(texts, correct, 2, enc)
    part = dsdr.diversity_scores(texts, correct, 2, enc, groups=torch.tensor([True, False]))
    assert calls[-1] == ["a=1", "b=2"]  # only the group with a correct rollout was embedded
    assert torch.equal(part["d"][:2], full["d"][:2]) and (part["d"][2:] == 0).all()


def test_ablation_flags_on_the_command_line():
    _, overrides = train.parse_args(["--method", "dsdr", "--no-global-diversity", "--no-coupling"])
    assert overrides == {"global_diversity": False, "coupling": False}
