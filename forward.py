"""forward.py — per-token quantities (log-probs, entropy, prompt log-probs, a method's own fields such as
Lp-Reg's min-p proxy) from one decoder pass, with the vocabulary-sized work done on chunks of rows.

`token_fields` runs the decoder once and the LM head + log-softmax on chunks (`_rows_in_chunks`,
`_chunk_stats`), so [batch, length, vocab] logits never exist at once; `split_micro_batches` /
`slice_batch` cut a padded batch into micro-batches under a token budget, `place_fields` writes their
results back, and `no_grad_fields` is the one micro-batched no-grad pass (the training prepass,
evaluation's entropy, the SE curriculum's scoring). Separate because every method's loss, evaluation and
the SE curriculum all read the policy through it.
"""

from __future__ import annotations

import torch

from distributed import autocast, dummy_batch, pad_forwards, to_device

# ====================================================================================================
# Per-token quantities from one forward pass, computed over the vocabulary in chunks of rows
# ====================================================================================================
def _chunk_stats(h, lm_head, targets, temperature, want: set, field_fns: dict | None = None) -> dict:
    """Log-prob of `targets` (with grad if h requires grad) and detached extras for rows of `h`:
    "entropy" if wanted, and name → fn(raw_logits, logits, lse, targets) for each method field function
    (Lp-Reg's proxy). raw_logits are z, logits z / T (the same tensor at T = 1), lse = logsumexp(z / T).
    "entropy_grad" in `want`: "entropy" is computed outside no_grad, so it carries the gradient of h (the
    entropy bonus, entropy.py); autograd then keeps this chunk's softmax for the backward."""
    raw = lm_head(h).float()  # [rows, V] in fp32
    logits = raw if temperature == 1.0 else raw / temperature
    if not field_fns:
        del raw  # only the method fields read the raw logits: free them before the softmax below
    lse = torch.logsumexp(logits, dim=-1)
    target_logit = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    out = {"logp": target_logit - lse}
    if "entropy_grad" in want:  # the same formula as below, differentiable: ∂H/∂z_v = −p_v (log p_v + H) / T
        out["entropy"] = lse - (torch.softmax(logits, dim=-1) * logits).sum(-1)
    with torch.no_grad():
        for name, fn in (field_fns or {}).items():
            out[name] = fn(raw.detach(), logits.detach(), lse.detach(), targets)
        if field_fns:
            del raw
        if "entropy" in want and "entropy" not in out:  # H = logsumexp(z) − Σ softmax(z) z
            out["entropy"] = lse - (torch.softmax(logits, dim=-1) * logits).sum(-1)
    return out


def token_fields(model, batch: dict, temperature: float, want: set, with_grad: bool,
                 chunk_rows: int = 4096, field_fns: dict | None = None) -> dict:
    """Per-token fields [S, T] for the response tokens of `batch` (and prompt log-probs if wanted).

    `want` ⊆ {"entropy", "entropy_grad", "prompt_logp"}; "logp" is always returned (with grad when
    `with_grad`), and each of `field_fns` (a method's `token_field_fns()`) by its name. "entropy" is
    detached, except under "entropy_grad" with `with_grad`: then it is the entropy of π_θ with its
    gradient (entropy.py's bonus). The decoder runs once; the LM head + log-softmax run on chunks of
    `chunk_rows` valid token rows so that only [chunk_rows, V] logits exist at a time. With grad, each
    chunk is checkpointed (its logits are recomputed in backward instead of being stored).
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
        rows = _rows_in_chunks(h, lm_head, targets, temperature, want, chunk_rows, with_grad, field_fns)
        out = {}
        grad_names = {"logp", "entropy"} if "entropy_grad" in want else {"logp"}
        for name, values in rows.items():
            full = torch.zeros(mask.shape, dtype=values.dtype, device=values.device)
            out[name] = full.masked_scatter(mask, values) if name in grad_names and with_grad else \
                full.masked_scatter(mask, values.detach())
        if "prompt_logp" in want:  # ARM's prompt confidence: token j of the prompt scored at j-1
            real = batch["prompt_mask"].bool()
            pm = torch.zeros_like(real)  # token j is scored iff token j-1 is real: the first token
            pm[:, 1:] = real[:, 1:] & real[:, :-1]  # of a (left-padded) sequence has no log-prob
            hp = hidden[:, :P - 1][pm[:, 1:]].detach()
            tp = input_ids[:, 1:P][pm[:, 1:]]
            vals = _rows_in_chunks(hp, lm_head, tp, temperature, set(), chunk_rows, False)["logp"]
            full = torch.zeros(pm.shape, dtype=vals.dtype, device=vals.device)
            out["prompt_logp"] = full.masked_scatter(pm, vals.detach())
            out["prompt_logp_mask"] = pm.float()
    return out


def _rows_in_chunks(h, lm_head, targets, temperature, want, chunk_rows, with_grad, field_fns=None):
    parts: dict[str, list] = {}
    grad_entropy = with_grad and "entropy_grad" in want  # the entropy bonus: H of π_θ with its gradient
    # the detached extras, from a second no-grad pass over a checkpointed chunk
    detached = (want - {"entropy", "entropy_grad"}) if grad_entropy else want
    extras = bool(detached & {"entropy"} or field_fns)
    for s in range(0, h.shape[0], chunk_rows):
        hs, ts = h[s:s + chunk_rows], targets[s:s + chunk_rows]
        if with_grad and h.shape[0] > chunk_rows:
            # recompute this chunk's logits in backward: memory O(chunk · V) instead of O(N · V)
            if grad_entropy:  # logp and H from the same checkpointed function (one recomputation)
                logp, entropy = torch.utils.checkpoint.checkpoint(
                    lambda a, b: tuple(_chunk_stats(a, lm_head, b, temperature, {"entropy_grad"})[k]
                                       for k in ("logp", "entropy")), hs, ts, use_reentrant=False)
                stats = {"logp": logp, "entropy": entropy}
            else:
                logp = torch.utils.checkpoint.checkpoint(
                    lambda a, b: _chunk_stats(a, lm_head, b, temperature, set())["logp"], hs, ts,
                    use_reentrant=False)
                stats = {"logp": logp}
            if extras:
                with torch.no_grad():
                    extra = _chunk_stats(hs.detach(), lm_head, ts, temperature, detached, field_fns)
                stats.update({k: v for k, v in extra.items() if k != "logp"})
        else:
            stats = _chunk_stats(hs, lm_head, ts, temperature, want, field_fns)
        for k, v in stats.items():
            parts.setdefault(k, []).append(v)
    if not parts:  # no valid rows
        z = h.new_zeros((0,), dtype=torch.float32)
        names = (want & {"entropy"}) | set(field_fns or {})
        out = {"logp": z + h.sum() * 0 if with_grad else z, **{k: z for k in names}}
        if "entropy_grad" in want:
            out["entropy"] = z + h.sum() * 0 if with_grad else z
        return out
    return {k: torch.cat(v) for k, v in parts.items()}


@torch.no_grad()
def no_grad_fields(model, batch: dict, rows: list[int], temperature: float, want: set, token_budget: int,
                   chunk_rows: int = 4096, field_fns: dict | None = None, dist=None, pad_id: int = 0) -> dict:
    """One no-grad forward over `rows` of a padded batch, in micro-batches under `token_budget`:
    {"logp", each of `want` and `field_fns`} as full-batch [S, T] CPU tensors (zeros outside `rows`;
    prompt fields [S, P]). The one place the policy is read without a gradient: the training prepass,
    evaluation's entropy and the SE curriculum's scoring pass. With `dist` under FSDP2 every rank runs as
    many forwards as the busiest one (each forward is a collective), with or without rows."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    S, T = batch["response_mask"].shape
    names = {"logp"} | (want & {"entropy"}) | set(field_fns or {})
    out = {k: torch.zeros((S, T), dtype=torch.float32) for k in names}
    micro_batches = split_micro_batches(batch, rows, token_budget) if rows else []
    for _ in range(pad_forwards(dist, len(micro_batches)) if dist is not None else 0):
        token_fields(model, dummy_batch(pad_id, device), temperature, set(), with_grad=False)
    for mb in micro_batches:
        idx = mb["rows"]
        mb = to_device(mb, device)
        with autocast(device):
            fields = token_fields(model, mb, temperature, want, with_grad=False, chunk_rows=chunk_rows,
                                  field_fns=field_fns)
        place_fields(out, batch, idx, fields)
    model.train(was_training)
    return out


def padding_backward(model, n_padding: int, pad_id: int, device, temperature: float) -> None:
    """FSDP2: `n_padding` forwards + backwards of zero loss, so that this rank runs as many as the busiest
    one (every forward and backward is a collective; count them with `pad_forwards` *before* the first)."""
    for _ in range(n_padding):
        with autocast(device):
            logp = token_fields(model, dummy_batch(pad_id, device), temperature, set(), with_grad=True)["logp"]
        (0.0 * logp.sum()).backward()


def split_micro_batches(batch: dict, rows: list[int], token_budget: int) -> list[dict]:
    """Micro-batches of `rows` whose padded size (sequences × length) fits the budget, each trimmed to its
    own longest prompt/response.

    Rows that fit in one forward stay one micro-batch, in their order. Otherwise they are packed longest
    first, so that each micro-batch holds rows of similar length and carries little padding: with
    responses of very different lengths (long reasoning traces next to short answers) consecutive rows
    would pad every micro-batch to its longest member. The grouping changes no per-token value and the
    loss normalisers are global (grpo.Normaliser), so only the order of the gradient sum changes; the
    statistics that are scoped per micro-batch on purpose (SENT's and Lp-Reg's "microbatch" scope, the
    releases' reading) are then taken over rows of similar length.
    """
    lengths = batch["lengths"]
    prompt_lens = batch["prompt_mask"].sum(-1).long()
    width = lambda idx: int(prompt_lens[idx].max() + lengths[idx].max().clamp(min=1))  # noqa: E731
    if width(rows) * len(rows) > token_budget:  # several forwards: longest first (stable: ties keep order)
        rows = sorted(rows, key=lambda r: -int(prompt_lens[r] + lengths[r].clamp(min=1)))
    out, current = [], []
    for r in rows:
        cand = current + [r]
        if current and width(cand) * len(cand) > token_budget:
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
