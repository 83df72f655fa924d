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
