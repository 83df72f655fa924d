"""GRPO, DAPO and Dr. GRPO: the base every exploration method in this project builds on.

Read beside:
  * GRPO      — Shao et al., DeepSeekMath, arXiv 2402.03300, §4.1 (group-relative advantages).
  * DAPO      — Yu et al., arXiv 2503.14476 (clip-higher §3.1, dynamic sampling §3.2, token-level loss
                §3.3, overlong reward shaping §3.4).
  * Dr. GRPO  — Liu et al., arXiv 2503.20783 (no std normalisation, constant length normaliser).
  * PPO clip  — Schulman et al., arXiv 1707.06347.  k3 KL — Schulman, "Approximating KL Divergence".

This file has three parts:
  1. pure functions on tensors (advantages, the clipped surrogate, aggregation, k3, DAPO extras);
  2. `GRPOConfig` with the three presets (`grpo`, `dapo`, `dr_grpo`);
  3. `Method`, the base class whose hooks train.py calls. Paper methods subclass it and override only
     the hooks they need (dsdr.py, lpreg.py, arm.py, curriculum.py).

Notation follows the specs: G responses per prompt, A_i the advantage of response i, m_{i,t} the
response mask (EOS included, padding excluded), T_i = Σ_t m_{i,t}, and for one optimiser step S
sequences and N valid tokens *globally* (summed over micro-batches and ranks).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# ====================================================================================================
# 1. Group advantages (GRPO §4.1; Dr. GRPO §3)
# ====================================================================================================


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group", eps: float = 1e-6):
    """A_i = (r_i − mean_g r) / (std_g r + eps), computed within each group of `group_size` responses.

    `rewards` is [B*G] (groups contiguous) or [B, G]; the result has the same shape.
    scale: "group" — divide by the group's std (GRPO, DAPO);
           "batch" — divide by the std over the whole batch (TRL's scale_rewards="batch");
           "none"  — no division: A_i = r_i − μ_g (Dr. GRPO).
    Conventions differ between codebases, so we state ours: the std is the *unbiased* (n−1) one
    (torch.std's default, as in verl and TRL) and eps = 1e-6 (verl; TRL uses 1e-4). Many minimal
    implementations use the population std (numpy's default); we do not. A group whose rewards are all
    equal gets A = 0 exactly (its numerator is 0).
    """
    if group_size < 2:
        raise ValueError(f"group_size must be >= 2 for group advantages, got {group_size}")
    shape = rewards.shape
    r = rewards.reshape(-1, group_size).to(torch.float64)  # float64: exact hand-checkable values
    centred = r - r.mean(dim=1, keepdim=True)
    if scale == "group":
        adv = centred / (r.std(dim=1, keepdim=True) + eps)
    elif scale == "batch":
        adv = centred / (r.std() + eps)
    elif scale == "none":
        adv = centred
    else:
        raise ValueError(f"unknown advantage scale {scale!r}; use 'group', 'batch' or 'none'")
    return adv.to(rewards.dtype if rewards.is_floating_point() else torch.float32).reshape(shape)


# ====================================================================================================
# 2. The clipped surrogate (PPO; DAPO §3.1 clip-higher) and its aggregation (DAPO §3.3, Dr. GRPO)
# ====================================================================================================


def clipped_surrogate(logp, old_logp, advantages, eps_low: float, eps_high: float, dual_clip_c=None):
    """Per-token PPO loss ℓ_{i,t} = −min(ρ A, clip(ρ, 1−ε_low, 1+ε_high) A), ρ = exp(logp − old_logp).

    `advantages` is broadcast to the token shape of `logp` ([S] → [S, 1]).
    Returns (ℓ [S, T], clipped_low [S, T] bool, clipped_high [S, T] bool).
    clipped_low:  A < 0 and ρ < 1 − ε_low   (the gradient of that token is 0);
    clipped_high: A > 0 and ρ > 1 + ε_high  (same).
    Dual clip (verl's default, off here unless `dual_clip_c` is set): for A < 0, ℓ = min(ℓ, −c·A), which
    bounds the loss of a token whose ratio exploded.
    On-policy (old_logp = logp.detach()) ρ is 1 in value but still carries the gradient ∇logp.
    """
    adv = advantages.unsqueeze(-1) if advantages.dim() == logp.dim() - 1 else advantages
    ratio = torch.exp(torch.clamp(logp - old_logp, -20.0, 20.0))
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high) * adv
    loss = -torch.minimum(unclipped, clipped)
    if dual_clip_c is not None:
        loss = torch.where(adv < 0, torch.minimum(loss, -dual_clip_c * adv), loss)
    with torch.no_grad():
        clipped_low = (adv < 0) & (ratio < 1.0 - eps_low)
        clipped_high = (adv > 0) & (ratio > 1.0 + eps_high)
    return loss, clipped_low, clipped_high


AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")


@dataclass(frozen=True)
class Normaliser:
    """The global counts of one optimiser step, so that micro-batches and ranks add up exactly.

    n_tokens = N (valid tokens), n_seqs = S (sequences), both summed over *all* micro-batches and
    ranks of the optimisation batch; max_len = L_max (max_new_tokens); world_size = W.
    Each micro-batch's backward uses W · (its partial sum) / (global normaliser); gradients are summed
    over micro-batches (no extra division by the accumulation count) and averaged over ranks by
    data-parallel all-reduce, which cancels the factor W. This is what verl's token-mean and TRL's
    "dapo" loss do (grpo spec §3).
    """

    n_tokens: float
    n_seqs: float
    max_len: int
    world_size: int = 1

    @staticmethod
    def of(mask: torch.Tensor, max_len: int | None = None) -> "Normaliser":
        """Normaliser of a batch that is one micro-batch on one rank."""
        return Normaliser(float(mask.sum()), float(mask.shape[0]), max_len or mask.shape[1], 1)


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, agg: str, norm: Normaliser) -> torch.Tensor:
    """Reduce a per-token quantity [S, T] to this micro-batch's share of the full-batch loss.

      token-mean               Σ_{i,t} m ℓ / N                 (DAPO, verl default)
      seq-mean-token-mean      (1/S) Σ_i Σ_t m ℓ / T_i         (original GRPO: (1/G)Σ_i (1/|o_i|)Σ_t)
      seq-mean-token-sum-norm  Σ_{i,t} m ℓ / (S · L_max)       (Dr. GRPO: a constant normaliser)

    verl's seq-mean-token-sum-norm divides by L_max only; we also divide by S so the loss scale does not
    depend on the batch size (a constant factor, i.e. an LR rescaling).
    """
    mask = mask.to(per_token.dtype)
    w = norm.world_size
    if agg == "token-mean":
        return w * (per_token * mask).sum() / max(norm.n_tokens, 1.0)
    if agg == "seq-mean-token-mean":
        seq_len = mask.sum(dim=-1).clamp(min=1.0)
        return w * ((per_token * mask).sum(dim=-1) / seq_len).sum() / max(norm.n_seqs, 1.0)
    if agg == "seq-mean-token-sum-norm":
        return w * (per_token * mask).sum() / (max(norm.n_seqs, 1.0) * norm.max_len)
    raise ValueError(f"unknown aggregation {agg!r}; use one of {AGGREGATIONS}")


# ====================================================================================================
# 3. k3 KL estimator (Schulman 2020; verl "low_var_kl")
# ====================================================================================================


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 = exp(δ) − δ − 1 with δ = ref_logp − logp (both clamped as in verl).

    With samples from π_θ it is an unbiased, low-variance estimate of KL(π_θ ‖ π_ref), ≥ 0, and
    ∂k3/∂logp = 1 − π_ref/π_θ. The clamp to [−10, 10] bounds rare exploding tokens: beyond
    δ ≈ 2.6109 the value is 10 and the gradient 0. The gradient flows through `logp` only.
    Its *value* estimates KL(π_θ ‖ π_ref), but as a loss differentiated this way (no score-function term,
    as in GRPO and verl) its expected gradient is that of the other direction, KL(π_ref ‖ π_θ):
    E_π[∇(1 − π_ref/π_θ)·log π_θ] = Σ_v (π_v − π_ref,v) ∇log π_v. notebooks/00b_bandit.ipynb checks this
    numerically. We keep the papers' estimator; readers comparing with a "true" reverse KL should know.
    """
    delta = torch.clamp(ref_logp.detach() - logp, -20.0, 20.0)
    return torch.clamp(torch.exp(delta) - delta - 1.0, -10.0, 10.0)


# ====================================================================================================
# 4. DAPO extras (§3.2 dynamic sampling, §3.4 overlong reward shaping)
# ====================================================================================================


def overlong_penalty(lengths: torch.Tensor, max_len: int, buffer: int, factor: float = 1.0) -> torch.Tensor:
    """DAPO's soft overlong punishment R_len (§3.4), added to the correctness reward.

    0 for |y| ≤ L_max − L_c; a linear ramp down to −factor at |y| = L_max. Because generation is capped
    at L_max, a truncated response (no EOS) receives −factor.
    """
    lengths = lengths.to(torch.float32)
    start = max_len - buffer
    ramp = (start - lengths) / max(buffer, 1) * factor
    return torch.where(lengths <= start, torch.zeros_like(lengths), ramp.clamp(min=-factor))


def informative_groups(correct: torch.Tensor, group_size: int) -> torch.Tensor:
    """DAPO dynamic sampling's filter: True for groups whose correctness is not all-equal.

    Filter on correctness bits, not on shaped rewards (a shaped reward can vary inside an all-correct
    group, e.g. under DSDR, and would keep groups that carry no correctness signal).
    """
    c = correct.reshape(-1, group_size).float()
    return c.max(dim=1).values != c.min(dim=1).values


# ====================================================================================================
# 5. Configuration and presets (grpo spec §6)
# ====================================================================================================


@dataclass
class GRPOConfig:
    """Hyperparameters of the base objective. Defaults are the `grpo` preset."""

    eps_low: float = 0.2  # PPO clip; DeepSeekMath
    eps_high: float = 0.2  # DAPO clip-higher uses 0.28
    agg: str = "seq-mean-token-mean"  # original GRPO; DAPO uses token-mean
    adv_scale: str = "group"  # "group" (z-score) | "batch" | "none" (Dr. GRPO)
    adv_eps: float = 1e-6  # verl convention (TRL: 1e-4)
    kl_coef: float = 0.0  # β of the k3 KL to π_ref; DeepSeekMath 0.04, DAPO and all presets here 0
    dual_clip_c: float | None = None  # verl applies 3.0 by default; off here
    dynamic_sampling: bool = False  # DAPO §3.2
    max_gen_batches: int = 4  # cap on extra rollout batches for dynamic sampling (verl raises instead)
    overlong_shaping: bool = False  # DAPO §3.4
    overlong_buffer: float = 0.2  # L_c as a fraction of L_max (DAPO: 4096 of 20480)
    overlong_factor: float = 1.0  # f
    mask_truncated: bool = False  # overlong filtering: drop the loss of truncated responses

    def __post_init__(self):
        """Ranges and names, checked when the config is made (train.build_method re-runs it after the
        command-line overrides), not at the first update. Subclasses call it first in their own."""
        if self.agg not in AGGREGATIONS:
            raise ValueError(f"agg must be one of {', '.join(AGGREGATIONS)}, got {self.agg!r}")
        if self.adv_scale not in ADV_SCALES:
            raise ValueError(f"adv_scale must be one of {', '.join(ADV_SCALES)}, got {self.adv_scale!r}")
        if not 0 <= self.eps_low <= 1:
            raise ValueError(f"eps_low must be in [0, 1] (the ratio is clipped below at 1 - eps_low), "
                             f"got {self.eps_low}")
        if not self.eps_high >= 0:
            raise ValueError(f"eps_high must be >= 0 (the ratio is clipped above at 1 + eps_high), got {self.eps_high}")
        if not (self.adv_eps > 0 or self.adv_scale == "none" and self.adv_eps == 0):
            raise ValueError(f"adv_eps must be > 0 (an all-equal group would divide 0 by 0), got {self.adv_eps}")
        if not self.kl_coef >= 0:
            raise ValueError(f"kl_coef must be >= 0 (the weight of the KL to the reference; 0 = off), "
                             f"got {self.kl_coef}")
        if self.dual_clip_c is not None and not self.dual_clip_c > 1:
            raise ValueError(f"dual_clip_c must be > 1 (or none: off), got {self.dual_clip_c}")
        if not self.max_gen_batches >= 1:
            raise ValueError(f"max_gen_batches must be >= 1, got {self.max_gen_batches}")
        if not 0 <= self.overlong_buffer <= 1:
            raise ValueError(f"overlong_buffer must be in [0, 1] (a fraction of max_new_tokens), "
                             f"got {self.overlong_buffer}")
        if not self.overlong_factor >= 0:
            raise ValueError(f"overlong_factor must be >= 0, got {self.overlong_factor}")


ADV_SCALES = ("group", "batch", "none")

PRESETS = {
    "grpo": GRPOConfig(),
    "dapo": GRPOConfig(eps_high=0.28, agg="token-mean", dynamic_sampling=True, overlong_shaping=True),
    "dr_grpo": GRPOConfig(agg="seq-mean-token-sum-norm", adv_scale="none"),
}


# ====================================================================================================
# 6. The Method base class: the hooks train.py calls
# ====================================================================================================

# What the loop can compute for a method besides the log-probs; it computes only what `needs()` returns.
#   ref_logp        detached log-probs of the sampled tokens under the frozen reference model π_ref
#   entropy         detached full-vocabulary entropy of π_old per response token (chunked, fp32)
#   entropy_grad    the training forward's entropy of π_θ *with* its gradient, as mb["cur_entropy"]
#                   (the entropy bonus, entropy.py; chunked, checkpointed like the log-probs)
#   prompt_logp     detached log-probs of the prompt tokens, with "prompt_logp_mask" (ARM's c_q)
# A method's own per-token quantities (Lp-Reg's min-p proxy) are functions it supplies in
# `token_field_fns()`, which the forward applies to each chunk of logits.
KNOWN_NEEDS = frozenset({"ref_logp", "entropy", "entropy_grad", "prompt_logp"})


class Method:
    """GRPO / DAPO / Dr. GRPO. Paper methods subclass it and override only the hooks their paper changes.

    Per step the loop (train.py) calls:
      1. `begin_step(stage)`              → actions the loop performs before sampling (SENT's stage restart)
      2. `keep_groups(correct, G)`        → which groups to train on (DAPO dynamic sampling), or None
      3. `shape_rewards(batch)`           → r̃ per response                  (DSDR's diversity bonus)
      4. `advantages(batch, rewards)`     → A per response                   (z-score / Dr. GRPO)
      5. `prepare_update(batch, rows, dist)` once per optimiser step when `needs_batch_fields`: the loop has
         put detached per-token fields of the whole rollout batch in batch["fields"] (a no-grad forward
         of π_old: "old_logp", and "entropy" / the method's own fields as needed; from the second
         mini-batch on also the current policy's "cur_logp" / "cur_entropy"). Lp-Reg and SENT select
         their tokens there, over the whole optimisation batch of every rank.
      6. `loss(mb, norm)` per micro-batch. It is the same for every method (do not override it): the
         hooks `update_advantages`, `token_loss` and `extra_loss` are what a method changes in it.
    Hooks may attach to the rollout batch: batch["per_seq"][name] = tensor [S] (sliced into every
    micro-batch as mb[name]) and batch["method_metrics"][name] = (sum, count) over this rank's
    sequences (logged as the global mean sum/count).
    """

    name = "grpo"
    config_cls = GRPOConfig
    needs_batch_fields = False  # True: prepare_update needs per-token fields of the whole batch
    # The hyperparameter values that switch the paper's mechanism off and leave only its base objective:
    # the *same-base control* of a study (study.py's "method:control"). tests/test_controls.py checks that
    # the control's update equals the base Method's exactly, so "method vs control" isolates the mechanism.
    control_overrides: dict = {}
    # The strengths used on the embedded toy model (--model toy) instead of the paper's, unless
    # --paper-defaults: the smallest that gave a measured, significant effect in docs/studies/toy (README
    # "Results on the toy"), or {} where none did. The paper's values stay the defaults for real models.
    toy_overrides: dict = {}

    def __init__(self, config: GRPOConfig | None = None):
        self.cfg = config or self.config_cls()

    # ---- what the loop must compute --------------------------------------------------------------
    def needs(self) -> set[str]:
        """The subset of KNOWN_NEEDS this method reads."""
        return {"ref_logp"} if self.cfg.kl_coef > 0 else set()

    def token_field_fns(self) -> dict:
        """name → f(raw_logits, logits, lse, targets) → [rows]: detached per-token fields the forward
        computes from each chunk of logits (raw_logits = z, logits = z / T, lse = logsumexp(z / T))."""
        return {}

    def curriculum(self):
        """A curriculum.CurriculumConfig when the method orders its prompts by semantic entropy (SENT)."""
        return None

    # ---- rollout-side hooks ----------------------------------------------------------------------
    def setup(self) -> None:
        """One-off work before the first rollout, e.g. loading an encoder so a missing package fails now."""

    def begin_step(self, stage: int) -> set[str]:
        """Called before each step's rollouts with the prompt sampler's curriculum stage (0 without one).
        Returns what the loop should do first: "reset_reference" (π_ref ← the current policy) and / or
        "reset_optimizer" (a fresh AdamW)."""
        return set()

    def keep_groups(self, correct: torch.Tensor, group_size: int) -> torch.Tensor | None:
        """DAPO dynamic sampling (§3.2): the groups worth training on, or None to keep every group."""
        return informative_groups(correct, group_size) if self.cfg.dynamic_sampling else None

    def shape_rewards(self, batch) -> torch.Tensor:
        """r_i = correct_i (+ DAPO's overlong term when on)."""
        rewards = batch["correct"].to(torch.float32).clone()
        if self.cfg.overlong_shaping:
            max_len = batch["max_new_tokens"]
            buffer = int(round(self.cfg.overlong_buffer * max_len))
            rewards = rewards + overlong_penalty(batch["lengths"], max_len, buffer, self.cfg.overlong_factor)
        return rewards

    def advantages(self, batch, rewards: torch.Tensor) -> torch.Tensor:
        return group_advantages(rewards, batch["group_size"], self.cfg.adv_scale, self.cfg.adv_eps)

    def prepare_update(self, batch, rows: list[int], dist) -> None:
        """Batch-level preparation before the first backward (token selection over the whole batch)."""

    # ---- the loss ----------------------------------------------------------------------------------
    def loss_rows(self, batch, rows: list[int]) -> list[int]:
        """The rows that count in the loss and its normalisers: all, or (DAPO's overlong filtering,
        `mask_truncated`) all but the truncated ones, as TRL does."""
        if not self.cfg.mask_truncated:
            return list(rows)
        return [r for r in rows if not batch["truncated"][r]]

    def loss_mask(self, mb) -> torch.Tensor:
        """m_{i,t}: the response mask, zero on truncated rows under `mask_truncated`."""
        mask = mb["response_mask"]
        if self.cfg.mask_truncated:
            mask = mask * (~mb["truncated"].bool()).to(mask.dtype).unsqueeze(-1)
        return mask

    def loss(self, mb, norm: Normaliser) -> tuple[torch.Tensor, dict]:
        """This micro-batch's share of the full-batch loss, the same for every method:

            ℓ_{i,t} = token_loss(Ã)_{i,t} + β_KL · k3(π_θ ‖ π_ref)_{i,t}
            L       = aggregate(ℓ, m, agg, norm) + extra_loss

        `mb` holds logp [b, T] (with grad), old_logp, response_mask, advantages [b], group_size and what
        `needs()` asked for; `norm` is the global `Normaliser`. Returns (loss, stats): the loop sums stats
        over micro-batches and ranks; "<x>_count" / "<x>_sum" become per-token means "<x>".
        """
        stats: dict[str, float] = {}
        mask = self.loss_mask(mb)
        advantages = self.update_advantages(mb, norm, stats)
        per_token, low, high = self.token_loss(mb, advantages, mask, stats)
        m = mask.bool()
        if low is not None:
            stats["clip_low_count"] = float((low & m).sum())
            stats["clip_high_count"] = float((high & m).sum())
        if self.cfg.kl_coef > 0:
            kl = k3_kl(mb["logp"], mb["ref_logp"])
            per_token = per_token + self.cfg.kl_coef * kl
            stats["kl_sum"] = float((kl.detach() * mask).sum())
        loss = aggregate(per_token, mask, self.cfg.agg, norm)
        extra = self.extra_loss(mb, mask, norm, stats)
        return (loss if extra is None else loss + extra), stats

    def update_advantages(self, mb, norm: Normaliser, stats: dict) -> torch.Tensor:
        """The advantages the loss uses for the micro-batch's rows (ARM shifts them with model outputs)."""
        return mb["advantages"]

    def token_loss(self, mb, advantages, mask, stats: dict):
        """Per-token policy loss ℓ [b, T] and the clipped-low / clipped-high masks (or None, None):
        the clipped surrogate. Lp-Reg and SENT add their per-token terms here."""
        return clipped_surrogate(mb["logp"], mb["old_logp"], advantages, self.cfg.eps_low, self.cfg.eps_high,
                                 self.cfg.dual_clip_c)

    def extra_loss(self, mb, mask, norm: Normaliser, stats: dict) -> torch.Tensor | None:
        """A loss added after aggregation (DSDR's local entropy term), already normalised; None: none."""
        return None

    # ---- resume ----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class GRPO(Method):
    """Alias with the paper's name; `Method` itself is GRPO."""


__all__ = [
    "group_advantages", "clipped_surrogate", "aggregate", "Normaliser", "k3_kl", "overlong_penalty",
    "informative_groups", "GRPOConfig", "PRESETS", "Method", "GRPO", "AGGREGATIONS", "KNOWN_NEEDS",
]
