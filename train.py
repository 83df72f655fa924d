"""train.py — the shared RLVR loop: data → rollouts → verify → method hooks → update → logs/checkpoints.

Run the embedded default (toy Countdown task, tiny model warm-started locally on first use):

    torchrun --nproc_per_node 1 train.py --method grpo
    python train.py --method dapo --steps 100 --out runs/dapo

and a real model, for users with network access:

    torchrun --nproc_per_node 8 train.py --method grpo --model Qwen/Qwen2.5-Math-1.5B \
        --dataset open-r1/DAPO-Math-17K-Processed

One training step (grpo spec "One training step"):
  1. take B prompts (each rank its share, whole groups), sample G responses each with pure sampling
     (temperature T, top_p 1, no top_k) so the trainer's log-probs describe the sampling distribution;
  2. verify them (verifier.py) → correctness bits, canonical solution keys, extracted answers;
  3. the method shapes rewards and computes advantages (grpo.py `Method` hooks);
  4. for each optimiser step: micro-batches bounded by a token budget, forward, per-token loss,
     aggregation with the *global* normaliser, backward; then clip the gradient norm and step AdamW.
The loop computes only what the method declares in `needs()` (reference log-probs, entropy, min-p
proxy, prompt log-probs, ...), and full-vocabulary work (log-softmax, entropy, proxy) is done on
chunks of rows so that [batch, length, vocab] logits never exist at once.

The loop's parts live in their own modules: config.py (settings and their checks), data.py (prompts),
rollout.py (the model and sampling), forward.py (per-token quantities), distributed.py, runfolder.py (disk).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

import eval as evaluation  # (the project's eval.py, named to avoid the builtin)
import verifier
from arm import ARM
from config import (ConfigError, OneLineParser, TrainConfig, add_dataclass_args, coerce_fields, flag_name,
                    resolve_defaults, validate)
from curriculum import SENT, build_curriculum_sampler
from data import PromptSampler, check_prompt_lengths, collate, load_prompts, render_prompts
from distributed import (Dist, autocast, dummy_batch, pad_forwards, rng_state, set_rng_state, set_seed,
                         shard_model, to_device)
from dsdr import DSDR
from forward import place_fields, proxy_filter, split_micro_batches, token_fields
from grpo import KNOWN_NEEDS, PRESETS, Method, Normaliser, informative_groups
from lpreg import LpReg
from rollout import load_policy, make_rollout, resolve_model_path
from runfolder import (CheckpointError, Logger, warn_line, check_resume_compatible, close_run_folder,
                       open_run_folder, resume_checkpoint, save_checkpoint, step_was_skipped)

# ====================================================================================================
# Methods: the one registry. name → (class, base preset): grpo / dapo / dr_grpo are the base `Method`
# with a grpo.py preset, the papers' methods their own class with their paper defaults.
# ====================================================================================================
METHODS = {
    "grpo": (Method, "grpo"),
    "dapo": (Method, "dapo"),
    "dr_grpo": (Method, "dr_grpo"),
    "dsdr": (DSDR, None),
    "lpreg": (LpReg, None),
    "arm": (ARM, None),
    "sent": (SENT, None),
}


def method_class(name: str):
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}; choose one of: {', '.join(METHODS)}")
    return METHODS[name][0]


def method_config_defaults(name: str):
    """The method's config with its paper defaults (or the grpo.py preset for grpo/dapo/dr_grpo)."""
    cls = method_class(name)
    preset = METHODS[name][1]
    return copy.deepcopy(PRESETS[preset]) if preset else cls.config_cls()


def build_method(name: str, overrides: dict | None = None) -> Method:
    """The method with its defaults and `overrides` (command-line text or Python values), every value
    checked against its field's declared type here and every range in the config's `__post_init__`, so
    that a typo fails now with one line naming the flag, not at the first update."""
    cls = method_class(name)
    cfg = method_config_defaults(name)
    names = {f.name for f in dataclasses.fields(cfg)}
    for key in overrides or {}:
        if key not in names:
            raise ConfigError(f"method {name!r} has no hyperparameter {key!r} (see --method {name} --help)")
    for key, value in coerce_fields(type(cfg), overrides or {}, prefix=name).items():
        setattr(cfg, key, value)
    if hasattr(cfg, "__post_init__"):
        try:
            cfg.__post_init__()  # re-validate after overrides
        except ValueError as e:
            raise ConfigError(_name_the_flag(str(e), names, name))
    return cls(cfg)


def _name_the_flag(message: str, names: set, method: str) -> str:
    """A config's "kl_coef must be >= 0, got -1.0" as "method 'grpo': kl_coef must be >= 0, got -1.0 (flag
    --grpo.kl-coef)": the field, as configs and checkpoints name it, and the flag that sets it."""
    first = message.split(" ", 1)[0]
    if first in names:
        return f"method {method!r}: {message} (flag {flag_name(first, method)})"
    return f"method {method!r}: {message}"


# ====================================================================================================
# The trainer
# ====================================================================================================
# The rollout batch: one dict per step on each rank, holding this rank's S = groups × G sequences.
#   from sampling (Trainer.sample_groups): prompt_indices, examples [S] (the example of each sequence),
#     prompt_ids, responses (token ids), texts, results (verifier verdicts), keys / answers [S],
#     correct [S] float, group_ids [S], group_size G, time_generate / time_score; with vLLM rollout_logp
#     [S, T] (the engine's log-prob of each sampled token, compared once with ours: rollout_gap)
#   from data.collate: input_ids / attention_mask [S, P+T] (prompts left-padded to P, responses right-
#     padded to T), prompt_mask [S, P], response_mask [S, T], prompt_len P, lengths [S], truncated [S]
#   from the method hooks (train_step): rewards [S], advantages [S] float32; a method may attach
#     per_seq[name] [S] (sliced into every micro-batch) and method_metrics[name] = (sum, count)
#   fields (prepass / prepare_update): per-token [S, T] tensors, named by the policy they come from:
#     π_old's old_logp, entropy, minp_proxy_logp, prompt_logp (+ prompt_logp_mask) [S, P]; the current
#     policy's cur_logp / cur_entropy (from the second mini-batch on); a method's selections (lp_selected,
#     sent_tier)
# A micro-batch `mb` (forward.slice_batch) holds the same per-sequence and per-token keys for its rows,
# trimmed to its own longest prompt / response, plus logp (with grad), mask (= response_mask, the name the
# methods' losses read) and, when needed, ref_logp.
# ====================================================================================================
class Trainer:
    def __init__(self, cfg: TrainConfig, method_overrides: dict | None = None):
        self.dist = Dist()
        cfg = resolve_defaults(cfg)
        method_class(cfg.method)  # (the method name first; config.validate checks the rest)
        validate(cfg, self.dist.world)
        self.cfg = cfg
        self.method = build_method(cfg.method, method_overrides)
        self.needs = self.method.needs()
        unknown = self.needs - KNOWN_NEEDS
        assert not unknown, f"method declares unknown needs {unknown}"
        self.run_dir = Path(cfg.out)
        # --- data (cheap, and validated before the run folder is touched and the model is loaded) ---
        self.examples = load_prompts(cfg)
        # --- the run folder (rank 0): created, probed, locked for this training and checked for an earlier
        # run before any expensive work; the lock is released at the end of fit (or when the process ends) ---
        self._run_lock = open_run_folder(self.run_dir, cfg.resume, cfg.overwrite) if self.dist.is_main else None
        # --- resume: the newest intact checkpoint, compatibility, before any expensive work ---
        self.start_step, resume_state = 0, None
        if cfg.resume:
            try:
                ckpt, resume_state = resume_checkpoint(self.run_dir, verbose=self.dist.is_main)
                check_resume_compatible(resume_state, cfg, self.method)
            except BaseException:
                close_run_folder(self._run_lock)
                raise
            self.start_step = resume_state["step"]
        self.sampler = PromptSampler(len(self.examples), cfg.seed)
        # --- model ---
        self.device = torch.device(f"cuda:{self.dist.local_rank}" if torch.cuda.is_available() else "cpu")
        torch.manual_seed(cfg.seed)
        model_path = str(ckpt) if resume_state else cfg.model
        self.model, self.tokenizer = load_policy(model_path, self.device)
        self.examples = render_prompts(self.examples, self.tokenizer, cfg.prompt_template)
        try:  # a prompt longer than the model's context: one line (and the run folder unlocked)
            check_prompt_lengths(self.examples, self.tokenizer, cfg,
                                 getattr(self.model.config, "max_position_embeddings", None))
        except ConfigError:
            close_run_folder(self._run_lock)
            raise
        self.model.train()
        if cfg.gradient_checkpointing:  # (before sharding: FSDP2 wraps the checkpointed layers)
            enable = getattr(self.model, "activation_checkpointing_enable", None)  # transformers >= 5.2x
            if enable is not None:
                enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if self.dist.enabled and cfg.fsdp:
            shard_model(self.model, self.dist, self.device)  # before the optimiser: it holds the shards
        self.ref_model = None
        if "ref_logp" in self.needs:  # π_ref = the frozen initial model, loaded only when needed
            self.ref_model, _ = load_policy(cfg.model, torch.device("cpu") if cfg.ref_offload else self.device)
            self.ref_model.eval().requires_grad_(False)
            if self.device.type == "cuda":  # no-grad log-probs only: bf16 halves its memory (SENT spec)
                self.ref_model.to(torch.bfloat16)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.rollout = make_rollout(self.model, self.tokenizer, cfg, self.device, self.dist,
                                    model_path=resolve_model_path(model_path))
        self.method.on_train_start(self)
        custom = self.method.prompt_sampler(self) if "prompt_sampler" in self.needs else None
        if custom is None and cfg.curriculum == "semantic-entropy":  # the SE curriculum under any method
            # (SE of every prompt with the initial policy: cached in the run folder)
            custom = build_curriculum_sampler(self, self.method.cfg)
        if custom is not None:
            self.sampler = custom
        if resume_state:
            optim_state = torch.load(ckpt / "optimizer.pt", weights_only=False)
            if self.dist.fsdp:  # a full (name-keyed) state: each rank takes its shards
                from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

                set_optimizer_state_dict(self.model, self.optimizer, optim_state,
                                         options=StateDictOptions(full_state_dict=True))
            else:
                self.optimizer.load_state_dict(optim_state)
            self.sampler.load_state_dict(resume_state["sampler"])
            self.method.load_state_dict(resume_state["method"])
            set_rng_state(resume_state["rng"][self.dist.rank])
        else:
            # each rank samples different responses; the seed fixes all of them
            set_seed(cfg.seed * 1000 + self.dist.rank)
        self.logger = Logger(self.run_dir, cfg, self.dist.is_main, self.start_step)
        # steps whose optimiser step update() skipped (non-finite gradient norm), over the whole run: kept in
        # the checkpoint; for checkpoints saved before the count, counted from the metrics rows kept
        self.skipped_steps = resume_state.get("skipped_steps", self.logger.skipped_steps) if resume_state else 0
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.json").write_text(json.dumps(
                {"train": dataclasses.asdict(cfg), "method": dataclasses.asdict(self.method.cfg)}, indent=2))

    # ---- 1. rollouts + verification ------------------------------------------------------------
    def sample_groups(self, n_prompts_global: int) -> dict:
        """Prompts → G responses each → verification, as lists. Each rank handles its share of groups."""
        cfg, dist, tok, G = self.cfg, self.dist, self.tokenizer, self.cfg.group_size
        indices = self.sampler.next_indices(n_prompts_global)  # the same order on every rank
        per_rank = n_prompts_global // dist.world
        local = indices[dist.rank * per_rank:(dist.rank + 1) * per_rank]
        examples = [self.examples[i] for i in local]
        prompt_ids = [tok(ex["prompt"], add_special_tokens=True)["input_ids"] for ex in examples]
        t0 = time.perf_counter()
        responses = self.rollout.generate(prompt_ids, G)
        t_gen = time.perf_counter() - t0
        t0 = time.perf_counter()
        texts = tok.batch_decode(responses, skip_special_tokens=True)
        results = verifier.verify_batch(texts, [ex for ex in examples for _ in range(G)], mode=cfg.answer_mode)
        raw = {"prompt_indices": local, "examples": examples, "prompt_ids": prompt_ids,
               "responses": responses, "texts": texts, "results": results,
               "time_generate": t_gen, "time_score": time.perf_counter() - t0}
        if self.rollout.last_logprobs is not None:  # the engine's log-prob of each sampled token (vLLM)
            raw["rollout_logp"] = self.rollout.last_logprobs
        return raw

    def build_batch(self, raw: dict) -> dict:
        """Lists of whole groups → padded tensors plus everything the method hooks read."""
        G, tok = self.cfg.group_size, self.tokenizer
        flat_examples = [ex for ex in raw["examples"] for _ in range(G)]
        batch = collate([p for p in raw["prompt_ids"] for _ in range(G)], raw["responses"],
                        tok.pad_token_id, tok.eos_token_id)
        results = raw["results"]
        batch.update(raw)
        batch.update({
            "examples": flat_examples,
            "correct": torch.tensor([r.correct for r in results], dtype=torch.float32),
            "keys": [r.key for r in results], "answers": [r.answer for r in results],
            "group_ids": torch.arange(len(raw["examples"])).repeat_interleave(G), "group_size": G,
            "max_new_tokens": self.cfg.max_new_tokens,
        })
        if "rollout_logp" in raw:  # [S, T] like response_mask, compared with the trainer's in update()
            T = batch["response_mask"].shape[1]
            batch["rollout_logp"] = torch.zeros((len(raw["responses"]), T), dtype=torch.float32)
            for i, lp in enumerate(raw["rollout_logp"]):
                batch["rollout_logp"][i, :len(lp)] = torch.tensor(lp, dtype=torch.float32)
            batch["gap_pending"] = True
        return batch

    def rollout_batch(self) -> tuple[dict, dict]:
        """One rollout batch of B groups (globally).

        With DAPO dynamic sampling (§3.2): drop groups whose correctness is all-equal and sample further
        batches until B informative groups are kept or `max_gen_batches` is reached (verl raises there;
        we train on what we have and log it). The choice is made on the global order of groups, so it
        does not depend on the number of ranks; ranks may then hold different numbers of groups, which
        the global normalisers of the loss account for.
        """
        B, G = self.cfg.prompts_per_step, self.cfg.group_size
        raw = self.sample_groups(B)
        if not getattr(self.method.cfg, "dynamic_sampling", False):
            return self.build_batch(raw), {"gen_batches": 1}
        raws, flags = [raw], [self._informative_global(raw)]
        while sum(int(f.sum()) for f in flags) < B and len(raws) < self.method.cfg.max_gen_batches:
            raws.append(self.sample_groups(B))
            flags.append(self._informative_global(raws[-1]))
        all_flags = torch.cat(flags)
        chosen = set(torch.nonzero(all_flags).flatten()[:B].tolist())
        per_rank = B // self.dist.world
        per_seq_keys = ("responses", "texts", "results") + (("rollout_logp",) if "rollout_logp" in raw else ())
        kept = {k: [] for k in ("prompt_indices", "examples", "prompt_ids") + per_seq_keys}
        for j, r in enumerate(raws):
            for g in range(per_rank):
                if j * B + self.dist.rank * per_rank + g in chosen:
                    for k in ("prompt_indices", "examples", "prompt_ids"):
                        kept[k].append(r[k][g])
                    for k in per_seq_keys:
                        kept[k].extend(r[k][g * G:(g + 1) * G])
        kept["time_generate"] = sum(r["time_generate"] for r in raws)
        kept["time_score"] = sum(r["time_score"] for r in raws)
        info = {"gen_batches": len(raws), "frac_zero_std": 1.0 - float(all_flags.float().mean()),
                "groups_kept": len(chosen)}
        return self.build_batch(kept), info

    def _informative_global(self, raw: dict) -> torch.Tensor:
        correct = torch.tensor([r.correct for r in raw["results"]], dtype=torch.float32)
        local = informative_groups(correct, self.cfg.group_size) if len(correct) else torch.zeros(0, dtype=torch.bool)
        return torch.cat([torch.as_tensor(x) for x in self.dist.gather_objects(local)])

    # ---- 2. one optimisation step -----------------------------------------------------------------
    def update(self, batch: dict, rows: list[int]) -> dict:
        """One optimiser step on `rows` of the rollout batch; returns metrics."""
        cfg, dist, method = self.cfg, self.dist, self.method
        counted = rows
        if getattr(method.cfg, "mask_truncated", False):  # overlong filtering: truncated rows leave the loss
            counted = [r for r in rows if not batch["truncated"][r]]  # and its normalisers (as TRL does)
        n_tokens = dist.sum(float(batch["response_mask"][counted].sum()))
        n_seqs = dist.sum(len(counted))
        norm = Normaliser(n_tokens, n_seqs, cfg.max_new_tokens, dist.world)
        # Batch-level preparation (e.g. Lp-Reg's token selection over the whole optimisation batch) needs
        # per-token fields of every row before the first backward. They come from the prepass, or, when
        # the optimisation batch is a single forward on every rank (train_step decided), from that forward
        # itself: no extra pass on-policy. Field names say which policy: "old_logp", "entropy",
        # "minp_proxy_logp", "prompt_logp" are π_old's (the rollout policy); "cur_logp" / "cur_entropy"
        # are the current π_θ's, detached (train_step refreshes them before every mini-batch after the
        # first; absent on the first, where π_θ = π_old).
        fused = method.needs_batch_fields and "fields" not in batch
        if method.needs_batch_fields and not fused:
            method.prepare_update(batch, rows, dist)
        micro_batches = split_micro_batches(batch, rows, cfg.micro_batch_tokens) if rows else []
        # FSDP2: every forward is a collective, so agree on the count before the first one
        n_padding = pad_forwards(dist, len(micro_batches))
        if fused and not micro_batches and not dist.fsdp:  # nothing here, but keep prepare_update's
            batch["fields"] = {}  # collectives matched (under FSDP2: after the padding forward, below)
            method.prepare_update(batch, rows, dist)
        want = {n for n in ("entropy", "minp_proxy_logp", "prompt_logp") if n in self.needs}
        if cfg.log_entropy:
            want.add("entropy")
        stats: dict[str, float] = {}
        entropy_sum = 0.0
        # vLLM: |trainer − engine| log-prob of the sampled tokens, measured before this batch's first step
        measure_gap = batch.pop("gap_pending", False)
        if self.ref_model is not None and cfg.ref_offload and micro_batches:
            self.ref_model.to(self.device)
        gap_sum, gap_max, gap_count = 0.0, 0.0, 0.0
        for mb in micro_batches:
            mb = to_device(mb, self.device)
            with autocast(self.device):
                fields = token_fields(self.model, mb, cfg.temperature, want, with_grad=True,
                                      chunk_rows=cfg.logit_chunk_rows,
                                      **proxy_filter(method.cfg))
            mb["mask"] = mb["response_mask"]
            mb["logp"] = fields["logp"]
            if measure_gap:
                engine = batch["rollout_logp"][mb["rows"].cpu()][:, :mb["mask"].shape[1]].to(self.device)
                gap = (fields["logp"].detach().float() - engine).abs() * mb["mask"]
                gap_sum, gap_max = gap_sum + float(gap.sum()), max(gap_max, float(gap.max()))
                gap_count += float(mb["mask"].sum())
            # on-policy: π_old = π_θ, so ρ = exp(logp − logp.detach()) = 1 in value, gradient kept
            mb.setdefault("old_logp", fields["logp"].detach())
            for k, v in fields.items():
                if k != "logp":
                    mb.setdefault(k, v)  # π_old's from the prepass when there is one, else this forward's
            if "entropy" in fields:  # this forward's entropy is always π_θ's (SENT micro-batch scope, S11)
                mb["cur_entropy"] = fields["entropy"]
            if fused:
                batch["fields"] = {}
                place_fields(batch["fields"], batch, mb["rows"].cpu(),
                             {("old_logp" if k == "logp" else k): v.detach() for k, v in fields.items()})
                method.prepare_update(batch, rows, dist)
                t_keep = mb["response_mask"].shape[1]
                for k, v in batch["fields"].items():  # what prepare_update added, for this micro-batch
                    if k not in mb:
                        mb[k] = v[mb["rows"].cpu()][:, :t_keep].to(self.device) if v.dim() == 2 else v
            if self.ref_model is not None:
                with torch.no_grad(), autocast(self.device):
                    mb["ref_logp"] = token_fields(self.ref_model, mb, cfg.temperature, set(), with_grad=False,
                                                  chunk_rows=cfg.logit_chunk_rows)["logp"]
            loss, mb_stats = method.loss(mb, norm)
            loss.backward()
            for k, v in mb_stats.items():
                stats[k] = stats.get(k, 0.0) + float(v)
            stats["loss"] = stats.get("loss", 0.0) + float(loss.detach()) / dist.world
            if "entropy" in fields:
                entropy_sum += float((fields["entropy"] * mb["mask"]).sum())
        if self.ref_model is not None and cfg.ref_offload:
            self.ref_model.to("cpu")
        for k in range(n_padding):  # FSDP2: match the other ranks' forwards
            mb = dummy_batch(self.tokenizer.pad_token_id, self.device)
            with autocast(self.device):
                logp = token_fields(self.model, mb, cfg.temperature, set(), with_grad=True)["logp"]
            if fused and not micro_batches and k == 0:  # the others call prepare_update after a forward
                batch["fields"] = {}
                method.prepare_update(batch, rows, dist)
            (0.0 * logp.sum()).backward()
        if not micro_batches:  # keep collective calls matched across ranks
            stats["loss"] = 0.0
        dist.average_gradients(self.model)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor holding the global norm
            grad_norm = grad_norm.full_tensor()
        if torch.isfinite(grad_norm):
            self.optimizer.step()
            self.rollout.mark_stale()  # vLLM: send the new weights before the next generation
        self.optimizer.zero_grad(set_to_none=True)
        out = {"loss": dist.sum(stats.pop("loss")), "grad_norm": float(grad_norm),
               "entropy": dist.sum(entropy_sum) / max(n_tokens, 1.0) if "entropy" in want else None}
        if measure_gap:  # every rank measured (a rank without rows contributes 0)
            batch["rollout_gap"] = {"rollout_logp_gap_mean": dist.sum(gap_sum) / max(dist.sum(gap_count), 1.0),
                                    "rollout_logp_gap_max": dist.max(gap_max)}
        # every rank reduces the same keys in the same order (a rank may hold no rows of this batch)
        keys = sorted(set().union(*dist.gather_objects(sorted(stats)))) if dist.enabled else list(stats)
        for k in keys:  # counts and sums → per-token means
            v = stats.get(k, 0.0)
            total = dist.sum(v)
            if k.endswith("_count"):
                out[k[:-6].replace("clip_low", "clip_frac_low").replace("clip_high", "clip_frac_high")] = \
                    total / max(n_tokens, 1.0)
            elif k.endswith("_sum"):
                out[k[:-4]] = total / max(n_tokens, 1.0)
            else:
                out[k] = total
        return out

    def train_step(self, step: int) -> dict:
        cfg, method = self.cfg, self.method
        t_start = time.perf_counter()
        if hasattr(self.sampler, "set_step"):  # step-scheduled prompt order (SE curriculum stages)
            self.sampler.set_step(step)
        batch, info = self.rollout_batch()
        t0 = time.perf_counter()
        rewards = method.shape_rewards(batch)
        batch["rewards"] = rewards
        batch["advantages"] = method.advantages(batch, rewards).to(torch.float32)
        t_score = batch["time_score"] + time.perf_counter() - t0
        t0 = time.perf_counter()
        n_seq = len(batch["texts"])
        needs_prepass = cfg.mini_batches > 1 or "prepass" in self.needs
        if method.needs_batch_fields and not needs_prepass:  # fused into the training forward if the
            # whole batch is one micro-batch on every rank (see update); otherwise a no-grad prepass
            single = n_seq == 0 or len(split_micro_batches(batch, list(range(n_seq)), cfg.micro_batch_tokens)) == 1
            needs_prepass = self.dist.sum(float(not single)) > 0
        if needs_prepass:
            batch["fields"] = self.prepass(batch)
        per_mini = n_seq // cfg.mini_batches if n_seq else 0
        metrics: dict = {}
        for k in range(cfg.mini_batches):
            rows = list(range(k * per_mini, (k + 1) * per_mini)) if k < cfg.mini_batches - 1 else \
                list(range(k * per_mini, n_seq))
            if k > 0 and method.needs_batch_fields:
                # Off-policy (--mini-batches > 1) a batch-level selection ranks by the *current* policy
                # (Lp-Reg L4; SENT S11), and the parameters have moved since the prepass: one no-grad
                # forward over this mini-batch's rows gives π_θ's detached "cur_logp" / "cur_entropy",
                # next to π_old's "old_logp" / "entropy" / "minp_proxy_logp", which stay fixed (L5).
                # The first mini-batch needs none: there π_θ = π_old and the methods fall back on old_*.
                batch["fields"].update(self.prepass(batch, rows, current=True))
            m = self.update(batch, rows)
            for key, v in m.items():
                if v is not None:
                    metrics[key] = metrics.get(key, 0.0) + v / cfg.mini_batches
        t_update = time.perf_counter() - t0
        metrics.update(self.rollout_metrics(batch, rewards))
        metrics.update(batch.get("rollout_gap", {}))
        method_metrics = batch.get("method_metrics", {})
        keys = sorted(set().union(*self.dist.gather_objects(sorted(method_metrics)))) if self.dist.enabled \
            else list(method_metrics)
        for key in keys:  # (sum, count) over this rank's sequences → the global mean
            total, count = method_metrics.get(key, (0.0, 0.0))
            count = self.dist.sum(count)
            metrics[key] = self.dist.sum(total) / count if count else None
        metrics.update(info)
        metrics.update({"time_generate": batch["time_generate"], "time_score": t_score,
                        "time_update": t_update, "time_step": time.perf_counter() - t_start})
        # rollout throughput of this rank's engine (tokens it generated / its generation time)
        metrics["rollout_tokens_per_s"] = float(batch["lengths"].sum()) / max(batch["time_generate"], 1e-9)
        if self.device.type == "cuda":  # peak GPU memory of this step (rank 0's; ranks are alike)
            metrics["peak_gpu_gb"] = torch.cuda.max_memory_allocated(self.device) / 1e9
            torch.cuda.reset_peak_memory_stats(self.device)
        return metrics

    @torch.no_grad()
    def prepass(self, batch: dict, rows: list[int] | None = None, current: bool = False) -> dict:
        """No-grad forward over the whole rollout batch before its first backward: π_old's fields
        ("old_logp", and "entropy", "minp_proxy_logp", "prompt_logp" as the method needs them).

        current=True (train_step, before every mini-batch after the first, for methods whose batch-level
        selection ranks by the current policy: Lp-Reg L4, SENT S11): the same forward over `rows` only,
        with the parameters as they are now, giving π_θ's detached "cur_logp" (and "cur_entropy" if the
        method needs entropy). π_old's proxy and prompt log-probs are not recomputed (spec L5: they stay
        π_old's). Every rank calls it together (FSDP2: matched forwards), with or without rows.
        """
        if current:
            want = {"entropy"} & set(self.needs)
        else:
            want = {n for n in ("entropy", "minp_proxy_logp", "prompt_logp") if n in self.needs}
        rows = list(range(len(batch["texts"]))) if rows is None else list(rows)
        out: dict[str, torch.Tensor] = {}
        micro_batches = split_micro_batches(batch, rows, self.cfg.micro_batch_tokens) if rows else []
        for _ in range(pad_forwards(self.dist, len(micro_batches))):  # FSDP2: matched forwards
            token_fields(self.model, dummy_batch(self.tokenizer.pad_token_id, self.device), self.cfg.temperature,
                         set(), with_grad=False)
        for mb in micro_batches:
            idx = mb["rows"]
            mb = to_device(mb, self.device)
            with autocast(self.device):
                fields = token_fields(self.model, mb, self.cfg.temperature, want, with_grad=False,
                                      chunk_rows=self.cfg.logit_chunk_rows,
                                      **proxy_filter(self.method.cfg))
            if current:
                fields = {f"cur_{k}": v for k, v in fields.items()}
            else:
                fields["old_logp"] = fields.pop("logp")
            place_fields(out, batch, idx, fields)
        return out

    def rollout_metrics(self, batch: dict, rewards: torch.Tensor) -> dict:
        """Reward/length/diversity statistics over the global batch (gathered from all ranks)."""
        local = {"rewards": rewards.tolist(), "correct": batch["correct"].tolist(),
                 "lengths": batch["lengths"].tolist(), "truncated": batch["truncated"].tolist(),
                 "keys": batch["keys"], "statuses": [r.status for r in batch["results"]]}
        parts = self.dist.gather_objects(local)
        G = self.cfg.group_size
        r = torch.tensor([x for p in parts for x in p["rewards"]])
        c = torch.tensor([x for p in parts for x in p["correct"]])
        lengths = torch.tensor([x for p in parts for x in p["lengths"]], dtype=torch.float32)
        keys = [k for p in parts for k in p["keys"]]
        statuses = [s for p in parts for s in p["statuses"]]
        groups = r.reshape(-1, G) if len(r) else r.reshape(0, G)
        distinct = [len({k for k in keys[g * G:(g + 1) * G] if k is not None}) for g in range(len(groups))]
        return {
            "reward_mean": float(r.mean()) if len(r) else 0.0,
            "reward_std": float(r.std()) if len(r) > 1 else 0.0,
            "correct_mean": float(c.mean()) if len(c) else 0.0,
            "frac_reward_zero_std": float((groups.std(dim=1) == 0).float().mean()) if len(groups) else 0.0,
            "response_length": float(lengths.mean()) if len(lengths) else 0.0,
            "truncated_frac": float(np.mean([x for p in parts for x in p["truncated"]])) if len(r) else 0.0,
            "distinct_correct": float(np.mean(distinct)) if distinct else 0.0,
            "unparseable_frac": statuses.count("unparseable") / max(len(statuses), 1),
            "timeout_frac": statuses.count("timeout") / max(len(statuses), 1),
        }

    # ---- 3. the run -------------------------------------------------------------------------------
    def fit(self, on_step=None) -> dict:
        """Train to cfg.steps; `on_step(step, metrics)` is called after each logged step (study.py study)."""
        cfg = self.cfg
        from tqdm.auto import tqdm

        bar = tqdm(range(self.start_step, cfg.steps), initial=self.start_step, total=cfg.steps,
                   desc=f"{cfg.method}", disable=not (cfg.progress and self.dist.is_main), dynamic_ncols=True)
        if cfg.final_eval and cfg.eval_at_start and self.start_step == 0:
            start = self.evaluate()
            if self.dist.is_main:
                (self.run_dir / "eval_start.json").write_text(json.dumps(start, indent=2))
        step, last_eval = self.start_step, (None, None)
        for step in bar:
            metrics = self.train_step(step)
            done = step + 1
            if step_was_skipped(metrics.get("grad_norm", 0.0)):  # update() did not step the optimiser
                self.skipped_steps += 1
                if self.dist.is_main:
                    warn_line(f"step {done}: gradient norm {metrics['grad_norm']}, the optimiser step was skipped "
                          f"({self.skipped_steps} skipped so far; metrics.jsonl: skipped_steps)")
            metrics["skipped_steps"] = self.skipped_steps
            if cfg.eval_every and done % cfg.eval_every == 0:
                last_eval = (done, self.evaluate())
                metrics.update(evaluation.flat_metrics(last_eval[1]))
            self.logger.log(done, metrics)
            if on_step is not None:
                on_step(done, metrics)
            bar.set_postfix(reward=f"{metrics['reward_mean']:.3f}",
                            entropy=f"{metrics.get('entropy') or 0:.3f}",
                            distinct=f"{metrics['distinct_correct']:.2f}")
            if done % cfg.save_every == 0 or done == cfg.steps:
                try:
                    save_checkpoint(self.run_dir, done, self.model, self.tokenizer, self.optimizer, self.sampler,
                                    self.method, cfg, self.dist, cfg.keep_checkpoints,
                                    extra={"skipped_steps": self.skipped_steps})
                except CheckpointError as e:  # (rank 0) one line, not a traceback; the run cannot go on
                    bar.close()
                    self.logger.close()
                    close_run_folder(self._run_lock)
                    raise SystemExit(f"error: {e}") from None
        summary = {}
        if cfg.final_eval:
            # the held-out evaluation of the final policy (already done if --eval-every hit the last step)
            summary = last_eval[1] if last_eval[0] == cfg.steps else self.evaluate()
            if self.dist.is_main:
                (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
                import study  # (study.py imports train: imported here, not at the top)

                study.plot_run(self.run_dir)
        self.logger.close()
        close_run_folder(self._run_lock)  # the run folder is complete: another training may take it
        return summary

    def eval_examples(self) -> list[dict]:
        """The held-out prompts, loaded and rendered on first use (every --eval-every call reuses them)."""
        if not hasattr(self, "_eval_examples"):
            cfg = self.cfg
            eval_cfg = dataclasses.replace(cfg, dataset=cfg.eval_dataset, dataset_config=None) \
                if cfg.eval_dataset else cfg
            self._eval_examples = render_prompts(load_prompts(eval_cfg, split="heldout")[: cfg.eval_prompts],
                                                 self.tokenizer, cfg.prompt_template)
        return self._eval_examples

    def evaluate(self) -> dict:
        """Held-out evaluation (pass@k curve, avg@n, distinct correct) without disturbing training RNG."""
        saved = rng_state()
        try:
            result = evaluation.evaluate_policy(self.rollout, self.tokenizer, self.eval_examples(),
                                                self.cfg.eval_samples, self.cfg.temperature, self.cfg.top_p,
                                                self.cfg.max_new_tokens, answer_mode=self.cfg.answer_mode,
                                                seed=12345, dist=self.dist, diversity=self.cfg.eval_diversity,
                                                entropy_model=self.model)
        finally:
            set_rng_state(saved)
        return result


# ====================================================================================================
# Command line
# ====================================================================================================
def parse_args(argv=None) -> tuple[TrainConfig, dict]:
    """The command line as a TrainConfig and the method's hyperparameter overrides, every value parsed as its
    field's declared type (ConfigError naming the flag otherwise)."""
    pre = OneLineParser(add_help=False)
    pre.add_argument("--method", default=TrainConfig.method)
    known, _ = pre.parse_known_args(argv)
    parser = OneLineParser(description=__doc__.split("\n\n")[0],
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataclass_args(parser.add_argument_group("training"), TrainConfig)
    method_defaults = method_config_defaults(known.method)  # ConfigError for unknown / missing methods
    train_names = {f.name for f in dataclasses.fields(TrainConfig)}
    group = parser.add_argument_group(f"{known.method} hyperparameters (paper defaults)")
    clash = [f for f in dataclasses.fields(method_defaults) if f.name in train_names]
    assert not clash, f"method field names clash with TrainConfig: {clash}"
    add_dataclass_args(group, method_defaults, prefix=known.method, dest_prefix="method__")
    args = vars(parser.parse_args(argv))
    method_overrides = coerce_fields(type(method_defaults), {k[len("method__"):]: v for k, v in args.items()
                                                             if k.startswith("method__")}, prefix=known.method)
    cfg = TrainConfig(**coerce_fields(TrainConfig, {k: v for k, v in args.items() if not k.startswith("method__")}))
    return cfg, method_overrides


def report_config_error(e: ConfigError, grace_s: float = 5.0) -> None:
    """"error: ..." on stderr once, and leave the process group. Under torchrun every rank meets the same bad
    input: rank 0 prints it; another rank waits `grace_s` for torchrun to stop it after rank 0's exit
    (leaving then with code 2, not -15) and prints the error itself only if it is still running, i.e.
    if rank 0 did not fail the same way."""
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    if rank != 0 and world > 1:
        import signal

        sys.stderr.flush()
        signal.signal(signal.SIGTERM, lambda *_: os._exit(2))
        time.sleep(grace_s)
    print(f"error: {e}", file=sys.stderr)


def main(argv=None) -> int:
    try:
        cfg, overrides = parse_args(argv)
        if not cfg.progress:  # --no-progress also silences transformers' own bars (checkpoint shards)
            import transformers

            transformers.utils.logging.disable_progress_bar()
        # the checks that need no process group first: under torchrun a rank that exits while another
        # is still joining the group would give that one a gloo/NCCL traceback (Trainer repeats them)
        resolved = resolve_defaults(cfg)
        method_class(resolved.method)
        validate(resolved, int(os.environ.get("WORLD_SIZE", "1")))
        build_method(cfg.method, overrides)
        trainer = Trainer(cfg, overrides)
    except ConfigError as e:
        report_config_error(e)
        return 2
    summary = trainer.fit()
    if trainer.dist.is_main and summary:
        print(json.dumps({k: v for k, v in summary.items() if not isinstance(v, (dict, list))}, indent=None))
    trainer.rollout.close()
    if trainer.dist.enabled and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
