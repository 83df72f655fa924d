"""Shared fixtures: a tiny random Qwen2 on the toy tokenizer, and the cached warm-started toy model."""

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # every test runs on local data
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A randomly initialised tiny Qwen2 + the toy tokenizer, saved like any hub model."""
    import toy

    path = tmp_path_factory.mktemp("tiny_model")
    tokenizer = toy.build_tokenizer()
    model = toy.build_model(tokenizer, seed=0)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def toy_model_dir():
    """The warm-started toy model (built once per machine, then cached)."""
    import toy

    return toy.ensure_toy_model()


def one_step_per_micro_batch_budget(method_cls, argv: list[str], tmp_path, monkeypatch,
                                    budgets=(10**6, 200)) -> tuple[dict, dict]:
    """Run one training step per micro-batch token budget (default: one forward vs several micro-batches)
    with `train.main(argv + ...)`; return ({budget: parameters}, {budget: logged metrics row}).

    Asserts that every one of the 16 sequences reaches `method_cls.loss` once, and that the first budget
    is a single forward while the second splits the batch."""
    import json

    from safetensors.torch import load_file

    import train

    params, logged, calls = {}, {}, []
    original = method_cls.loss
    monkeypatch.setattr(method_cls, "loss",
                        lambda self, mb, norm: calls.append(len(mb["rows"])) or original(self, mb, norm))
    for budget in budgets:
        calls.clear()
        out = tmp_path / f"budget-{budget}"
        assert train.main([*argv, "--steps", "1", "--prompts-per-step", "4", "--group-size", "4", "--seed", "3",
                           "--micro-batch-tokens", str(budget), "--out", str(out), "--no-final-eval",
                           "--no-progress", "--no-tensorboard"]) == 0
        params[budget] = load_file(str(out / "checkpoints" / "step_000001" / "model.safetensors"))
        logged[budget] = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
        assert sum(calls) == 16 and (len(calls) == 1 if budget == budgets[0] else len(calls) > 1)
    monkeypatch.setattr(method_cls, "loss", original)
    return params, logged


def policy_loss(logp, old_logp, advantages, mask, eps_low=0.2, eps_high=0.2, agg="token-mean", norm=None,
                dual_clip_c=None):
    """A reference clipped-surrogate loss built from grpo.py's pure functions (`clipped_surrogate` then
    `aggregate`), for comparing the training code (`Method.loss`) and hand-computed cases against.
    Returns (loss, {"clip_frac_low", "clip_frac_high"}) with fractions of the valid tokens."""
    from grpo import Normaliser, aggregate, clipped_surrogate

    norm = norm or Normaliser.of(mask)
    per_token, low, high = clipped_surrogate(logp, old_logp, advantages, eps_low, eps_high, dual_clip_c)
    m = mask.bool()
    n_valid = max(int(m.sum()), 1)
    return aggregate(per_token, mask, agg, norm), {"clip_frac_low": float((low & m).sum()) / n_valid,
                                                   "clip_frac_high": float((high & m).sum()) / n_valid}
