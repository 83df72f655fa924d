"""eval.py — how good and how diverse a policy's samples are, from one sampling run.

    python eval.py --model runs/grpo-s0 --dataset countdown --n 32      # a run folder (latest checkpoint)
    python eval.py --model toy --n 32                                    # the warm-start toy model
    python eval.py --model Qwen/Qwen2.5-Math-1.5B --dataset data.jsonl --n 64 --temperature 0.7

It writes eval.json and passk.png into --out and prints a short table: unbiased pass@k for k = 1, 2, 4,
..., n, avg@n, maj@n, distinct correct solutions, semantic and formula diversity (all samples
and correct ones), and the policy's token entropy on its own samples. Every number is reported with the
sampling parameters that produced it (temperature, top_p, n, k), as the grpo spec §8 asks.
The diversity metrics are DSDR's D_emb and D_eq (imported from dsdr.py). Comparing run folders and the
methods × seeds study on the toy are in study.py.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

import verifier
from config import (MIN_TEMPERATURE, PROMPT_TEMPLATES, ROLLOUTS, TOY, ConfigError, OneLineParser, TrainConfig,
                    check_model_path, check_vllm, resolve_defaults)
from data import KNOWN_DATASETS, check_prompt_lengths, collate, load_prompts, render_prompts
from dsdr import SentenceEncoder, embedding_distance_matrix, extract_formulas, formula_uniqueness, get_encoder
from forward import no_grad_fields
from rollout import HFRollout, VLLMRollout, load_policy, resolve_model_path, sample_and_verify
from runfolder import latest_checkpoint

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


def solution_identity(result, text: str, task: str):
    """What makes two correct samples "the same solution", for counting distinct correct ones.

    Countdown: the verifier's canonical key (the same steps up to commutativity and order). Math: a
    derivation has no canonical form, and the final answers of correct samples are all equal, so we use
    the set of formulas the sample writes down (extract_formulas, DSDR's S(o)); a sample that writes no
    formula is identified by its whole whitespace-normalised text.
    """
    if task == "countdown" and result.key is not None:
        return result.key
    formulas = extract_formulas(text)
    return frozenset(formulas) if formulas else " ".join(text.split())


def problem_metrics(results: list, example: dict, texts: list[str] | None = None) -> dict:
    """Per-problem correctness metrics; `texts` (the decoded samples) are needed for math problems'
    distinct-correct count (see solution_identity)."""
    n = len(results)
    c = sum(r.correct for r in results)
    task = example.get("task", "math")
    texts = texts if texts is not None else [r.answer or "" for r in results]
    return {
        "n": n, "c": c,
        "distinct_correct": len({solution_identity(r, t, task) for r, t in zip(results, texts) if r.correct}),
        "pass_at_k": {k: pass_at_k(n, c, k) for k in k_values(n)},
        "maj_at_n": majority_correct([r.answer for r in results], example, results),
    }


# Diversity entries of `problem_metrics` dicts (added by evaluate_policy): nan where a prompt has no pair
# in scope (e.g. fewer than 2 correct samples), and averaged over the prompts where they are defined.
DIVERSITY_KEYS = ("semantic_diversity", "semantic_diversity_correct", "formula_diversity",
                  "formula_diversity_correct")


def _nanmean(values) -> float:
    values = [v for v in values if v is not None and not np.isnan(v)]
    return float(np.mean(values)) if values else float("nan")


def aggregate_metrics(per_problem: list[dict]) -> dict:
    n = per_problem[0]["n"]
    ks = k_values(n)
    solvable = [p for p in per_problem if p["c"] > 0]
    out = {
        "n_problems": len(per_problem),
        "n_samples": n,
        "avg_at_n": float(np.mean([p["c"] / p["n"] for p in per_problem])),  # = unbiased pass@1
        "pass_at_k": {str(k): float(np.mean([p["pass_at_k"][k] for p in per_problem])) for k in ks},
        "maj_at_n": float(np.mean([p["maj_at_n"] for p in per_problem])),
        "distinct_correct": float(np.mean([p["distinct_correct"] for p in per_problem])),
        "distinct_correct_on_solvable": float(np.mean([p["distinct_correct"] for p in solvable])) if solvable else 0.0,
        "frac_solvable": len(solvable) / len(per_problem),
    }
    for key in DIVERSITY_KEYS:
        if key in per_problem[0]:
            out[key] = _nanmean(p[key] for p in per_problem)
    if "entropy_sum" in per_problem[0]:  # token-weighted: the mean over all sampled tokens
        tokens = sum(p["entropy_tokens"] for p in per_problem)
        out["token_entropy"] = sum(p["entropy_sum"] for p in per_problem) / tokens if tokens else float("nan")
    return out


# ====================================================================================================
# Diversity metrics (DSDR's D_emb and D_eq, from dsdr.py)
# ====================================================================================================
#
# DSDR's semantic part D_emb (Eqs. 4–6) and formula part D_eq (Eqs. 7–8) are implemented in dsdr.py, the
# paper's file (their design notes are there); eval.py imports them and summarises them per prompt.


# ---- group-level summaries for evaluation -----------------------------------------------------------
#
# For evaluation we summarise each prompt's samples by their mean pairwise diversity and average over
# prompts. `only` restricts each group to flagged samples (typically the correct ones: "how different
# are the right answers", which is what DSDR aims to raise); a prompt with fewer than 2 samples in scope
# has no pair and is skipped; with no prompt left the result is nan.


def _in_scope(texts_per_prompt: list[list[str]], only: list[list[bool]] | None) -> list[list[str]]:
    if only is None:
        return [list(texts) for texts in texts_per_prompt]
    if len(only) != len(texts_per_prompt):
        raise ValueError(f"`only` has {len(only)} groups for {len(texts_per_prompt)} prompts")
    groups = []
    for texts, flags in zip(texts_per_prompt, only):
        if len(flags) != len(texts):
            raise ValueError(f"`only` has {len(flags)} flags for a group of {len(texts)} texts")
        groups.append([t for t, keep in zip(texts, flags) if keep])
    return groups


def semantic_diversity(texts_per_prompt: list[list[str]], encoder: SentenceEncoder | None = None,
                       only: list[list[bool]] | None = None) -> float:
    """Mean over prompts of the mean pairwise d_emb (Eq. 5) among a prompt's texts (= the mean D_emb
    of the group, Eq. 6), or among the flagged texts only. All texts go through one `encode` call."""
    groups = [g for g in _in_scope(texts_per_prompt, only) if len(g) >= 2]
    if not groups:
        return float("nan")
    encoder = encoder if encoder is not None else get_encoder()
    z = encoder.encode([t for g in groups for t in g])
    values, start = [], 0
    for g in groups:
        m = len(g)
        d = embedding_distance_matrix(z[start:start + m])
        values.append(float(d.sum()) / (m * (m - 1)))
        start += m
    return float(np.mean(values))


def formula_diversity(texts_per_prompt: list[list[str]], only: list[list[bool]] | None = None,
                      max_chars: int | None = None) -> float:
    """Mean over prompts of the mean D_eq (Eqs. 7–8) among a prompt's texts, or among the flagged texts
    only (uniqueness is then judged against the other flagged texts)."""
    values = []
    for g in _in_scope(texts_per_prompt, only):
        if len(g) >= 2:
            values.append(float(formula_uniqueness([extract_formulas(t, max_chars) for t in g]).mean()))
    return float(np.mean(values)) if values else float("nan")


# ====================================================================================================
# Sampling a policy on held-out prompts
# ====================================================================================================


def group_diversity(z: torch.Tensor, formula_sets: list[set[str]], only: list[bool] | None = None) -> tuple:
    """(mean pairwise d_emb, mean D_eq) of one prompt's samples, or of the flagged ones only; nan for
    both when fewer than 2 samples are in scope. z: the samples' embeddings [n, d]."""
    keep = list(range(len(formula_sets))) if only is None else [i for i, f in enumerate(only) if f]
    m = len(keep)
    if m < 2:
        return float("nan"), float("nan")
    d = embedding_distance_matrix(z[keep])
    semantic = float(d.sum()) / (m * (m - 1))
    formula = float(formula_uniqueness([formula_sets[i] for i in keep]).mean())
    return semantic, formula


def sample_entropy(model, prompt_ids: list[list[int]], responses: list[list[int]], pad_id: int, eos_id: int,
                   temperature: float, token_budget: int = 16384, dist=None) -> tuple[list[float], list[int]]:
    """Per sample: the sum over its tokens of the policy's entropy H(π(·|context)/T) and its token count,
    from one no-grad forward of (prompt, response) in micro-batches (forward.no_grad_fields)."""
    if not responses:  # (under FSDP2 the other ranks' forwards are still matched)
        batch = collate([[pad_id]], [[eos_id]], pad_id, eos_id)
        no_grad_fields(model, batch, [], temperature, {"entropy"}, token_budget, dist=dist, pad_id=pad_id)
        return [], []
    batch = collate(prompt_ids, responses, pad_id, eos_id)
    entropy = no_grad_fields(model, batch, list(range(len(responses))), temperature, {"entropy"}, token_budget,
                             dist=dist, pad_id=pad_id)["entropy"]
    sums = (entropy * batch["response_mask"]).sum(-1).double()
    return sums.tolist(), batch["lengths"].tolist()


def evaluate_policy(rollout, tokenizer, examples: list[dict], n: int, temperature: float, top_p: float,
                    max_new_tokens: int, seed: int = 0, dist=None, diversity: bool = True,
                    entropy_model=None, top_k: int = 0, answer_mode: str = verifier.DEFAULT_MATH_MODE) -> dict:
    """n samples per prompt from `rollout` (rollout.HFRollout or the vLLM engine), verified and scored.

    Reports, averaged over prompts: pass@k for k = 1, 2, 4, ..., n, avg@n, maj@n, distinct correct, and
    with `diversity` the semantic and formula diversity of all samples and of the correct ones (the same
    D_emb / D_eq as DSDR; MiniLM loaded once per process, unique texts encoded once). With an
    `entropy_model` (the policy, as an HF model) also the mean token entropy of the policy on its own
    samples. With several ranks each samples its share of prompts and the per-prompt results are
    gathered, so every rank returns the same numbers.
    """
    world, rank = (dist.world, dist.rank) if dist is not None else (1, 0)
    torch.manual_seed(seed + rank)
    mine = examples[rank::world]
    sharded = dist is not None and getattr(dist, "fsdp", False)  # FSDP2: every rank must take part
    extra = {"top_k": top_k} if top_k else {}  # (rollouts without top-k support still work without it)
    raw = sample_and_verify(rollout, tokenizer, mine, n, answer_mode, generate=bool(mine) or sharded,
                            temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, **extra)
    prompt_ids, responses, texts, results = raw["prompt_ids"], raw["responses"], raw["texts"], raw["results"]
    per_problem = [problem_metrics(results[i * n:(i + 1) * n], ex, texts[i * n:(i + 1) * n])
                   for i, ex in enumerate(mine)]
    if diversity and texts:
        z = get_encoder().encode(texts)
        formula_sets = [extract_formulas(t) for t in texts]
        for i, p in enumerate(per_problem):
            rows = slice(i * n, (i + 1) * n)
            correct = [r.correct for r in results[rows]]
            p["semantic_diversity"], p["formula_diversity"] = group_diversity(z[rows], formula_sets[rows])
            p["semantic_diversity_correct"], p["formula_diversity_correct"] = \
                group_diversity(z[rows], formula_sets[rows], correct)
    if entropy_model is not None and (responses or sharded):
        sums, counts = sample_entropy(entropy_model, [p for p in prompt_ids for _ in range(n)], responses,
                                      tokenizer.pad_token_id, tokenizer.eos_token_id, temperature, dist=dist)
        for i, p in enumerate(per_problem):
            p["entropy_sum"], p["entropy_tokens"] = sum(sums[i * n:(i + 1) * n]), sum(counts[i * n:(i + 1) * n])
    if dist is not None and dist.enabled:
        per_problem = [p for part in dist.gather_objects(per_problem) for p in part]
    out = aggregate_metrics(per_problem)
    out["sampling"] = {"temperature": temperature, "top_p": top_p, "n": n, "max_new_tokens": max_new_tokens,
                       "seed": seed, **extra}
    return out


# ====================================================================================================
# Reporting one evaluation: the pass@k figure, the table, flat metrics for metrics.jsonl
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


def format_table(result: dict) -> str:
    s = result["sampling"]
    lines = [f"problems={result['n_problems']}  n={s['n']}  T={s['temperature']}  top_p={s['top_p']}",
             f"avg@{s['n']} (= pass@1) {result['avg_at_n']:.4f}   maj@{s['n']} {result['maj_at_n']:.4f}   "
             f"distinct correct {result['distinct_correct']:.2f} "
             f"({result['distinct_correct_on_solvable']:.2f} on solvable)",
             "k       " + " ".join(f"{k:>7}" for k in result["pass_at_k"]),
             "pass@k  " + " ".join(f"{v:7.4f}" for v in result["pass_at_k"].values())]
    if "semantic_diversity" in result:
        lines.append(f"semantic diversity {result['semantic_diversity']:.4f} (correct only "
                     f"{result['semantic_diversity_correct']:.4f})   formula diversity "
                     f"{result['formula_diversity']:.4f} (correct only {result['formula_diversity_correct']:.4f})")
    if "token_entropy" in result:
        lines.append(f"token entropy {result['token_entropy']:.4f} nats")
    return "\n".join(lines)


def flat_metrics(result: dict, prefix: str = "eval/") -> dict:
    """An evaluation result as flat scalars for metrics.jsonl: pass@k as `pass@K` keys, nested dicts
    (sampling parameters) left out."""
    out = {f"{prefix}{k}": v for k, v in result.items() if isinstance(v, (int, float))}
    out.update({f"{prefix}pass@{k}": v for k, v in result.get("pass_at_k", {}).items()})
    return out


# ====================================================================================================
# Command line
# ====================================================================================================


# The papers' evaluation settings (specs/*.md, "evaluation" rows). `--protocol NAME` sets them; a flag given
# explicitly wins. Everything else (benchmarks, max length for the model) is chosen on the command line.
EVAL_DEFAULTS = {"n": 32, "temperature": 1.0, "top_p": 1.0, "top_k": 0, "max_new_tokens": None}
PROTOCOLS = {
    # DSDR Table 1 / §4.1: Avg@16 at T = 0.7, top-p 0.9; Pass@1 from one sample at T = 0.1; Fig. 3 pass@k
    # for k = 2..64 from 64 samples (the paper states T only for Avg@16; we reuse T = 0.7, top-p 0.9)
    "dsdr-avg16": {"n": 16, "temperature": 0.7, "top_p": 0.9},
    "dsdr-pass1": {"n": 1, "temperature": 0.1, "top_p": 0.9},
    "dsdr-passk": {"n": 64, "temperature": 0.7, "top_p": 0.9},
    # Lp-Reg §5.1.3: AIME24/25 as the mean of 16 samples at T = 0.6; MATH-500, OlympiadBench, Minerva greedy
    "lpreg-aime": {"n": 16, "temperature": 0.6, "top_p": 1.0},
    "lpreg-greedy": {"n": 1, "temperature": 0.0, "top_p": 1.0},
    # SENT's evaluation configs: T = 1.0, top-p 0.9, top-k 50, up to 8,000 tokens; Avg@k / Pass@k, k ≤ 32
    "sent": {"n": 32, "temperature": 1.0, "top_p": 0.9, "top_k": 50, "max_new_tokens": 8000},
}


def resolve_model(model: str) -> str:
    """A run folder → its latest checkpoint; anything else is passed to from_pretrained (or "toy")."""
    path = Path(model)
    if (path / "checkpoints").is_dir():
        ckpt = latest_checkpoint(path)
        if ckpt is None:
            raise ConfigError(f"run folder {model} has no checkpoint yet: train it first (or pass a "
                              f"model folder)")
        return str(ckpt)
    return model


def prepare_out(out: Path) -> None:
    """Create the output folder and check that a file can be written there, before any model is loaded:
    an --out that is a file or read-only must not fail after the whole evaluation and lose it."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".eval_write_test_{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"--out {out} is not a writable folder ({e.strerror or e}): choose another "
                          f"--out") from None


def main(argv=None) -> int:
    """eval.py ...: bad input is one line on stderr ("error: ... "), exit code 2."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        return evaluate_main(argv)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def evaluate_main(argv: list[str]) -> int:
    parser = OneLineParser(description="pass@k / avg@n / maj@k / distinct correct of a policy")
    parser.add_argument("--model", required=True, help="run folder, 'toy', hub name or local model folder")
    parser.add_argument("--dataset", default="countdown",
                        help="countdown, a hub dataset (known aliases: " + ", ".join(
                            a for aliases, *_ in KNOWN_DATASETS.values() for a in aliases[:1]) +
                        ") or a local .jsonl/.parquet file")
    parser.add_argument("--dataset-config", default=None, help="a hub dataset's config name")
    parser.add_argument("--split", default="heldout",
                        help="countdown: heldout (default) or train; a hub dataset: one of its splits")
    parser.add_argument("--protocol", default=None, choices=sorted(PROTOCOLS),
                        help="a paper's sampling settings (explicit flags below override them)")
    parser.add_argument("--n", type=int, default=None, help="samples per problem (default 32)")
    parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N problems")
    parser.add_argument("--temperature", type=float, default=None, help="default 1.0; 0 = greedy")
    parser.add_argument("--top-p", type=float, default=None, help="default 1.0")
    parser.add_argument("--top-k", type=int, default=None, help="default 0 (off)")
    parser.add_argument("--max-new-tokens", type=int, default=None)
    parser.add_argument("--prompt-template", default="auto", choices=PROMPT_TEMPLATES)
    parser.add_argument("--rollout", default="hf", choices=ROLLOUTS,
                        help="vllm: sample with a vLLM engine (no HF copy of the model: no token entropy)")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.85, help="vLLM on CUDA")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--answer-mode", default=verifier.DEFAULT_MATH_MODE, choices=verifier.MATH_MODES,
                        help="math answers: math-verify's extraction (default) or strict (needs \\boxed{}, "
                             "'Answer:' or '####')")
    parser.add_argument("--out", default=None, help="output folder (default: the run folder or eval_out/)")
    parser.add_argument("--no-diversity", dest="diversity", action="store_false",
                        help="skip semantic (MiniLM) and formula diversity")
    args = parser.parse_args(argv)
    sampling = {**EVAL_DEFAULTS, **PROTOCOLS.get(args.protocol, {}),
                **{k: v for k in EVAL_DEFAULTS if (v := getattr(args, k)) is not None}}
    # every check before the model loads (ConfigError: one line, exit code 2)
    if sampling["n"] < 1:
        raise ConfigError(f"--n must be >= 1 (samples per problem), got {sampling['n']}")
    temperature = sampling["temperature"]
    if not (temperature == 0 or MIN_TEMPERATURE <= temperature < float("inf")):
        raise ConfigError(f"--temperature must be 0 (greedy) or >= {MIN_TEMPERATURE} (logits / T "
                          f"overflows float32 as T -> 0), got {temperature}")
    if not 0 < sampling["top_p"] <= 1:
        raise ConfigError(f"--top-p must be in (0, 1], got {sampling['top_p']}")
    if sampling["top_k"] < 0:
        raise ConfigError(f"--top-k must be >= 0 (0 = off), got {sampling['top_k']}")
    if sampling["max_new_tokens"] is not None and sampling["max_new_tokens"] < 1:
        raise ConfigError(f"--max-new-tokens must be >= 1, got {sampling['max_new_tokens']}")
    if args.limit is not None and args.limit < 1:
        raise ConfigError(f"--limit must be >= 1 (omit it to evaluate every problem), got {args.limit}")
    if not 0 < args.gpu_memory_utilization <= 1:
        raise ConfigError(f"--gpu-memory-utilization must be in (0, 1], got {args.gpu_memory_utilization}")
    model_path = resolve_model(args.model)
    check_model_path(model_path)
    cfg = resolve_defaults(TrainConfig(
        model=args.model if args.model == TOY else model_path, dataset=args.dataset,
        dataset_config=args.dataset_config, max_new_tokens=sampling["max_new_tokens"],
        temperature=sampling["temperature"] or 1.0, top_p=sampling["top_p"], rollout=args.rollout,
        prompt_template=args.prompt_template, vllm_gpu_memory_utilization=args.gpu_memory_utilization))
    if args.rollout == "vllm":
        check_vllm()
    examples = load_prompts(cfg, split=args.split)
    out = Path(args.out) if args.out else (Path(args.model) if Path(args.model, "checkpoints").is_dir()
                                           else Path("eval_out"))
    prepare_out(out)
    examples = examples[: args.limit] if args.limit else examples
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.rollout == "vllm":  # the engine alone: no second copy of the weights in memory
        from transformers import AutoTokenizer

        path = resolve_model_path(cfg.model)
        tokenizer, model = AutoTokenizer.from_pretrained(path), None
        rollout = VLLMRollout(None, tokenizer, cfg, device, model_path=path)
    else:
        model, tokenizer = load_policy(model_path, device)
        rollout = HFRollout(model, tokenizer, cfg, device)
    examples = render_prompts(examples, tokenizer, args.prompt_template)
    check_prompt_lengths(examples, tokenizer, cfg, getattr(getattr(model, "config", None),
                                                           "max_position_embeddings", None))
    greedy = sampling["temperature"] == 0
    result = evaluate_policy(rollout, tokenizer, examples, sampling["n"], sampling["temperature"],
                             sampling["top_p"], cfg.max_new_tokens, seed=args.seed, diversity=args.diversity,
                             entropy_model=None if greedy else model, top_k=sampling["top_k"],
                             answer_mode=args.answer_mode)
    result.update({"model": args.model, "dataset": args.dataset, "protocol": args.protocol,
                   "rollout": args.rollout, "prompt_template": args.prompt_template})
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(result, indent=2))
    plot_passk(result, out / "passk.png", label=args.model)
    print(format_table(result))
    print(f"wrote {out / 'eval.json'} and {out / 'passk.png'}")
    rollout.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
