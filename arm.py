"""ARM: ProGRPO's Advantage Re-weighting Mechanism (prompt perplexity vs answer confidence).

Read beside: Li, Goncharova, Kuznetsov, Oseledets, "Back to Basics: Revisiting Exploration in
Reinforcement Learning for LLM Reasoning via Generative Probabilities", arXiv 2602.05281 (ProGRPO).
There is no official code, and only the abstract is first-hand. The formulas below follow the paper *as
summarised in ../shared/specs/arm.md* (which renders them from secondary summaries); the labels
ARM-1…3 and A1–A10 are the spec's, not the paper's equation numbers.

The idea. GRPO keeps reinforcing the paths the policy already finds most likely, so entropy collapses
and pass@k at large k falls. ARM shifts the advantage of each response by how its confidence compares
with how familiar the prompt is:

    c_o,i = exp(mean log π_old over the ~20 % least likely sampled tokens of o_i)        (ARM-1)
    c_q   = exp(mean log π_old over the question tokens) = 1 / PPL(question)             (ARM-2)
    Ã_i   = A_i + α (c_q − c_o,i)   in every group with at least one correct response    (ARM-3)

A response more confident than the prompt is familiar is pushed down, a less confident one up. In an
all-correct group GRPO's A is 0 and ARM's shift is the only signal: it moves probability from the
over-confident correct solutions to the under-explored ones ("equilibrate the confidence across all
correct responses", abstract). The change is additive and bounded: |Ã − A| < α. The loss is the
clipped surrogate with Ã (clip 0.2/0.28, token-mean), no KL, no entropy bonus.

Readings and their switches (spec Decisions):
  * A2 `on_incorrect`   — True (default): every response of an active group is shifted, per the
                          formula; False: only correct responses ("across all correct responses").
  * A3 `on_all_correct` — True (default): all-correct groups are shifted; False: they keep A = 0.
  * A4 `low_select`     — "logp" (default): the low set L_i is the k lowest sampled-token log-probs;
                          "entropy": the k highest-entropy positions (needs the entropy hook).
  * A5 `prompt_low_only`— False (default): c_q averages all question tokens; True: the same bottom-20 %
                          rule as c_o.
  * A9 `kl_coef`        — 0 (default); e.g. 0.001 for a k3 KL to π_ref as in FlowRL's GRPO setup.

Where the data come from (spec A6). c_o and c_q are statistics of the rollout policy π_old, without
gradient. Both come from the forward pass the loop already runs: c_o from old_logp (logp.detach()
on-policy, the prepass with --mini-batches > 1), c_q from the prompt log-probs of the same forward
(declared as the "prompt_logp" need). Both are per-sequence, so each micro-batch computes its own
rows' Ã in `update_advantages`; no batch-level pass and no extra forward are needed.

Decision (ours) on the question span (spec ARM-2, Pitfall "Prompt span"): the rollout batch carries no
question boundaries inside the rendered prompt (math prompts get the chat or R1-Zero template,
data.render_prompts; the toy's are used as they are), so Q is every prompt token that has a log-prob,
i.e. `prompt_logp_mask` as the loop gives it (the first token of a sequence, e.g. BOS, has none). For
the toy Countdown task the prompt *is* the question. With templated prompts Q also holds the template /
system tokens, which inflates c_q.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from grpo import GRPO, GRPOConfig, Normaliser

LOW_SELECT = ("logp", "entropy")


# ====================================================================================================
# Hyperparameters (spec Defaults; sources noted)
# ====================================================================================================
@dataclass
class ARMConfig(GRPOConfig):
    # --- the base (secondary summaries: clip [0.8, 1.28], DAPO-style token-level objective) ---
    eps_low: float = 0.2
    eps_high: float = 0.28
    agg: str = "token-mean"
    adv_scale: str = "group"  # z-score with the unbiased std (verl convention; project decision)
    adv_eps: float = 1e-6
    kl_coef: float = 0.0  # β: not reported; project decision (spec A9)
    dynamic_sampling: bool = False  # off: it would drop the all-correct groups ARM adds signal to
    overlong_shaping: bool = False  # off: project decision
    # --- ARM ---
    alpha: float = 0.3  # α of ARM-3: not reported ("must be tuned"); project decision, sweep {0.1, 0.3, 1.0}
    low_frac: float = 0.2  # ρ_low of ARM-1: k_i = max(1, ceil(ρ_low·T_i)) (secondary summaries)
    low_select: str = "logp"  # ranking key of L_i: "logp" (project decision) | "entropy" (spec A4)
    on_incorrect: bool = True  # shift the incorrect responses of mixed groups too (spec A2)
    on_all_correct: bool = True  # shift all-correct groups (spec A3)
    prompt_low_only: bool = False  # c_q over the bottom-ρ_low question tokens only (spec A5)

    def __post_init__(self):
        super().__post_init__()  # the base objective's ranges (grpo.GRPOConfig)
        if self.alpha < 0:
            raise ValueError(f"alpha must be >= 0 (the shift α(c_q − c_o) keeps its sign), got {self.alpha}")
        if not 0 < self.low_frac <= 1:
            raise ValueError(f"low_frac must be in (0, 1], got {self.low_frac}")
        if self.low_select not in LOW_SELECT:
            raise ValueError(f"low_select must be 'logp' or 'entropy', got {self.low_select!r}")


# ====================================================================================================
# Confidences (ARM-1, ARM-2): pure functions on detached per-token tensors
# ====================================================================================================


def low_token_count(n_valid: torch.Tensor, low_frac: float = 0.2) -> torch.Tensor:
    """k = max(1, ceil(ρ_low · T)) per row (ARM-1): T = 1 → 1, T = 10 → 2, T = 11 → 3.

    The ceiling has a tiny tolerance: a product ρ_low·T that is an integer on paper must not round up
    to the next k because floating point put it a few ulps above.
    """
    k = torch.ceil(n_valid.to(torch.float64) * low_frac - 1e-9).long()
    return k.clamp(min=1)


def low_token_mask(logp: torch.Tensor, mask: torch.Tensor, low_frac: float = 0.2,
                   entropy: torch.Tensor | None = None) -> torch.Tensor:
    """The low set L_i as a bool mask [S, T]: the k_i valid positions of each row that are least likely.

    Ranking key: the sampled-token log-prob, lowest first (spec default), or with `entropy` given, the
    token entropy, highest first ("most uncertain", spec A4). Masked and padded positions get the key
    +inf before the sort, so they are never selected (spec Pitfall "Bottom-k ranking"); k_i is capped
    at T_i, so a row with no valid token selects nothing. Ties are broken arbitrarily (by the sort).
    """
    valid = mask.bool()
    key = (-entropy if entropy is not None else logp).detach().to(torch.float64)
    key = key.masked_fill(~valid, float("inf"))
    order = key.argsort(dim=-1, stable=True)  # ascending: least likely / most uncertain first
    n_valid = valid.sum(dim=-1)
    k = torch.minimum(low_token_count(n_valid, low_frac), n_valid)
    rank_selected = torch.arange(key.shape[-1], device=key.device).unsqueeze(0) < k.unsqueeze(-1)
    return torch.zeros_like(valid).scatter(-1, order, rank_selected)


def mean_confidence(logp: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
    """exp(mean of logp over `selected`) per row: a geometric-mean probability in (0, 1].

    An empty selection (a row with no scored token) gives exp(0) = 1: no evidence, no shift from it.
    """
    sel = selected.to(torch.float64)
    total = (logp.detach().to(torch.float64) * sel).sum(dim=-1)
    mean = total / sel.sum(dim=-1).clamp(min=1.0)
    return torch.exp(mean).to(torch.float32)


def answer_confidence(logp: torch.Tensor, mask: torch.Tensor, low_frac: float = 0.2,
                      entropy: torch.Tensor | None = None) -> torch.Tensor:
    """c_o,i = exp((1/k_i) Σ_{t∈L_i} log π_old(o_{i,t} | h_{i,t}))  (ARM-1), [S] in (0, 1], no gradient.

    `logp` [S, T] are π_old's sampled-token log-probs (old_logp), `mask` the response mask. This is the
    geometric-mean probability of the ~20 % least likely sampled tokens: most chain-of-thought tokens
    are near-deterministic and would dilute a plain length-normalised confidence ("low-probability token
    length normalisation"). With `entropy` [S, T] the low set is chosen by entropy instead (spec A4);
    the averaged quantity is still the sampled-token log-prob.
    """
    return mean_confidence(logp, low_token_mask(logp, mask, low_frac, entropy))


def prompt_confidence(prompt_logp: torch.Tensor, prompt_mask: torch.Tensor,
                      low_frac: float | None = None) -> torch.Tensor:
    """c_q = exp((1/|Q|) Σ_{j∈Q} log π_old(x_j | x_<j)) = 1 / PPL(question)  (ARM-2), [S], no gradient.

    `prompt_logp` [S, P] holds the log-prob of prompt token j scored by the logits at j−1, and
    `prompt_mask` is 1 on the positions of Q that have one. With `low_frac` set, only the bottom
    max(1, ceil(low_frac·|Q|)) question tokens are averaged (spec A5, `prompt_low_only`).
    """
    if low_frac is None:
        return mean_confidence(prompt_logp, prompt_mask.bool())
    return mean_confidence(prompt_logp, low_token_mask(prompt_logp, prompt_mask, low_frac))


# ====================================================================================================
# The shifted advantage (ARM-3)
# ====================================================================================================


def arm_active(correct: torch.Tensor, group_size: int, on_incorrect: bool = True,
               on_all_correct: bool = True) -> torch.Tensor:
    """Which responses ARM shifts, bool [S] (groups of `group_size` contiguous).

    Default: every response of every group with at least one correct answer (ARM-3). The test uses the
    correctness bits, not Σr, so ±1 or shaped rewards cannot fake an "all wrong" group (spec A8).
    on_incorrect=False keeps incorrect responses at A (A2); on_all_correct=False keeps all-correct groups
    at A = 0 (A3).
    """
    bits = correct.reshape(-1, group_size).bool()
    has_correct = bits.any(dim=1, keepdim=True)
    active = has_correct.expand_as(bits)
    if not on_all_correct:
        active = active & ~bits.all(dim=1, keepdim=True)
    if not on_incorrect:
        active = active & bits
    return active.reshape(-1)


def shift_advantages(advantages: torch.Tensor, c_q: torch.Tensor, c_o: torch.Tensor, active: torch.Tensor,
                     alpha: float) -> torch.Tensor:
    """Ã_i = A_i + α (c_q,i − c_o,i) where `active`, A_i elsewhere (ARM-3); detached, per sequence.

    Additive (A1), neither clipped nor re-standardised (A7). Inactive rows are returned bit-for-bit
    (torch.where, not a multiplication by 0), and α = 0 adds an exact 0.0, so α = 0 is GRPO exactly.
    Example (spec): G = 8 with one correct response has A = +2.474867 / −0.353553; with α = 0.3 and
    c_q = 0.5 the correct response with c_o = 0.2 gets 2.564867, an incorrect one with c_o = 0.6 gets
    −0.383553 (or −0.353553 with on_incorrect=False, where `arm_active` leaves it out).
    """
    shift = alpha * (c_q.detach().to(advantages.dtype) - c_o.detach().to(advantages.dtype))
    return torch.where(active.bool(), advantages.detach() + shift, advantages.detach())


# ====================================================================================================
# The method
# ====================================================================================================


class ARM(GRPO):
    """GRPO (clip 0.2/0.28, token-mean) with the ARM-3 advantage shift. Hooks overridden:
    `needs` (prompt log-probs; entropy for low_select="entropy"), `advantages` (which responses the
    shift applies to, from the correctness bits) and `update_advantages` (c_o, c_q and Ã for the
    micro-batch's rows; the base loss then uses Ã)."""

    name = "arm"
    config_cls = ARMConfig
    control_overrides = {"alpha": 0.0}  # ARM-3 shifts by α(c_q − c_o): α = 0 leaves the GRPO advantage
    # no toy strength: the default α = 0.3 already acts on the toy (docs/studies/toy, 3 seeds: effective
    # solutions +0.38 [+0.19, +0.59], pass@64 +0.08 [+0.01, +0.16], pass@1 −0.03 [−0.08, +0.03])
    toy_overrides: dict = {}

    def needs(self) -> set[str]:
        needs = super().needs() | {"prompt_logp"}  # c_q from the training forward's prompt positions (A6)
        if self.cfg.low_select == "entropy":
            needs.add("entropy")
        return needs

    def advantages(self, batch, rewards: torch.Tensor) -> torch.Tensor:
        """GRPO's A, plus the per-sequence flag "arm_active" the loss uses once c_o and c_q are known.

        A is computed before any forward pass (no model outputs yet); whether a response is shifted
        depends only on its group's correctness bits, so it is decided here for whole groups, which a
        micro-batch may split.
        """
        adv = super().advantages(batch, rewards)
        active = arm_active(batch["correct"], batch["group_size"], self.cfg.on_incorrect, self.cfg.on_all_correct)
        batch.setdefault("per_seq", {})["arm_active"] = active.to(torch.float32)
        # where the shift goes (logged in update_advantages): all-correct groups vs mixed groups
        G = batch["group_size"]
        all_correct = batch["correct"].reshape(-1, G).bool().all(dim=1).repeat_interleave(G)
        batch["per_seq"]["arm_all_correct"] = all_correct.to(torch.float32)
        # share of the rollout batch's responses that ARM shifts (this rank's (sum, count); global mean)
        batch.setdefault("method_metrics", {})["arm/active_frac"] = (float(active.sum()), float(active.numel()))
        return adv

    def confidences(self, mb) -> tuple[torch.Tensor, torch.Tensor]:
        """(c_q, c_o) of the micro-batch's rows from π_old's detached fields (ARM-1, ARM-2; A4, A5)."""
        entropy = mb["entropy"] if self.cfg.low_select == "entropy" else None
        c_o = answer_confidence(mb["old_logp"], mb["response_mask"], self.cfg.low_frac, entropy)
        c_q = prompt_confidence(mb["prompt_logp"], mb["prompt_logp_mask"],
                                self.cfg.low_frac if self.cfg.prompt_low_only else None)
        return c_q, c_o

    def update_advantages(self, mb, norm: Normaliser, stats: dict) -> torch.Tensor:
        c_q, c_o = self.confidences(mb)
        base_adv = mb["advantages"]
        shifted = shift_advantages(base_adv, c_q, c_o, mb["arm_active"], self.cfg.alpha)  # ARM-3
        # Means over the sequences of the optimisation batch: each micro-batch adds its rows' share
        # Σ/S (S global), and the loop sums these over micro-batches and ranks. Rows the loss drops
        # (mask_truncated) are left out, as they are from S.
        counted = torch.ones_like(c_o)
        if self.cfg.mask_truncated:
            counted = (~mb["truncated"].bool()).to(c_o.dtype)
        n_seqs = max(norm.n_seqs, 1.0)
        delta = (shifted - base_adv).to(c_o.dtype)
        stats["arm/c_o"] = float((c_o * counted).sum()) / n_seqs  # answer confidence (ARM-1)
        stats["arm/c_q"] = float((c_q * counted).sum()) / n_seqs  # prompt confidence (ARM-2)
        stats["arm/shift"] = float((delta * counted).sum()) / n_seqs  # mean Ã − A (0 where inactive)
        stats["arm/shift_abs"] = float((delta.abs() * counted).sum()) / n_seqs  # mean |Ã − A| < α
        # the same sum split by group type (the two add up to shift_abs): how much of ARM's signal lands on
        # all-correct groups, where GRPO has none, versus on mixed groups, where it re-weights GRPO's
        in_all_correct = mb["arm_all_correct"].to(delta.dtype) * counted
        stats["arm/shift_abs_all_correct"] = float((delta.abs() * in_all_correct).sum()) / n_seqs
        stats["arm/shift_abs_mixed"] = float((delta.abs() * (counted - in_all_correct)).sum()) / n_seqs
        return shifted


__all__ = [
    "ARMConfig", "ARM", "low_token_count", "low_token_mask", "mean_confidence", "answer_confidence",
    "prompt_confidence", "arm_active", "shift_advantages",
]
