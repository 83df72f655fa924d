"""forward.py — per-token quantities (log-probs, entropy, Lp-Reg's min-p proxy, prompt log-probs) from one
decoder pass, with the vocabulary-sized work done on chunks of rows.

`token_fields` runs the decoder once and the LM head + log-softmax on chunks (`_rows_in_chunks`,
`_chunk_stats`), so [batch, length, vocab] logits never exist at once; `split_micro_batches` /
`slice_batch` cut a padded batch into micro-batches under a token budget, and `place_fields` writes their
results back. Separate because the loss of every method, evaluation's entropy and the SE curriculum all
read the policy through it.
"""

from __future__ import annotations

import math

import torch

# ====================================================================================================
# Per-token quantities from one forward pass, computed over the vocabulary in chunks of rows
# ====================================================================================================
def _chunk_stats(h, lm_head, targets, temperature, want: set, minp_kappa: float, fixed_tau: float | None = None,
                 filter_logits: str = "raw"):
    """Log-prob of `targets` (with grad if h requires grad) and detached extras for rows of `h`.

    filter_logits (Lp-Reg's proxy at T ≠ 1, LpRegConfig.lp_filter_logits): "raw" decides the keep set on
    the raw logits z before the division by T (official order: `apply_min_p`, then `div_(temperature)`),
    "tempered" on z/T. Either way the kept tokens share softmax(z/T). At T = 1 both are the same."""
    if filter_logits not in ("raw", "tempered"):
        raise ValueError(f"filter_logits must be 'raw' or 'tempered', got {filter_logits!r}")

    def proxy_dropped(z, lse_z):  # bool [rows, V]: what the proxy filter drops (logit space, fp32, spec L6)
        # min-p keeps p ≥ κ·p_max; the fixed-τ ablation keeps p ≥ τ
        if fixed_tau is not None:
            threshold = lse_z + math.log(fixed_tau)
        else:
            threshold = z.max(dim=-1).values + math.log(minp_kappa)
        return z < threshold.unsqueeze(-1)

    raw = lm_head(h).float()  # [rows, V] in fp32
    dropped = None
    if "minp_proxy_logp" in want and filter_logits == "raw" and temperature != 1.0:
        with torch.no_grad():  # a bool mask: the raw logits need not outlive the division below
            z = raw.detach()
            dropped = proxy_dropped(z, torch.logsumexp(z, dim=-1) if fixed_tau is not None else None)
            del z
    logits = raw / temperature
    del raw
    lse = torch.logsumexp(logits, dim=-1)
    target_logit = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    out = {"logp": target_logit - lse}
    with torch.no_grad():
        if "entropy" in want:  # H = logsumexp(z) − Σ softmax(z) z
            out["entropy"] = lse - (torch.softmax(logits, dim=-1) * logits).sum(-1)
        if "minp_proxy_logp" in want:  # Lp-Reg Eq. 5: keep p ≥ κ·p_max, renormalise, filtered → −1e4
            if dropped is None:  # T = 1 or the "tempered" order: the keep test on the tempered logits
                dropped = proxy_dropped(logits, lse)
            row_max = logits.max(dim=-1).values
            # log Z = log Σ_kept p: one [rows, V] temporary zeroed in place, not a masked copy of the
            # logits plus logsumexp's own buffer (measured: 1.36x -> 1.08x the plain pass at V = 152k)
            scaled = torch.sub(logits, row_max.unsqueeze(-1)).exp_()
            scaled.masked_fill_(dropped, 0.0)
            log_z = torch.log(scaled.sum(-1)) + row_max - lse
            del scaled
            token_kept = ~dropped.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
            del dropped
            out["minp_proxy_logp"] = torch.where(token_kept, (target_logit - lse) - log_z,
                                                 torch.full_like(lse, -1e4))
    return out


def token_fields(model, batch: dict, temperature: float, want: set, with_grad: bool,
                 chunk_rows: int = 4096, minp_kappa: float = 0.02, fixed_tau: float | None = None,
                 filter_logits: str = "raw") -> dict:
    """Per-token fields [S, T] for the response tokens of `batch` (and prompt log-probs if wanted).

    `want` ⊆ {"entropy", "minp_proxy_logp", "prompt_logp"}; "logp" is always returned (with grad when
    `with_grad`). The decoder runs once; the LM head + log-softmax run on chunks of `chunk_rows` valid
    token rows so that only [chunk_rows, V] logits exist at a time. With grad, each chunk is
    checkpointed (its logits are recomputed in backward instead of being stored). minp_kappa, fixed_tau
    and filter_logits configure Lp-Reg's proxy (see `proxy_filter` and `_chunk_stats`).
    """
    input_ids, attn = batch["input_ids"], batch["attention_mask"]
    P = batch["prompt_len"]
    # Positions as generate() computed them for left-padded prompts: count only real tokens.
    position_ids = (attn.cumsum(-1) - 1).clamp(min=0)
    ctx = torch.enable_grad() if with_grad else torch.no_grad()
    with ctx:
        hidden = model.base_model(input_ids=input_ids, attention_mask=attn, position_ids=position_ids,
                                  use_cache=False).last_hidden_state
        lm_head = model.get_output_embeddings()
        T = input_ids.shape[1] - P
        mask = batch["response_mask"].bool()
        # logits at position t predict token t+1: response token j is predicted by position P-1+j
        h = hidden[:, P - 1:P - 1 + T][mask]
        targets = input_ids[:, P:][mask]
        rows = _rows_in_chunks(h, lm_head, targets, temperature, want, chunk_rows, minp_kappa, with_grad, fixed_tau,
                               filter_logits)
        out = {}
        for name, values in rows.items():
            full = torch.zeros(mask.shape, dtype=values.dtype, device=values.device)
            out[name] = full.masked_scatter(mask, values) if name == "logp" and with_grad else \
                full.masked_scatter(mask, values.detach())
        if "prompt_logp" in want:  # ARM's prompt confidence: token j of the prompt scored at j-1
            real = batch["prompt_mask"].bool()
            pm = torch.zeros_like(real)  # token j is scored iff token j-1 is real: the first token
            pm[:, 1:] = real[:, 1:] & real[:, :-1]  # of a (left-padded) sequence has no log-prob
            hp = hidden[:, :P - 1][pm[:, 1:]].detach()
            tp = input_ids[:, 1:P][pm[:, 1:]]
            vals = _rows_in_chunks(hp, lm_head, tp, temperature, set(), chunk_rows, minp_kappa, False)["logp"]
            full = torch.zeros(pm.shape, dtype=vals.dtype, device=vals.device)
            out["prompt_logp"] = full.masked_scatter(pm, vals.detach())
            out["prompt_logp_mask"] = pm.float()
    return out


def proxy_filter(method_cfg) -> dict:
    """Lp-Reg's proxy filter settings from a method config: min-p with κ (default), or fixed τ, and
    whether the keep test sees the raw logits (default, official order) or the tempered ones."""
    fixed = getattr(method_cfg, "lp_filter", "minp") == "fixed"
    return {"minp_kappa": getattr(method_cfg, "kappa", 0.02),
            "fixed_tau": getattr(method_cfg, "lp_tau", None) if fixed else None,
            "filter_logits": getattr(method_cfg, "lp_filter_logits", "raw")}


def _rows_in_chunks(h, lm_head, targets, temperature, want, chunk_rows, minp_kappa, with_grad, fixed_tau=None,
                    filter_logits="raw"):
    parts: dict[str, list] = {}
    for s in range(0, h.shape[0], chunk_rows):
        hs, ts = h[s:s + chunk_rows], targets[s:s + chunk_rows]
        if with_grad and h.shape[0] > chunk_rows:
            # recompute this chunk's logits in backward: memory O(chunk · V) instead of O(N · V)
            logp = torch.utils.checkpoint.checkpoint(
                lambda a, b: _chunk_stats(a, lm_head, b, temperature, set(), minp_kappa)["logp"],
                hs, ts, use_reentrant=False)
            stats = {"logp": logp}
            if want:
                with torch.no_grad():
                    extra = _chunk_stats(hs.detach(), lm_head, ts, temperature, want, minp_kappa, fixed_tau,
                                         filter_logits)
                stats.update({k: v for k, v in extra.items() if k != "logp"})
        else:
            stats = _chunk_stats(hs, lm_head, ts, temperature, want, minp_kappa, fixed_tau, filter_logits)
        for k, v in stats.items():
            parts.setdefault(k, []).append(v)
    if not parts:  # no valid rows
        z = h.new_zeros((0,), dtype=torch.float32)
        return {"logp": z + h.sum() * 0 if with_grad else z, **{k: z for k in want}}
    return {k: torch.cat(v) for k, v in parts.items()}


def split_micro_batches(batch: dict, rows: list[int], token_budget: int) -> list[dict]:
    """Consecutive micro-batches of `rows` whose padded size (sequences × length) fits the budget.

    Each micro-batch is trimmed to its own longest prompt/response, so short batches cost less.
    """
    lengths = batch["lengths"]
    prompt_lens = batch["prompt_mask"].sum(-1).long()
    out, current = [], []
    for r in rows:
        cand = current + [r]
        width = int(prompt_lens[cand].max() + lengths[cand].max().clamp(min=1))
        if current and width * len(cand) > token_budget:
            out.append(current)
            current = [r]
        else:
            current = cand
    if current:
        out.append(current)
    return [slice_batch(batch, idx) for idx in out]


def slice_batch(batch: dict, idx: list[int]) -> dict:
    index = torch.tensor(idx, dtype=torch.long)
    P = batch["prompt_len"]
    p_keep = int(batch["prompt_mask"][index].sum(-1).max())
    t_keep = max(1, int(batch["lengths"][index].max()))
    mb = {"rows": index, "prompt_len": p_keep}
    mb["input_ids"] = batch["input_ids"][index][:, P - p_keep:P + t_keep]
    mb["attention_mask"] = batch["attention_mask"][index][:, P - p_keep:P + t_keep]
    mb["prompt_mask"] = batch["prompt_mask"][index][:, P - p_keep:]
    mb["response_mask"] = batch["response_mask"][index][:, :t_keep]
    for key in ("lengths", "truncated", "advantages", "correct", "group_ids"):
        if key in batch:
            mb[key] = batch[key][index]
    for key, value in batch.get("per_seq", {}).items():  # per-sequence tensors a method attached [S]
        mb[key] = value[index]
    if "group_size" in batch:
        mb["group_size"] = batch["group_size"]
    for key, value in batch.get("fields", {}).items():  # per-token fields from the prepass [S, T]
        mb[key] = value[index][:, :t_keep] if value.dim() == 2 and value.shape[1] >= t_keep else value[index]
    return mb


def place_fields(out: dict, batch: dict, idx: torch.Tensor, fields: dict) -> None:
    """Write a micro-batch's per-token fields into full-batch [S, T] (prompt fields: [S, P]) CPU tensors."""
    S, T = batch["response_mask"].shape
    for k, v in fields.items():
        width = v.shape[1]
        if k not in out:
            full_w = batch["prompt_mask"].shape[1] if k.startswith("prompt") else T
            out[k] = torch.zeros((S, full_w), dtype=v.dtype)
        if k.startswith("prompt"):  # prompt fields are left-aligned: pad on the left
            out[k][idx, -width:] = v.cpu()
        else:
            out[k][idx, :width] = v.cpu()
