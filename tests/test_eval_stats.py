"""eval.py: effective number of solutions, the per-prompt record (order across ranks, per_prompt_values) and
the two-level (prompts × seeds) bootstrap intervals of the Statistics section."""

import math

import numpy as np
import pytest

import eval as evaluation
from verifier import VerifyResult

# ---- effective number of solutions --------------------------------------------------------------


@pytest.mark.parametrize("keys, expected", [
    (["a", "a", "b", "b"], 2.0),
    (["a", "a", "a"], 1.0),
    (["a", "b", "c"], 3.0),
    ([], 0.0),  # nothing solved = no solution
    (["a", "a", "a", "b"], math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))),
])
def test_effective_solutions_hand_values(keys, expected):
    assert evaluation.effective_solutions(keys) == pytest.approx(expected, abs=1e-12)
    assert evaluation.effective_solutions(["a", "a", "a", "b"]) == pytest.approx(1.7548, abs=1e-4)


def _cd(key, correct=True):
    return VerifyResult(float(correct), correct, "22" if correct else "21", key, "correct" if correct else "wrong")


def test_problem_metrics_effective_solutions_uses_correct_samples_only():
    ex = {"task": "countdown", "target": 22, "answer": "22"}
    results = [_cd("((3*5)+7)"), _cd("((3*5)+7)"), _cd("((3*5)+7)"), _cd("((3+8)*2)"), _cd(None, False),
               _cd(None, False)]
    m = evaluation.problem_metrics(results, ex)
    assert m["distinct_correct"] == 2
    assert m["effective_solutions"] == pytest.approx(1.7548, abs=1e-4)
    m = evaluation.problem_metrics([_cd(None, False)] * 3, ex)
    assert m["c"] == 0 and m["distinct_correct"] == 0 and m["effective_solutions"] == 0.0


def test_aggregate_effective_solutions_keys():
    base = {"n": 4, "pass_at_k": {1: 0.5, 2: 0.5, 4: 0.5}, "maj_at_n": False}
    per_problem = [{**base, "c": 4, "distinct_correct": 2, "effective_solutions": 2.0},
                   {**base, "c": 3, "distinct_correct": 1, "effective_solutions": 1.0},
                   {**base, "c": 0, "distinct_correct": 0, "effective_solutions": 0.0}]
    out = evaluation.aggregate_metrics(per_problem)
    assert out["effective_solutions"] == pytest.approx(1.0)  # (2 + 1 + 0) / 3
    assert out["effective_solutions_on_solvable"] == pytest.approx(1.5)  # (2 + 1) / 2
    flat = evaluation.flat_metrics({**out, "sampling": {"n": 4}, "per_prompt": {"c": [4, 3, 0], "n": 4}})
    assert flat["eval/effective_solutions"] == pytest.approx(1.0)
    assert "eval/effective_solutions_on_solvable" in flat
    assert all(isinstance(v, (int, float)) for v in flat.values()) and "eval/per_prompt" not in flat
    table = evaluation.format_table({**out, "sampling": {"n": 4, "temperature": 1.0, "top_p": 1.0}})
    assert "effective solutions 1.00 (1.50 on solvable)" in table


# ---- the per-prompt record ----------------------------------------------------------------------


@pytest.mark.parametrize("total, world", [(5, 2), (6, 2), (7, 3), (2, 4), (4, 1)])
def test_restore_order_undoes_round_robin_gather(total, world):
    examples = [f"ex{i}" for i in range(total)]
    gathered = [examples[rank::world] for rank in range(world)]  # what gather_objects returns
    assert evaluation.restore_order(gathered) == examples
    if world == 2 and total == 5:
        assert gathered == [["ex0", "ex2", "ex4"], ["ex1", "ex3"]]  # interleaved, then restored
    with pytest.raises(ValueError):
        evaluation.restore_order([examples[:1], examples[1:]] if total > 3 else [[], examples])


def test_per_prompt_values_from_record():
    record = {"id": ["a", "b", "c"], "n": 8, "c": [0, 3, 8], "distinct_correct": [0, 2, 1],
              "effective_solutions": [0.0, 1.8, 1.0], "entropy_sum": [4.0, 0.0, 3.0], "entropy_tokens": [8, 0, 12]}
    result = {"pass_at_k": {}, "per_prompt": record}
    for k in (1, 2, 4, 8):
        expected = [evaluation.pass_at_k(8, c, k) for c in record["c"]]
        np.testing.assert_allclose(evaluation.per_prompt_values(result, "pass@k", k=k), expected, atol=1e-15)
        np.testing.assert_allclose(evaluation.per_prompt_values(result, f"pass@{k}"), expected, atol=1e-15)
    np.testing.assert_allclose(evaluation.per_prompt_values(record, "pass@1"), [0.0, 3 / 8, 1.0])
    np.testing.assert_array_equal(evaluation.per_prompt_values(result, "distinct_correct"), [0, 2, 1])
    np.testing.assert_allclose(evaluation.per_prompt_values(result, "effective_solutions"), [0.0, 1.8, 1.0])
    entropy = evaluation.per_prompt_values(result, "token_entropy")
    assert entropy[0] == 0.5 and np.isnan(entropy[1]) and entropy[2] == 0.25  # nan where no token
    with pytest.raises(ValueError):
        evaluation.per_prompt_values(result, "pass@k")  # k missing
    with pytest.raises(ValueError):
        evaluation.per_prompt_values(result, "maj@8")
    m = evaluation.per_prompt_matrix([result, result], "pass@2")
    assert m.shape == (2, 3)
    with pytest.raises(ValueError):  # other prompts: not aligned
        evaluation.per_prompt_matrix([result, {"per_prompt": {**record, "id": ["a", "c", "b"]}}], "pass@1")


class _ScriptedRollout:
    """Correct for prompts with an even target, wrong for the others; the same response n times."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def generate(self, prompt_ids, n, **kwargs):
        out = []
        for ids in prompt_ids:
            target = int(self.tokenizer.decode(ids).split(">")[1].split(":")[0])
            text = f"{target}+0={target}" if target % 2 == 0 else "1+1=2"
            out += [self.tokenizer(text)["input_ids"] + [self.tokenizer.eos_token_id]] * n
        return out


class _Gathered(Exception):
    pass


class _FakeDist:
    """Rank `rank` of `world`; gather_objects stores this rank's part in `parts` and returns every part,
    or, while another rank's part is still missing, stops the evaluation there (_Gathered)."""

    enabled, fsdp = True, False

    def __init__(self, rank, world, parts):
        self.rank, self.world, self.parts = rank, world, parts

    def gather_objects(self, obj):
        self.parts[self.rank] = obj
        if any(part is None for part in self.parts):
            raise _Gathered
        return list(self.parts)


def _two_rank_evaluation(tok, examples):
    parts = [None, None]
    with pytest.raises(_Gathered):  # rank 1 evaluates its share first
        evaluation.evaluate_policy(_ScriptedRollout(tok), tok, examples, 2, 1.0, 1.0, 20, diversity=False,
                                   dist=_FakeDist(1, 2, parts))
    out = evaluation.evaluate_policy(_ScriptedRollout(tok), tok, examples, 2, 1.0, 1.0, 20, diversity=False,
                                     dist=_FakeDist(0, 2, parts))
    return out, parts


def test_evaluate_policy_per_prompt_record_is_in_example_order_for_any_world():
    import toy

    tok = toy.build_tokenizer()  # (no model: the scripted rollout samples, no entropy)
    targets = [4, 7, 10, 3, 12]
    examples = [{"id": f"p{i}", "prompt": toy.format_prompt([t, 0], t), "numbers": [t, 0], "target": t,
                 "answer": str(t), "task": "countdown"} for i, t in enumerate(targets)]
    single = evaluation.evaluate_policy(_ScriptedRollout(tok), tok, examples, 2, 1.0, 1.0, 20, diversity=False)
    record = single["per_prompt"]
    assert record["id"] == ["p0", "p1", "p2", "p3", "p4"] and record["n"] == 2
    assert record["c"] == [2, 0, 2, 0, 2] and record["effective_solutions"] == [1.0, 0.0, 1.0, 0.0, 1.0]
    assert "entropy_sum" not in record  # no entropy model: no entropy lists
    assert single["effective_solutions"] == pytest.approx(0.6) and single["effective_solutions_on_solvable"] == 1.0
    # two ranks: each evaluates examples[rank::2]; the gathered parts are rank-interleaved, then restored
    double, parts = _two_rank_evaluation(tok, examples)
    assert [p["id"] for p in parts[0]] == ["p0", "p2", "p4"] and [p["id"] for p in parts[1]] == ["p1", "p3"]
    assert double["per_prompt"] == record
    assert {k: v for k, v in double.items() if k != "per_prompt"} == \
        {k: v for k, v in single.items() if k != "per_prompt"}
    out, _ = _two_rank_evaluation(tok, [{k: v for k, v in ex.items() if k != "id"} for ex in examples])
    assert out["per_prompt"]["id"] == [0, 1, 2, 3, 4]  # the index when examples have no id
    flat = evaluation.flat_metrics(out)
    assert "eval/per_prompt" not in flat and "eval/effective_solutions" in flat
    assert "per_prompt" not in {k for k, v in out.items() if not isinstance(v, (dict, list))}  # train.py's print


# ---- bootstrap intervals ------------------------------------------------------------------------


def test_bootstrap_identical_arms_give_zero():
    x = np.random.default_rng(1).normal(size=(1, 60))
    r = evaluation.bootstrap_difference(x, x.copy(), n_boot=500)
    assert r["diff"] == 0.0 and r["lo"] == 0.0 and r["hi"] == 0.0
    assert (r["n_seeds_t"], r["n_seeds_c"], r["n_prompts"]) == (1, 1, 60)
    same_seeds = np.tile(x, (3, 1))  # three seeds that agree exactly: seed resampling changes nothing
    r = evaluation.bootstrap_difference(same_seeds, np.tile(x, (2, 1)), n_boot=500)
    assert abs(r["diff"]) < 1e-12 and abs(r["lo"]) < 1e-12 and abs(r["hi"]) < 1e-12


def test_bootstrap_constant_shift_is_exact():
    x = np.random.default_rng(2).uniform(size=(1, 80))
    r = evaluation.bootstrap_difference(x + 0.1, x, n_boot=500)
    for key in ("diff", "lo", "hi"):
        assert r[key] == pytest.approx(0.1, abs=1e-12)
    r = evaluation.bootstrap_difference(np.tile(x, (3, 1)) + 0.1, np.tile(x, (2, 1)), n_boot=500)
    for key in ("diff", "lo", "hi"):
        assert r[key] == pytest.approx(0.1, abs=1e-12)


def test_bootstrap_pure_noise_matches_normal_theory():
    rng = np.random.default_rng(3)
    prompts = 2000
    t, c = rng.normal(size=(1, prompts)), rng.normal(size=(1, prompts))
    r = evaluation.bootstrap_difference(t, c, n_boot=2000, seed=7)
    assert r["lo"] < 0 < r["hi"]
    normal_width = 2 * 1.959964 * np.std(t[0] - c[0], ddof=1) / np.sqrt(prompts)  # paired over prompts
    assert normal_width / 1.5 < r["hi"] - r["lo"] < normal_width * 1.5
    m = evaluation.bootstrap_mean(t, n_boot=2000, seed=7)
    assert m["lo"] < m["mean"] < m["hi"] and m["mean"] == pytest.approx(float(t.mean()))
    width = 2 * 1.959964 * np.std(t, ddof=1) / np.sqrt(prompts)
    assert width / 1.5 < m["hi"] - m["lo"] < width * 1.5


def test_bootstrap_pairs_prompts():
    """A shared prompt effect (hard and easy prompts) cancels in the paired difference."""
    rng = np.random.default_rng(4)
    difficulty = rng.normal(scale=1.0, size=(1, 300))
    t, c = difficulty + 0.05 + rng.normal(scale=0.01, size=(1, 300)), difficulty + rng.normal(scale=0.01, size=(1, 300))
    r = evaluation.bootstrap_difference(t, c, n_boot=1000)
    assert 0.0 < r["lo"] < 0.05 < r["hi"] < 0.1 and r["hi"] - r["lo"] < 0.01


def test_bootstrap_is_deterministic_for_a_seed():
    rng = np.random.default_rng(5)
    t, c = rng.normal(size=(3, 50)), rng.normal(size=(2, 50))
    a = evaluation.bootstrap_difference(t, c, n_boot=300, seed=11)
    assert a == evaluation.bootstrap_difference(t, c, n_boot=300, seed=11)
    assert a != evaluation.bootstrap_difference(t, c, n_boot=300, seed=12)
    assert evaluation.bootstrap_mean(t, n_boot=300, seed=3) == evaluation.bootstrap_mean(t, n_boot=300, seed=3)


def test_bootstrap_seed_resampling_widens_when_seeds_disagree():
    rng = np.random.default_rng(6)
    base = rng.normal(size=200)
    control = rng.normal(size=(1, 200))
    one_seed = evaluation.bootstrap_difference(base[None, :], control, n_boot=1000)
    two_seeds = evaluation.bootstrap_difference(np.stack([base + 0.2, base - 0.2]), control, n_boot=1000)
    assert two_seeds["diff"] == pytest.approx(one_seed["diff"], abs=1e-12)  # same mean
    assert two_seeds["hi"] - two_seeds["lo"] > 1.3 * (one_seed["hi"] - one_seed["lo"])
    m1, m2 = evaluation.bootstrap_mean(base, n_boot=1000), evaluation.bootstrap_mean(
        np.stack([base + 0.2, base - 0.2]), n_boot=1000)
    assert m2["hi"] - m2["lo"] > 1.3 * (m1["hi"] - m1["lo"]) and m2["n_seeds"] == 2


def test_bootstrap_nan_cells_are_left_out():
    x = np.array([[1.0, np.nan, 3.0, 5.0]])
    m = evaluation.bootstrap_mean(x, n_boot=200)
    assert m["mean"] == pytest.approx(3.0) and 1.0 <= m["lo"] <= m["hi"] <= 5.0
    r = evaluation.bootstrap_difference(x + 1.0, x, n_boot=200)
    assert r["diff"] == pytest.approx(1.0) and r["lo"] == pytest.approx(1.0) and r["hi"] == pytest.approx(1.0)
    with pytest.raises(ValueError):
        evaluation.bootstrap_difference(np.zeros((2, 5)), np.zeros((2, 4)))
