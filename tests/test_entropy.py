"""The entropy-bonus baseline (entropy.py): the chunked entropy-with-gradient of the training forward against
a direct full-softmax computation, the bonus's gradient on a hand-sized case, the control equal to the base
exactly, Skywork-OR1's controller on a hand-computed sequence, and the method end to end with --resume."""

import json
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

import train
from data import collate
from entropy import EntropyBonus, EntropyConfig, adaptive_coef_step
from forward import _chunk_stats, token_fields
from grpo import GRPOConfig, Method, Normaliser
from lpreg import LpReg, LpRegConfig

QUICK = ["--no-final-eval", "--no-progress", "--no-tensorboard"]


def _load(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), AutoTokenizer.from_pretrained(path)


def _batch(tok):
    texts = [("3 5 7>22:", "5*3=15,15+7=22"), ("1 2>3:", "1+2=3"), ("9 9 9 9>81:", "9*9=81")]
    prompts = [tok(p)["input_ids"] for p, _ in texts]
    responses = [tok(r)["input_ids"] + [tok.eos_token_id] for _, r in texts]
    responses[1] = responses[1][:-1]  # one truncated response (no EOS)
    return collate(prompts, responses, tok.pad_token_id, tok.eos_token_id)


def _direct_entropy(model, batch, temperature):
    """H of softmax(z / T) at every response position, from one full-vocabulary forward (with grad)."""
    ids, attn, P = batch["input_ids"], batch["attention_mask"], batch["prompt_len"]
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=attn, position_ids=pos).logits.float()[:, P - 1:-1] / temperature
    logprobs = torch.log_softmax(logits, dim=-1)
    return -(logprobs.exp() * logprobs).sum(-1) * batch["response_mask"]


# ---------------------------------------------------------------------------------------------------
# 1. forward.py's "entropy_grad": chunked (and checkpointed) entropy with its gradient
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("chunk_rows", [1, 3, 4096])  # many checkpointed chunks / several / one plain chunk
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_chunked_entropy_with_grad_equals_direct_entropy_and_gradient(tiny_model_dir, chunk_rows, temperature):
    model, tok = _load(tiny_model_dir)
    batch = _batch(tok)
    n_valid = int(batch["response_mask"].sum())
    assert chunk_rows == 4096 or n_valid > 2 * chunk_rows  # the checkpointed branch runs several chunks
    fields = token_fields(model, batch, temperature, {"entropy_grad"}, with_grad=True, chunk_rows=chunk_rows)
    direct_model, _ = _load(tiny_model_dir)
    direct = _direct_entropy(direct_model, batch, temperature)
    assert fields["entropy"].requires_grad
    torch.testing.assert_close(fields["entropy"].detach(), direct.detach(), atol=1e-5, rtol=1e-5)
    # the log-probs are those of the default path, bit for bit
    plain = token_fields(model, batch, temperature, set(), with_grad=True, chunk_rows=chunk_rows)["logp"]
    assert torch.equal(fields["logp"].detach(), plain.detach())
    # the gradient of a weighted sum of H reaches every parameter as autograd of the direct formula says
    weights = torch.rand(batch["response_mask"].shape, generator=torch.Generator().manual_seed(0))
    (fields["entropy"] * weights).sum().backward()
    (direct * weights).sum().backward()
    grads = dict(direct_model.named_parameters())
    for name, p in model.named_parameters():
        ref = grads[name].grad
        if ref is None or not ref.abs().sum():
            continue
        torch.testing.assert_close(p.grad, ref, atol=2e-5, rtol=1e-4, msg=name)
    assert model.get_output_embeddings().weight.grad.abs().sum() > 0


def test_entropy_grad_keeps_the_other_fields_of_the_forward(tiny_model_dir):
    """With the bonus's need next to the detached ones (entropy for logging, a method field, prompt
    log-probs) in the checkpointed branch: the same detached fields as without it, and H with grad."""
    model, tok = _load(tiny_model_dir)
    batch = _batch(tok)
    fns = LpReg(LpRegConfig(kappa=0.3)).token_field_fns()
    base = token_fields(model, batch, 0.7, {"entropy", "prompt_logp"}, with_grad=True, chunk_rows=3, field_fns=fns)
    both = token_fields(model, batch, 0.7, {"entropy", "entropy_grad", "prompt_logp"}, with_grad=True,
                        chunk_rows=3, field_fns=fns)
    assert both.keys() == base.keys() and both["entropy"].requires_grad and not base["entropy"].requires_grad
    for k in ("minp_proxy_logp", "prompt_logp", "prompt_logp_mask"):
        assert torch.equal(both[k], base[k]), k
    torch.testing.assert_close(both["entropy"].detach(), base["entropy"], atol=1e-6, rtol=1e-6)
    # without grad "entropy_grad" gives the detached entropy
    ng = token_fields(model, batch, 0.7, {"entropy_grad"}, with_grad=False, chunk_rows=3)
    assert not ng["entropy"].requires_grad
    torch.testing.assert_close(ng["entropy"], base["entropy"], atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------------------------------------------
# 2. the bonus's gradient on a hand-sized case
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_bonus_gradient_is_minus_c_times_entropy_gradient(temperature):
    """2 sequences × 3 positions (5 valid tokens), 4 logits each; H from forward.py's chunk code with the LM head
    the identity, the bonus from EntropyBonus.extra_loss. Expected: −c·∂H/∂z by autograd of torch's own
    Categorical entropy, and the closed form ∂H/∂z_v = −p_v (log p_v + H) / T."""
    c = 0.01
    z = torch.tensor([[2.0, 0.5, -1.0, 0.0], [0.1, 0.2, 0.3, 0.4], [5.0, -5.0, 0.0, 1.0], [1.0, 1.0, 1.0, -3.0],
                      [-0.5, 2.5, 0.0, 0.7]], requires_grad=True)
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    targets = torch.tensor([0, 3, 1, 2, 1])
    h = _chunk_stats(z, torch.nn.Identity(), targets, temperature, {"entropy_grad"})["entropy"]
    mb = {"cur_entropy": torch.zeros(2, 3).masked_scatter(mask.bool(), h)}
    method = EntropyBonus(EntropyConfig(coef=c))
    for norm, factor in ((Normaliser.of(mask), 1 / 5), (Normaliser(20.0, 4.0, 3, 2), 2 / 20)):
        stats = {}
        bonus = method.extra_loss(mb, mask, norm, stats)
        (grad,) = torch.autograd.grad(bonus, z, retain_graph=True)
        zz = z.detach().clone().requires_grad_()
        h_ind = torch.distributions.Categorical(logits=zz / temperature).entropy()
        expected = -c * factor * h_ind.sum()
        (expected_grad,) = torch.autograd.grad(expected, zz)
        torch.testing.assert_close(bonus.detach(), expected.detach(), atol=1e-9, rtol=1e-6)
        torch.testing.assert_close(grad, expected_grad, atol=1e-9, rtol=1e-5)
        p = torch.softmax(z.detach() / temperature, -1)
        closed = -c * factor * (-p * (p.log() + h_ind.detach().unsqueeze(-1)) / temperature)
        torch.testing.assert_close(grad, closed, atol=1e-9, rtol=1e-5)
        assert stats["entropy_coef_sum"] == pytest.approx(c * 5)
        assert stats["entropy_bonus"] == pytest.approx(float(bonus.detach()) / norm.world_size)


# ---------------------------------------------------------------------------------------------------
# 3. the control (control_overrides) and the adaptive bonus when off: the base Method exactly
# ---------------------------------------------------------------------------------------------------
class _OneRank:
    world, rank = 1, 0

    @staticmethod
    def sum(value):
        return float(value)


def _micro_batch(model_dir, method, chunk_rows):
    """One micro-batch through train.py's own Trainer.micro_batch_loss (forward with the method's needs, loss,
    backward): (loss, stats, {name: grad})."""
    model, tok = _load(model_dir)
    batch = _batch(tok)
    batch.update(advantages=torch.tensor([1.0, -0.5, -0.5]), group_size=3, rows=torch.arange(3))
    norm = Normaliser.of(batch["response_mask"])
    rollout = {k: batch[k] for k in ("response_mask", "truncated")}
    if method.needs_batch_fields:  # the prepass's π_old entropy, then the controller's step
        from forward import no_grad_fields

        rollout["fields"] = no_grad_fields(model, batch, [0, 1, 2], 1.0, {"entropy"}, 10**6, chunk_rows)
        method.prepare_update(rollout, [0, 1, 2], _OneRank())
        batch["entropy"] = rollout["fields"]["entropy"]  # (old_logp stays logp.detach(), as for the base)
    needs = method.needs()
    trainer = SimpleNamespace(cfg=SimpleNamespace(temperature=1.0, logit_chunk_rows=chunk_rows), model=model,
                              method=method,
                              needs=needs, logs_entropy=True, ref_model=None, device=torch.device("cpu"))
    loss, stats, _ = train.Trainer.micro_batch_loss(trainer, batch, rollout, norm, None)
    loss.backward()
    return loss.detach(), stats, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("chunk_rows", [3, 4096])
def test_control_and_bonus_off_equal_the_base_method_exactly(tiny_model_dir, chunk_rows):
    base = _micro_batch(tiny_model_dir, Method(GRPOConfig(eps_high=0.28, agg="token-mean")), chunk_rows)
    control = EntropyBonus(EntropyConfig(**EntropyBonus.control_overrides))
    assert "entropy_grad" not in control.needs()  # the control pays for no entropy forward either
    for method in (control, EntropyBonus(EntropyConfig(adaptive=True, target_entropy=0.0))):  # e_k ≥ 0: off
        loss, stats, grads = _micro_batch(tiny_model_dir, method, chunk_rows)
        assert torch.equal(loss, base[0])
        assert grads.keys() == base[2].keys()
        for name, g in grads.items():
            assert torch.equal(g, base[2][name]), name
        assert stats["clip_low_count"] == base[1]["clip_low_count"]
    assert stats["entropy_coef_sum"] == 0.0  # (the adaptive one logged its α = 0)
    # and with the bonus on the update moves, by −c·token-mean(H) in the loss
    loss, stats, grads = _micro_batch(tiny_model_dir, EntropyBonus(EntropyConfig(coef=0.05)), chunk_rows)
    model, tok = _load(tiny_model_dir)
    h = _direct_entropy(model, _batch(tok), 1.0).detach()
    n = float(_batch(tok)["response_mask"].sum())
    assert float(loss - base[0]) == pytest.approx(-0.05 * float(h.sum()) / n, rel=1e-4)
    assert any(not torch.equal(g, base[2][k]) for k, g in grads.items())


# ---------------------------------------------------------------------------------------------------
# 4. Skywork-OR1's controller on a hand-computed sequence
# ---------------------------------------------------------------------------------------------------
def _rollout(entropy: float, n_tokens: int = 4):
    mask = torch.ones(1, n_tokens)
    return {"response_mask": mask, "truncated": torch.zeros(1, dtype=torch.bool),
            "fields": {"entropy": torch.full((1, n_tokens), entropy)}}


def test_adaptive_controller_hand_sequence():
    """H_tgt = 1, Δ = 0.125, c_max = 0.5, c_0 = 0.25 (binary fractions: exact). Each row: e_k, then the α_k the
    step applies and c_{k+1}."""
    cfg = EntropyConfig(adaptive=True, coef=0.25, target_entropy=1.0, adaptive_delta=0.125, coef_max=0.5)
    method = EntropyBonus(cfg)
    assert method.needs() >= {"entropy", "entropy_grad"} and method.needs_batch_fields
    sequence = [(0.5, 0.25, 0.375),  # below: bonus on at c_k, c up
                (0.5, 0.375, 0.5),
                (0.5, 0.5, 0.5),  # c_max reached: clamped
                (2.0, 0.0, 0.375),  # above: bonus off, c down
                (1.0, 0.0, 0.25),  # at the target counts as above (strict <)
                (3.0, 0.0, 0.125),
                (3.0, 0.0, 0.0),
                (3.0, 0.0, 0.0),  # clamped at 0
                (0.875, 0.0, 0.125),  # below again, but c_k = 0: no bonus yet
                (0.875, 0.125, 0.25)]
    for e, applied, nxt in sequence:
        assert adaptive_coef_step(method.coef, e, 1.0, 0.125, 0.5) == (applied, nxt)
        batch = _rollout(e)
        c_k = method.coef
        method.prepare_update(batch, [0], _OneRank())
        assert (method.applied, method.coef) == (applied, nxt)
        assert batch["method_metrics"] == {"entropy_measured": (e, 1.0), "entropy_ctrl_coef": (c_k, 1.0),
                                           "entropy_bonus_on": (float(e < 1.0), 1.0)}
        stats = {}
        mask = torch.ones(1, 4)
        out = method.extra_loss({"cur_entropy": torch.full((1, 4), e, requires_grad=True)}, mask,
                                Normaliser.of(mask), stats)
        assert stats["entropy_coef_sum"] == applied * 4
        assert (out is None) == (applied == 0.0)
        if out is not None:
            assert float(out.detach()) == pytest.approx(-applied * e)
    # the state is c_k: a fresh method loaded from it continues identically (--resume)
    again = EntropyBonus(cfg)
    again.load_state_dict(json.loads(json.dumps(method.state_dict())))
    for m in (method, again):
        m.prepare_update(_rollout(0.1), [0], _OneRank())
    assert (again.applied, again.coef) == (method.applied, method.coef) == (0.25, 0.375)


def test_adaptive_measures_the_global_token_mean_over_ranks_and_the_loss_mask():
    """e_k = Σ H·m / Σ m over every rank's rows (not a mean of per-rank means), m the loss mask."""

    class TwoRanks:  # this rank: 2 tokens of H = 0.1; the other rank: 6 tokens summing to 3.0
        world, rank = 2, 0
        others = [6.0, 3.0]  # prepare_update reduces the count, then the sum

        def sum(self, value):
            return float(value) + self.others.pop(0)

    method = EntropyBonus(EntropyConfig(adaptive=True, coef=0.0, target_entropy=0.5, mask_truncated=True))
    batch = {"response_mask": torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]]),
             "truncated": torch.tensor([False, True]),  # mask_truncated: the second row leaves the measure
             "fields": {"entropy": torch.tensor([[0.1, 0.1, 9.0], [9.0, 9.0, 9.0]])}}
    method.prepare_update(batch, [0, 1], TwoRanks())
    e = batch["method_metrics"]["entropy_measured"][0]
    assert e == pytest.approx(3.2 / 8) and method.coef == pytest.approx(1e-4)  # below 0.5: c up by Δ


def test_config_ranges_are_one_line_errors(tmp_path, capsys):
    for bad in ({"coef": -1.0}, {"adaptive_delta": 0.0}, {"target_entropy": -0.1}, {"coef_max": -1.0},
                {"adaptive": True, "coef": 0.01, "coef_max": 0.005}):
        with pytest.raises(ValueError, match=next(iter(bad)) if "adaptive" not in bad else "coef"):
            EntropyConfig(**bad)
    assert train.main(["--method", "entropy", "--adaptive-delta", "0", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "adaptive_delta" in err and "--entropy.adaptive-delta" in err


# ---------------------------------------------------------------------------------------------------
# 5. end to end: train.main logs the coefficient; --adaptive resumes bit-exactly
# ---------------------------------------------------------------------------------------------------
def _metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_entropy_method_trains_on_the_toy_and_logs_its_coefficient(toy_model_dir, tmp_path):
    out = tmp_path / "entropy"
    assert train.main(["--method", "entropy", "--steps", "2", "--prompts-per-step", "4", "--group-size", "4",
                       "--out", str(out), *QUICK]) == 0
    rows = _metrics(out)
    assert [r["step"] for r in rows] == [1, 2]
    c = EntropyBonus.toy_overrides["coef"]  # on the toy: the toy strength, not verl's 0.001
    for r in rows:
        assert r["entropy_coef"] == pytest.approx(c)
        # the bonus is −c · token-mean H, and the logged entropy is this forward's token-mean H
        assert r["entropy_bonus"] == pytest.approx(-c * r["entropy"], rel=1e-5)
    assert json.loads((out / "config.json").read_text())["method"]["coef"] == c == 0.01


def test_adaptive_resume_is_bit_exact(toy_model_dir, tmp_path):
    """3 steps straight == 2 steps + --resume + 1 step, with a controller that moves every step (H_tgt far
    above the toy's entropy: c = 0 → 0.01 → 0.02 → 0.025, clamped), so a lost c_k would change step 3."""
    common = ["--method", "entropy", "--adaptive", "--coef", "0", "--target-entropy", "5", "--adaptive-delta",
              "0.01", "--coef-max", "0.025", "--prompts-per-step", "2", "--group-size", "4", "--save-every", "2",
              "--seed", "1", *QUICK]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert train.main(common + ["--steps", "3", "--out", str(straight)]) == 0
    assert train.main(common + ["--steps", "2", "--out", str(resumed)]) == 0
    assert train.main(common + ["--steps", "3", "--out", str(resumed), "--resume"]) == 0
    a = load_file(str(straight / "checkpoints" / "step_000003" / "model.safetensors"))
    b = load_file(str(resumed / "checkpoints" / "step_000003" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    drop = ("time_generate", "time_score", "time_update", "time_step", "rollout_tokens_per_s")
    strip = lambda rows: [{k: v for k, v in r.items() if k not in drop} for r in rows]  # noqa: E731
    rows = strip(_metrics(straight))
    assert rows == strip(_metrics(resumed))
    assert [r["entropy_ctrl_coef"] for r in rows] == pytest.approx([0.0, 0.01, 0.02])
    assert [r["entropy_coef"] for r in rows] == pytest.approx([0.0, 0.01, 0.02])
    assert all(r["entropy_bonus_on"] == 1.0 for r in rows)
    state = torch.load(resumed / "checkpoints" / "step_000003" / "trainer_state.pt", weights_only=False)
    assert state["method"]["coef"] == pytest.approx(0.025)  # c_3, clamped at c_max
