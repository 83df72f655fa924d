"""The multi-process path on CPU: `torchrun --nproc_per_node 2` (gloo) gives the same update as one process.

With a rollout that depends on the prompt alone (tests/dist_worker.py), the global batch is the same for
1 and 2 ranks; each rank holds half of the groups. The loss normalisers are global counts times the world
size and gradients are averaged over ranks, so the parameters after two steps must match the single-process
run for every aggregation mode, and so must the logged metrics (reduced over ranks).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "dist_worker.py"


def _run(nproc: int, args: list[str]) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(WORKER), *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.parametrize("method, sharding", [("grpo", "--fsdp"), ("grpo", "--no-fsdp"), ("dapo", "--fsdp"),
                                              ("dr_grpo", "--fsdp"), ("dsdr", "--fsdp")])
def test_two_ranks_match_one(method, sharding, tiny_model_dir, tmp_path):
    """FSDP2 (default with several ranks) and plain data parallelism give the single-process update;
    dsdr adds a reward bonus computed per group and a token-level term with its own normaliser."""
    common = ["--method", method, "--model", tiny_model_dir, "--steps", "2", "--prompts-per-step", "6",
              "--group-size", "4", "--lr", "1e-3", "--seed", "3", "--no-final-eval", "--no-progress",
              "--no-tensorboard", "--micro-batch-tokens", "150"]  # several micro-batches, uneven per rank
    runs = {}
    for nproc in (1, 2):
        out = tmp_path / f"n{nproc}"
        _run(nproc, common + ["--out", str(out)] + ([sharding] if nproc == 2 else []))
        runs[nproc] = (load_file(str(out / "checkpoints" / "step_000002" / "model.safetensors")),
                       [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()])
    (p1, m1), (p2, m2) = runs[1], runs[2]
    changed = 0
    initial = load_file(str(Path(tiny_model_dir) / "model.safetensors"))
    for k, v in p1.items():
        # summation order differs (per-rank padding, all-reduce); Adam turns that into ~1e-5 on a few
        # near-zero-gradient entries, while a wrong normaliser or a missing average moves entries by ~lr
        torch.testing.assert_close(p2[k], v, atol=3e-5, rtol=1e-3)
        changed += int(not torch.equal(v, initial[k]))
    assert changed > 0
    for a, b in zip(m1, m2):
        for key in ("reward_mean", "reward_std", "frac_reward_zero_std", "response_length", "entropy", "loss",
                    "grad_norm"):
            if a.get(key) is not None:
                assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (key, a[key], b[key])
    if method == "dapo":  # the all-wrong groups were dropped the same way on both
        assert [r["groups_kept"] for r in m1] == [r["groups_kept"] for r in m2]


def test_two_rank_resume_is_exact(tiny_model_dir, tmp_path):
    """2 steps + --resume + 2 steps equals 4 steps, both with 2 FSDP2 ranks (full optimiser state saved
    by name on rank 0, re-sharded on load)."""
    common = ["--method", "dsdr", "--model", tiny_model_dir, "--prompts-per-step", "4", "--group-size", "4",
              "--seed", "1", "--save-every", "2", "--no-final-eval", "--no-progress", "--no-tensorboard"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    _run(2, common + ["--steps", "4", "--out", str(straight)])
    _run(2, common + ["--steps", "2", "--out", str(resumed)])
    _run(2, common + ["--steps", "4", "--out", str(resumed), "--resume"])
    a = load_file(str(straight / "checkpoints" / "step_000004" / "model.safetensors"))
    b = load_file(str(resumed / "checkpoints" / "step_000004" / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=0, rtol=0)


def test_two_ranks_sample_with_hf_generate_and_evaluate(tiny_model_dir, tmp_path):
    """The real sampling path under FSDP2: ranks generate different lengths and numbers of chunks
    (synced_gpus + dummy chunks), and the held-out evaluation splits 5 prompts over 2 ranks."""
    out = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
           "--model", tiny_model_dir, "--steps", "1", "--prompts-per-step", "6", "--group-size", "2",
           "--gen-batch-prompts", "2", "--eval-prompts", "5", "--eval-samples", "2", "--out", str(out),
           "--no-progress", "--no-tensorboard"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_problems"] == 5 and summary["n_samples"] == 2
    # train.py's start-up line, once (rank 0), with the thread count the launcher's OMP_NUM_THREADS asked for
    assert proc.stdout.count("torch threads: 1 per rank (OMP_NUM_THREADS=1)") == 1, proc.stdout[-2000:]


# ----------------------------------------------------------------------------------------------------
# CPU threads per process (distributed.default_torch_threads, set_torch_threads)
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cpus, local_ranks, omp, expected", [
    (2, 1, None, 2),     # one rank takes the CPUs it may run on
    (2, 2, None, 1),     # two ranks share them
    (16, 3, None, 5),    # rounded down: never more threads than CPUs
    (1, 4, None, 1),     # more ranks than CPUs: still one thread each
    (16, 1, "3", 3),     # OMP_NUM_THREADS set: the user's choice, kept as it is
    (2, 1, "8", 8),      # ... even above the CPU count
    (16, 2, "4,2", 4),   # OpenMP's per-level list: its first entry
    (4, 1, "", 4),       # set but empty, or not a positive number: ignored
    (4, 2, "0", 2),
    (4, 1, "many", 4),
])
def test_default_torch_threads_by_hand(cpus, local_ranks, omp, expected):
    from distributed import default_torch_threads

    assert default_torch_threads(cpus, local_ranks, omp) == expected


def test_set_torch_threads_shares_the_affinity_among_the_local_ranks_and_says_so(monkeypatch, capsys):
    import distributed

    assert 1 <= distributed.available_cpus() <= (os.cpu_count() or 1)  # the real one: this process's CPUs
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setattr(distributed, "available_cpus", lambda: 4)
    previous = torch.get_num_threads()
    try:
        assert distributed.set_torch_threads() == 2 == torch.get_num_threads()
        assert capsys.readouterr().out == "torch threads: 2 per rank (4 CPUs, 2 ranks on this node)\n"
        monkeypatch.setenv("RANK", "1")  # only rank 0 says it
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        assert distributed.set_torch_threads() == 1 == torch.get_num_threads()
        assert capsys.readouterr().out == ""
    finally:
        torch.set_num_threads(previous)
