"""Same-base controls (issue 16): each paper's method with its mechanism switched off trains exactly like the
base objective it is built on, so "method vs control" in a study measures the mechanism and nothing else.

The check is end to end, not on one loss: the same seed, 3 steps of the whole loop (rollouts, rewards,
advantages, prepass, update) for `method:control` and for study.control_entry's "grpo:<base fields>", then
the final weights must be bit-identical and every logged training number equal. A mechanism that leaked
through its zero strength (a bonus added before the check, an RNG draw, a different normaliser, a
curriculum left on) would fail it.
"""

import json

import pytest
import torch
from safetensors.torch import load_file

import study
import train
from runfolder import latest_checkpoint

QUICK = ["--steps", "3", "--prompts-per-step", "4", "--group-size", "4", "--save-every", "3", "--no-final-eval",
         "--no-progress", "--no-tensorboard"]
# logged only by the method (its own diagnostics) or wall-clock dependent: not part of the update
IGNORED = ("time_", "rollout_tokens_per_s", "dsdr/", "lp_", "sent/", "arm/", "entropy_bonus", "entropy_coef")


def _train(entry: str, out) -> tuple[dict, list[dict]]:
    name, flags = study.parse_variant(entry)
    assert train.main(["--method", name, *study.variant_args(flags), "--out", str(out), *QUICK]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return load_file(str(latest_checkpoint(out) / "model.safetensors")), rows


def _methods_with_a_mechanism():
    return [m for m, (cls, _) in train.METHODS.items() if cls.control_overrides]


def test_every_paper_method_declares_its_control():
    assert {"dsdr", "arm", "lpreg", "sent"} <= set(_methods_with_a_mechanism())


@pytest.mark.parametrize("method", _methods_with_a_mechanism())
def test_control_trains_bit_identically_to_its_base(toy_model_dir, tmp_path, method):
    control = study.control_entry(f"{method}:control")
    assert control is not None and control.startswith("grpo")
    w_method, rows_method = _train(f"{method}:control", tmp_path / "method")
    w_base, rows_base = _train(control, tmp_path / "base")
    assert w_method.keys() == w_base.keys()
    for key in w_base:
        assert torch.equal(w_method[key], w_base[key]), key
    for a, b in zip(rows_method, rows_base):
        for key in b:
            if not key.startswith(IGNORED) and key in a:
                assert a[key] == b[key], (key, a[key], b[key])
    # and the mechanism is really on at its default strength: the weights differ from the control's
    w_on, _ = _train(method, tmp_path / "on")
    assert any(not torch.equal(w_on[k], w_base[k]) for k in w_base)


def test_control_entries_and_sweep_expansion():
    assert study.control_entry("dsdr") == "grpo:eps_high=0.28:agg=token-mean"
    assert study.control_entry("lpreg") == "grpo:eps_low=1.0:eps_high=9.0:agg=token-mean"
    assert study.control_entry("grpo") is None and study.control_entry("dapo") is None
    points = study.expand_entry("sent:beta_high=0.2|1:beta_low=0.05|0.25")
    assert [e for e, _ in points] == ["sent:beta_high=0.2:beta_low=0.05", "sent:beta_high=1:beta_low=0.25"]
    assert [p["value"] for _, p in points] == [0.2, 1.0] and points[0][1]["knob"] == "beta_high"
    entries, info = study.plan_entries(["arm:alpha=0.3|1", "dsdr:lambda_l=0:lambda_d=0.01"])
    assert entries == ["arm:alpha=0.3", "arm:alpha=1", "dsdr:lambda_l=0:lambda_d=0.01",
                       "grpo:eps_high=0.28:agg=token-mean"]  # one shared control, added once
    assert info["arm:alpha=1"]["control"] == "grpo:eps_high=0.28:agg=token-mean"
    with pytest.raises(train.ConfigError, match="different lengths"):
        study.expand_entry("sent:beta_high=0.2|1:beta_low=0.05|0.1|0.2")


def test_with_control_trains_the_same_base_control_and_prints_both(toy_model_dir, tmp_path, capsys):
    out = tmp_path / "arm"
    assert train.main(["--method", "arm", "--alpha", "1", "--steps", "2", "--prompts-per-step", "4", "--group-size",
                       "4", "--eval-prompts", "6", "--eval-samples", "4", "--out", str(out), "--no-progress",
                       "--no-tensorboard", "--no-eval-diversity", "--with-control"]) == 0
    control = tmp_path / "arm-control"
    saved = json.loads((control / "config.json").read_text())
    assert saved["train"]["method"] == "grpo" and saved["method"]["eps_high"] == 0.28
    assert saved["method"]["agg"] == "token-mean" and saved["train"]["seed"] == 0
    # the starting policy's evaluation is computed once and shared
    assert (control / "eval_start.json").read_text() == (out / "eval_start.json").read_text()
    table = (out / "vs_control.md").read_text()
    assert "| pass@1 |" in table and "| effective solutions / prompt |" in table
    assert "grpo:eps_high=0.28:agg=token-mean" in table and table in capsys.readouterr().out


def test_toy_strengths_apply_on_the_toy_only_and_yield_to_paper_defaults_and_flags(monkeypatch):
    from config import TrainConfig

    monkeypatch.setattr(train.ARM, "toy_overrides", {"alpha": 1.0})
    assert train.build_method("arm", {}, toy=True).cfg.alpha == 1.0
    assert train.build_method("arm", {}, toy=False).cfg.alpha == 0.3  # the paper's value (real models)
    assert train.build_method("arm", {"alpha": "0.5"}, toy=True).cfg.alpha == 0.5  # an explicit flag wins
    assert train.uses_toy_strengths(TrainConfig(model="toy"))
    assert not train.uses_toy_strengths(TrainConfig(model="toy", paper_defaults=True))
    assert not train.uses_toy_strengths(TrainConfig(model="Qwen/Qwen2.5-Math-1.5B"))


def test_a_shared_start_evaluation_is_reused_only_for_the_same_prompts_and_sampling(tmp_path):
    import dataclasses

    from config import TrainConfig, resolve_defaults
    from runfolder import reuse_start_evaluation, start_evaluation_matches

    cfg = resolve_defaults(TrainConfig(eval_prompts=200, eval_samples=64))
    path = tmp_path / "eval_start.json"
    assert not start_evaluation_matches(path, cfg)  # nothing computed yet
    sampling = {"temperature": 1.0, "top_p": 1.0, "n": 64, "max_new_tokens": cfg.max_new_tokens, "seed": 12345}
    path.write_text(json.dumps({"n_problems": 200, "sampling": sampling}))
    assert start_evaluation_matches(path, cfg)
    for change in ({"eval_prompts": 64}, {"eval_samples": 16}, {"temperature": 0.7}, {"top_p": 0.9},
                   {"max_new_tokens": 20}):
        assert not start_evaluation_matches(path, dataclasses.replace(cfg, **change)), change
    run = tmp_path / "run"
    run.mkdir()
    reuse_start_evaluation(path, run)
    assert (run / "eval_start.json").read_text() == path.read_text()
