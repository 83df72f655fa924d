"""study.py compare / study, and held-out diversity in metrics.jsonl via --eval-every (issue 3)."""

import json
from pathlib import Path

import pytest

import study
import train


def _fake_run(path: Path, pass1: float, distinct: float, steps: int = 4, rewards=None) -> Path:
    """A run folder as train.py writes it, with chosen numbers."""
    path.mkdir(parents=True)
    rewards = rewards or [0.1 * (i + 1) for i in range(steps)]
    rows = [{"step": i + 1, "reward_mean": r, "entropy": 0.2, "distinct_correct": 1.5} for i, r in enumerate(rewards)]
    rows[-1].update({"eval/pass@1": pass1, "eval/pass@4": 0.8})
    (path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    result = lambda p1, d: {"n_problems": 8, "n_samples": 4, "avg_at_n": p1, "maj_at_n": p1,
                            "pass_at_k": {"1": p1, "2": 0.6, "4": 0.8}, "distinct_correct": d,
                            "distinct_correct_on_solvable": d, "frac_solvable": 1.0,
                            "semantic_diversity_correct": 0.1, "formula_diversity_correct": 0.2,
                            "token_entropy": 0.3,
                            "sampling": {"temperature": 1.0, "top_p": 1.0, "n": 4, "max_new_tokens": 40, "seed": 1}}
    (path / "eval_start.json").write_text(json.dumps(result(0.2, 3.0)))
    (path / "summary.json").write_text(json.dumps(result(pass1, distinct)))
    return path


def test_compare_pools_seeds_as_mean_and_sample_std(tmp_path):
    runs = [_fake_run(tmp_path / "grpo-s0", 0.30, 2.0), _fake_run(tmp_path / "grpo-s1", 0.50, 3.0),
            _fake_run(tmp_path / "dsdr-s0", 0.40, 4.0)]
    table = study.compare_runs(runs, tmp_path / "cmp")
    lines = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
             for line in table.splitlines() if line.startswith("| ")}
    assert lines["grpo"][:3] == ["2", "4", "0.400 ± 0.141"]  # mean 0.4, sample std 0.1·√2
    assert lines["grpo"][3:5] == ["0.800 ± 0.000", "2.500 ± 0.707"]  # pass@4, distinct correct
    assert lines["dsdr"][:3] == ["1", "4", "0.400"]  # one seed: no ± part
    assert lines["start (step 0)"][2] == "0.200"
    assert "pass@4" in table.splitlines()[0]  # the largest k all runs have
    assert (tmp_path / "cmp" / "compare.md").read_text() == table
    assert (tmp_path / "cmp" / "compare.png").stat().st_size > 10_000


def test_compare_cli_rejects_a_folder_that_is_not_a_run(tmp_path):
    with pytest.raises(SystemExit, match="not a train.py run folder"):
        study.main(["compare", str(tmp_path)])


def test_cli_without_a_command_is_one_line_exit_2(capsys):
    for argv in ([], ["nope"]):
        assert study.main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: study.py needs a command, compare, study or report") and "\n" not in err


def test_eval_every_logs_held_out_diversity(toy_model_dir, tmp_path):
    out = tmp_path / "run"
    assert train.main(["--steps", "2", "--prompts-per-step", "4", "--group-size", "4", "--eval-every", "2",
                       "--eval-prompts", "6", "--eval-samples", "4", "--out", str(out), "--no-progress",
                       "--no-tensorboard", "--no-final-eval"]) == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert "eval/pass@1" not in rows[0]
    for key in ("eval/pass@1", "eval/pass@4", "eval/distinct_correct", "eval/semantic_diversity",
                "eval/formula_diversity", "eval/token_entropy"):
        assert key in rows[1], key
    assert rows[1]["eval/pass@1"] <= rows[1]["eval/pass@4"]
    assert rows[1]["eval/token_entropy"] > 0


def test_reduced_study_writes_table_and_plots_and_is_resumable(toy_model_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "study"
    args = ["study", "--methods", "grpo,dr_grpo", "--seeds", "1", "--eval-every", "2", "--out", str(out),
            "--no-progress", "--", "--prompts-per-step", "4", "--group-size", "4", "--eval-prompts", "8",
            "--eval-samples", "4", "--no-tensorboard"]
    assert study.main(args[:5] + ["--steps", "2"] + args[5:]) == 0  # an "interrupted" short study
    assert study.main(args[:5] + ["--steps", "4"] + args[5:]) == 0  # continues both runs to step 4
    for run in ("grpo-s0", "dr_grpo-s0"):
        rows = [json.loads(x) for x in (out / run / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == [1, 2, 3, 4]
        assert "eval/pass@1" in rows[1] and "eval/pass@1" in rows[3]  # held-out at every checkpoint
        assert json.loads((out / run / "config.json").read_text())["train"]["resume"] is True
    table = (out / "study.md").read_text()
    assert "| grpo | 1 | 4 |" in table and "| dr_grpo | 1 | 4 |" in table
    assert (out / "study.png").stat().st_size > 10_000
    # a finished study is not redone
    monkeypatch.setattr(train.Trainer, "fit", lambda *a, **k: pytest.fail("a finished run was trained again"))
    assert study.main(args[:5] + ["--steps", "4"] + args[5:]) == 0
    assert "study.md" in capsys.readouterr().out


def test_study_rejects_unknown_method_before_training(tmp_path, capsys):
    assert study.main(["study", "--methods", "grpo,nope", "--steps", "2", "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "unknown method 'nope'" in err and "\n" not in err
    assert not (tmp_path / "s").exists() or not any((tmp_path / "s").iterdir())  # nothing trained


def test_sweep_study_with_controls_writes_effects_dose_response_and_frontier(toy_model_dir, tmp_path):
    """The study machinery on a tiny grid (2 strengths × 1 seed × 2 steps): the sweep expands, the same-base
    control is added and trained once, the step-0 evaluation is computed once and shared, every checkpoint's
    per-prompt record is kept, and `report` redraws the same table from study.json alone."""
    out = tmp_path / "sweep"
    assert study.main(["study", "--methods", "arm:alpha=0.3|3", "--seeds", "1", "--steps", "2", "--eval-every", "1",
                       "--out", str(out), "--no-progress", "--", "--prompts-per-step", "4", "--group-size", "4",
                       "--eval-prompts", "6", "--eval-samples", "4", "--no-tensorboard", "--no-eval-diversity"]) == 0
    runs = ["arm-alpha0.3-s0", "arm-alpha3-s0", "grpo-eps_high0.28-aggtoken-mean-s0"]
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == runs
    starts = [(out / r / "eval_start.json").read_text() for r in runs]
    assert starts[0] == starts[1] == starts[2] == (out / "eval_start.json").read_text()  # computed once, shared
    cache = json.loads((out / "study.json").read_text())
    assert cache["entries"]["arm:alpha=3"] == {"control": "grpo:eps_high=0.28:agg=token-mean", "sweep": {
        "line": "arm:alpha=0.3|3", "method": "arm", "knob": "alpha", "value": 3.0}}
    assert sorted(cache["records"]["arm:alpha=3"]["0"]) == ["0", "1", "2"]  # step 0 and both checkpoints
    assert len(cache["records"]["arm:alpha=3"]["0"]["2"]["c"]) == 6 and cache["meta"]["n_samples"] == 4
    effects = (out / "effects.md").read_text()
    assert "| arm:alpha=3 | grpo:eps_high=0.28:agg=token-mean | 2 | 1 vs 1 |" in effects
    for name in ("dose_arm.png", "frontier.png"):
        assert (out / name).stat().st_size > 10_000
    again = tmp_path / "again"
    assert study.main(["report", str(out / "study.json"), "--out", str(again)]) == 0
    assert (again / "effects.md").read_text() == effects


def test_effects_of_a_known_difference(tmp_path):
    """effects() on a hand-made cache: an entry that solves every prompt 2 more times in 4 than its control
    has Δ pass@1 = +0.5 exactly, with a zero-width interval (identical seeds, constant shift)."""
    rec = lambda c: {"n": 4, "c": c, "distinct_correct": [1.0] * 5, "effective_solutions": [1.0] * 5,  # noqa: E731
                     "entropy_sum": [2.0] * 5, "entropy_tokens": [10] * 5}
    cache = {"meta": {"n_samples": 4, "steps": 10},
             "entries": {"m:x=1": {"control": "grpo", "sweep": {"line": "m:x=1", "method": "m", "knob": "x", "value": 1.0}},
                         "grpo": {"control": None, "sweep": None}},
             "records": {"m:x=1": {"0": {"10": rec([3, 3, 2, 4, 2])}, "1": {"10": rec([3, 3, 2, 4, 2])}},
                         "grpo": {"0": {"10": rec([1, 1, 0, 2, 0])}, "1": {"10": rec([1, 1, 0, 2, 0])}}}}
    (row,) = study.effects(cache, n_boot=200)
    assert row["pass@1"]["diff"] == pytest.approx(0.5) and row["pass@1"]["significant"]
    assert row["pass@1"]["lo"] == pytest.approx(0.5) and row["pass@1"]["hi"] == pytest.approx(0.5)
    assert row["distinct_correct"]["diff"] == 0 and not row["distinct_correct"]["significant"]
