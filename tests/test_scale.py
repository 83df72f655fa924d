"""Real-scale plumbing that runs on local data: known hub datasets (field mappings, with `datasets` faked),
prompt templates, evaluation protocols, gradient checkpointing and reference-model offloading."""

import json

import pytest
import torch
from safetensors.torch import load_file

import eval as evaluation
import train
from config import ConfigError, TrainConfig
from data import BOXED_INSTRUCTION, load_prompts, render_prompts

QUICK = ["--no-final-eval", "--no-progress", "--no-tensorboard"]


@pytest.fixture
def fake_hub(monkeypatch):
    """datasets.load_dataset for hub names, answering from an in-memory table (no network in tests)."""
    import datasets

    calls, tables = [], {}
    real = datasets.load_dataset

    def load_dataset(name, config=None, split=None, **kw):
        if name in ("json", "parquet"):
            return real(name, config, split=split, **kw)
        calls.append((name, config, split))
        if name not in tables:
            raise FileNotFoundError(f"Dataset '{name}' doesn't exist on the Hub or cannot be accessed.")
        return datasets.Dataset.from_list(tables[name])

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls, tables


def test_known_datasets_map_fields_splits_and_configs(fake_hub):
    calls, tables = fake_hub
    tables["HuggingFaceH4/MATH-500"] = [{"problem": "1+1?", "answer": "2", "solution": "... \\boxed{2}"}]
    tables["open-r1/DAPO-Math-17k-Processed"] = [{"prompt": "Solve x+1=3. Answer: $Answer", "solution": "2"}]
    tables["openai/gsm8k"] = [{"question": "How many?", "answer": "3 + 4 = <<3+4=7>>7 apples\n#### 1,234"}]
    tables["math-ai/amc23"] = [{"question": "AMC?", "answer": 27.0}]

    ex = load_prompts(TrainConfig(dataset="math500"))  # alias; the loop's "train" split → "test"
    assert calls[-1] == ("HuggingFaceH4/MATH-500", None, "test")
    assert ex[0]["prompt"] == "1+1?" and ex[0]["answer"] == "2" and ex[0]["task"] == "math"
    ex = load_prompts(TrainConfig(dataset="open-r1/DAPO-Math-17k-Processed"))
    assert calls[-1] == ("open-r1/DAPO-Math-17k-Processed", "all", "train")
    assert ex[0]["prompt"].startswith("Solve") and ex[0]["answer"] == "2"
    load_prompts(TrainConfig(dataset="dapo-math", dataset_config="en"))
    assert calls[-1] == ("open-r1/DAPO-Math-17k-Processed", "en", "train")
    ex = load_prompts(TrainConfig(dataset="gsm8k"), split="heldout")
    assert calls[-1] == ("openai/gsm8k", "main", "test")
    assert ex[0]["prompt"] == "How many?" and ex[0]["answer"] == "1234"  # what follows ####, no commas
    ex = load_prompts(TrainConfig(dataset="amc23"))
    assert ex[0]["prompt"] == "AMC?" and ex[0]["answer"] == "27.0"


def test_unknown_or_unreachable_hub_dataset_is_one_line(fake_hub, capsys):
    with pytest.raises(ConfigError, match="could not load dataset 'someone/nothing-here'.*local .jsonl"):
        load_prompts(TrainConfig(dataset="someone/nothing-here"))
    assert train.main(["--dataset", "someone/nothing-here", "--out", "/tmp/never"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: could not load dataset") and "\n" not in err


def test_local_file_with_question_and_solution_fields(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"problem": "2+2?", "solution": "4"}) + "\n")
    ex = load_prompts(TrainConfig(dataset=str(path)))
    assert ex[0]["prompt"] == "2+2?" and ex[0]["answer"] == "4"


def test_prompt_templates(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    math_ex = [{"prompt": "What is 6*7?", "answer": "42", "task": "math"}]
    toy_ex = [{"prompt": "9 3 2 3>27:", "answer": "27", "task": "countdown"}]
    # auto: the toy prompts stay raw; a math question without a chat template gets r1-zero
    assert render_prompts(toy_ex, tok, "auto") == toy_ex
    r1 = render_prompts(math_ex, tok, "auto")[0]
    assert r1["template"] == "r1-zero" and r1["question"] == "What is 6*7?"
    assert r1["prompt"].startswith("A conversation between User and Assistant")
    assert "User: What is 6*7?\nAssistant: <think>" in r1["prompt"] and "\\boxed{}" in r1["prompt"]
    assert render_prompts([r1], tok, "auto") == [r1]  # rendering twice changes nothing
    with pytest.raises(ConfigError, match="no chat template"):
        render_prompts(math_ex, tok, "chat")
    # a chat template: the question + the \boxed instruction as one user turn, generation prompt added,
    # and the BOS the template writes is dropped because the tokenizer adds it when tokenizing
    tok.bos_token = "<s>"
    tok.chat_template = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>"
                         "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
    chat = render_prompts(math_ex, tok, "auto")[0]
    assert chat["template"] == "chat"
    assert chat["prompt"] == f"<|user|>What is 6*7?\n{BOXED_INSTRUCTION}<|end|><|assistant|>"
    assert render_prompts(math_ex, tok, "raw") == math_ex


def test_math_training_step_with_r1_zero_template_on_local_data(tiny_model_dir, tmp_path):
    """The real-model path end to end on local data: math prompts, template, math verifier, truncation
    counted (a random tiny model never writes EOS within 8 tokens: every response is truncated)."""
    path = tmp_path / "math.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"What is {i}+{i}?", "answer": str(2 * i)}) + "\n"
                            for i in range(8)))
    out = tmp_path / "run"
    assert train.main(["--model", tiny_model_dir, "--dataset", str(path), "--prompt-template", "r1-zero",
                       "--steps", "1", "--prompts-per-step", "2", "--group-size", "2", "--max-new-tokens", "8",
                       "--lr", "1e-3", "--answer-mode", "strict", "--out", str(out), *QUICK]) == 0
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    # strict: random tokens commit to no final answer (math-verify's default extraction would read any
    # number the random text happens to contain, and the small golds here make a match likely)
    assert row["truncated_frac"] == 1.0 and row["reward_mean"] == 0.0


def _one_step(tmp_path, name, extra):
    out = tmp_path / name
    assert train.main(["--method", "grpo", "--steps", "1", "--prompts-per-step", "4", "--group-size", "4",
                       "--seed", "5", "--out", str(out), *QUICK, *extra]) == 0
    return load_file(str(out / "checkpoints" / "step_000001" / "model.safetensors"))


def test_gradient_checkpointing_gives_the_same_update(toy_model_dir, tmp_path, monkeypatch):
    """Same parameters after one step, and the decoder layers really were recomputed in backward."""
    from transformers.models.qwen2 import modeling_qwen2

    calls = []
    # count MLP calls (the decoder layer's own forward is the checkpoint wrapper: leave it alone)
    mlp_forward = modeling_qwen2.Qwen2MLP.forward
    monkeypatch.setattr(modeling_qwen2.Qwen2MLP, "forward",
                        lambda self, *a, **k: calls.append(1) or mlp_forward(self, *a, **k))
    plain = _one_step(tmp_path, "plain", [])
    n_plain, calls[:] = len(calls), []
    ckpt = _one_step(tmp_path, "gc", ["--gradient-checkpointing"])
    assert len(calls) > n_plain, "no layer was recomputed: checkpointing is not active"
    init = load_file(str(__import__("pathlib").Path(toy_model_dir) / "model.safetensors"))
    assert any(not torch.equal(init[k], plain[k]) for k in plain)  # the step moved the weights
    for k in plain:
        torch.testing.assert_close(ckpt[k], plain[k], atol=1e-6, rtol=0)


def test_offloaded_reference_model_gives_the_same_update(toy_model_dir, tmp_path):
    """GRPO with a k3 KL (β = 0.04, DeepSeekMath's value) needs π_ref: kept on the device or offloaded
    to the CPU between updates, the update is the same."""
    on_device = _one_step(tmp_path, "ref", ["--kl-coef", "0.04"])
    offloaded = _one_step(tmp_path, "ref_off", ["--kl-coef", "0.04", "--ref-offload"])
    for k in on_device:
        torch.testing.assert_close(offloaded[k], on_device[k], atol=1e-7, rtol=0)


def test_eval_protocols_and_greedy(toy_model_dir, tmp_path):
    """--protocol sets a paper's sampling; explicit flags win; T = 0 is greedy (n identical samples)."""
    out = tmp_path / "greedy"
    assert evaluation.main(["--model", "toy", "--protocol", "lpreg-greedy", "--n", "3", "--limit", "4",
                            "--no-diversity", "--out", str(out)]) == 0
    result = json.loads((out / "eval.json").read_text())
    assert result["sampling"]["temperature"] == 0.0 and result["sampling"]["n"] == 3
    assert result["protocol"] == "lpreg-greedy"
    # greedy: every problem is all-correct or all-wrong, so pass@k does not grow with k
    assert result["pass_at_k"]["1"] == result["pass_at_k"]["2"] == result["pass_at_k"]["3"]
    out = tmp_path / "sent"
    assert evaluation.main(["--model", "toy", "--protocol", "sent", "--n", "4", "--limit", "4",
                            "--max-new-tokens", "40", "--no-diversity", "--out", str(out)]) == 0
    sampling = json.loads((out / "eval.json").read_text())["sampling"]
    assert sampling == {"temperature": 1.0, "top_p": 0.9, "n": 4, "max_new_tokens": 40, "seed": 0, "top_k": 50}


def test_eval_protocols_follow_the_specs():
    p = evaluation.PROTOCOLS
    assert p["dsdr-avg16"] == {"n": 16, "temperature": 0.7, "top_p": 0.9}
    assert p["dsdr-passk"]["n"] == 64 and p["lpreg-aime"] == {"n": 16, "temperature": 0.6, "top_p": 1.0}
    assert p["lpreg-greedy"]["temperature"] == 0.0 and p["sent"]["top_k"] == 50


def test_bench_real_size_path_runs_on_a_small_architecture(tmp_path, monkeypatch, capsys):
    """bench.py --real-size (for GPU machines) end to end, on a small Qwen3 so that it runs on CPU: the
    random model is built from the table's config class, trained with and without checkpointing, and the
    throughput columns are printed."""
    import bench

    monkeypatch.setitem(bench.REAL_SIZES, "tiny-qwen3", ("Qwen3Config", dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, vocab_size=1000, max_position_embeddings=256, tie_word_embeddings=True)))
    assert bench.main(["--real-size", "tiny-qwen3", "--model-dir", str(tmp_path), "--steps", "2", "--warmup", "1",
                       "--", "--max-new-tokens", "8", "--prompts-per-step", "2", "--group-size", "2"]) == 0
    out = capsys.readouterr().out
    assert "built a random tiny-qwen3" in out
    lines = [line.split() for line in out.splitlines() if line.startswith("grpo")]
    assert [line[0] for line in lines] == ["grpo", "grpo+gc"], out
    assert all(float(line[2]) > 0 for line in lines)  # rollout tokens/s measured


def test_bench_vs_trl_is_skipped_in_one_line_when_trl_is_missing(monkeypatch, capsys):
    """TRL is an optional extra: without it --vs-trl says so and trains nothing."""
    import sys

    import bench

    monkeypatch.setitem(sys.modules, "trl", None)  # makes `import trl` raise ImportError

    def must_not_run(*args, **kwargs):
        raise AssertionError("--vs-trl trained without TRL")

    monkeypatch.setattr(bench, "run_one", must_not_run)
    monkeypatch.setattr(bench, "run_trl", must_not_run)
    assert bench.main(["--vs-trl", "--steps", "3", "--warmup", "1"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("--vs-trl skipped: TRL is not installed")


def test_bench_trl_child_times_every_grpo_trainer_step():
    """The TRL side of --vs-trl (only where TRL is installed): GRPOTrainer trains on the toy with the
    project's Countdown reward and reports one time per optimiser step."""
    pytest.importorskip("trl")
    import bench

    result = bench.run_trl(steps=2, prompts_per_step=2, group_size=4, max_new_tokens=8)
    assert "error" not in result, result
    assert len(result["times"]) == 2 and all(t > 0 for t in result["times"])


def test_linear_weights_counts_each_matmul_weight_once():
    import bench

    model = torch.nn.Sequential(torch.nn.Embedding(10, 3), torch.nn.Linear(3, 4), torch.nn.ReLU(),
                                torch.nn.Linear(4, 2, bias=False))
    assert bench.linear_weights(model) == 3 * 4 + 4 * 2  # the embedding lookup is not a matmul


def test_bench_roofline_sets_each_part_against_the_matmul_peak(capsys):
    """bench.py --roofline on a small batch: token counts and FLOPs consistent with each other, every
    part slower than its floor and below twice the peak (a FLOP count off by a factor would show here)."""
    import bench

    report = bench.roofline(prompts_per_step=2, repeats=1)
    parts = report["parts"]
    assert set(parts) == {"generate", "update", "dsdr encoder"}
    assert 0 < report["real_tokens"] <= min(report["padded_update_tokens"], report["padded_generate_tokens"])
    # the update runs forward (2 FLOPs per weight and token) and backward (4) on the tokens generation made
    assert parts["update"]["gflop_real"] == pytest.approx(3 * parts["generate"]["gflop_real"])
    assert parts["generate"]["gflop_real"] == pytest.approx(2 * report["linear_weights"] * report["real_tokens"] / 1e9)
    for name, p in parts.items():
        assert p["seconds"] > p["floor_seconds"] > 0, name
        assert 0 < p["of_peak"] < 2, (name, p)
    bench.print_roofline(report)
    out = capsys.readouterr().out
    assert "GRPO generate + update" in out and "x faster" in out
