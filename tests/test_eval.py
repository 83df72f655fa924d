"""eval.py: unbiased pass@k against the closed form, maj@k voting rules, and the CLI on the toy model."""

import json
from math import comb

import pytest

import eval as evaluation
from verifier import VerifyResult


@pytest.mark.parametrize("n, c, k, expected", [(4, 2, 2, 5 / 6), (10, 3, 1, 0.3), (10, 3, 5, 11 / 12),
                                               (64, 1, 8, 0.125), (10, 0, 3, 0.0), (10, 8, 3, 1.0)])
def test_pass_at_k_spec_values(n, c, k, expected):
    assert evaluation.pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_equals_closed_form_and_is_monotone():
    for n in range(1, 13):
        for c in range(n + 1):
            values = [evaluation.pass_at_k(n, c, k) for k in range(1, n + 1)]
            for k, v in zip(range(1, n + 1), values):
                closed = 1.0 - comb(n - c, k) / comb(n, k)
                assert v == pytest.approx(closed, abs=1e-12)
                if n - c < k:
                    assert v == 1.0
            assert values == sorted(values)  # non-decreasing in k
            assert values[0] == pytest.approx(c / n)  # pass@1 = avg@n


def test_pass_at_k_rejects_undefined_k():
    with pytest.raises(ValueError):
        evaluation.pass_at_k(4, 1, 5)
    assert evaluation.k_values(16) == [1, 2, 4, 8, 16] and evaluation.k_values(12) == [1, 2, 4, 8, 12]


def _r(answer, correct):
    return VerifyResult(float(correct), correct, answer, None, "correct" if correct else "wrong")


def test_majority_vote_rules():
    ex = {"task": "math", "answer": "2"}
    # largest cluster wins, even if a minority answer is right
    res = [_r("3", False), _r("2", True), _r("3", False)]
    assert evaluation.majority_correct([r.answer for r in res], ex, res) is False
    # unparseable answers do not vote: one parsed correct answer wins against three None
    res = [_r(None, False), _r(None, False), _r(None, False), _r("2", True)]
    assert evaluation.majority_correct([r.answer for r in res], ex, res) is True
    # ties are broken by earliest first appearance
    res = [_r("2", True), _r("5", False), _r("5", False), _r("2", True)]
    assert evaluation.majority_correct([r.answer for r in res], ex, res) is True
    res = [_r("5", False), _r("2", True), _r("2", True), _r("5", False)]
    assert evaluation.majority_correct([r.answer for r in res], ex, res) is False
    # nothing parses: incorrect
    assert evaluation.majority_correct([None, None], ex, [_r(None, False)] * 2) is False
    # equivalence, not string equality, defines clusters: 1/2 and 0.5 vote together
    res = [_r("3", False), _r("1/2", True), _r("0.5", True)]
    assert evaluation.majority_correct([r.answer for r in res], {"task": "math", "answer": "1/2"}, res) is True


def test_problem_metrics_distinct_correct():
    results = [VerifyResult(1.0, True, "22", "((3*5)+7)", "correct"),
               VerifyResult(1.0, True, "22", "((3*5)+7)", "correct"),
               VerifyResult(1.0, True, "22", "((3+8)*2)", "correct"),
               VerifyResult(0.0, False, "21", None, "wrong")]
    m = evaluation.problem_metrics(results, {"task": "countdown", "target": 22, "answer": "22"})
    assert m["c"] == 3 and m["distinct_correct"] == 2 and m["maj_at_n"] is True
    assert m["pass_at_k"][1] == pytest.approx(0.75) and m["pass_at_k"][4] == 1.0


def test_eval_cli_on_toy_model(toy_model_dir, tmp_path, capsys):
    out = tmp_path / "ev"
    assert evaluation.main(["--model", "toy", "--n", "8", "--limit", "16", "--out", str(out)]) == 0
    result = json.loads((out / "eval.json").read_text())
    assert (out / "passk.png").stat().st_size > 1000
    assert result["n_problems"] == 16 and result["sampling"]["n"] == 8
    p = result["pass_at_k"]
    assert list(p) == ["1", "2", "4", "8"] and p["1"] <= p["2"] <= p["4"] <= p["8"]
    assert p["1"] == pytest.approx(result["avg_at_n"])
    assert 0.05 < p["1"] < 0.9  # the warm start solves some, not all
    assert "pass@k" in capsys.readouterr().out


# ---- distinct correct for math, diversity of one group, aggregation (issue 3) -----------------------


def test_math_distinct_correct_counts_formula_sets():
    ex = {"task": "math", "answer": "4"}
    texts = ["We have $x+1=5$ so $x=4$. \\boxed{4}",
             "Since $x + 1 = 5$, we get $x = 4$, answer \\boxed{4}",  # same formulas, other words
             "Subtract: $5-1=4$. \\boxed{4}",  # another derivation
             "\\boxed{3}"]
    results = [_r("4", True), _r("4", True), _r("4", True), _r("3", False)]
    m = evaluation.problem_metrics(results, ex, texts)
    assert m["c"] == 3 and m["distinct_correct"] == 2


def test_group_diversity_hand_cases():
    import torch

    sets = [{"a=1"}, {"a=1"}, {"a=1"}]
    z_same = torch.tensor([[1.0, 0.0]] * 3)
    assert evaluation.group_diversity(z_same, sets) == (0.0, 0.0)  # identical → 0 and 0
    z_orth = torch.eye(3)
    semantic, formula = evaluation.group_diversity(z_orth, [{"a"}, {"b"}, {"a", "c"}])
    assert semantic == pytest.approx(0.5)  # orthogonal → (1 − 0)/2
    assert formula == pytest.approx((1 + 0 + 0.5) / 3)  # D_eq = [1, 0, 1/2]
    # only the flagged samples: rows 0 and 2 → one pair; with fewer than 2 in scope → nan
    semantic, formula = evaluation.group_diversity(z_orth, [{"a"}, {"b"}, {"a", "c"}], [True, False, True])
    assert semantic == pytest.approx(0.5) and formula == pytest.approx((0 + 0.5) / 2)
    assert all(v != v for v in evaluation.group_diversity(z_orth, sets, [True, False, False]))


def test_aggregate_skips_undefined_diversity_and_weights_entropy_by_tokens():
    base = {"n": 2, "pass_at_k": {1: 0.5, 2: 1.0}, "maj_at_n": True, "distinct_correct": 1}
    nan = float("nan")
    per_problem = [
        {**base, "c": 1, "semantic_diversity": 0.2, "semantic_diversity_correct": nan, "formula_diversity": 1.0,
         "formula_diversity_correct": nan, "entropy_sum": 3.0, "entropy_tokens": 10},
        {**base, "c": 2, "semantic_diversity": 0.4, "semantic_diversity_correct": 0.3, "formula_diversity": 0.0,
         "formula_diversity_correct": 0.5, "entropy_sum": 1.0, "entropy_tokens": 30},
    ]
    out = evaluation.aggregate_metrics(per_problem)
    assert out["semantic_diversity"] == pytest.approx(0.3)
    assert out["semantic_diversity_correct"] == pytest.approx(0.3)  # the nan prompt has no correct pair
    assert out["formula_diversity_correct"] == pytest.approx(0.5)
    assert out["token_entropy"] == pytest.approx(4.0 / 40)  # per token, not per prompt (0.2)


class _ScriptedRollout:
    """Returns the same response n times for every prompt: the collapsed extreme."""

    def __init__(self, tokenizer, text):
        self.ids = tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]

    def generate(self, prompt_ids, n, **kwargs):
        return [list(self.ids) for _ in prompt_ids for _ in range(n)]


def test_identical_responses_have_zero_diversity_and_one_distinct_correct(tiny_model_dir):
    import toy
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    example = {"prompt": toy.format_prompt([3, 5, 7, 2], 22), "numbers": [3, 5, 7, 2], "target": 22,
               "answer": "22", "task": "countdown"}
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    out = evaluation.evaluate_policy(_ScriptedRollout(tok, "5*3=15,15+7=22"), tok, [example] * 3, 6, 1.0, 1.0,
                                     40, entropy_model=model)
    assert out["pass_at_k"]["1"] == 1.0 and out["distinct_correct"] == 1.0
    for key in evaluation.DIVERSITY_KEYS:
        assert out[key] == pytest.approx(0.0, abs=1e-6), key
    assert out["token_entropy"] > 0  # a random tiny model is far from deterministic
    assert "semantic diversity" in evaluation.format_table(out)


def test_sample_entropy_matches_full_softmax(tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    prompts = [tok("3 5>8:")["input_ids"], tok("10 2 4 7>30:")["input_ids"]]
    responses = [tok("3+5=8")["input_ids"] + [tok.eos_token_id], tok("10*2=20,20+")["input_ids"]]
    sums, counts = evaluation.sample_entropy(model, prompts, responses, tok.pad_token_id, tok.eos_token_id, 0.7,
                                             token_budget=8)  # tiny budget: one row per micro-batch
    assert counts == [len(r) for r in responses]
    for p, r, total in zip(prompts, responses, sums):
        with torch.no_grad():
            logits = model(torch.tensor([p + r])).logits[0, len(p) - 1:len(p) - 1 + len(r)] / 0.7
        logp = torch.log_softmax(logits.double(), -1)
        expected = float(-(logp.exp() * logp).sum())
        assert total == pytest.approx(expected, rel=1e-4)
