"""eval.py — how good and how diverse a policy's samples are, from one sampling run.

    python eval.py --model runs/grpo-s0 --dataset countdown --n 32      # a run folder (latest checkpoint)
    python eval.py --model toy --n 32                                    # the warm-start toy model
    python eval.py --model Qwen/Qwen2.5-Math-1.5B --dataset data.jsonl --n 64 --temperature 0.7

It writes eval.json and passk.png into --out and prints a short table: unbiased pass@k for k = 1, 2, 4,
..., n, avg@n, maj@n, distinct correct solutions and their effective number (exp of the entropy of the
correct samples' solution distribution), semantic and formula diversity (all samples and correct ones), and
the policy's token entropy on its own samples. eval.json also keeps a compact per-prompt record
(`per_prompt`), so that two methods' runs can be compared prompt by prompt with the bootstrap intervals
of the Statistics section (bootstrap_difference: resampling prompts and seeds). Every number is reported with the
sampling parameters that produced it (temperature, top_p, n, k), as the grpo spec §8 asks.
The diversity metrics are DSDR's D_emb and D_eq (imported from dsdr.py). Comparing run folders and the
methods × seeds study on the toy are in study.py.
"""

from __future__ import annotations

import json
import os
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import torch

import verifier
from config import (MIN_TEMPERATURE, PROMPT_TEMPLATES, ROLLOUTS, ConfigError, OneLineParser, TrainConfig, is_toy,
                    check_model_path, check_vllm, resolve_defaults)
from data import KNOWN_DATASETS, check_prompt_lengths, collate, load_prompts, render_prompts
from distributed import set_torch_threads
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


def effective_solutions(identities: list) -> float:
    """The effective number of solutions among one prompt's correct samples: exp of the Shannon entropy
    (natural log) of the distribution of their solution identities (solution_identity), i.e. the Hill
    number of order 1.

    1 when every correct sample is the same solution, K when K solutions are equally frequent, and in
    between when they are not: [a, a, a, b] gives exp(H(3/4, 1/4)) ≈ 1.755, where distinct_correct says 2.
    It counts solutions weighted by how often the policy finds them, so a rare second solution adds little.
    No correct sample gives 0: nothing solved = no solution (not 1, which would mean "one solution").
    """
    if not identities:
        return 0.0
    counts = np.fromiter(Counter(identities).values(), dtype=np.float64)
    p = counts / counts.sum()
    return float(np.exp(-(p * np.log(p)).sum()))


def problem_metrics(results: list, example: dict, texts: list[str] | None = None) -> dict:
    """Per-problem correctness metrics; `texts` (the decoded samples) are needed for math problems'
    distinct-correct count and effective number of solutions (see solution_identity)."""
    n = len(results)
    c = sum(r.correct for r in results)
    task = example.get("task", "math")
    texts = texts if texts is not None else [r.answer or "" for r in results]
    identities = [solution_identity(r, t, task) for r, t in zip(results, texts) if r.correct]
    return {
        "n": n, "c": c,
        "distinct_correct": len(set(identities)),
        "effective_solutions": effective_solutions(identities),
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
    """Means over prompts of problem_metrics dicts; "…_on_solvable": over the prompts with c > 0 only."""
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
    if "effective_solutions" in per_problem[0]:  # (0 on unsolved prompts: the first mean counts them as 0)
        out["effective_solutions"] = float(np.mean([p["effective_solutions"] for p in per_problem]))
        out["effective_solutions_on_solvable"] = \
            float(np.mean([p["effective_solutions"] for p in solvable])) if solvable else 0.0
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
                   temperature: float, token_budget: int = 4096, dist=None) -> tuple[list[float], list[int]]:
    """Per sample: the sum over its tokens of the policy's entropy H(π(·|context)/T) and its token count,
    from one no-grad forward of (prompt, response) in micro-batches (forward.no_grad_fields), packed
    longest first. The budget is smaller than training's: an evaluation has thousands of samples of
    varied length, and on CPU 4,096-token forwards with little padding were the fastest (toy, 32 prompts
    × 64 samples, 2 cores: 1.83 s against 2.38 s at 16,384 tokens in batch order); no value depends on it."""
    if not responses:  # (under FSDP2 the other ranks' forwards are still matched)
        batch = collate([[pad_id]], [[eos_id]], pad_id, eos_id)
        no_grad_fields(model, batch, [], temperature, {"entropy"}, token_budget, dist=dist, pad_id=pad_id)
        return [], []
    batch = collate(prompt_ids, responses, pad_id, eos_id)
    entropy = no_grad_fields(model, batch, list(range(len(responses))), temperature, {"entropy"}, token_budget,
                             dist=dist, pad_id=pad_id)["entropy"]
    sums = (entropy * batch["response_mask"]).sum(-1).double()
    return sums.tolist(), batch["lengths"].tolist()


def restore_order(parts: list[list]) -> list:
    """Undo the round-robin split of evaluate_policy: rank r of W = len(parts) evaluated examples r, r + W,
    r + 2W, ... (examples[rank::world]), and `parts` is every rank's list in rank order (gather_objects).
    Returns the items in the original example order, the same for every world size."""
    world = len(parts)
    total = sum(len(part) for part in parts)
    out = [None] * total
    for rank, part in enumerate(parts):
        if len(part) != len(range(rank, total, world)):
            raise ValueError(f"rank {rank} holds {len(part)} items; a round-robin split of {total} items over "
                             f"{world} ranks gives it {len(range(rank, total, world))}")
        out[rank::world] = part
    return out


# The per-prompt record of an evaluation (`result["per_prompt"]`): compact lists in the example order, for
# comparisons prompt by prompt (per_prompt_values, bootstrap_difference). The entropy lists only when the
# token entropy was computed.
PER_PROMPT_KEYS = ("id", "c", "distinct_correct", "effective_solutions", "entropy_sum", "entropy_tokens")


def per_prompt_record(per_problem: list[dict], n: int) -> dict:
    """`result["per_prompt"]` from problem_metrics dicts in example order (each with its "id")."""
    record = {"n": n}
    for key in PER_PROMPT_KEYS:
        if key in per_problem[0]:
            record[key] = [p[key] for p in per_problem]
    return record


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

    `out["per_prompt"]` keeps, per prompt in the order of `examples` (whatever the world size), its id
    (the example's "id", else its index), c, distinct_correct, effective_solutions and, with the entropy,
    entropy_sum / entropy_tokens, plus n: see per_prompt_values and the bootstrap intervals.
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
    for i, (p, ex) in enumerate(zip(per_problem, mine)):
        p["id"] = ex.get("id", rank + i * world)  # (its index in `examples` when it has no id)
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
    if dist is not None and dist.enabled:  # rank-interleaved → the example order
        per_problem = restore_order(dist.gather_objects(per_problem))
    out = aggregate_metrics(per_problem)
    out["sampling"] = {"temperature": temperature, "top_p": top_p, "n": n, "max_new_tokens": max_new_tokens,
                       "seed": seed, **extra}
    out["per_prompt"] = per_prompt_record(per_problem, n)
    return out


# ====================================================================================================
# Statistics: per-prompt values and bootstrap confidence intervals over prompts and seeds
# ====================================================================================================
#
# "Method A trains a better policy than method B" is a claim about two sources of chance: which held-out
# prompts we happened to evaluate on (prompt-to-prompt variation: some prompts are easy, some hard, and a
# few hundred of them are a sample), and which training run we happened to get (seed-to-seed variation:
# two seeds of one method can end at quite different policies). An interval over prompts alone treats one
# training run as if it were the method, and understates the uncertainty of the comparison; an interval
# over seeds alone (mean ± std of a handful of runs) ignores that every run was scored on the same finite
# prompt set. The bootstrap below resamples both: in each replicate the prompts once, with replacement,
# and the SAME prompt indices for both arms (both arms are scored on the same prompts, so the comparison is
# paired: a hard prompt lowers both arms and cancels in the difference), and the seeds of each arm with
# replacement, independently per arm (the runs of A and of B are independent). The statistic is the mean
# over the resampled seeds × resampled prompts; the interval is the percentile interval of the replicates.
#
# Seeds and prompts are crossed (every seed is scored on every prompt), and resampling rows and columns
# independently is Owen's (2007) "pigeonhole bootstrap". It is mildly conservative: the seed × prompt
# interaction noise (including the sampling noise of the n samples per prompt) is counted up to three
# times in the replicates' variance instead of once, so with several seeds and little systematic
# seed or prompt effect the interval is up to √3 times too wide; a too-wide interval is the safe side.
# With one seed per arm the seed level contributes nothing, and the interval covers prompt sampling only:
# it then says how sure we are about these two training runs on this prompt population, not about the
# methods.


def per_prompt_values(result: dict, metric: str, k: int | None = None) -> np.ndarray:
    """One value per prompt (in the evaluation's example order) from an evaluation's per-prompt record.

    `result`: an evaluate_policy result (or eval.json / summary.json read back), or its "per_prompt"
    dict. metric: "pass@k" (the unbiased pass_at_k(n, c, k); give k, or write it in: "pass@8"), "pass@1"
    (= c/n), "distinct_correct", "effective_solutions", "token_entropy" (entropy_sum / entropy_tokens: the
    mean entropy per token of the prompt's samples; nan where they have no token).
    """
    record = result.get("per_prompt", result)
    if "c" not in record or "n" not in record:
        raise ValueError("this evaluation has no per-prompt record (result['per_prompt']): re-evaluate with "
                         "the current eval.py")
    n, c = int(record["n"]), [int(x) for x in record["c"]]
    if metric.startswith("pass@"):
        if metric != "pass@k":
            k = int(metric[len("pass@"):])
        if k is None:
            raise ValueError("pass@k needs k (per_prompt_values(result, 'pass@k', k=8) or 'pass@8')")
        return np.array([pass_at_k(n, ci, k) for ci in c], dtype=np.float64)
    if metric in ("distinct_correct", "effective_solutions"):
        return np.asarray(record[metric], dtype=np.float64)
    if metric == "token_entropy":
        if "entropy_sum" not in record:
            raise ValueError("this evaluation has no token entropy (evaluate_policy without entropy_model)")
        sums = np.asarray(record["entropy_sum"], dtype=np.float64)
        tokens = np.asarray(record["entropy_tokens"], dtype=np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(tokens > 0, sums / np.where(tokens > 0, tokens, 1.0), np.nan)
    raise ValueError(f"unknown per-prompt metric {metric!r}: pass@k, pass@1, distinct_correct, "
                     f"effective_solutions or token_entropy")


def per_prompt_matrix(results: list[dict], metric: str, k: int | None = None) -> np.ndarray:
    """[seeds, prompts]: per_prompt_values of several evaluations (one per seed) of the same prompts, for
    bootstrap_mean / bootstrap_difference; refuses evaluations whose prompt ids differ (not aligned)."""
    if not results:
        raise ValueError("per_prompt_matrix needs at least one evaluation")
    ids = [list(r.get("per_prompt", r).get("id", [])) for r in results]
    if any(i != ids[0] for i in ids[1:]):
        raise ValueError("the evaluations are not of the same prompts in the same order (their per-prompt ids "
                         "differ): evaluate every run on the same held-out prompts")
    return np.stack([per_prompt_values(r, metric, k) for r in results])


def _as_seeds_by_prompts(values, name: str) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    if values.ndim == 1:  # one seed
        values = values[None, :]
    if values.ndim != 2 or values.shape[0] < 1 or values.shape[1] < 1:
        raise ValueError(f"{name} must be [seeds, prompts] with at least one of each, got shape {values.shape}")
    return values


def _check_bootstrap_args(n_boot: int, level: float) -> None:
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")


def _resampled_means(values: np.ndarray, seed_counts: np.ndarray, prompt_counts: np.ndarray) -> np.ndarray:
    """The nanmean over resampled seeds × resampled prompts, one per replicate, from how often each seed
    (seed_counts [B, S]) and each prompt (prompt_counts [B, P]) was drawn: a resampled cell (s, p) appears
    seed_counts[s] · prompt_counts[p] times, so the mean is a weighted mean over the original cells, with
    nan cells left out of both sums (nan when a replicate drew no defined cell)."""
    defined = ~np.isnan(values)
    total = (seed_counts @ np.where(defined, values, 0.0) * prompt_counts).sum(1)
    weight = (seed_counts @ defined.astype(np.float64) * prompt_counts).sum(1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(weight > 0, total / np.where(weight > 0, weight, 1.0), np.nan)


def _bootstrap_replicates(arms: list[np.ndarray], n_boot: int, seed: int) -> list[np.ndarray]:
    """Per arm, n_boot resampled means: prompts drawn once per replicate for all arms (paired), seeds
    drawn per arm. Vectorised over replicates in chunks of about 4M cells."""
    rng = np.random.default_rng(seed)
    n_prompts = arms[0].shape[1]
    chunk = max(1, min(n_boot, 4_000_000 // n_prompts))
    out = [[] for _ in arms]
    for start in range(0, n_boot, chunk):
        b = min(chunk, n_boot - start)
        prompt_counts = rng.multinomial(n_prompts, np.full(n_prompts, 1.0 / n_prompts), size=b).astype(np.float64)
        for i, values in enumerate(arms):
            n_seeds = values.shape[0]
            seed_counts = rng.multinomial(n_seeds, np.full(n_seeds, 1.0 / n_seeds), size=b).astype(np.float64)
            out[i].append(_resampled_means(values, seed_counts, prompt_counts))
    return [np.concatenate(parts) for parts in out]


def _percentiles(replicates: np.ndarray, level: float) -> tuple[float, float]:
    tail = 100.0 * (1.0 - level) / 2.0
    with np.errstate(all="ignore"):
        lo, hi = np.nanpercentile(replicates, [tail, 100.0 - tail]) if np.isfinite(replicates).any() \
            else (np.nan, np.nan)
    return float(lo), float(hi)


def bootstrap_mean(values, n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> dict:
    """The mean of a per-prompt metric over seeds and prompts, with a bootstrap percentile interval.

    values: [seeds, prompts] (a 1-D array is one seed), e.g. per_prompt_matrix(results, "pass@1").
    Each of n_boot replicates resamples the prompts and the seeds with replacement (the two levels, see
    the section comment: prompt-to-prompt and seed-to-seed variation both matter) and takes the mean over
    the resampled seeds × prompts. With one seed the interval covers prompt sampling only. nan values
    (e.g. token entropy of a prompt without tokens) are left out: the mean and every replicate are
    nanmeans over the cells. Returns {mean, lo, hi, n_seeds, n_prompts}; numpy Generator seeded by
    `seed`, so the interval is deterministic.
    """
    _check_bootstrap_args(n_boot, level)
    values = _as_seeds_by_prompts(values, "values")
    (replicates,) = _bootstrap_replicates([values], n_boot, seed)
    lo, hi = _percentiles(replicates, level)
    with np.errstate(all="ignore"):
        mean = float(np.nanmean(values)) if (~np.isnan(values)).any() else float("nan")
    return {"mean": mean, "lo": lo, "hi": hi, "n_seeds": values.shape[0], "n_prompts": values.shape[1]}


def bootstrap_difference(treatment, control, n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> dict:
    """Treatment minus control of a per-prompt metric, with a paired two-level bootstrap interval.

    treatment, control: [seeds, prompts] (seed counts may differ; a 1-D array is one seed) of the same
    metric on the SAME held-out prompts, columns aligned (per_prompt_matrix checks the ids). Each of n_boot
    replicates draws the prompts once with replacement, the same indices for both arms (paired: both arms
    saw the same prompts, so prompt difficulty cancels in the difference), and the seeds of each arm with
    replacement, independently per arm (independent training runs); its statistic is the mean over
    (resampled seeds, resampled prompts) of treatment minus the same for control. Resampling prompts alone
    would treat each run as the method and understate the uncertainty of "A trains better than B"; with
    one seed per arm the seed level contributes nothing and the interval covers prompt sampling only.
    `diff` is nanmean(treatment) − nanmean(control) over all cells; [lo, hi] the percentile interval at
    `level`. nan values are left out of every mean (nanmean; a replicate in which an arm has no defined
    cell is dropped from the percentiles). Deterministic for a fixed `seed` (numpy Generator).
    Returns {diff, lo, hi, n_seeds_t, n_seeds_c, n_prompts}.
    """
    _check_bootstrap_args(n_boot, level)
    treatment = _as_seeds_by_prompts(treatment, "treatment")
    control = _as_seeds_by_prompts(control, "control")
    if treatment.shape[1] != control.shape[1]:
        raise ValueError(f"treatment has {treatment.shape[1]} prompts and control {control.shape[1]}: the arms "
                         f"must be scored on the same prompts, columns aligned")
    rep_t, rep_c = _bootstrap_replicates([treatment, control], n_boot, seed)
    lo, hi = _percentiles(rep_t - rep_c, level)
    with np.errstate(all="ignore"):
        diff = float(np.nanmean(treatment) - np.nanmean(control)) \
            if (~np.isnan(treatment)).any() and (~np.isnan(control)).any() else float("nan")
    return {"diff": diff, "lo": lo, "hi": hi, "n_seeds_t": treatment.shape[0], "n_seeds_c": control.shape[0],
            "n_prompts": treatment.shape[1]}


# (metric of per_prompt_values, title) compared between a run and its same-base control
COMPARED = (("pass@1", "pass@1"), ("pass@kmax", "pass@{kmax}"), ("distinct_correct", "distinct correct / prompt"),
            ("effective_solutions", "effective solutions / prompt"), ("token_entropy", "token entropy (nats)"))


def comparison_table(result: dict, control: dict, label: str, control_label: str, n_boot: int = 2000) -> str:
    """A run's held-out evaluation next to its same-base control's (the same prompts): per metric both
    means and the difference with its 95 % bootstrap interval over prompts (one seed each, so the interval
    covers prompt sampling, not seed-to-seed training noise: a study with several seeds settles that).
    `train.py --with-control` prints it at the end of a run (`make train` does)."""
    kmax = min(int(result["n_samples"]), int(control["n_samples"]))
    lines = [f"| held-out, {result['n_problems']} prompts × {kmax} samples | {label} | {control_label} | "
             f"difference [95 % CI] |", "|---|---|---|---|"]
    for metric, title in COMPARED:
        name, k = ("pass@k", kmax) if metric == "pass@kmax" else (metric, None)
        try:
            a, b = per_prompt_values(result, name, k), per_prompt_values(control, name, k)
        except ValueError:  # e.g. no token entropy in this evaluation
            continue
        d = bootstrap_difference(a, b, n_boot=n_boot)
        mark = " *" if d["lo"] > 0 or d["hi"] < 0 else ""
        lines.append(f"| {title.format(kmax=kmax)} | {np.nanmean(a):.3f} | {np.nanmean(b):.3f} | "
                     f"{d['diff']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}]{mark} |")
    return "\n".join(lines) + ("\n\n* the interval excludes 0. One seed each: the interval covers the held-out "
                               "prompts only; docs/studies/toy has 3 seeds per setting.\n")



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
             f"({result['distinct_correct_on_solvable']:.2f} on solvable)"
             + (f"   effective solutions {result['effective_solutions']:.2f} "
                f"({result['effective_solutions_on_solvable']:.2f} on solvable)"
                if "effective_solutions" in result else ""),
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
    """An evaluation result as flat scalars for metrics.jsonl: pass@k as `pass@K` keys, nested dicts and
    lists (sampling parameters, the per-prompt record) left out."""
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
    parser.add_argument("--model", required=True, help="run folder, 'toy' / 'toy-numbers', hub name or local model folder")
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
        model=args.model if is_toy(args.model) else model_path, dataset=args.dataset,
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
    set_torch_threads()  # this process's share of the CPUs (distributed.py)
    sys.exit(main())
