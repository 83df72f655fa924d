"""Bad input (issue 14): every case is refused with ONE line on stderr that says what is wrong and how to
fix it, exit code 2, before the model loads, with no traceback.

One table: (program, argv, files to write, expected start of the message). `{tmp}` in an argv is the test's
tmp_path; files are written there first. The model must not load: `rollout.load_policy` raises if called
(the one case that needs the tokenizer gets a tokenizer-only stand-in instead).
"""

import json
import os
import re
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest

import eval as evaluation
import train
from config import TrainConfig
from data import load_prompts

ROOT = Path(__file__).resolve().parents[1]
ROW = json.dumps({"prompt": "What is 1+1?", "answer": "2"})


def rows(*items) -> str:
    return "".join(json.dumps(r) + "\n" for r in items)


TINY_CONFIG = json.dumps({"model_type": "qwen2", "vocab_size": 22, "hidden_size": 8})

# (id, program, argv, {file name: content}, expected start of the message after "error: ")
CASES = [
    # --- training flags: types ---
    ("prompts-per-step-abc", "train", ["--prompts-per-step", "abc"], {},
     "--prompts-per-step must be an integer, got 'abc'"),
    ("steps-1.5", "train", ["--steps", "1.5"], {}, "--steps must be an integer, got 1.5"),
    ("group-size-2.5", "train", ["--group-size", "2.5"], {}, "--group-size must be an integer, got 2.5"),
    ("lr-abc", "train", ["--lr", "abc"], {}, "--lr must be a number, got 'abc'"),
    ("unknown-flag", "train", ["--stepz", "3"], {}, "unrecognized arguments: --stepz 3 (see --help)"),
    # --- training flags: ranges ---
    ("lr-negative", "train", ["--lr", "-1"], {}, "--lr must be > 0, got -1.0"),
    ("lr-zero", "train", ["--lr", "0"], {}, "--lr must be > 0, got 0.0"),
    ("save-every-0", "train", ["--save-every", "0"], {}, "--save-every must be >= 1"),
    ("logit-chunk-rows-0", "train", ["--logit-chunk-rows", "0"], {}, "--logit-chunk-rows must be >= 1"),
    ("eval-samples-0", "train", ["--eval-samples", "0"], {}, "--eval-samples must be >= 1"),
    ("grad-clip-0", "train", ["--grad-clip", "0"], {}, "--grad-clip must be > 0"),
    ("temperature-1e-40", "train", ["--temperature", "1e-40"], {}, "--temperature must be >= 0.001"),
    ("split-typo", "train", ["--split", "trian"], {}, "--split must be one of"),
    # --- method hyperparameters: checked when the method is built, not at the first update ---
    ("dsdr-lambda-d-abc", "train", ["--method", "dsdr", "--dsdr.lambda-d", "abc"], {},
     "--dsdr.lambda-d must be a number, got 'abc'"),
    ("grpo-eps-low-abc", "train", ["--grpo.eps-low", "abc"], {}, "--grpo.eps-low must be a number, got 'abc'"),
    ("grpo-agg-typo", "train", ["--grpo.agg", "token-meen"], {}, "method 'grpo': agg must be one of"),
    ("grpo-kl-coef-negative", "train", ["--grpo.kl-coef", "-1"], {}, "method 'grpo': kl_coef must be >= 0"),
    ("dapo-max-gen-batches-1.5", "train", ["--method", "dapo", "--dapo.max-gen-batches", "1.5"], {},
     "--dapo.max-gen-batches must be an integer, got 1.5"),
    # --- dataset files ---
    ("jsonl-empty", "train", ["--dataset", "{tmp}/d.jsonl"], {"d.jsonl": ""}, "dataset file"),
    ("jsonl-bad-line", "train", ["--dataset", "{tmp}/d.jsonl"], {"d.jsonl": ROW + "\n{'prompt': 1}\n" + ROW + "\n"},
     "dataset file {tmp}/d.jsonl line 2 is not valid JSON"),
    # blank lines are skipped, but still counted: the bad line is named by its line number in the file
    ("jsonl-blank-lines-then-bad-line", "train", ["--dataset", "{tmp}/d.jsonl"],
     {"d.jsonl": ROW + "\n\n   \n" + ROW[:-3] + "\n"}, "dataset file {tmp}/d.jsonl line 4 is not valid JSON"),
    ("json-truncated", "train", ["--dataset", "{tmp}/d.json"], {"d.json": "[" + ROW + ", " + ROW[:20]},
     "dataset file {tmp}/d.json is not valid JSON"),
    ("parquet-not-parquet", "train", ["--dataset", "{tmp}/d.parquet"], {"d.parquet": rows({"prompt": "a"})},
     "dataset file {tmp}/d.parquet is not a parquet file"),
    ("answer-null", "train", ["--dataset", "{tmp}/d.jsonl"],
     {"d.jsonl": rows({"prompt": "1+1?", "answer": "2"}, {"prompt": "2+2?", "answer": None})},
     "dataset file {tmp}/d.jsonl line 2: 'answer' is null"),
    ("answer-list", "train", ["--dataset", "{tmp}/d.jsonl"], {"d.jsonl": rows({"prompt": "1+1?", "answer": [2]})},
     "dataset file {tmp}/d.jsonl line 1: 'answer' must be text or a number, got a list"),
    ("answer-dict", "train", ["--dataset", "{tmp}/d.jsonl"],
     {"d.jsonl": rows({"prompt": "1+1?", "answer": {"value": 2}})},
     "dataset file {tmp}/d.jsonl line 1: 'answer' must be text or a number, got a dict"),
    ("prompt-empty", "train", ["--dataset", "{tmp}/d.jsonl"],
     {"d.jsonl": rows({"prompt": "1+1?", "answer": "2"}, {"prompt": "  ", "answer": "4"})},
     "dataset file {tmp}/d.jsonl line 2: 'prompt' is empty"),
    ("answer-empty", "train", ["--dataset", "{tmp}/d.json"],
     {"d.json": json.dumps([{"prompt": "1+1?", "answer": "2"}, {"prompt": "2+2?", "answer": ""}])},
     "dataset file {tmp}/d.json row 2: 'answer' is empty"),
    # --- model folders ---
    ("model-missing-dir", "train", ["--model", "{tmp}/no_such_model"], {}, "--model {tmp}/no_such_model does not exist"),
    ("model-without-tokenizer", "train", ["--model", "{tmp}/m"], {"m/config.json": TINY_CONFIG},
     "--model {tmp}/m has no tokenizer"),
    # --- a prompt longer than the model's context (needs the tokenizer: checked right after it loads) ---
    ("prompt-too-long", "train-tokenizer", ["--dataset", "{tmp}/d.jsonl", "--prompt-template", "raw"],
     {"d.jsonl": rows({"prompt": "1 " * 50_000, "answer": "1"})}, "dataset file {tmp}/d.jsonl row 1: the prompt has"),
    # --- eval.py ---
    ("eval-dataset-missing", "eval", ["--model", "toy", "--dataset", "{tmp}/missing.jsonl"], {},
     "dataset file {tmp}/missing.jsonl does not exist"),
    ("eval-split-typo", "eval", ["--model", "toy", "--split", "helduot"], {}, "--split must be one of"),
    ("eval-limit-0", "eval", ["--model", "toy", "--limit", "0"], {}, "--limit must be >= 1"),
    ("eval-out-is-a-file", "eval", ["--model", "toy", "--out", "{tmp}/f"], {"f": "x"}, "--out {tmp}/f"),
    ("eval-bad-argument", "eval", ["--model", "toy", "--n", "abc"], {},
     "argument --n: invalid int value: 'abc' (see --help)"),
    ("eval-temperature-1e-40", "eval", ["--model", "toy", "--temperature", "1e-40"], {},
     "--temperature must be 0 (greedy) or >= 0.001"),
]


@pytest.mark.parametrize("program, argv, files, expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_before_the_model_loads(program, argv, files, expected, tmp_path, capsys,
                                                             monkeypatch):
    for name, content in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(content)

    def forbidden(*a, **k):
        raise AssertionError("the model was loaded before the input was validated")

    if program == "train-tokenizer":  # the tokenizer (all the prompt-length check needs), never the weights
        import toy

        stand_in = types.SimpleNamespace(config=types.SimpleNamespace(max_position_embeddings=96))
        monkeypatch.setattr(train, "load_policy", lambda *a, **k: (stand_in, toy.build_tokenizer()))
    else:
        for program_module in (train, evaluation):  # where each program looks load_policy up
            monkeypatch.setattr(program_module, "load_policy", forbidden)
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    if program.startswith("train"):
        argv += ["--out", str(tmp_path / "run"), "--no-progress"]
    main = evaluation.main if program == "eval" else train.main
    start = time.perf_counter()
    code = main(argv)
    elapsed = time.perf_counter() - start
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("error: " + expected.replace("{tmp}", str(tmp_path))), lines[0]
    assert elapsed < 30, f"took {elapsed:.0f} s"


def test_blank_lines_in_jsonl_are_skipped(tmp_path):
    """Decision: blank (whitespace-only) lines of a .jsonl carry no row and are skipped, not refused."""
    path = tmp_path / "d.jsonl"
    path.write_text("\n" + ROW + "\n\n  \n" + ROW + "\n\n")
    examples = load_prompts(TrainConfig(dataset=str(path)))
    assert [e["answer"] for e in examples] == ["2", "2"]


def test_bad_input_under_torchrun_is_one_line_from_rank_0_and_a_clean_exit_on_every_rank(tmp_path):
    """torchrun with 2 processes and --prompts-per-step 3: rank 0 prints the one line, no rank prints a
    traceback, every rank exits with code 2. (torchrun itself then reports the failed workers with its own
    ChildFailedError traceback, as it does for any worker exit code but 0: not ours to change.)"""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node", "2",
                           "train.py", "--prompts-per-step", "3", "--out", str(tmp_path / "run")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    err = proc.stderr
    ours = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert ours == ["error: --prompts-per-step 3 must be divisible by the number of processes (2) so that every "
                    "rank holds whole groups"], err
    assert proc.returncode != 0
    assert 'train.py", line' not in err, err  # no traceback from inside a worker
    codes = re.findall(r"rank\s*: (\d) \(local_rank: \d\)\s*exitcode\s*: (-?\d+)", err)
    assert sorted(codes) == [("0", "2"), ("1", "2")], err  # a clean exit with the bad-input code on each rank
