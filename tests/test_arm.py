"""ARM (arm.py, spec ../shared/specs/arm.md): hand-computed confidences and shifted advantages, the spec's
testable properties, the switches, the reduction to GRPO at α = 0, c_q against a model's full logits,
and the method in the loop (metrics logged, micro-batching does not change the update)."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

import arm
import train
from conftest import one_step_per_micro_batch_budget
from data import collate
from forward import token_fields
from grpo import GRPOConfig, Method, Normaliser, group_advantages

QUICK = ["--no-final-eval", "--no-progress", "--no-tensorboard"]


def _logp(probs):
    return torch.log(torch.tensor(probs, dtype=torch.float64)).to(torch.float32)


# ---------------------------------------------------------------------------------------------------
# ARM-1: answer confidence over the low-probability tokens
# ---------------------------------------------------------------------------------------------------


def test_k_values_from_the_spec():
    k = arm.low_token_count(torch.tensor([0, 1, 4, 5, 6, 10, 11, 15, 100]))
    assert k.tolist() == [1, 1, 1, 1, 2, 2, 3, 3, 20]


def test_answer_confidence_is_the_geometric_mean_of_the_lowest_fifth():
    # T = 7 → k = ceil(1.4) = 2: the tokens with p = 0.1 and 0.3; padding (p ≈ e^-50) never enters
    probs = [0.9, 0.5, 0.99, 0.1, 0.8, 0.3, 0.95]
    logp = torch.cat([_logp(probs), torch.full((3,), -50.0)]).unsqueeze(0)
    mask = torch.tensor([[1.0] * 7 + [0.0] * 3])
    c_o = arm.answer_confidence(logp, mask)
    assert c_o.shape == (1,)
    assert c_o.item() == pytest.approx(math.sqrt(0.1 * 0.3), rel=1e-6)
    sel = arm.low_token_mask(logp, mask)
    assert sel[0].nonzero().flatten().tolist() == [3, 5]
    # T = 10 → k = 2, T = 11 → k = 3, T = 1 → k = 1
    ten = _logp([0.9] * 8 + [0.2, 0.4]).unsqueeze(0)
    assert arm.answer_confidence(ten, torch.ones(1, 10)).item() == pytest.approx(math.sqrt(0.08), rel=1e-6)
    eleven = _logp([0.9] * 8 + [0.2, 0.4, 0.5]).unsqueeze(0)
    assert arm.answer_confidence(eleven, torch.ones(1, 11)).item() == pytest.approx(0.04 ** (1 / 3), rel=1e-6)
    one = _logp([0.7, 0.01]).unsqueeze(0)
    assert arm.answer_confidence(one, torch.tensor([[1.0, 0.0]])).item() == pytest.approx(0.7, rel=1e-6)


def test_answer_confidence_rows_are_independent_and_low_frac_is_a_knob():
    logp = torch.stack([_logp([0.5, 0.25, 1.0, 1.0, 1.0]), _logp([0.8, 0.6, 0.4, 0.2, 0.1])])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0, 0.0], [1.0] * 5])
    # row 0: T = 3 → k = 1 → 0.25; row 1: T = 5 → k = 1 → 0.1
    torch.testing.assert_close(arm.answer_confidence(logp, mask), torch.tensor([0.25, 0.1]))
    # low_frac = 1: the plain length-normalised confidence, exp(mean of all valid log-probs)
    full = arm.answer_confidence(logp, mask, low_frac=1.0)
    torch.testing.assert_close(full, torch.tensor([0.125 ** (1 / 3), (0.8 * 0.6 * 0.4 * 0.2 * 0.1) ** 0.2]))


def test_confidence_bounds():
    torch.manual_seed(0)
    logp = -torch.rand(16, 12) * 5
    mask = (torch.rand(16, 12) > 0.3).float()
    mask[:, 0] = 1.0
    c_o = arm.answer_confidence(logp, mask)
    plain = torch.exp((logp * mask).sum(-1) / mask.sum(-1))
    assert ((c_o > 0) & (c_o <= 1)).all()
    assert (c_o <= plain + 1e-7).all()  # the low set is the least likely: its mean is at most the mean
    # equality when all token log-probs are equal; c_o = 1 iff every selected token has probability 1
    same = torch.full((2, 6), math.log(0.6))
    torch.testing.assert_close(arm.answer_confidence(same, torch.ones(2, 6)), torch.full((2,), 0.6))
    certain = torch.zeros(1, 6)
    assert arm.answer_confidence(certain, torch.ones(1, 6)).item() == 1.0
    certain[0, 3] = -1e-3
    assert arm.answer_confidence(certain, torch.ones(1, 6)).item() < 1.0


def test_low_set_by_entropy_selects_the_most_uncertain_positions():
    logp = _logp([0.1, 0.9, 0.8, 0.7, 0.6, 0.5]).unsqueeze(0)
    entropy = torch.tensor([[0.0, 2.0, 0.1, 3.0, 0.2, 0.3]])
    mask = torch.ones(1, 6)
    # T = 6 → k = 2: the entropy ranking picks positions 1 and 3 (not the least likely token 0)
    sel = arm.low_token_mask(logp, mask, entropy=entropy)
    assert sel[0].nonzero().flatten().tolist() == [1, 3]
    c_o = arm.answer_confidence(logp, mask, entropy=entropy)
    assert c_o.item() == pytest.approx(math.sqrt(0.9 * 0.7), rel=1e-6)
    # padding is never selected, even with a high entropy there
    entropy2 = torch.tensor([[0.0, 2.0, 0.1, 3.0, 0.2, 9.0]])
    sel2 = arm.low_token_mask(logp, torch.tensor([[1.0] * 5 + [0.0]]), entropy=entropy2)
    assert sel2[0].nonzero().flatten().tolist() == [3]


# ---------------------------------------------------------------------------------------------------
# ARM-2: prompt confidence = 1 / PPL(question)
# ---------------------------------------------------------------------------------------------------


def test_prompt_confidence_hand_case_and_low_only_switch():
    # left-padded prompt: positions 0-1 padding, position 2 the first real token (no log-prob)
    plogp = torch.tensor([[0.0, 0.0, 0.0, math.log(0.5), math.log(0.125), math.log(0.25)]])
    pmask = torch.tensor([[0.0, 0.0, 0.0, 1.0, 1.0, 1.0]])
    assert arm.prompt_confidence(plogp, pmask).item() == pytest.approx(0.25, rel=1e-6)  # (1/64)^(1/3)
    assert arm.prompt_confidence(plogp, pmask, low_frac=0.2).item() == pytest.approx(0.125, rel=1e-6)
    # a prompt with no scored token: no evidence → 1
    assert arm.prompt_confidence(torch.zeros(1, 3), torch.zeros(1, 3)).item() == 1.0


def test_prompt_confidence_equals_direct_computation_from_full_logits(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    pairs = [("3 5 7>22:", "5*3=15,15+7=22"), ("1 2>3:", "1+2=3"), ("9 9 9 9>81:", "9*9=81")]
    prompts = [tok(p)["input_ids"] for p, _ in pairs]
    responses = [tok(r)["input_ids"] + [tok.eos_token_id] for _, r in pairs]
    batch = collate(prompts, responses, tok.pad_token_id, tok.eos_token_id)
    fields = token_fields(model, batch, 1.0, {"prompt_logp"}, with_grad=False)
    c_q = arm.prompt_confidence(fields["prompt_logp"], fields["prompt_logp_mask"])
    c_o = arm.answer_confidence(fields["logp"], batch["response_mask"])
    for i, (p, r) in enumerate(zip(prompts, responses)):
        ids = torch.tensor([p + r])
        with torch.no_grad():
            logprobs = torch.log_softmax(model(ids).logits.float(), dim=-1)[0]
        # token j of the prompt is scored by the logits at j−1; the first token has none
        prompt_lp = torch.stack([logprobs[j - 1, p[j]] for j in range(1, len(p))])
        assert c_q[i].item() == pytest.approx(float(torch.exp(prompt_lp.mean())), rel=1e-5)
        resp_lp = torch.stack([logprobs[len(p) - 1 + t, r[t]] for t in range(len(r))])
        k = max(1, math.ceil(0.2 * len(r)))
        expected = torch.exp(resp_lp.sort().values[:k].mean())
        assert c_o[i].item() == pytest.approx(float(expected), rel=1e-5)


# ---------------------------------------------------------------------------------------------------
# ARM-3: the shifted advantage
# ---------------------------------------------------------------------------------------------------


def test_numeric_example_from_the_spec():
    correct = torch.tensor([1.0, 0, 0, 0, 0, 0, 0, 0])
    adv = group_advantages(correct, 8)
    assert adv[0].item() == pytest.approx(2.474867, abs=1e-6) and adv[1].item() == pytest.approx(-0.353553, abs=1e-6)
    c_o = torch.tensor([0.2, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6])
    c_q = torch.tensor([0.5]).repeat_interleave(8)  # one anchor per prompt, shared by its responses
    shifted = arm.shift_advantages(adv, c_q, c_o, arm.arm_active(correct, 8), alpha=0.3)
    assert shifted[0].item() == pytest.approx(2.564867, abs=1e-6)
    assert shifted[1].item() == pytest.approx(-0.383553, abs=1e-6)
    only_correct = arm.shift_advantages(adv, c_q, c_o, arm.arm_active(correct, 8, on_incorrect=False), alpha=0.3)
    assert only_correct[0].item() == pytest.approx(2.564867, abs=1e-6)
    assert torch.equal(only_correct[1:], adv[1:])


def _random_case(seed=0, G=4):
    g = torch.Generator().manual_seed(seed)
    # groups: all wrong, mixed, all correct, mixed
    correct = torch.tensor([0, 0, 0, 0, 1, 0, 1, 0, 1, 1, 1, 1, 0, 0, 0, 1], dtype=torch.float32)
    adv = group_advantages(correct, G)
    c_o = torch.rand(16, generator=g) * 0.98 + 0.01
    c_q = (torch.rand(4, generator=g) * 0.98 + 0.01).repeat_interleave(G)
    return correct, adv, c_q, c_o


def test_all_wrong_groups_are_unchanged_and_the_shift_is_bounded_and_exact():
    correct, adv, c_q, c_o = _random_case()
    for alpha in (0.1, 0.3, 1.0):
        shifted = arm.shift_advantages(adv, c_q, c_o, arm.arm_active(correct, 4), alpha=alpha)
        assert torch.equal(shifted[:4], adv[:4]) and (shifted[:4] == 0).all()  # all wrong: exactly A = 0
        delta = shifted - adv
        assert (delta.abs() < alpha).all()
        torch.testing.assert_close(delta[4:], alpha * (c_q[4:] - c_o[4:]))
        # shared anchor: within a group only c_o separates the responses
        for grp in range(1, 4):
            rows = slice(4 * grp, 4 * grp + 4)
            a, s, o = adv[rows], shifted[rows], c_o[rows]
            expected = (a[:, None] - a[None, :]) - alpha * (o[:, None] - o[None, :])
            torch.testing.assert_close(s[:, None] - s[None, :], expected)


def test_all_correct_group_gets_a_signal_that_lowers_confident_answers():
    correct = torch.ones(4)
    adv = group_advantages(correct, 4)
    assert (adv == 0).all()  # GRPO: no signal at all
    c_o = torch.tensor([0.9, 0.2, 0.5, 0.7])
    c_q = torch.tensor([0.4]).repeat_interleave(4)
    shifted = arm.shift_advantages(adv, c_q, c_o, arm.arm_active(correct, 4), alpha=0.3)
    torch.testing.assert_close(shifted, 0.3 * (0.4 - c_o))
    assert (shifted != 0).all()
    assert int(shifted.argmax()) == int(c_o.argmin()) and int(shifted.argmin()) == int(c_o.argmax())
    assert shifted[0] < 0 < shifted[1]  # the over-confident answer is pushed down, the unsure one up
    assert shifted.sum().item() == pytest.approx(4 * 0.3 * (0.4 - c_o.mean().item()), abs=1e-6)
    off = arm.shift_advantages(adv, c_q, c_o, arm.arm_active(correct, 4, on_all_correct=False), alpha=0.3)
    assert torch.equal(off, adv)


def test_switches_select_the_documented_responses():
    correct = torch.tensor([0, 0, 0, 0, 1, 0, 1, 0, 1, 1, 1, 1], dtype=torch.float32)
    default = arm.arm_active(correct, 4)
    assert default.tolist() == [False] * 4 + [True] * 8
    only_correct = arm.arm_active(correct, 4, on_incorrect=False)
    assert only_correct.tolist() == [False] * 4 + [True, False, True, False] + [True] * 4
    assert arm.arm_active(correct, 4, on_all_correct=False).tolist() == [False] * 4 + [True] * 4 + [False] * 4
    both = arm.arm_active(correct, 4, on_incorrect=False, on_all_correct=False)
    assert both.tolist() == [False] * 4 + [True, False, True, False] + [False] * 4
    # the test is on the correctness bits (spec A8): ±1 rewards summing to 0 are not "all wrong"
    m = arm.ARM()
    batch = {"correct": torch.tensor([1.0, 0.0, 0.0, 0.0]), "group_size": 4, "lengths": torch.full((4,), 3),
             "max_new_tokens": 8}
    adv = m.advantages(batch, torch.tensor([1.0, -1.0, -1.0, 1.0]))
    assert batch["per_seq"]["arm_active"].tolist() == [1.0] * 4
    assert batch["method_metrics"]["arm/active_frac"] == (4.0, 4.0)
    torch.testing.assert_close(adv, group_advantages(torch.tensor([1.0, -1.0, -1.0, 1.0]), 4))


def test_needs_and_config_defaults():
    m = arm.ARM()
    assert m.cfg.eps_low == 0.2 and m.cfg.eps_high == 0.28 and m.cfg.agg == "token-mean"
    assert m.cfg.kl_coef == 0 and not m.cfg.dynamic_sampling and m.cfg.alpha == 0.3 and m.cfg.low_frac == 0.2
    assert "prompt_logp" in m.needs() and "entropy" not in m.needs() and "ref_logp" not in m.needs()
    assert "entropy" in arm.ARM(arm.ARMConfig(low_select="entropy")).needs()
    assert "ref_logp" in arm.ARM(arm.ARMConfig(kl_coef=0.001)).needs()
    for bad in ({"alpha": -0.1}, {"low_frac": 0.0}, {"low_frac": 1.5}, {"low_select": "prob"}):
        with pytest.raises(ValueError):
            arm.ARMConfig(**bad)


def test_config_errors_are_one_line(tmp_path, capsys):
    assert train.main(["--method", "arm", "--low-select", "random", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "low_select" in err


# ---------------------------------------------------------------------------------------------------
# The loss: α = 0 is GRPO exactly; otherwise the gradient is the base loss's with a constant Ã
# ---------------------------------------------------------------------------------------------------


def _micro_batch(method, seed=0, S=8, T=6, P=5, G=4):
    g = torch.Generator().manual_seed(seed)
    correct = torch.tensor([1, 0, 1, 1, 1, 1, 1, 1], dtype=torch.float32)[:S]
    batch = {"correct": correct, "group_size": G, "lengths": torch.full((S,), T), "max_new_tokens": T}
    adv = method.advantages(batch, method.shape_rewards(batch))
    logp = (-torch.rand(S, T, generator=g) * 3).requires_grad_()
    mask = torch.ones(S, T)
    mask[1, 4:] = 0
    mask[5, 2:] = 0
    pmask = torch.ones(S, P)
    pmask[:, 0] = 0
    return {"logp": logp, "old_logp": logp.detach() - 0.3 * torch.rand(S, T, generator=g),
            "response_mask": mask,
            "advantages": adv, "correct": correct, "group_size": G,
            "prompt_logp": -torch.rand(S, P, generator=g) * 4 * pmask, "prompt_logp_mask": pmask,
            "truncated": torch.zeros(S, dtype=torch.bool), **batch["per_seq"]}


def _base_method():
    return Method(GRPOConfig(eps_high=0.28, agg="token-mean"))  # DAPO's clip and loss, no sampling / shaping


def test_alpha_zero_is_grpo_with_the_same_clip_exactly():
    method, base = arm.ARM(arm.ARMConfig(alpha=0.0)), _base_method()
    assert (base.cfg.eps_low, base.cfg.eps_high, base.cfg.agg) == (0.2, 0.28, "token-mean")
    mb = _micro_batch(method)
    norm = Normaliser.of(mb["response_mask"])
    l1, stats = method.loss(mb, norm)
    g1 = torch.autograd.grad(l1, mb["logp"])[0]
    l2, _ = base.loss(mb, norm)
    g2 = torch.autograd.grad(l2, mb["logp"])[0]
    assert float(l1.detach()) == float(l2.detach()) and torch.equal(g1, g2)
    assert stats["arm/shift"] == 0.0 and 0 < stats["arm/c_o"] <= 1 and 0 < stats["arm/c_q"] <= 1


def test_gradient_is_the_base_gradient_with_the_constant_shifted_advantage():
    method, base = arm.ARM(), _base_method()
    mb = _micro_batch(method, seed=1)
    norm = Normaliser.of(mb["response_mask"])
    l1, stats = method.loss(mb, norm)
    g1 = torch.autograd.grad(l1, mb["logp"])[0]
    c_q = arm.prompt_confidence(mb["prompt_logp"], mb["prompt_logp_mask"])
    c_o = arm.answer_confidence(mb["old_logp"], mb["response_mask"])
    shifted = arm.shift_advantages(mb["advantages"], c_q, c_o, arm.arm_active(mb["correct"], 4), alpha=0.3)
    assert not torch.equal(shifted, mb["advantages"])  # the all-correct group now carries a signal
    l2, _ = base.loss({**mb, "advantages": shifted}, norm)
    g2 = torch.autograd.grad(l2, mb["logp"])[0]
    assert float(l1.detach()) == float(l2.detach()) and torch.equal(g1, g2)
    # logged means over the sequences
    assert stats["arm/c_o"] == pytest.approx(float(c_o.mean()), rel=1e-6)
    assert stats["arm/c_q"] == pytest.approx(float(c_q.mean()), rel=1e-6)
    assert stats["arm/shift"] == pytest.approx(float((shifted - mb["advantages"]).mean()), abs=1e-7)
    assert 0 < stats["arm/shift_abs"] < 0.3


def test_loss_uses_old_logp_and_entropy_switch():
    """c_o comes from π_old (old_logp), not from the trained logp; low_select='entropy' reads mb['entropy']."""
    method = arm.ARM()
    mb = _micro_batch(method, seed=2)
    c_q, c_o = method.confidences(mb)
    torch.testing.assert_close(c_o, arm.answer_confidence(mb["old_logp"], mb["response_mask"]))
    assert not torch.allclose(c_o, arm.answer_confidence(mb["logp"].detach(), mb["response_mask"]))
    ent_method = arm.ARM(arm.ARMConfig(low_select="entropy"))
    mb["entropy"] = torch.rand(mb["response_mask"].shape, generator=torch.Generator().manual_seed(3))
    _, c_o_ent = ent_method.confidences(mb)
    torch.testing.assert_close(c_o_ent,
                               arm.answer_confidence(mb["old_logp"], mb["response_mask"], entropy=mb["entropy"]))
    low_q = arm.ARM(arm.ARMConfig(prompt_low_only=True)).confidences(mb)[0]
    assert (low_q <= c_q + 1e-7).all()


# ---------------------------------------------------------------------------------------------------
# In the loop
# ---------------------------------------------------------------------------------------------------


def test_arm_trains_on_the_toy_and_logs_its_metrics(toy_model_dir, tmp_path):
    out = tmp_path / "r"
    assert train.main(["--method", "arm", "--steps", "2", "--prompts-per-step", "4", "--group-size", "4",
                       "--out", str(out), *QUICK]) == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "arm/c_o" in r]
    assert len(train_rows) == 2
    for r in train_rows:
        for key in ("arm/c_o", "arm/c_q", "arm/shift", "arm/shift_abs", "arm/active_frac"):
            assert key in r, key
        assert 0 < r["arm/c_o"] <= 1 and 0 < r["arm/c_q"] <= 1
        assert 0 <= r["arm/shift_abs"] < 0.3 and 0 <= r["arm/active_frac"] <= 1
    cfg = json.loads((out / "config.json").read_text())["method"]
    assert cfg["alpha"] == 0.3 and cfg["eps_high"] == 0.28 and cfg["agg"] == "token-mean"


def test_micro_batching_does_not_change_the_arm_update(toy_model_dir, tmp_path, monkeypatch):
    """c_o and c_q are per-sequence, so each micro-batch computes its rows' Ã itself: the same update."""
    params, logged = one_step_per_micro_batch_budget(arm.ARM, ["--method", "arm"], tmp_path, monkeypatch)
    for key in ("arm/c_o", "arm/c_q", "arm/shift"):
        assert logged[10**6][key] == pytest.approx(logged[200][key], rel=1e-4, abs=1e-6)
    for k, v in params[10**6].items():
        # Adam divides by sqrt(v): rounding noise on near-zero gradients shows up as ~1e-5 on a few entries
        torch.testing.assert_close(v, params[200][k], atol=3e-5, rtol=1e-3)


def test_switches_and_mini_batches_run_through_the_cli(toy_model_dir, tmp_path, monkeypatch):
    """With --mini-batches 2 π_old's old_logp, entropy and prompt log-probs come from the prepass."""
    seen = []
    original = arm.ARM.loss

    def spy(self, mb, norm):
        seen.append({k: k in mb for k in ("old_logp", "prompt_logp", "prompt_logp_mask", "entropy", "arm_active")})
        return original(self, mb, norm)

    monkeypatch.setattr(arm.ARM, "loss", spy)
    out = tmp_path / "switches"
    assert train.main(["--method", "arm", "--steps", "1", "--prompts-per-step", "4", "--group-size", "4",
                       "--mini-batches", "2", "--low-select", "entropy", "--no-on-incorrect",
                       "--no-on-all-correct", "--prompt-low-only", "--alpha", "1.0", "--out", str(out), *QUICK]) == 0
    assert seen and all(all(s.values()) for s in seen)
    cfg = json.loads((out / "config.json").read_text())["method"]
    assert (cfg["low_select"], cfg["on_incorrect"], cfg["on_all_correct"], cfg["prompt_low_only"], cfg["alpha"]) == \
        ("entropy", False, False, True, 1.0)
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert 0 <= row["arm/shift_abs"] < 1.0
