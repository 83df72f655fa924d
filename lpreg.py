"""Lp-Reg: Low-probability Regularization, which keeps RLVR from extinguishing rare "reasoning sparks".

Read beside: Huang, Xu, Wang et al., "Low-probability Tokens Sustain Exploration in Reinforcement
Learning with Verifiable Reward", arXiv 2510.03222 (official code: CarlanLark/Lp-Reg-dev, an old-verl
fork). Equation numbers below are the paper's; "spec Ln" refers to the decisions in
../shared/specs/lpreg.md, which follows the official code wherever paper and code differ.

The idea. Negative samples push every one of their tokens down. The rare but plausible tokens among
them (the "reasoning sparks") have the least probability to lose, and RLVR gradually eliminates them,
so exploration collapses. Lp-Reg protects them in three steps:

  1. a proxy distribution (Eq. 5, min-p variant): at each position keep the tokens with
     p ≥ κ·max p (κ = 0.02), renormalise over them; everything below is presumed noise and gets
     probability 0 (the finite sentinel log-prob −1e4);
  2. a token selection (Eq. 6 conditions): the ρ = 1% lowest-probability tokens among the
     negative-advantage tokens of the optimisation batch, kept only if π_θ < π_proxy (which excludes
     the noise tokens, whose proxy is 0);
  3. on those tokens the loss becomes −A·r + β·k3(π_proxy ‖ π_θ) (β = 1), a sampled-token k3 clamped to
     [−10, 10]; elsewhere the PPO-clipped loss with the deliberately wide range [0, 10]; token-mean
     over all valid tokens; no reference KL.

On-policy the k3 term is advantage reshaping on the selected set: A → A + β(1/Z_t − 1), with Z_t the
probability mass the min-p filter keeps (spec "What it does"). Its value is tiny (5.07e-5 at Z = 0.99),
its gradient is not.

How the loop serves it (train.py). The proxy log-prob of the sampled token is a per-token field this
file supplies (`LpReg.token_field_fns` → `proxy_logp`): the forward computes it from the same chunk of
logits as the log-probs, so the [tokens, V] softmax only ever exists for one chunk of rows. The
selection must be known before the first backward (it is global over the optimisation batch, spec L2):
`needs_batch_fields = True` makes the loop run a no-grad forward of the whole rollout batch (π_old's
"old_logp" and "minp_proxy_logp") and call `prepare_update`, which writes the selection back as the
per-token field "lp_selected".

Temperature (rollout T ≠ 1). The official code filters the *raw* logits and divides by T afterwards, so
the keep set is K = {v : z_v − z_max ≥ ln κ} on the raw logits z, and the proxy renormalises the tempered
distribution softmax(z/T) over K. That is our default, `lp_filter_logits="raw"`; "tempered" (our earlier
order) builds K from softmax(z/T) instead, i.e. z_v − z_max ≥ T·ln κ. At T = 1 both are the same.

Off-policy (the paper's "off." rows: mini-batch 32 of 256, i.e. 8 optimiser steps per rollout batch) is
the loop's `--mini-batches 8`: old_logp and the proxy then come from π_old's prepass and stay fixed for
all 8 steps (spec L5). The *ranking* and the test logp < log π_proxy use the current policy's detached
logp (spec L4; the official loss ranks each micro-batch by its current detached logp): before every
mini-batch after the first the loop runs a no-grad forward with the current parameters over that
mini-batch's rows and hands it to `prepare_update` as the field "cur_logp" (π_θ now), next to π_old's
"old_logp" and "minp_proxy_logp". On the first mini-batch π_θ = π_old and "cur_logp" is absent.
The default, one optimiser step per rollout batch, is the paper's on-policy setting.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from grpo import GRPOConfig, Method, clipped_surrogate, k3_kl

# "probability 0" of a filtered token: finite, so that a k3 of such a token could never be inf/NaN
# (spec Pitfalls)
FILTERED_LOGP = -1e4


# ====================================================================================================
# Hyperparameters (paper defaults; §5.1.2 and the official on-policy script unless noted)
# ====================================================================================================
@dataclass
class LpRegConfig(GRPOConfig):
    # --- the base (spec Defaults) ---
    eps_low: float = 1.0  # clip ratio to [1 − 1, 1 + 9] = [0, 10], U = 10 (§5.1.2); NOT dapo's 0.2/0.28
    eps_high: float = 9.0
    agg: str = "token-mean"  # official script; the β·k3 terms share this denominator (spec L9)
    adv_scale: str = "group"  # z-score with the unbiased std (official code)
    adv_eps: float = 1e-6
    kl_coef: float = 0.0  # no reference-model KL (official script)
    # --- Lp-Reg (Eqs. 5–6) ---
    kappa: float = 0.02  # κ, min-p ratio: keep p ≥ κ·max p (§5.1.2)
    rho: float = 0.01  # ρ_p, lowest fraction of the negative tokens (Qwen3-14B; 0.005 for Qwen2.5-32B)
    beta: float = 1.0  # β, weight of the k3 pull toward the proxy (§5.1.2)
    # --- decisions and their switches (spec L1–L10) ---
    lp_percentile_over: str = "neg"  # L1: "neg" (code: lowest ρ of Neg) | "all" (paper: ρ-quantile of all)
    lp_scope: str = "batch"  # L2: "batch" (global over the optimisation batch) | "microbatch" (code)
    lp_min_k: int = 1  # L3: select none when k < lp_min_k; 2 reproduces the code's skip of k = 1
    lp_filter: str = "minp"  # L6: "minp" | "fixed" (the p ≥ τ ablation, with lp_tau)
    lp_tau: float = 0.02  # τ of lp_filter="fixed"
    # L6 at T ≠ 1: "raw" (official code: the keep set from the raw logits, then renormalise softmax(z/T)
    # over it) | "tempered" (the keep set from softmax(z/T)); identical at T = 1
    lp_filter_logits: str = "raw"
    lp_clip_form: str = "ppo"  # L8: "ppo" max-form (code) | "paper": clip(r, 0, U)·A on every token
    lp_rho_pos: float = 0.0  # L10: > 0 also regularises the lowest positive tokens ("Reg. Pos. & Neg.")

    def __post_init__(self):
        super().__post_init__()  # the base objective's ranges (grpo.GRPOConfig)
        if not 0 < self.kappa <= 1:
            raise ValueError(f"kappa must be in (0, 1], got {self.kappa}")
        if not 0 <= self.rho <= 1 or not 0 <= self.lp_rho_pos <= 1:
            raise ValueError(f"rho and lp_rho_pos must be in [0, 1], got {self.rho} and {self.lp_rho_pos}")
        if self.beta < 0:
            raise ValueError(f"beta must be >= 0, got {self.beta}")
        if self.lp_percentile_over not in ("neg", "all"):
            raise ValueError(f"lp_percentile_over must be 'neg' or 'all', got {self.lp_percentile_over!r}")
        if self.lp_scope not in ("batch", "microbatch"):
            raise ValueError(f"lp_scope must be 'batch' or 'microbatch', got {self.lp_scope!r}")
        if int(self.lp_min_k) != self.lp_min_k or self.lp_min_k < 1:
            raise ValueError(f"lp_min_k must be an integer >= 1, got {self.lp_min_k}")
        if self.lp_clip_form not in ("ppo", "paper"):
            raise ValueError(f"lp_clip_form must be 'ppo' or 'paper', got {self.lp_clip_form!r}")
        if not 0 < self.lp_tau <= 1:
            raise ValueError(f"lp_tau must be in (0, 1], got {self.lp_tau}")
        if self.lp_filter not in ("minp", "fixed"):
            raise ValueError(f"lp_filter must be 'minp' or 'fixed', got {self.lp_filter!r}")
        if getattr(self, "lp_filter_logits", "raw") not in ("raw", "tempered"):
            raise ValueError(f"lp_filter_logits must be 'raw' or 'tempered', got {self.lp_filter_logits!r}")


# ====================================================================================================
# 1. The proxy distribution (Eq. 5), as the per-token field the loop computes from each chunk of logits
# ====================================================================================================
# The forward (forward.token_fields) calls this on one chunk of rows at a time, next to the log-probs and
# from the same logits, so the [tokens, V] softmax only ever exists for one chunk. All keep tests run in
# fp32 logit space (spec L6): p(v) ≥ κ·p_max ⟺ z_v − z_max ≥ ln κ, which needs neither a softmax nor a
# division. filter_logits="raw" (default, official order: `apply_min_p` on the raw logits z, then
# `div_(temperature)`) tests the keep condition on z; "tempered" tests it on z/T. Either way the kept
# tokens share the tempered distribution softmax(z/T).
FILTER_LOGITS = ("raw", "tempered")


def proxy_logp(raw_logits: torch.Tensor, logits: torch.Tensor, lse: torch.Tensor, targets: torch.Tensor,
               kappa: float = 0.02, tau: float | None = None, filter_logits: str = "raw") -> torch.Tensor:
    """log π_proxy of each target token (Eq. 5), fp32 [rows]; FILTERED_LOGP where the filter drops it.

    raw_logits z [rows, V], logits = z / T, lse = logsumexp(z / T) [rows], targets [rows].
      min-p (official `apply_min_p`, tau=None): K = {v : p(v) ≥ κ·max_u p(u)}  (`≥`, spec L6)
      fixed-τ ablation (tau set, spec L6 switch):  K = {v : p(v) ≥ τ}; a position whose max p is below τ
                                                   keeps nothing: every token there is "noise"
    with p = softmax(z) ("raw") or softmax(z/T) ("tempered"); π_proxy = softmax(z/T) renormalised over K,
    log π_proxy(v) = log p_T(v) − log Z, Z = Σ_{u∈K} p_T(u). Under min-p the argmax is always kept, so
    Z ≥ p_max > 0 and a kept value is finite.
    """
    if filter_logits not in FILTER_LOGITS:
        raise ValueError(f"lp_filter_logits must be 'raw' or 'tempered', got {filter_logits!r}")
    space = raw_logits if filter_logits == "raw" else logits
    if tau is None:
        threshold = space.max(dim=-1).values + math.log(kappa)
    else:  # p(v) ≥ τ ⟺ z_v − logsumexp(z) ≥ ln τ
        threshold = (lse if space is logits else torch.logsumexp(space, dim=-1)) + math.log(tau)
    dropped = space < threshold.unsqueeze(-1)
    # log Z: one [rows, V] temporary zeroed in place, not a masked copy of the logits plus logsumexp's own
    # buffer (measured: 1.36x -> 1.08x the plain log-prob pass at V = 152k)
    row_max = logits.max(dim=-1).values
    scaled = torch.sub(logits, row_max.unsqueeze(-1)).exp_()
    scaled.masked_fill_(dropped, 0.0)
    log_z = torch.log(scaled.sum(-1)) + row_max - lse
    del scaled
    target_kept = ~dropped.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    target_logp = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - lse
    return torch.where(target_kept, target_logp - log_z, torch.full_like(lse, FILTERED_LOGP))


# ====================================================================================================
# 2. Token selection (Eq. 6 conditions, official-code semantics; spec L1–L4, L10)
# ====================================================================================================
class _OneProcess:
    """The two collectives the selection needs, for a single process (tests, micro-batch scope)."""

    enabled, world, rank = False, 1, 0

    @staticmethod
    def sum(value: float) -> float:
        return float(value)

    @staticmethod
    def gather_objects(obj) -> list:
        return [obj]


def lowest_count(n: int | float, fraction: float) -> int:
    """k = floor(fraction · n) (spec L3). The 1e-9 guards floor(0.29·100) = 28 from binary rounding."""
    return int(math.floor(fraction * float(n) + 1e-9))


def lowest_k_mask(values: torch.Tensor, k: int, dist=None) -> torch.Tensor:
    """Bool mask of the k smallest entries of a 1-D tensor, over the union of all ranks' tensors.

    Exactly k entries are selected globally (fewer only if there are fewer than k). Ties are broken by
    rank, then by position, so the result does not depend on how rows are split into micro-batches.
    Only each rank's own k smallest values travel: the global k smallest are among them (1% of the
    tokens by default, instead of all-gathering every logp).
    """
    dist = dist or _OneProcess()
    order = torch.sort(values.detach().float().cpu(), stable=True)
    candidates = order.values[:k]  # this rank's ≤ k smallest, ascending
    parts = dist.gather_objects(candidates)
    owner = torch.cat([torch.full((len(p),), r, dtype=torch.long) for r, p in enumerate(parts)])
    # stable sort of the rank-ordered concatenation: equal values keep (rank, position) order
    winners = torch.sort(torch.cat(parts), stable=True).indices[:k]
    mine = int((owner[winners] == dist.rank).sum())  # a prefix of this rank's ascending candidates
    out = torch.zeros(values.shape[0], dtype=torch.bool)
    out[order.indices[:mine]] = True
    return out.to(values.device)


def global_quantile(values: torch.Tensor, q: float, dist=None) -> float | None:
    """The q-quantile (linear interpolation, as torch.quantile / numpy's default) of the union of all
    ranks' 1-D `values`; None when there are none. Only each rank's lowest ⌊q(n−1)⌋ + 2 values travel."""
    dist = dist or _OneProcess()
    n = int(dist.sum(values.numel()))
    if n == 0:
        return None
    position = q * (n - 1)
    below = int(math.floor(position))
    candidates = torch.sort(values.detach().double().cpu()).values[:below + 2]
    merged = torch.sort(torch.cat(dist.gather_objects(candidates))).values
    low, high = merged[below], merged[min(below + 1, n - 1)]
    return float(low + (position - below) * (high - low))


def select_tokens(logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, proxy_logp: torch.Tensor,
                  rho: float = 0.01, min_k: int = 1, over: str = "neg", rho_pos: float = 0.0,
                  dist=None) -> torch.Tensor:
    """The regularised set S [S, T] bool (spec "Token selection"):

        Neg = {m = 1, A < 0};  k = floor(ρ·|Neg|), none if k < min_k          (L3)
        Low = the k tokens of Neg with the smallest detached logp              (L1 "neg", L4)
        S   = {(i,t) ∈ Low : logp < log π_proxy}                                (Eq. 6: π_θ < π_proxy)

    over="all" (L1, the paper's reading): δ = the ρ-quantile of logp over all valid tokens and
    S = {m = 1, logp < δ, A < 0, logp < log π_proxy}. rho_pos > 0 (L10) adds the same selection among
    the positive-advantage tokens. `dist` (distributed.Dist) makes every count and cut-off global across
    ranks (L2); None = one process. Every rank must call this with the same settings (collectives).
    Filtered tokens (proxy = −1e4, "π_proxy = 0") never qualify: the last condition excludes them, and
    we also test π_proxy > 0 explicitly.
    """
    dist = dist or _OneProcess()
    valid = mask.bool()
    adv = advantages.unsqueeze(-1) if advantages.dim() == logp.dim() - 1 else advantages
    adv = adv.expand_as(logp)
    lp = logp.detach().float()
    below_proxy = (lp < proxy_logp) & (proxy_logp > FILTERED_LOGP)
    selected = torch.zeros_like(valid)
    for side, fraction in ((valid & (adv < 0), rho), (valid & (adv > 0), rho_pos)):
        if fraction <= 0:
            continue
        population = side if over == "neg" else valid
        k = lowest_count(dist.sum(float(population.sum())), fraction)
        if k < max(min_k, 1):  # the same k on every rank: all skip together
            continue
        if over == "neg":
            low = torch.zeros_like(valid)
            low[side] = lowest_k_mask(lp[side], k, dist)
        else:
            delta = global_quantile(lp[valid], fraction, dist)
            low = side & (lp < delta)
        selected |= low & below_proxy
    return selected


# ====================================================================================================
# 3. The per-token loss (Eq. 6; spec "Per-token loss and objective", L7–L9)
# ====================================================================================================


def lpreg_token_loss(logp, old_logp, proxy_logp, advantages, selected, beta: float = 1.0,
                     eps_low: float = 1.0, eps_high: float = 9.0, clip_form: str = "ppo", dual_clip_c=None):
    """Per-token loss ℓ [S, T] and its parts; returns (ℓ, k3, clipped_low, clipped_high).

        off S: ℓ = max(−Aρ, −A·clip(ρ, 1−ε_low, 1+ε_high))          PPO max-form, [0, 10] (L8)
        on  S: ℓ = −Aρ + β·k3,  k3 = clamp(e^d − d − 1, −10, 10),  d = log π_proxy − logp   (L7)

    For A < 0 with a lower bound of 0 the clipped form already is −Aρ, so on S this just adds β·k3.
    Positive tokens are in S only under the L10 switch (lp_rho_pos > 0); they keep the clipped form + β·k3.
    clip_form="paper" (L8): ℓ = −A·clip(ρ, 1−ε_low, 1+ε_high) on every token, plus β·k3 on S.
    k3 is computed in fp32 with grpo.k3_kl (verl's low_var_kl: d clamped to ±20, k3 to [−10, 10]); the
    proxy is detached, so the gradient flows through logp only: ∂k3/∂logp = 1 − π_proxy/π_θ.
    """
    adv = advantages.unsqueeze(-1) if advantages.dim() == logp.dim() - 1 else advantages
    ratio = torch.exp(torch.clamp(logp - old_logp, -20.0, 20.0))  # as grpo.clipped_surrogate
    if clip_form == "ppo":
        base, clipped_low, clipped_high = clipped_surrogate(logp, old_logp, advantages, eps_low, eps_high,
                                                            dual_clip_c)
        # −Aρ on S (spec); for A > 0 (only under the L10 switch) keep the clipped form, which is Eq. 6's
        # clip(r, 0, U)·A: dropping the cap there would let a positive token's ratio run away off-policy
        on_selected = torch.where(adv < 0, -adv * ratio, base)
    elif clip_form == "paper":  # clip(r, 0, U)·A bounds r for A < 0 as well (differs only off-policy)
        base = -torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high) * adv
        on_selected = base
        with torch.no_grad():
            clipped_low = (adv != 0) & (ratio < 1.0 - eps_low)
            clipped_high = (adv != 0) & (ratio > 1.0 + eps_high)
    else:
        raise ValueError(f"unknown clip_form {clip_form!r}; use 'ppo' or 'paper'")
    k3 = k3_kl(logp.float(), proxy_logp.float())
    per_token = torch.where(selected.bool(), on_selected + beta * k3, base)
    return per_token, k3, clipped_low, clipped_high


# ====================================================================================================
# The method
# ====================================================================================================


class LpReg(Method):
    """GRPO base (clip [0, 10], token-mean, no KL) + β·k3 toward the min-p proxy on the lowest-probability
    negative tokens. Hooks overridden: `token_field_fns` (the proxy, Eq. 5), `prepare_update` (the global
    selection, L2) and `token_loss` (Eq. 6)."""

    name = "lpreg"
    config_cls = LpRegConfig
    # β = 0: no pull toward the proxy; on the selected (A < 0) tokens −Aρ is what the [0, 10] clip gives anyway
    control_overrides = {"beta": 0.0}
    # toy strength (docs/studies/toy, 3 seeds): on a 22-token vocabulary the min-p proxy removes ~0.2 % of the
    # mass (Z ≈ 0.998), so the pull per selected token is β(1/Z − 1) ≈ 0.002·β: the paper's β = 1 moved nothing
    # measurable (effective solutions +0.19 [−0.03, +0.41]); β = 100 did (+0.30 [+0.07, +0.53]). κ = 0.3
    # filters more but then the lowest-probability negative tokens are all "noise" and none is selected.
    # On the whole-number toy (--model toy-numbers, a warm start with a ~3 % low-probability tail) the paper's
    # ρ = 0.01 selects nothing (its lowest tokens are all in the tail); `--rho 0.1 --beta 10` acts: effective
    # solutions +0.95 [+0.75, +1.16] and above GRPO's early-stopping line (docs/studies/toy-numbers). The
    # toy strength below was chosen on the character toy (3 seeds) and is not measured on toy-numbers; with 5
    # seeds on the character toy its effect is +0.17 [−0.09, +0.42] (docs/studies/toy-5seeds): not measured.
    toy_overrides = {"beta": 100.0}

    def __init__(self, config: LpRegConfig | None = None):
        super().__init__(config)
        # the batch scope selects over the whole optimisation batch before the first backward (spec L2);
        # the micro-batch scope (L2 switch) selects inside token_loss from the training forward alone
        self.needs_batch_fields = self.cfg.lp_scope == "batch"

    def token_field_fns(self) -> dict:
        c = self.cfg
        tau = c.lp_tau if c.lp_filter == "fixed" else None
        return {"minp_proxy_logp": functools.partial(proxy_logp, kappa=c.kappa, tau=tau,
                                                     filter_logits=c.lp_filter_logits)}

    def _select(self, logp, advantages, mask, proxy_logp, dist=None) -> torch.Tensor:
        c = self.cfg
        return select_tokens(logp, advantages, mask, proxy_logp, c.rho, int(c.lp_min_k), c.lp_percentile_over,
                             c.lp_rho_pos, dist)

    def prepare_update(self, batch, rows: list[int], dist) -> None:
        """S over the optimisation batch `rows` of every rank, as the field "lp_selected" (0/1 float).

        Ranked by the detached logp of the *current* policy, which also decides logp < log π_proxy (L4),
        against π_old's proxy (L5). The fields say which policy each comes from:
          "cur_logp"         π_θ as it is now: the loop's no-grad forward over these rows, run before every
                             mini-batch after the first (the parameters have moved since the prepass);
          "old_logp"         π_old (the prepass); stands in for "cur_logp" when that is absent, i.e. on the
                             first mini-batch, where π_θ = π_old;
          "minp_proxy_logp"  π_old's proxy, fixed for all mini-batches of the rollout batch.
        Every rank takes part in the collectives, even with no rows.
        """
        fields = batch["fields"]
        fields.setdefault("lp_selected", torch.zeros(batch["response_mask"].shape, dtype=torch.float32))
        index = torch.tensor(rows, dtype=torch.long)
        mask = self.loss_mask({"response_mask": batch["response_mask"][index], "truncated": batch["truncated"][index]})
        current = fields["cur_logp"] if "cur_logp" in fields else fields["old_logp"]
        selected = self._select(current[index], batch["advantages"][index], mask, fields["minp_proxy_logp"][index],
                                dist)
        fields["lp_selected"][index] = selected.float()
        # How much the min-p filter removes (the regime Lp-Reg needs: a proxy that differs from π). For a kept
        # sampled token log π_proxy = log π − log Z, so Z = exp(old_logp − proxy) at that position, with no
        # extra pass over the vocabulary; the rare positions whose sampled token was filtered are left out.
        proxy, old = fields["minp_proxy_logp"][index], fields["old_logp"][index]
        kept = mask.bool() & (proxy > FILTERED_LOGP)
        z = torch.exp(old - proxy)[kept].clamp(max=1.0)
        metrics = batch.setdefault("method_metrics", {})
        metrics["lp/removed_mass"] = (float((1.0 - z).sum()), float(z.numel()))  # mean 1 − Z over positions
        for bound in (0.99, 0.9):
            metrics[f"lp/frac_Z_below_{bound}"] = (float((z < bound).sum()), float(z.numel()))
        # What the regulariser does where it acts: on-policy a selected token's advantage becomes A + β(1/Z − 1)
        # (spec, "What it does"), so the mean of 1/Z − 1 over S is Lp-Reg's push per unit β. (S holds kept
        # tokens only, so proxy > FILTERED_LOGP there.)
        on_s = selected.bool() & mask.bool()
        z_s = torch.exp(old - proxy)[on_s].clamp(max=1.0)
        metrics["lp/shift_per_beta"] = (float((1.0 / z_s - 1.0).sum()), float(z_s.numel()))

    def token_loss(self, mb, advantages, mask, stats: dict):
        c = self.cfg
        proxy = mb["minp_proxy_logp"].to(mb["logp"].device)
        if c.lp_scope == "batch":
            selected = mb["lp_selected"].to(mask.device).bool() & mask.bool()
        else:  # L2 switch: the official code's per-micro-batch (per-GPU) top-k, current logp (L4)
            selected = self._select(mb["logp"].detach(), advantages, mask, proxy)
        per_token, k3, low, high = lpreg_token_loss(mb["logp"], mb["old_logp"], proxy, advantages, selected,
                                                    c.beta, c.eps_low, c.eps_high, c.lp_clip_form, c.dual_clip_c)
        stats["lp_selected_count"] = float(selected.sum())  # logged as the fraction of valid tokens in S
        stats["lp_n_selected"] = float(selected.sum())  # |S| over the optimisation batch
        stats["lp_k3_sum"] = float((k3.detach() * selected).sum())  # logged as Σ_S k3 / N (the term / β)
        stats["lp_filtered_count"] = float(((proxy <= FILTERED_LOGP) & mask.bool()).sum())  # "noise" tokens
        return per_token, low, high  # aggregated by the base: token-mean over ALL valid tokens (L9)


__all__ = ["LpRegConfig", "LpReg", "FILTERED_LOGP", "FILTER_LOGITS", "proxy_logp", "lowest_count", "lowest_k_mask",
           "global_quantile", "select_tokens", "lpreg_token_loss"]
