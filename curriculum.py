"""SENT: a semantic-entropy curriculum (data) + tiered KL on low-entropy tokens (algorithm).

Read beside: Cao, Bai, Peng, Wang, Yang, Huo, Zhang, Gao, "Efficient Reinforcement Learning with Semantic
and Token Entropy for LLM Reasoning", arXiv 2512.04359 (official code: zldscr0/SENT, a verl fork; the
loss is `compute_policy_loss_low_entropy_kl_cov_v2` in verl/trainer/ppo/core_algos.py). The paper's
equation numbers are not reproduced in our spec (../shared/specs/sent.md), so comments cite the spec's
sections (§1–§4) and Decisions (S1–S11).

The idea. RLVR collapses the policy's entropy, and with it exploration. SENT attacks this at two scales:

  1. data (§1–§2): before training, sample M answers per prompt from the initial policy π_0, cluster
     them by answer equivalence and compute the semantic entropy SE(q) of the answer distribution.
     Low SE = the model already agrees with itself ("easy"). Train stage by stage from low to high SE;
  2. tokens (§3–§4): in each optimisation batch, anchor the 80 % *lowest-entropy* tokens to π_ref with a
     k3 KL (β_low = 0.05), and more strongly (β_high = 0.2) the few of them whose KL-Cov covariance
     (logp − μ)(A − μ_A) is largest: confident tokens with high advantage, the ones that drive the
     collapse (Cui et al. 2025: ΔH ≈ −η Cov(log π, π·A)). The 20 % high-entropy "forking" tokens stay free.

        ℓ_t = −min(ρ_t A_t, clip(ρ_t, 0.8, 1.2) A_t) + β_t · k3_t,    L = token-mean(ℓ)          (§4)

Both parts are on by default for `--method sent` and each works alone:
  * algorithm only:  --method sent --no-se-curriculum
  * data only:       --method grpo --curriculum semantic-entropy  (any method, e.g. dsdr), or
                     --method sent --beta-high 0 --beta-low 0 (then the loss is GRPO's token-mean, exactly)
  * release loss:    --method sent --release-compat  (S1; see `release_token_loss` for its two defects).

This file has four parts: pure functions (SE, clustering, stage split, token sets, per-token losses),
the curriculum sampler, the cached offline SE pass with π_0, and the `SENT` method.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import verifier
from data import collate
from distributed import rng_state, set_rng_state, set_seed
from forward import no_grad_fields
from grpo import GRPOConfig, Method, Normaliser, aggregate, clipped_surrogate, k3_kl
from rollout import HFRollout, load_policy, resolve_model_path, sample_and_verify

SE_WEIGHTS = ("prob", "count")
STAGE_SPLITS = ("quantile", "threshold")
SCOPES = ("batch", "microbatch")
COV_CENTRES = ("low", "all")
RELEASE_RHO_COV = 0.0002  # the release's covariance fraction (per micro-batch of 4 sequences)
RELEASE_EXTRA_KL = 0.001  # the release's extra k3 to π_ref on every valid token


# ====================================================================================================
# Hyperparameters (spec Defaults; sources noted)
# ====================================================================================================
@dataclass
class CurriculumConfig:
    """The data side (§1–§2). Any method can use it via `--curriculum semantic-entropy` (with these
    defaults); under `--method sent` every field is also a CLI flag."""

    se_samples: int = 8  # M: project decision (= the training G; the paper's M is not reported)
    se_weights: str = "prob"  # S2: "prob" w_m = exp(mean token log-prob) | "count" w_m = 1
    none_as_singletons: bool = False  # S3: unparseable answers share one cluster (default) or not
    n_stages: int = 2  # N: official code (two stage scripts)
    stage_split: str = "quantile"  # S5: equal-size stages (project decision) | "threshold"
    stage_thresholds: list | None = None  # S5 switch: [t_1, ..., t_{N-1}], stage s = t_s ≤ SE < t_{s+1}
    stage_steps: list | None = None  # S6 switch: explicit stage lengths in steps; None = equal shares
    # Compute SE for the first n prompts only and train on those (tests, quick looks); None = all.
    se_max_prompts: int | None = None

    def __post_init__(self):
        if self.se_samples < 2:
            raise ValueError(f"se_samples (M) must be >= 2 for a semantic entropy, got {self.se_samples}")
        if self.se_weights not in SE_WEIGHTS:
            raise ValueError(f"se_weights must be 'prob' or 'count', got {self.se_weights!r}")
        if self.n_stages < 1:
            raise ValueError(f"n_stages must be >= 1, got {self.n_stages}")
        if self.stage_split not in STAGE_SPLITS:
            raise ValueError(f"stage_split must be 'quantile' or 'threshold', got {self.stage_split!r}")
        if self.stage_split == "threshold" and len(_as_list(self.stage_thresholds)) != self.n_stages - 1:
            raise ValueError(f"stage_split='threshold' needs n_stages-1 = {self.n_stages - 1} stage_thresholds")
        if self.stage_steps is not None and (len(_as_list(self.stage_steps)) != self.n_stages
                                             or min(_as_list(self.stage_steps)) < 1
                                             or any(int(s) != s for s in _as_list(self.stage_steps))):
            raise ValueError(f"stage_steps must list {self.n_stages} positive whole stage lengths, "
                             f"got {self.stage_steps}")
        if self.se_max_prompts is not None and self.se_max_prompts < self.n_stages:
            raise ValueError(f"se_max_prompts must be >= n_stages ({self.n_stages}), got {self.se_max_prompts}")


@dataclass
class SENTConfig(CurriculumConfig, GRPOConfig):
    # --- the base (§4): clipped surrogate with symmetric ε = 0.2, token-mean (official code), no extra KL ---
    eps_low: float = 0.2  # paper: clipped objective; the value is a project decision
    eps_high: float = 0.2
    agg: str = "token-mean"  # official code
    adv_scale: str = "group"
    kl_coef: float = 0.0  # the base's uniform KL stays off: SENT's β_t replaces it
    # --- the token side (§3) ---
    low_frac: float = 0.8  # T_low = bottom 80 % of valid tokens by entropy (official code, hard-coded)
    rho_cov: float | None = None  # T_hc fraction of T_low; None: 0.002 (KL-Cov 7B value), 0.0002 under
    #                               release_compat (the release's value)
    beta_high: float = 0.2  # β on T_hc (official code: 0.1 × 2.0)
    beta_low: float = 0.05  # β on T_low \ T_hc (official code: 0.1 × 0.5)
    cov_center: str = "low"  # S9: centre the covariance over T_low (official code) | "all" valid tokens
    sent_scope: str | None = None  # S8: "batch" (global; default) | "microbatch" (release). None: batch,
    #                                or microbatch under release_compat
    release_compat: bool = False  # S1: reproduce the shipped loss (see release_token_loss)
    # --- the data side switches ---
    se_curriculum: bool = True  # the SE curriculum (§2); --no-se-curriculum = the token side alone
    stage_restart: bool = False  # S7: at each stage boundary π_ref ← current policy and a fresh optimiser

    def __post_init__(self):
        CurriculumConfig.__post_init__(self)  # the data side's ranges
        GRPOConfig.__post_init__(self)  # the base objective's ranges
        if not 0 < self.low_frac <= 1:
            raise ValueError(f"low_frac must be in (0, 1], got {self.low_frac}")
        if self.rho_cov is not None and not 0 <= self.rho_cov <= 1:
            raise ValueError(f"rho_cov must be in [0, 1], got {self.rho_cov}")
        if self.beta_high < 0 or self.beta_low < 0:
            raise ValueError("beta_high and beta_low must be >= 0")
        if self.cov_center not in COV_CENTRES:
            raise ValueError(f"cov_center must be 'low' or 'all', got {self.cov_center!r}")
        if self.sent_scope is not None and self.sent_scope not in SCOPES:
            raise ValueError(f"sent_scope must be 'batch' or 'microbatch', got {self.sent_scope!r}")
        if self.release_compat and self.agg != "token-mean":  # the release's loss is token-mean throughout
            raise ValueError(f"agg must be token-mean under release_compat (as in the release), got {self.agg!r}")

    @property
    def scope(self) -> str:
        return self.sent_scope or ("microbatch" if self.release_compat else "batch")

    @property
    def cov_fraction(self) -> float:
        if self.rho_cov is not None:
            return self.rho_cov
        return RELEASE_RHO_COV if self.release_compat else 0.002


def _as_list(x) -> list:
    """CLI values: "0.5" parses to a float, "2,2" to a list. Both mean a list here."""
    if x is None:
        return []
    return list(x) if isinstance(x, (list, tuple)) else [x]


# ====================================================================================================
# 1. Semantic entropy of one prompt (§1; S2–S4)
# ====================================================================================================


def answer_clusters(answers: list[str | None], task: str, none_as_singletons: bool = False) -> list[int]:
    """Cluster ids of M extracted answers by verifier answer equivalence (S4).

    Greedy in sample order: an answer joins the first cluster whose representative (first member) it
    matches under the symmetric closure verify(rep, a) or verify(a, rep) (`verifier.cluster_answers`;
    countdown: equal final values; math: math-verify). Unparseable answers (None) share one "none"
    cluster (S3, default). With `none_as_singletons` each of them is its own cluster instead: None is
    equivalent to nothing, so that is the default clustering with the "none" cluster split up.
    """
    ids = verifier.cluster_answers(answers, task)
    if none_as_singletons:
        fresh = max(ids, default=-1) + 1
        for m, a in enumerate(answers):
            if a is None:
                ids[m], fresh = fresh, fresh + 1
    return ids


def sample_weights(mean_logp, mode: str = "prob") -> np.ndarray:
    """w_m = exp((1/T_m) Σ_t log π_0(o_{m,t} | h_{m,t})) (S2 "prob"), or w_m = 1 ("count").

    The length-normalised probability, not exp(Σ log π): the raw product underflows for long answers and
    lets a single (short) sample take all the weight (spec Pitfalls).
    """
    mean_logp = np.asarray(mean_logp, dtype=np.float64)
    if mode == "count":
        return np.ones_like(mean_logp)
    if mode != "prob":
        raise ValueError(f"unknown se_weights {mode!r}")
    return np.exp(mean_logp)


def semantic_entropy(cluster_ids, weights=None) -> float:
    """SE = −Σ_k P_k ln P_k with P_k = Σ_{m∈C_k} w_m / Σ_m w_m (§1, natural log).

    0 for one cluster whatever the weights; ln K for K equally weighted clusters. Computed in float64.
    """
    ids = np.asarray(cluster_ids)
    w = np.ones(len(ids)) if weights is None else np.asarray(weights, dtype=np.float64)
    if len(ids) == 0 or w.sum() <= 0:
        return 0.0
    _, inverse = np.unique(ids, return_inverse=True)
    p = np.bincount(inverse, weights=w) / w.sum()
    p = p[p > 0]
    return float(max(0.0, -(p * np.log(p)).sum()))  # max: −0.0 / rounding below 0 for one cluster


# ====================================================================================================
# 2. The curriculum: stages (S5), their schedule (S6) and the sampler
# ====================================================================================================


def stage_split(se_values, n_stages: int = 2, mode: str = "quantile", thresholds=None) -> list[list[int]]:
    """Prompt indices of each stage D_1..D_N, each listed in ascending SE (ties in dataset order).

    quantile (S5 default): sort ascending with a stable sort, stage s = ranks [⌊s·n/N⌋, ⌊(s+1)·n/N⌋);
    sizes differ by at most 1. threshold: stage s = {q : t_s ≤ SE(q) < t_{s+1}}, t_0 = −∞, t_N = +∞
    (a stage may then be empty; the sampler refuses that).
    """
    se = np.asarray(se_values, dtype=np.float64)
    order = np.argsort(se, kind="stable")
    n = len(se)
    if mode == "quantile":
        return [[int(i) for i in order[(s * n) // n_stages:((s + 1) * n) // n_stages]] for s in range(n_stages)]
    if mode == "threshold":
        cuts = [-math.inf, *(float(t) for t in _as_list(thresholds)), math.inf]
        if len(cuts) != n_stages + 1 or any(a > b for a, b in zip(cuts, cuts[1:])):
            raise ValueError(f"need {n_stages - 1} ascending stage thresholds, got {thresholds}")
        return [[int(i) for i in order if cuts[s] <= se[i] < cuts[s + 1]] for s in range(n_stages)]
    raise ValueError(f"unknown stage_split {mode!r}; use one of {STAGE_SPLITS}")


def stage_starts(total_steps: int, n_stages: int, stage_steps=None) -> list[int]:
    """The first step (0-based) of each stage.

    Default (S6): equal shares, stage s starts at s·⌊total/N⌋ and the last stage takes the remainder
    (so with N = 2 the switch is exactly at step ⌊total/2⌋). `stage_steps` gives the lengths explicitly;
    past their sum the last stage simply continues.
    """
    if stage_steps is not None:
        lengths = [int(x) for x in _as_list(stage_steps)]
        return [int(x) for x in np.concatenate([[0], np.cumsum(lengths)[:-1]])]
    share = total_steps // n_stages
    return [s * share for s in range(n_stages)]


class CurriculumSampler:
    """The prompt order of the SE curriculum, with data.PromptSampler's interface.

    `set_step(step)` (called by the loop before each rollout) moves to the stage of that step; within a
    stage the prompts are shuffled per pass with a seeded permutation of (seed, stage, pass) and
    reshuffled on each new pass (official code: data.shuffle). The state (stage, pass, position) is
    checkpointed, so --resume continues bit-exactly, across a stage boundary too. Note that the default
    schedule depends on --steps: resuming with a different --steps moves the boundary; pass
    --stage-steps to pin it.
    """

    def __init__(self, stages: list[list[int]], starts: list[int], seed: int):
        if any(len(s) == 0 for s in stages):
            raise ValueError(f"every curriculum stage needs prompts; stage sizes {[len(s) for s in stages]}")
        self.stages, self.starts, self.seed = stages, starts, seed
        self.stage, self.epoch, self.pos = 0, 0, 0
        self._perm = self._permutation()

    def _permutation(self) -> np.ndarray:
        members = np.asarray(self.stages[self.stage])
        return members[np.random.default_rng([self.seed, self.stage, self.epoch]).permutation(len(members))]

    def stage_of(self, step: int) -> int:
        return max(s for s, start in enumerate(self.starts) if start <= step)

    def set_step(self, step: int) -> None:
        stage = self.stage_of(step)
        if stage != self.stage:  # a new stage starts its own first pass
            self.stage, self.epoch, self.pos = stage, 0, 0
            self._perm = self._permutation()

    def next_indices(self, k: int) -> list[int]:
        out: list[int] = []
        n = len(self._perm)
        while len(out) < k:
            if self.pos == n:
                self.epoch, self.pos = self.epoch + 1, 0
                self._perm = self._permutation()
            take = min(k - len(out), n - self.pos)
            out.extend(int(i) for i in self._perm[self.pos:self.pos + take])
            self.pos += take
        return out

    def state_dict(self) -> dict:
        return {"stage": self.stage, "epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.stage, self.epoch, self.pos = state["stage"], state["epoch"], state["pos"]
        self._perm = self._permutation()


# ====================================================================================================
# 3. The offline SE pass with π_0 (§1): batched, cached per prompt, resumable
# ====================================================================================================


def _cache_path(ctx, ccfg: CurriculumConfig) -> tuple[Path, dict]:
    """run_dir/se_cache/se-<hash>.jsonl, keyed by everything that changes the samples (spec Pitfalls)."""
    cfg = ctx.cfg
    key = {"model": resolve_model_path(cfg.model), "dataset": cfg.dataset, "split": cfg.split,
           "M": ccfg.se_samples, "seed": cfg.seed, "temperature": cfg.temperature, "top_p": cfg.top_p,
           "max_new_tokens": cfg.max_new_tokens, "chunk": cfg.gen_batch_prompts}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return Path(ctx.run_dir) / "se_cache" / f"se-{digest}.jsonl", key


def _read_cache(path: Path) -> dict[int, dict]:
    """Prompt index → its record. A line cut by a crash is ignored (it is recomputed)."""
    done: dict[int, dict] = {}
    if not path.exists():
        return done
    for line in path.read_text().splitlines()[1:]:  # line 1 is the key
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        done[int(rec["i"])] = rec
    return done


@torch.no_grad()
def _sample_chunk(model, tokenizer, cfg, examples: list[dict], M: int, device) -> list[dict]:
    """M samples per prompt from π_0 (T, top_p and max length of training), their extracted answers,
    clusters (shared "none" cluster; S3's switch is applied later) and mean token log-probs."""
    raw = sample_and_verify(HFRollout(model, tokenizer, cfg, device), tokenizer, examples, M, cfg.answer_mode)
    # mean log π_0(o_t | h_t) from the same chunked logits / T as training (forward.no_grad_fields)
    batch = collate([p for p in raw["prompt_ids"] for _ in range(M)], raw["responses"], tokenizer.pad_token_id,
                    tokenizer.eos_token_id)
    logp = no_grad_fields(model, batch, list(range(len(raw["responses"]))), cfg.temperature, set(),
                          cfg.micro_batch_tokens, cfg.logit_chunk_rows)["logp"].double()
    mask = batch["response_mask"].double()
    mean_logp = (logp * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
    out = []
    for j, ex in enumerate(examples):
        answers = [r.answer for r in raw["results"][j * M:(j + 1) * M]]
        out.append({"answers": answers, "clusters": answer_clusters(answers, ex.get("task", "math")),
                    "mean_logp": [float(x) for x in mean_logp[j * M:(j + 1) * M]]})
    return out


def compute_semantic_entropy(ctx, ccfg: CurriculumConfig) -> np.ndarray:
    """SE(q) of the first n prompts of ctx.examples (n = se_max_prompts or all) with the initial policy.

    Costs n·M rollouts plus one scoring forward. Prompts are done in chunks of --gen-batch-prompts; each
    chunk is appended to the cache file as soon as it is done, so an interrupted pass resumes where it
    stopped, and a finished pass is never recomputed (not on --resume either). Each chunk has its own
    seed (seed, chunk start), so the samples do not depend on where a pass was interrupted; the global
    RNG is restored afterwards, so the training run is the same with or without a cache. Ranks split
    every chunk and rank 0 writes.
    """
    from tqdm.auto import tqdm

    cfg, dist, M = ctx.cfg, ctx.dist, ccfg.se_samples
    n = len(ctx.examples) if ccfg.se_max_prompts is None else min(ccfg.se_max_prompts, len(ctx.examples))
    path, key = _cache_path(ctx, ccfg)
    done = dist.gather_objects(_read_cache(path) if dist.is_main else None)[0]  # rank 0's view for all
    todo = [i for i in range(n) if i not in done]
    if todo:
        if dist.is_main:
            print(f"SENT curriculum: semantic entropy of {len(todo)} prompts x M={M} samples = "
                  f"{len(todo) * M} rollouts of the initial policy (one-off before training; cached in "
                  f"{path}, resumable; {n - len(todo)} prompts already cached)", flush=True)
            if not path.exists():
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(key) + "\n")
            else:  # drop a line cut by a crash, so that the next record starts on a line of its own
                text = path.read_text()
                if not text.endswith("\n"):
                    path.write_text(text[:text.rfind("\n") + 1])
        # π_0: the live policy at step 0; on --resume the policy is trained, so use the frozen reference
        # (it is π_0 unless stage_restart replaced it) or load π_0 again.
        model = ctx.model
        if ctx.start_step > 0:
            usable = ctx.ref_model is not None and not cfg.ref_offload  # (offloaded: it lives on the CPU)
            model = ctx.ref_model if usable else load_policy(cfg.model, ctx.device)[0]
        saved_rng = rng_state()
        chunk = cfg.gen_batch_prompts
        starts = sorted({(i // chunk) * chunk for i in todo})
        bar = tqdm(total=n, initial=n - len(todo), desc="semantic entropy", unit="prompt",
                   disable=not (cfg.progress and dist.is_main), dynamic_ncols=True)
        t_first = time.perf_counter()
        try:
            for c, start in enumerate(starts):
                idx = [i for i in range(start, min(start + chunk, n)) if i not in done]
                mine = idx[dist.rank::dist.world]
                set_seed(int(np.random.default_rng([cfg.seed, 7919, start]).integers(2**31)) + dist.rank)
                recs = _sample_chunk(model, ctx.tokenizer, cfg, [ctx.examples[i] for i in mine], M, ctx.device) \
                    if mine else []
                merged = {i: r for part in dist.gather_objects(list(zip(mine, recs))) for i, r in part}
                if dist.is_main:
                    with open(path, "a") as f:
                        f.write("".join(json.dumps({"i": i, **merged[i]}) + "\n" for i in idx))
                done.update(merged)
                bar.update(len(idx))
                if c == 0 and dist.is_main and len(starts) > 1:
                    dt = time.perf_counter() - t_first
                    left = sum(1 for i in todo if i not in done)
                    print(f"SENT curriculum: first chunk of {len(idx)} prompts took {dt:.1f}s; "
                          f"ETA ~{dt * left / max(len(idx), 1):.0f}s for the other {left}", flush=True)
        finally:
            bar.close()
            set_rng_state(saved_rng)
    se = np.zeros(n)
    for i in range(n):
        rec = done[i]
        ids = rec["clusters"]
        if ccfg.none_as_singletons:  # S3 switch, applied to the cached shared-none clustering
            fresh = max(ids) + 1
            ids = list(ids)
            for m, a in enumerate(rec["answers"]):
                if a is None:
                    ids[m], fresh = fresh, fresh + 1
        se[i] = semantic_entropy(ids, sample_weights(rec["mean_logp"], ccfg.se_weights))
    return se


def build_curriculum_sampler(ctx, method_cfg=None) -> CurriculumSampler:
    """SE of the training prompts (cached), stages (S5), schedule (S6) → the sampler. Any method: the
    settings are the method config's if it has them (SENT), else the CurriculumConfig defaults."""
    ccfg = method_cfg if isinstance(method_cfg, CurriculumConfig) else CurriculumConfig()
    se = compute_semantic_entropy(ctx, ccfg)
    stages = stage_split(se, ccfg.n_stages, ccfg.stage_split, ccfg.stage_thresholds)
    starts = stage_starts(ctx.cfg.steps, ccfg.n_stages, ccfg.stage_steps)
    if ctx.dist.is_main:
        ranges = ", ".join(f"D_{s + 1}: {len(st)} prompts, SE {se[st].min():.3f}-{se[st].max():.3f} "
                           f"from step {starts[s]}" if st else f"D_{s + 1}: empty"
                           for s, st in enumerate(stages))
        print(f"SENT curriculum: {ranges}", flush=True)
        summary = {"se": [float(x) for x in se], "stages": stages, "stage_starts": starts}
        Path(ctx.run_dir).mkdir(parents=True, exist_ok=True)
        (Path(ctx.run_dir) / "semantic_entropy.json").write_text(json.dumps(summary))
    return CurriculumSampler(stages, starts, ctx.cfg.seed)


# ====================================================================================================
# 4. Token sets (§3; S8–S10) and per-token losses (§4)
# ====================================================================================================
# Tiers of a valid token: 0 outside T_low (β = 0); 1 in T_low with β = 0 (release_compat only, whose
# β_low set is not T_low \ T_hc); 2 the β_low set; 3 the β_high set. Stored as one float field.
TIER_FREE, TIER_LOW_UNPENALISED, TIER_LOW, TIER_HIGH = 0, 1, 2, 3


def sent_token_sets(entropy, logp, advantages, mask, low_frac: float = 0.8, rho_cov: float = 0.002,
                    cov_center: str = "low", release: bool = False) -> dict[str, torch.Tensor]:
    """T_low, the covariance and T_hc over all valid tokens of `mask` (§3); all inputs detached.

    entropy, logp, mask: [S, T]; advantages: [S] or [S, T]. Returns bool masks "low" and "high" (T_hc),
    "cov" (0 outside T_low) and "tier" (see above), all [S, T].
      |T_low| = max(1, ⌊low_frac·|V|⌋) lowest-entropy tokens (ties: earlier token first);
      Cov_t   = (logp_t − μ_lp)(A_t − μ_A), means over T_low (S9 default) or over V (cov_center="all");
      |T_hc|  = max(1, ⌊ρ_cov·|T_low|⌋) tokens of T_low with the largest Cov_t; β_low on T_low \\ T_hc.
    release=True: β_low on the *bottom*-|T_hc| covariance tokens of T_low instead (S10, release), with the
    release's arithmetic and tie-breaking (zldscr0/SENT, `compute_policy_loss_low_entropy_kl_cov_v2`):
    the covariance in fp32 with the means taken over T_low in ascending-entropy order, the top and bottom
    sets from `torch.topk(cov, k, largest=True / False)` on that CPU fp32 vector (topk's order among
    equal values is its own, not "earlier first"), and the bottom set written *after* the top set, so a
    token in both gets 0.05, not 0.2. The two overlap when Cov is constant over T_low, e.g. a micro-batch
    of one all-correct group (A = 0 everywhere); "high" is then the β_high set, i.e. top minus bottom.
    Entropy ties inside T_low stay in position order (the release's GPU topk order is not reproducible).
    """
    device = mask.device
    valid = mask.bool().cpu()  # selection runs on CPU in float64 (release: its fp32 covariance, see above)
    adv = advantages.unsqueeze(-1).expand_as(logp) if advantages.dim() == logp.dim() - 1 else advantages
    h, lp, a = (x.detach().cpu().to(torch.float64)[valid] for x in (entropy, logp, adv))
    n = h.numel()
    low_flat = torch.zeros(n, dtype=torch.bool)
    high_flat = torch.zeros(n, dtype=torch.bool)
    bottom_flat = torch.zeros(n, dtype=torch.bool)
    cov_flat = torch.zeros(n, dtype=torch.float64)
    if n:
        n_low = max(1, int(math.floor(low_frac * n + 1e-9)))  # tolerance: 0.8·10 must give 8, not 7
        low_idx = torch.sort(h, stable=True).indices[:n_low]
        low_flat[low_idx] = True
        k = max(1, int(math.floor(rho_cov * n_low + 1e-9)))
        if release:  # the release's fp32 arithmetic and topk, T_low in ascending-entropy order (docstring)
            a_low, lp_low = a[low_idx].float(), lp[low_idx].float()
            if cov_center == "low":
                mu_a, mu_lp = a_low.mean(), lp_low.mean()
            else:
                mu_a, mu_lp = a.float().mean(), lp.float().mean()
            cov_low = (a_low - mu_a) * (lp_low - mu_lp)
            high_flat[low_idx[torch.topk(cov_low, k, largest=True).indices]] = True
            bottom_flat[low_idx[torch.topk(cov_low, k, largest=False).indices]] = True
        else:
            centre = low_flat if cov_center == "low" else torch.ones(n, dtype=torch.bool)
            mu_lp, mu_a = lp[centre].mean(), a[centre].mean()
            cov_low = (lp[low_idx] - mu_lp) * (a[low_idx] - mu_a)
            high_flat[low_idx[torch.sort(cov_low, descending=True, stable=True).indices[:k]]] = True
        cov_flat[low_idx] = cov_low.to(torch.float64)
    tier_flat = torch.full((n,), float(TIER_FREE), dtype=torch.float32)
    if release:
        tier_flat[low_flat] = TIER_LOW_UNPENALISED
        tier_flat[high_flat] = TIER_HIGH
        tier_flat[bottom_flat] = TIER_LOW  # written last, as in the release: 0.05 wins where both hold
        high_flat &= ~bottom_flat
    else:
        tier_flat[low_flat] = TIER_LOW
        tier_flat[high_flat] = TIER_HIGH

    def scatter(flat, dtype):
        return torch.zeros(valid.shape, dtype=dtype).masked_scatter(valid, flat.to(dtype)).to(device)

    return {"low": scatter(low_flat, torch.bool), "high": scatter(high_flat, torch.bool),
            "cov": scatter(cov_flat, torch.float64), "tier": scatter(tier_flat, torch.float32)}


def tier_betas(tier: torch.Tensor, beta_high: float, beta_low: float) -> torch.Tensor:
    """β_t from the tiers: β_high on T_hc, β_low on the β_low set, 0 elsewhere (§3)."""
    return torch.where(tier == TIER_HIGH, torch.full_like(tier, beta_high),
                       torch.where(tier == TIER_LOW, torch.full_like(tier, beta_low), torch.zeros_like(tier)))


def sent_token_loss(logp, old_logp, ref_logp, advantages, beta, eps_low=0.2, eps_high=0.2):
    """ℓ_t = −min(ρA, clip(ρ, 1−ε, 1+ε)A) + β_t·k3_t (§4, our form); returns (ℓ, clipped_low, clipped_high, k3).

    k3 = exp(δ) − δ − 1, δ = ref_logp − logp, clamped as in grpo.k3_kl; ∂(β k3)/∂logp = β(1 − π_ref/π_θ)
    is 0 while π_θ = π_ref, so at step 0 the gradient is the clipped base's exactly.
    """
    per_token, low, high = clipped_surrogate(logp, old_logp, advantages, eps_low, eps_high)
    if ref_logp is None:  # every β is 0: no reference model was loaded
        return per_token, low, high, torch.zeros_like(per_token)
    kl = k3_kl(logp, ref_logp)
    return per_token + beta.to(per_token.dtype) * kl, low, high, kl


def release_token_loss(logp, old_logp, ref_logp, advantages, coef):
    """The shipped loss of zldscr0/SENT (release_compat, S1), per token, before aggregation:

        ℓ_t = −A_t ρ_t + c_t·|logp_t − old_logp_t|      (unclipped surrogate; penalty to π_old, not π_ref)

    with c_t = 0.2 on the top-k_c covariance tokens of T_low and 0.05 on the bottom-k_c ones (S10; 0.05
    where a token is in both, as the release writes the bottom set last: `sent_token_sets`); the
    caller adds 0.001·token-mean(k3 to π_ref) over all valid tokens. At ρ = 1 the |Δlogp| term is 0 in
    value and in (sub)gradient: on the first update after each rollout it does nothing.

    Two defects of the release (spec "Why the default is not the release"):
      1. misaligned covariance: the release indexes with the *integer* response mask, an integer gather
         that builds a (B, L, L) tensor from rows 0 and 1 instead of a boolean selection, so its means and
         covariance ranking do not belong to the low-entropy tokens. We do NOT reproduce this: the
         covariance here is computed on the intended tokens (`sent_token_sets`).
      2. a numerically inactive token term: ρ_cov = 0.0002 per micro-batch of 4 sequences gives
         ⌊0.0002·|T_low|⌋ = 0, so max(1, ·) picks exactly one token at 0.2 and one at 0.05 per
         micro-batch against thousands under token-mean: the shipped method is in effect
         "SE curriculum + unclipped PG + 0.001 k3".
    Returns (ℓ, k3 to π_ref).
    """
    adv = advantages.unsqueeze(-1) if advantages.dim() == logp.dim() - 1 else advantages
    ratio = torch.exp(torch.clamp(logp - old_logp, -20.0, 20.0))
    per_token = -adv * ratio + coef.to(logp.dtype) * (logp - old_logp).abs()
    return per_token, k3_kl(logp, ref_logp)


# ====================================================================================================
# The method
# ====================================================================================================


class SENT(Method):
    """GRPO (clip 0.2, token-mean) + tiered k3 KL on low-entropy tokens + the SE curriculum.
    Hooks overridden: `curriculum` (§2), `begin_step` (S7's stage restart), `prepare_update` (§3, batch
    scope), `token_loss` (§4) and, under release_compat, `extra_loss`."""

    name = "sent"
    config_cls = SENTConfig
    # no token-side KL (§3–4) and the seeded shuffle instead of the SE curriculum (§2); stage_restart is off by default
    control_overrides = {"beta_high": 0.0, "beta_low": 0.0, "se_curriculum": False, "stage_restart": False}
    # no toy strength: the release's β already act on the toy (docs/studies/toy, 3 seeds: effective solutions
    # +0.44 [+0.15, +0.71], pass@1 −0.01 [−0.05, +0.05]); the curriculum alone moved nothing measurable
    toy_overrides: dict = {}

    def __init__(self, config: SENTConfig | None = None):
        super().__init__(config)
        # S8: batch scope selects over the whole optimisation batch before the first backward
        self.needs_batch_fields = self.cfg.scope == "batch"
        self._stage_seen = 0  # the last stage whose start was handled (S7)

    @property
    def uses_ref(self) -> bool:
        return self.cfg.release_compat or self.cfg.beta_high > 0 or self.cfg.beta_low > 0

    def needs(self) -> set[str]:
        return super().needs() | {"entropy"} | ({"ref_logp"} if self.uses_ref else set())

    # ---- data side ------------------------------------------------------------------------------
    def curriculum(self):
        return self.cfg if self.cfg.se_curriculum else None

    def begin_step(self, stage: int) -> set[str]:
        """S7 (release: one run per stage, stage 2 initialised from stage 1): at the first step of a new
        stage, π_ref ← a frozen copy of the current policy and a fresh optimiser (the LR is constant, so
        there is no schedule to restart). The loop does both, and saves the new reference for --resume."""
        actions = set()
        if stage != self._stage_seen and self.cfg.stage_restart:
            actions = {"reset_reference", "reset_optimizer"}
        self._stage_seen = stage
        return actions

    def state_dict(self) -> dict:
        return {"stage_seen": self._stage_seen}

    def load_state_dict(self, state: dict) -> None:
        self._stage_seen = state.get("stage_seen", 0)

    # ---- token side -----------------------------------------------------------------------------
    def _tiers(self, entropy, logp, advantages, mask) -> torch.Tensor:
        c = self.cfg
        return sent_token_sets(entropy, logp, advantages, mask, c.low_frac, c.cov_fraction, c.cov_center,
                               release=c.release_compat)["tier"]

    def prepare_update(self, batch, rows: list[int], dist) -> None:
        """S8 batch scope: T_low, the means and T_hc over the whole optimisation batch of every rank.

        Each rank sends its valid tokens' (entropy, logp, A) to all; every rank runs the same selection
        on the concatenation (rank order) and keeps its own slice, so the global cut-offs are exact.

        Entropy and logp are the *current* policy's, detached. S8 says "from the prepass" (π_old) and S11
        says "the current policy"; they agree on-policy and conflict off-policy (--mini-batches > 1). We
        follow S11, as Lp-Reg's ranking does (its spec L4) and as the release does in every micro-batch:
        before each mini-batch after the first the loop refreshes π_θ's "cur_entropy" / "cur_logp" with a
        no-grad forward over these rows; on the first mini-batch π_θ = π_old and π_old's "entropy" /
        "old_logp" (the prepass) stand in for them.
        """
        fields = batch["fields"]
        index = torch.tensor(rows, dtype=torch.long)
        mask = self.loss_mask({"response_mask": batch["response_mask"][index],
                               "truncated": batch["truncated"][index]}).bool()
        current = "cur_logp" in fields  # refreshed for these rows: both current fields are present
        ent = (fields["cur_entropy"] if current else fields["entropy"])[index]
        lp = (fields["cur_logp"] if current else fields["old_logp"])[index]
        adv = batch["advantages"][index].unsqueeze(-1).expand_as(lp)
        parts = dist.gather_objects((ent[mask], lp[mask], adv[mask]))
        flat = [torch.cat([p[j].to(torch.float64) for p in parts]) for j in range(3)]
        ones = torch.ones(1, flat[0].numel())  # the global batch as one row of valid tokens
        tier = self._tiers(flat[0].unsqueeze(0), flat[1].unsqueeze(0), flat[2].unsqueeze(0), ones)[0]
        offset = sum(p[0].numel() for p in parts[:dist.rank])
        fields.setdefault("sent_tier", torch.zeros(batch["response_mask"].shape, dtype=torch.float32))
        mine = tier[offset:offset + int(mask.sum())]
        fields["sent_tier"][index] = torch.zeros(mask.shape, dtype=torch.float32).masked_scatter(mask, mine)

    def token_loss(self, mb, advantages, mask, stats: dict):
        c = self.cfg
        if c.scope == "batch":
            tier = mb["sent_tier"].to(mask.device)
        else:  # S8 switch (release scope): the statistics of this micro-batch only, from this forward:
            # π_θ's entropy and detached logp (S11; the release recomputes both in every micro-batch, also
            # on its second optimiser step per rollout, where π_old's prepass values would be stale).
            # "cur_entropy" is the training forward's; without it (a hand-built mb) "entropy" stands in.
            entropy = mb["cur_entropy"] if "cur_entropy" in mb else mb["entropy"]
            tier = self._tiers(entropy, mb["logp"].detach(), advantages, mask).to(mask.device)
        tier = tier * mask
        beta = tier_betas(tier, c.beta_high, c.beta_low)
        m = mask.bool()
        stats["sent_low_count"] = float(((tier > 0) & m).sum())
        stats["sent_n_hc"] = float(((tier == TIER_HIGH) & m).sum())
        stats["sent_beta_sum"] = float((beta * mask).sum())
        ref_logp = mb.get("ref_logp") if self.uses_ref else None
        if c.release_compat:  # no clipping: (ℓ, None, None)
            per_token, kl = release_token_loss(mb["logp"], mb["old_logp"], ref_logp, advantages, beta)
            low = high = None
        else:
            per_token, low, high, kl = sent_token_loss(mb["logp"], mb["old_logp"], ref_logp, advantages, beta,
                                                      c.eps_low, c.eps_high)
        stats["sent_kl_sum"] = float((kl.detach() * mask).sum())
        self._term_stats(stats, mb, ref_logp, advantages, tier, beta, mask)
        return per_token, low, high

    @torch.no_grad()
    def _term_stats(self, stats: dict, mb, ref_logp, advantages, tier, beta, mask) -> None:
        """The measured size of the token-side term next to the advantages, per tier, from tensors this
        forward already holds (no extra forward). Logged as token-means over the N valid tokens of the
        update ("_sum" / "_count" keys, reduced by distributed.reduce_stats), i.e. in the units of the
        token-mean loss; a tier's per-token mean is its value divided by its sent/frac_*:

          sent/frac_high, sent/frac_low  |T_hc| / N and |β_low set| / N
          sent/kl_high, sent/kl_low      Σ_tier β_t·k3_t / N: the tier's share of the loss value
          sent/grad_high, sent/grad_low  Σ_tier |∂(β_t·k3_t)/∂logp_t| / N = Σ |β_t (1 − π_ref/π_θ)| / N
                                         (0 where k3's clamps cut the gradient, grpo.k3_kl)
          sent/adv_abs                   Σ_V |A_t| / N: the surrogate's per-token pull, |∂ℓ/∂logp_t| = |A_t|ρ_t
                                         with ρ_t = 1 on-policy

        Under release_compat the term is c_t·|logp − old_logp| (release_token_loss), its gradient c_t·sign."""
        m = mask.bool()
        adv = advantages.detach().unsqueeze(-1).expand_as(mask) if advantages.dim() == mask.dim() - 1 \
            else advantages.detach()
        logp = mb["logp"].detach()
        if ref_logp is None:  # every β is 0 (no reference loaded): the term is 0
            term = grad = torch.zeros_like(logp)
        elif self.cfg.release_compat:
            diff = logp - mb["old_logp"]
            term, grad = beta * diff.abs(), beta * (diff != 0).to(beta.dtype)
        else:
            raw = ref_logp.detach() - logp
            delta = torch.clamp(raw, -20.0, 20.0)
            k3 = torch.exp(delta) - delta - 1.0
            live = (raw.abs() < 20.0) & (k3.abs() < 10.0)  # where the clamps leave the gradient on
            term = beta * torch.clamp(k3, -10.0, 10.0)
            grad = beta * (1.0 - torch.exp(delta)).abs() * live.to(beta.dtype)
        for name, code in (("high", TIER_HIGH), ("low", TIER_LOW)):
            sel = m & (tier == code)
            stats[f"sent/frac_{name}_count"] = float(sel.sum())
            stats[f"sent/kl_{name}_sum"] = float(term[sel].sum())
            stats[f"sent/grad_{name}_sum"] = float(grad[sel].sum())
        stats["sent/adv_abs_sum"] = float(adv.abs()[m].sum())

    def extra_loss(self, mb, mask, norm: Normaliser, stats: dict) -> torch.Tensor | None:
        """release_compat: + 0.001 · token-mean k3(π_θ ‖ π_ref) over all valid tokens (S1)."""
        if not self.cfg.release_compat:
            return None
        return RELEASE_EXTRA_KL * aggregate(k3_kl(mb["logp"], mb["ref_logp"]), mask, "token-mean", norm)


__all__ = [
    "CurriculumConfig", "SENTConfig", "SENT", "answer_clusters", "sample_weights", "semantic_entropy",
    "stage_split", "stage_starts", "CurriculumSampler", "compute_semantic_entropy", "build_curriculum_sampler",
    "sent_token_sets", "tier_betas", "sent_token_loss", "release_token_loss",
]
