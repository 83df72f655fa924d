"""Unit tests of the shared loop's building blocks: collation, chunked per-token fields, micro-batching,
argument validation. Hand-checked or compared with a direct (unchunked) computation."""

import json
import math

import pytest
import torch

import train
from config import ConfigError, TrainConfig
from data import PromptSampler, collate, load_prompts
from forward import split_micro_batches, token_fields
from lpreg import LpReg, LpRegConfig


def _load(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), AutoTokenizer.from_pretrained(path)


# ---------------------------------------------------------------------------------------------------
# collate: masks, EOS, truncation
# ---------------------------------------------------------------------------------------------------
def test_collate_masks_eos_and_truncation():
    pad, eos = 0, 1
    batch = collate([[5, 6], [7]], [[8, 9, eos], [10, 11]], pad, eos)
    assert batch["prompt_len"] == 2
    assert batch["input_ids"].tolist() == [[5, 6, 8, 9, eos], [pad, 7, 10, 11, pad]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [0, 1, 1, 1, 0]]
    # the response mask includes EOS and excludes padding
    assert batch["response_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["lengths"].tolist() == [3, 2]
    assert batch["truncated"].tolist() == [False, True]  # no EOS = truncated
    assert batch["prompt_mask"].tolist() == [[1, 1], [0, 1]]


# ---------------------------------------------------------------------------------------------------
# token_fields: chunked log-probs / entropy / min-p proxy equal a direct full-vocabulary computation
# ---------------------------------------------------------------------------------------------------
def _direct_fields(model, batch, temperature, kappa):
    ids, attn, P = batch["input_ids"], batch["attention_mask"], batch["prompt_len"]
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        raw = model(input_ids=ids, attention_mask=attn, position_ids=pos).logits.float()
    logits = raw / temperature
    logprobs = torch.log_softmax(logits[:, P - 1:-1], dim=-1)
    targets = ids[:, P:]
    logp = logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    probs = logprobs.exp()
    entropy = -(probs * logprobs).sum(-1)
    # the min-p keep set from the raw logits (default lp_filter_logits="raw", the official order); the
    # proxy then renormalises the tempered probabilities over it
    raw_probs = torch.softmax(raw[:, P - 1:-1], dim=-1)
    kept = raw_probs >= kappa * raw_probs.max(-1, keepdim=True).values
    z = (probs * kept).sum(-1)
    tok_kept = kept.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    proxy = torch.where(tok_kept, logp - z.log(), torch.full_like(logp, -1e4))
    plogp = torch.log_softmax(logits[:, :P - 1], dim=-1).gather(-1, ids[:, 1:P].unsqueeze(-1)).squeeze(-1)
    m = batch["response_mask"]
    return logp * m, entropy * m, proxy * m, plogp


@pytest.mark.parametrize("chunk_rows", [1, 3, 4096])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_fields_match_direct_computation(tiny_model_dir, chunk_rows, temperature):
    model, tok = _load(tiny_model_dir)
    prompts = [tok("3 5 7>22:")["input_ids"], tok("1 2>3:")["input_ids"]]
    responses = [tok("5*3=15,15+7=22")["input_ids"] + [tok.eos_token_id], tok("1+2=3")["input_ids"]]
    batch = collate(prompts, responses, tok.pad_token_id, tok.eos_token_id)
    fields = token_fields(model, batch, temperature, {"entropy", "prompt_logp"}, with_grad=True,
                          chunk_rows=chunk_rows, field_fns=LpReg(LpRegConfig(kappa=0.3)).token_field_fns())
    logp, ent, proxy, plogp = _direct_fields(model, batch, temperature, 0.3)
    torch.testing.assert_close(fields["logp"].detach(), logp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fields["entropy"], ent, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fields["minp_proxy_logp"], proxy, atol=1e-4, rtol=1e-5)
    pm = fields["prompt_logp_mask"].bool()
    # shorter prompt is left-padded: its first real token and the padding get no log-prob
    pad = batch["prompt_len"] - len(prompts[1])
    assert not pm[1, :pad + 1].any() and pm[1, pad + 1:].all() and not pm[0, 0] and pm[0, 1:].all()
    torch.testing.assert_close(fields["prompt_logp"][:, 1:][pm[:, 1:]], plogp[pm[:, 1:]], atol=1e-5, rtol=1e-5)
    # the gradient flows through logp (and is the same whatever the chunking: checkpointed chunks)
    fields["logp"].sum().backward()
    grad = model.get_output_embeddings().weight.grad.clone()
    model.zero_grad()
    model2, _ = _load(tiny_model_dir)
    direct = token_fields(model2, batch, temperature, set(), with_grad=True, chunk_rows=10**6)
    direct["logp"].sum().backward()
    torch.testing.assert_close(grad, model2.get_output_embeddings().weight.grad, atol=1e-5, rtol=1e-4)


def test_micro_batches_reproduce_whole_batch(tiny_model_dir):
    """Micro-batching and per-micro-batch trimming of padding do not change any log-prob."""
    model, tok = _load(tiny_model_dir)
    texts = [("3 5 7>22:", "5*3=15,15+7=22"), ("1 2>3:", "1+2=3"), ("9 9 9 9>81:", "9*9=81"),
             ("2 4>8:", "2*4=8,8")]
    prompts = [tok(p)["input_ids"] for p, _ in texts]
    responses = [tok(r)["input_ids"] + [tok.eos_token_id] for _, r in texts]
    batch = collate(prompts, responses, tok.pad_token_id, tok.eos_token_id)
    whole = token_fields(model, batch, 1.0, set(), with_grad=False)["logp"]
    mbs = split_micro_batches(batch, [0, 1, 2, 3], token_budget=30)
    assert len(mbs) > 1
    for mb in mbs:
        part = token_fields(model, mb, 1.0, set(), with_grad=False)["logp"]
        T = part.shape[1]
        torch.testing.assert_close(part, whole[mb["rows"], :T], atol=1e-5, rtol=1e-5)
        assert whole[mb["rows"], T:].abs().sum() == 0  # trimmed columns were padding only


def test_micro_batches_pack_longest_first_only_when_several_forwards_are_needed():
    """Rows that fit one forward stay one micro-batch in their order; otherwise they are packed longest
    first under the budget (hand-worked: prompt 2 tokens each, responses 1, 6, 2, 5 tokens + EOS)."""
    prompts = [[5, 6]] * 4
    responses = [[7] * k + [1] for k in (1, 6, 2, 5)]  # widths (prompt + response + EOS): 4, 9, 5, 8
    batch = collate(prompts, responses, 0, 1)
    one = split_micro_batches(batch, [0, 1, 2, 3], token_budget=4 * 9)
    assert [mb["rows"].tolist() for mb in one] == [[0, 1, 2, 3]]
    # budget 18: longest first gives [9, 8] (2 x 9 = 18) and [5, 4] (2 x 5 = 10): 28 padded tokens; in
    # batch order it would be [4, 9] (18), [5, 8] (16): 34
    packed = split_micro_batches(batch, [0, 1, 2, 3], token_budget=18)
    assert [mb["rows"].tolist() for mb in packed] == [[1, 3], [2, 0]]
    assert [tuple(mb["input_ids"].shape) for mb in packed] == [(2, 9), (2, 5)]
    assert sum(mb["input_ids"].numel() for mb in packed) == 28


# ---------------------------------------------------------------------------------------------------
# prompt order: seeded, epoch-wise, resumable
# ---------------------------------------------------------------------------------------------------
def test_prompt_sampler_covers_epochs_and_resumes():
    s = PromptSampler(10, seed=3)
    first = s.next_indices(7)
    state = s.state_dict()
    rest = s.next_indices(8)
    assert sorted(first + rest[:3]) == list(range(10))  # one full epoch before any repeat
    s2 = PromptSampler(10, seed=3)
    s2.load_state_dict(state)
    assert s2.next_indices(8) == rest
    assert PromptSampler(10, seed=4).next_indices(10) != PromptSampler(10, seed=3).next_indices(10)


# ---------------------------------------------------------------------------------------------------
# bad input: one clear line, before the model is loaded
# ---------------------------------------------------------------------------------------------------
@pytest.fixture
def no_model_loading(monkeypatch):
    def forbidden(*a, **k):
        raise AssertionError("the model was loaded before the input was validated")

    monkeypatch.setattr(train, "load_policy", forbidden)


@pytest.mark.parametrize("argv, message", [
    (["--method", "nope"], "unknown method 'nope'"),
    (["--group-size", "1"], "--group-size must be >= 2"),
    (["--prompts-per-step", "6", "--mini-batches", "4"], "--mini-batches 4 must divide"),
    (["--dataset", "missing_file.jsonl"], "does not exist"),
    (["--temperature", "0"], "--temperature must be >= 0.001"),
])
def test_bad_input_is_one_line_before_compute(no_model_loading, capsys, argv, message):
    assert train.main(argv + ["--out", "/tmp/never_created"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


def test_dataset_missing_fields(no_model_loading, tmp_path, capsys):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"text": "1+1?", "answer": "2"}) + "\n")  # no prompt/question/problem
    assert train.main(["--dataset", str(path), "--out", str(tmp_path / "run")]) == 2
    assert "lacks field(s) ['prompt']" in capsys.readouterr().err


def test_local_jsonl_and_parquet_datasets_load(tmp_path):
    import datasets

    rows = [{"prompt": "What is 1+1?", "answer": 2}, {"prompt": "What is 2+2?", "answer": "4"}]
    jl = tmp_path / "d.jsonl"
    jl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pq = tmp_path / "d.parquet"
    datasets.Dataset.from_list([{"prompt": r["prompt"], "answer": str(r["answer"])} for r in rows]).to_parquet(pq)
    for path in (jl, pq):
        examples = load_prompts(TrainConfig(dataset=str(path)))
        assert [e["answer"] for e in examples] == ["2", "4"]
        assert all(e["task"] == "math" for e in examples)


def test_method_overrides_from_cli():
    cfg, overrides = train.parse_args(["--method", "dapo", "--eps-high", "0.3", "--dapo.kl-coef", "0.01",
                                       "--no-dynamic-sampling"])
    method = train.build_method(cfg.method, overrides)
    assert method.cfg.eps_high == 0.3 and method.cfg.kl_coef == 0.01 and method.cfg.dynamic_sampling is False
    assert method.cfg.agg == "token-mean"  # the rest of the dapo preset is kept
    assert "ref_logp" in method.needs()
    with pytest.raises(ConfigError):
        train.build_method("grpo", {"not_a_field": 1})


def test_batch_fields_are_the_same_for_one_or_many_micro_batches(toy_model_dir, tmp_path, monkeypatch):
    """A method with needs_batch_fields always gets the no-grad prepass (one per step), and sees the same
    π_old fields, selection and update whether the batch is one micro-batch or several (small budget)."""
    from safetensors.torch import load_file

    from grpo import Method
    from lpreg import LpReg

    seen = {}

    class Recorder(Method):
        needs_batch_fields = True

        def token_field_fns(self):
            return LpReg().token_field_fns()  # the min-p proxy as a method-supplied field

        def prepare_update(self, batch, rows, dist):
            fields = batch["fields"]
            seen.setdefault(self.tag, []).append({k: v.clone() for k, v in fields.items()})
            fields["selected"] = (fields["minp_proxy_logp"] > fields["old_logp"]).float()  # a token selection

        def token_loss(self, mb, advantages, mask, stats):
            assert "selected" in mb and mb["selected"].shape == mb["response_mask"].shape
            return super().token_loss(mb, advantages, mask, stats)

    prepasses = []
    original = train.Trainer.prepass
    monkeypatch.setattr(train.Trainer, "prepass", lambda self, batch, rows, current=False:
                        prepasses.append(1) or original(self, batch, rows, current))
    params = {}
    for tag, budget in (("one", 10**6), ("many", 200)):
        Recorder.tag = tag
        prepasses.clear()
        monkeypatch.setattr(train, "build_method", lambda name, overrides=None, toy=False: Recorder())
        out = tmp_path / tag
        assert train.main(["--steps", "1", "--prompts-per-step", "4", "--group-size", "4", "--seed", "5",
                           "--micro-batch-tokens", str(budget), "--out", str(out), "--no-final-eval",
                           "--no-progress", "--no-tensorboard"]) == 0
        params[tag] = load_file(str(out / "checkpoints" / "step_000001" / "model.safetensors"))
        assert len(prepasses) == 1
    (one,), (many,) = seen["one"], seen["many"]
    assert one.keys() == many.keys() >= {"old_logp", "minp_proxy_logp"}
    for k in one:
        torch.testing.assert_close(one[k], many[k], atol=1e-5, rtol=1e-5)
    for k, v in params["one"].items():
        torch.testing.assert_close(v, params["many"][k], atol=3e-5, rtol=1e-3)
