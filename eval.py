"""eval.py — pass@k (unbiased), avg@n, maj@k and distinct correct solutions, from one sampling run.

    python eval.py --model runs/grpo-s0 --dataset countdown --n 32      # a run folder (latest checkpoint)
    python eval.py --model toy --n 32                                    # the warm-start toy model
    python eval.py --model Qwen/Qwen2.5-Math-1.5B --dataset data.jsonl --n 64 --temperature 0.7

writes eval.json and passk.png into --out and prints a short table. Every number is reported with the
sampling parameters that produced it (temperature, top_p, n, k), as the grpo spec §8 asks.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

import verifier

# ====================================================================================================
# Metrics (grpo spec §8)
# ====================================================================================================


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem with n samples, c correct (Chen et al. 2021, §2.1).

    pass@k = 1 − C(n−c, k) / C(n, k), computed in the stable product form
    1 − Π_{i=n−c+1}^{n} (1 − k/i) (no big binomials); 1 when n − c < k. k > n is undefined.
    """
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"pass@k needs 1 <= k <= n, got k={k}, n={n}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def k_values(n: int) -> list[int]:
    """k ∈ {1, 2, 4, …} up to n, plus n itself."""
    ks, k = [], 1
    while k <= n:
        ks.append(k)
        k *= 2
    if ks[-1] != n:
        ks.append(n)
    return ks


def majority_correct(answers: list[str | None], example: dict, results: list) -> bool:
    """maj@k on one problem: the largest cluster of equivalent answers wins (ties: earliest first
    appearance); unparseable answers do not vote; correct iff the winning answer verifies."""
    task = example.get("task", "math")
    voting = [i for i, a in enumerate(answers) if a is not None]
    if not voting:
        return False
    clusters = verifier.cluster_answers([answers[i] for i in voting], task)
    counts: dict[int, int] = {}
    first: dict[int, int] = {}
    for pos, cid in enumerate(clusters):
        counts[cid] = counts.get(cid, 0) + 1
        first.setdefault(cid, pos)
    winner = max(counts, key=lambda cid: (counts[cid], -first[cid]))
    rep = voting[first[winner]]
    if task == "countdown":  # the "answer" of a chain is its final value; the gold is the target
        return answers[rep] == str(example["target"])
    return bool(results[rep].correct)  # that answer was verified against the gold (gold first)


def problem_metrics(results: list, example: dict) -> dict:
    n = len(results)
    c = sum(r.correct for r in results)
    return {
        "n": n, "c": c,
        "distinct_correct": len({r.key if r.key is not None else r.answer for r in results if r.correct}),
        "pass_at_k": {k: pass_at_k(n, c, k) for k in k_values(n)},
        "maj_at_n": majority_correct([r.answer for r in results], example, results),
    }


def aggregate_metrics(per_problem: list[dict]) -> dict:
    n = per_problem[0]["n"]
    ks = k_values(n)
    solvable = [p for p in per_problem if p["c"] > 0]
    return {
        "n_problems": len(per_problem),
        "n_samples": n,
        "avg_at_n": float(np.mean([p["c"] / p["n"] for p in per_problem])),  # = unbiased pass@1
        "pass_at_k": {str(k): float(np.mean([p["pass_at_k"][k] for p in per_problem])) for k in ks},
        "maj_at_n": float(np.mean([p["maj_at_n"] for p in per_problem])),
        "distinct_correct": float(np.mean([p["distinct_correct"] for p in per_problem])),
        "distinct_correct_on_solvable": float(np.mean([p["distinct_correct"] for p in solvable])) if solvable else 0.0,
        "frac_solvable": len(solvable) / len(per_problem),
    }


# ====================================================================================================
# Sampling a policy on held-out prompts
# ====================================================================================================


def evaluate_policy(rollout, tokenizer, examples: list[dict], n: int, temperature: float, top_p: float,
                    max_new_tokens: int, seed: int = 0, dist=None) -> dict:
    """n samples per prompt from `rollout` (train.HFRollout or the vLLM engine), verified and scored.

    With several ranks each samples its share of prompts and the results are gathered, so every rank
    returns the same numbers.
    """
    world, rank = (dist.world, dist.rank) if dist is not None else (1, 0)
    torch.manual_seed(seed + rank)
    mine = examples[rank::world]
    prompt_ids = [tokenizer(ex["prompt"], add_special_tokens=True)["input_ids"] for ex in mine]
    responses = rollout.generate(prompt_ids, n, temperature=temperature, top_p=top_p,
                                 max_new_tokens=max_new_tokens) if mine else []
    texts = tokenizer.batch_decode(responses, skip_special_tokens=True) if responses else []
    results = verifier.verify_batch(texts, [ex for ex in mine for _ in range(n)])
    per_problem = [problem_metrics(results[i * n:(i + 1) * n], ex) for i, ex in enumerate(mine)]
    if dist is not None and dist.enabled:
        per_problem = [p for part in dist.gather_objects(per_problem) for p in part]
    out = aggregate_metrics(per_problem)
    out["sampling"] = {"temperature": temperature, "top_p": top_p, "n": n, "max_new_tokens": max_new_tokens,
                       "seed": seed}
    return out


# ====================================================================================================
# Plots
# ====================================================================================================


def plot_passk(result: dict, path: Path, label: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = [int(k) for k in result["pass_at_k"]]
    fig, ax = plt.subplots(figsize=(5, 3.6))
    ax.plot(ks, [result["pass_at_k"][str(k)] for k in ks], marker="o", label=label or None)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("k")
    ax.set_ylabel("pass@k")
    s = result["sampling"]
    ax.set_title(f"pass@k (T={s['temperature']}, top_p={s['top_p']}, n={s['n']})")
    ax.grid(alpha=0.3)
    if label:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_run(run_dir: Path) -> Path:
    """training.png in the run folder: reward, entropy and distinct correct over steps, final pass@k."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else None
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    steps = [r["step"] for r in rows]
    for ax, key, label in zip(axes[:3], ("reward_mean", "entropy", "distinct_correct"),
                              ("mean training reward", "token entropy (nats)", "distinct correct / group")):
        ys = [r.get(key) for r in rows]
        if any(y is not None for y in ys):
            ax.plot([s for s, y in zip(steps, ys) if y is not None], [y for y in ys if y is not None])
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.set_title(label)
        ax.grid(alpha=0.3)
    ax = axes[3]
    if summary and "pass_at_k" in summary:
        ks = [int(k) for k in summary["pass_at_k"]]
        ax.plot(ks, [summary["pass_at_k"][str(k)] for k in ks], marker="o")
        ax.set_xscale("log", base=2)
        s = summary["sampling"]
        ax.set_title(f"held-out pass@k (T={s['temperature']}, n={s['n']})")
    ax.set_xlabel("k")
    ax.set_ylabel("pass@k")
    ax.grid(alpha=0.3)
    fig.suptitle(run_dir.name)
    fig.tight_layout()
    out = run_dir / "training.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def format_table(result: dict) -> str:
    s = result["sampling"]
    lines = [f"problems={result['n_problems']}  n={s['n']}  T={s['temperature']}  top_p={s['top_p']}",
             f"avg@{s['n']} (= pass@1) {result['avg_at_n']:.4f}   maj@{s['n']} {result['maj_at_n']:.4f}   "
             f"distinct correct {result['distinct_correct']:.2f} "
             f"({result['distinct_correct_on_solvable']:.2f} on solvable)",
             "k       " + " ".join(f"{k:>7}" for k in result["pass_at_k"]),
             "pass@k  " + " ".join(f"{v:7.4f}" for v in result["pass_at_k"].values())]
    return "\n".join(lines)


# ====================================================================================================
# Command line
# ====================================================================================================


def resolve_model(model: str) -> str:
    """A run folder → its latest checkpoint; anything else is passed to from_pretrained (or "toy")."""
    path = Path(model)
    if (path / "checkpoints").is_dir():
        import train

        ckpt = train.latest_checkpoint(path)
        if ckpt is None:
            raise SystemExit(f"error: run folder {model} has no checkpoint yet")
        return str(ckpt)
    return model


def main(argv=None) -> int:
    import train

    parser = argparse.ArgumentParser(description="pass@k / avg@n / maj@k / distinct correct of a policy")
    parser.add_argument("--model", required=True, help="run folder, 'toy', hub name or local model folder")
    parser.add_argument("--dataset", default="countdown")
    parser.add_argument("--split", default="heldout")
    parser.add_argument("--n", type=int, default=32, help="samples per problem")
    parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N problems")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--max-new-tokens", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="output folder (default: the run folder or eval_out/)")
    args = parser.parse_args(argv)
    if args.n < 1:
        parser.error("--n must be >= 1")
    model_path = resolve_model(args.model)
    cfg = train.resolve_defaults(train.TrainConfig(model=args.model if args.model == train.TOY else model_path,
                                                   dataset=args.dataset, max_new_tokens=args.max_new_tokens,
                                                   temperature=args.temperature, top_p=args.top_p))
    try:
        examples = train.load_prompts(cfg, split=args.split)
    except train.ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    examples = examples[: args.limit] if args.limit else examples
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = train.load_policy(model_path, device)
    rollout = train.HFRollout(model, tokenizer, cfg, device)
    result = evaluate_policy(rollout, tokenizer, examples, args.n, args.temperature, args.top_p,
                             cfg.max_new_tokens, seed=args.seed)
    result["model"] = args.model
    result["dataset"] = args.dataset
    out = Path(args.out) if args.out else (Path(args.model) if Path(args.model, "checkpoints").is_dir()
                                           else Path("eval_out"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(result, indent=2))
    plot_passk(result, out / "passk.png", label=args.model)
    print(format_table(result))
    print(f"wrote {out / 'eval.json'} and {out / 'passk.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
