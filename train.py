"""train.py — the shared RLVR loop: data → rollouts → verify → method hooks → update → logs/checkpoints.

Run the embedded default (toy Countdown task, tiny model warm-started locally on first use):

    torchrun --nproc_per_node 1 train.py --method grpo
    python train.py --method dapo --steps 100 --out runs/dapo

and a real model, for users with network access:

    torchrun --nproc_per_node 8 train.py --method grpo --model Qwen/Qwen2.5-Math-1.5B \
        --dataset open-r1/DAPO-Math-17K-Processed

One training step (`Trainer.train_step`, grpo spec "One training step"):
  1. take B prompts (each rank its share, whole groups), sample G responses each with pure sampling
     (temperature T, top_p 1, no top_k) so the trainer's log-probs describe the sampling distribution;
  2. verify them (verifier.py) → correctness bits, canonical solution keys, extracted answers;
  3. the method shapes rewards and computes advantages (grpo.py `Method` hooks);
  4. `update`, per optimiser step: micro-batches bounded by a token budget, forward, the method's loss
     with the *global* normaliser, backward; then clip the gradient norm and step AdamW.
The loop computes only what the method declares (`needs()`, `token_field_fns()`): reference log-probs,
entropy, prompt log-probs, the method's own per-token fields; full-vocabulary work is done on chunks of
rows so that [batch, length, vocab] logits never exist at once (forward.py).

The loop's parts live in their own modules: config.py (settings and their checks), data.py (prompts),
rollout.py (the model and sampling), forward.py (per-token quantities), distributed.py, runfolder.py (disk).
The rollout batch (the dict every hook reads) is described once, in data.py above `build_rollout_batch`.
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
from arm import ARM
from config import (ConfigError, OneLineParser, TrainConfig, add_dataclass_args, coerce_fields, flag_name, is_toy,
                    resolve_defaults, validate)
from curriculum import SENT, CurriculumConfig, build_curriculum_sampler
from data import (PromptSampler, build_rollout_batch, check_prompt_lengths, keep_groups, load_prompts,
                  render_prompts)
from distributed import (Dist, autocast, clip_and_step, load_optimizer_state, pad_forwards, reduce_means,
                         reduce_stats, report_config_error, rng_state, set_rng_state, set_seed, set_torch_threads,
                         shard_model, to_device)
from dsdr import DSDR
from entropy import EntropyBonus
from forward import no_grad_fields, padding_backward, split_micro_batches, token_fields
from grpo import KNOWN_NEEDS, PRESETS, GRPOConfig, Method, Normaliser
from lpreg import LpReg
from rollout import (LogprobGap, enable_gradient_checkpointing, load_policy, make_rollout, resolve_model_path,
                     sample_and_verify)
from runfolder import (CheckpointError, Logger, check_resume_compatible, close_run_folder, latest_checkpoint,
                       open_run_folder, plot_run, resume_checkpoint, reuse_start_evaluation, save_checkpoint,
                       start_evaluation_matches, step_was_skipped, warn_line)

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
    "entropy": (EntropyBonus, None),
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


def build_method(name: str, overrides: dict | None = None, toy: bool = False) -> Method:
    """The method with its defaults and `overrides` (command-line text or Python values), every value
    checked against its field's declared type here and every range in the config's `__post_init__`, so
    that a typo fails now with one line naming the flag, not at the first update. `toy`: the class's toy
    strengths (`toy_overrides`) replace the paper's values first; explicit overrides still win."""
    cls = method_class(name)
    cfg = method_config_defaults(name)
    names = {f.name for f in dataclasses.fields(cfg)}
    for key in overrides or {}:
        if key not in names:
            raise ConfigError(f"method {name!r} has no hyperparameter {key!r} (see --method {name} --help)")
    overrides = {**(cls.toy_overrides if toy else {}), **(overrides or {})}
    for key, value in coerce_fields(type(cfg), overrides, prefix=name).items():
        setattr(cfg, key, value)
    try:
        cfg.__post_init__()  # re-validate after overrides
    except ValueError as e:  # "kl_coef must be >= 0, got -1.0" → "... (flag --grpo.kl-coef)"
        field = str(e).split(" ", 1)[0]
        where = f" (flag {flag_name(field, name)})" if field in names else ""
        raise ConfigError(f"method {name!r}: {e}{where}")
    return cls(cfg)


def uses_toy_strengths(cfg: TrainConfig) -> bool:
    """The toy strengths apply on the embedded toy model unless --paper-defaults asks for the papers' values."""
    return is_toy(cfg.model) and not cfg.paper_defaults


# ====================================================================================================
# The trainer
# ====================================================================================================
class Trainer:
    def __init__(self, cfg: TrainConfig, method_overrides: dict | None = None):
        self.dist = Dist()
        cfg = resolve_defaults(cfg)
        method_class(cfg.method)  # (the method name first; config.validate checks the rest)
        validate(cfg, self.dist.world)
        self.cfg, self.method = cfg, build_method(cfg.method, method_overrides, toy=uses_toy_strengths(cfg))
        self.needs = self.method.needs()
        assert self.needs <= KNOWN_NEEDS, f"method declares unknown needs {self.needs - KNOWN_NEEDS}"
        self.run_dir = Path(cfg.out)
        self.examples = load_prompts(cfg)  # (cheap, and validated before anything is written or loaded)
        # the run folder (rank 0): created, probed, locked for this training and checked for an earlier run
        # before any expensive work; the lock is released at the end of fit (or when the process ends)
        self._run_lock = open_run_folder(self.run_dir, cfg.resume, cfg.overwrite) if self.dist.is_main else None
        self.start_step, resume, ckpt = 0, {}, None
        try:
            if cfg.resume:  # the newest intact checkpoint, checked against this configuration
                ckpt, resume = resume_checkpoint(self.run_dir, verbose=self.dist.is_main)
                check_resume_compatible(resume, cfg, self.method)
                self.start_step = resume["step"]
            self.device = torch.device(f"cuda:{self.dist.local_rank}" if torch.cuda.is_available() else "cpu")
            torch.manual_seed(cfg.seed)
            self.model, self.tokenizer = load_policy(str(ckpt) if ckpt else cfg.model, self.device)
            self.examples = render_prompts(self.examples, self.tokenizer, cfg.prompt_template)
            check_prompt_lengths(self.examples, self.tokenizer, cfg,
                                 getattr(self.model.config, "max_position_embeddings", None))
        except BaseException:  # a bad checkpoint or prompt: one line, and the run folder unlocked
            close_run_folder(self._run_lock)
            raise
        self.model.train()
        if cfg.gradient_checkpointing:
            enable_gradient_checkpointing(self.model)  # (before sharding: FSDP2 wraps the checkpointed layers)
        if self.dist.enabled and cfg.fsdp:
            shard_model(self.model, self.dist, self.device)  # before the optimiser: it holds the shards
        # π_ref: the frozen initial model (or the policy a method's begin_step made the reference), only if needed
        self.reference_step = resume.get("reference_step")
        self.ref_model = self.load_reference() if "ref_logp" in self.needs else None
        self.optimizer = self.new_optimizer()
        self.rollout = make_rollout(self.model, self.tokenizer, cfg, self.device, self.dist,
                                    model_path=resolve_model_path(str(ckpt) if ckpt else cfg.model))
        self.method.setup()
        # the SE curriculum (SENT §2, or --curriculum semantic-entropy under any method): SE of every prompt
        # with the initial policy, cached in the run folder
        curriculum = self.method.curriculum() or (CurriculumConfig() if cfg.curriculum == "semantic-entropy" else None)
        self.sampler = build_curriculum_sampler(self, curriculum) if curriculum else \
            PromptSampler(len(self.examples), cfg.seed)
        if ckpt:
            load_optimizer_state(self.model, self.optimizer, torch.load(ckpt / "optimizer.pt", weights_only=False),
                                 self.dist)
            self.sampler.load_state_dict(resume["sampler"])
            self.method.load_state_dict(resume["method"])
            set_rng_state(resume["rng"][self.dist.rank])
        else:
            set_seed(cfg.seed * 1000 + self.dist.rank)  # each rank samples different responses; one seed fixes all
        self.logger = Logger(self.run_dir, cfg, self.dist.is_main, self.start_step)
        # steps whose optimiser step was skipped (non-finite gradient norm) over the whole run: kept in the
        # checkpoint; for checkpoints saved before the count, counted from the metrics rows kept
        self.skipped_steps = resume.get("skipped_steps", self.logger.skipped_steps) if ckpt else 0
        if self.dist.is_main:
            (self.run_dir / "config.json").write_text(json.dumps(
                {"train": dataclasses.asdict(cfg), "method": dataclasses.asdict(self.method.cfg)}, indent=2))

    def new_optimizer(self):
        return torch.optim.AdamW(self.model.parameters(), lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)

    def reference_dir(self, step: int) -> Path:
        return self.run_dir / "reference" / f"step_{step:06d}"

    def load_reference(self):
        path = self.reference_dir(self.reference_step) if self.reference_step is not None else self.cfg.model
        ref, _ = load_policy(str(path), torch.device("cpu") if self.cfg.ref_offload else self.device)
        ref.eval().requires_grad_(False)
        return ref.to(torch.bfloat16) if self.device.type == "cuda" else ref  # no-grad log-probs: bf16 suffices

    def begin_step(self, step: int) -> None:
        """The prompt sampler's stage for this step, and what the method asks for at it (SENT's S7)."""
        self.sampler.set_step(step)
        actions = self.method.begin_step(self.sampler.stage)
        if "reset_reference" in actions and self.ref_model is not None:  # π_ref ← a copy of the policy,
            self.ref_model.load_state_dict(self.model.state_dict())  # (values copied: never an alias)
            self.reference_step = step
            if self.dist.is_main:  # saved, so that --resume restores it
                self.ref_model.save_pretrained(self.reference_dir(step), safe_serialization=True)
                self.tokenizer.save_pretrained(self.reference_dir(step))
            self.dist.barrier()
        if "reset_optimizer" in actions:
            self.optimizer = self.new_optimizer()

    # ---- 1. rollouts + verification ------------------------------------------------------------
    def sample_groups(self, n_prompts_global: int) -> dict:
        """Prompts → G responses each → verification, as lists. Each rank handles its share of groups."""
        dist = self.dist
        indices = self.sampler.next_indices(n_prompts_global)  # the same order on every rank
        per_rank = n_prompts_global // dist.world
        local = indices[dist.rank * per_rank:(dist.rank + 1) * per_rank]
        examples = [self.examples[i] for i in local]
        raw = sample_and_verify(self.rollout, self.tokenizer, examples, self.cfg.group_size, self.cfg.answer_mode)
        raw.update({"prompt_indices": local, "examples": examples})
        if self.rollout.last_logprobs is not None:  # the engine's log-prob of each sampled token (vLLM)
            raw["rollout_logp"] = self.rollout.last_logprobs
        return raw

    def rollout_batch(self) -> tuple[dict, dict]:
        """One rollout batch of B groups (globally).

        With DAPO dynamic sampling (the method's `keep_groups`, §3.2): drop groups whose correctness is
        all-equal and sample further batches until B informative groups are kept or `max_gen_batches` is
        reached (verl raises there; we train on what we have and log it). The choice is made on the global
        order of groups, so it does not depend on the number of ranks; ranks may then hold different
        numbers of groups, which the global normalisers of the loss account for.
        """
        B, G, raws, flags = self.cfg.prompts_per_step, self.cfg.group_size, [], []
        while not raws or (sum(int(f.sum()) for f in flags) < B and len(raws) < self.method.cfg.max_gen_batches):
            raws.append(self.sample_groups(B))
            correct = torch.tensor([r.correct for r in raws[-1]["results"]], dtype=torch.float32)
            keep = self.method.keep_groups(correct, G)
            if keep is None:  # no filter: the first batch as it is
                return self.build_batch(raws[0]), {"gen_batches": 1}
            flags.append(torch.cat([torch.as_tensor(x, dtype=torch.bool) for x in self.dist.gather_objects(keep)]))
        all_flags = torch.cat(flags)
        chosen = torch.nonzero(all_flags).flatten()[:B].tolist()
        kept = keep_groups(raws, chosen, B, G, self.dist.rank, self.dist.world)
        info = {"gen_batches": len(raws), "frac_zero_std": 1.0 - float(all_flags.float().mean()),
                "groups_kept": len(chosen)}
        return self.build_batch(kept), info

    def build_batch(self, raw: dict) -> dict:
        return build_rollout_batch(raw, self.cfg.group_size, self.tokenizer, self.cfg.max_new_tokens)

    # ---- 2. one training step ----------------------------------------------------------------------
    def train_step(self, step: int) -> dict:
        cfg, method, t_start = self.cfg, self.method, time.perf_counter()
        self.begin_step(step)
        batch, info = self.rollout_batch()
        t0 = time.perf_counter()
        rewards = batch["rewards"] = method.shape_rewards(batch)
        batch["advantages"] = method.advantages(batch, rewards).to(torch.float32)
        t_score = batch["time_score"] + time.perf_counter() - t0
        t0 = time.perf_counter()
        n_seq = len(batch["texts"])
        if method.needs_batch_fields or cfg.mini_batches > 1:  # π_old's fields of the whole batch, before
            batch["fields"] = self.prepass(batch, list(range(n_seq)))  # the first optimiser step moves it
        per_mini = n_seq // cfg.mini_batches
        metrics: dict = {}
        for k in range(cfg.mini_batches):
            rows = list(range(k * per_mini, (k + 1) * per_mini if k < cfg.mini_batches - 1 else n_seq))
            if k > 0 and method.needs_batch_fields:
                # Off-policy (--mini-batches > 1) a batch-level selection ranks by the *current* policy
                # (Lp-Reg L4; SENT S11), and the parameters have moved since the prepass: one no-grad
                # forward over this mini-batch's rows gives π_θ's detached "cur_logp" / "cur_entropy",
                # next to π_old's "old_logp" / "entropy" / "minp_proxy_logp", which stay fixed (L5).
                # The first mini-batch needs none: there π_θ = π_old and the methods fall back on old_*.
                batch["fields"].update(self.prepass(batch, rows, current=True))
            for key, v in self.update(batch, rows).items():
                if v is not None:
                    metrics[key] = metrics.get(key, 0.0) + v / cfg.mini_batches
        metrics.update(self.rollout_metrics(batch, rewards), **batch.get("rollout_gap", {}), **info)
        metrics["adv_share_all_correct"] = self.all_correct_share(batch)
        metrics["curriculum_stage"] = self.sampler.stage  # SENT's SE curriculum (0 without one)
        metrics.update(reduce_means(batch.get("method_metrics", {}), self.dist))
        metrics.update({"time_generate": batch["time_generate"], "time_score": t_score,
                        "time_update": time.perf_counter() - t0, "time_step": time.perf_counter() - t_start})
        # rollout throughput of this rank's engine (tokens it generated / its generation time)
        metrics["rollout_tokens_per_s"] = float(batch["lengths"].sum()) / max(batch["time_generate"], 1e-9)
        if self.device.type == "cuda":  # peak GPU memory of this step (rank 0's; ranks are alike)
            metrics["peak_gpu_gb"] = torch.cuda.max_memory_allocated(self.device) / 1e9
            torch.cuda.reset_peak_memory_stats(self.device)
        return metrics

    def prepass(self, batch: dict, rows: list[int], current: bool = False) -> dict:
        """No-grad forward over `rows` before their first backward: π_old's fields "old_logp", and
        "entropy", "prompt_logp" and the method's own fields as it needs them.

        current=True (before every mini-batch after the first, for methods whose batch-level selection
        ranks by the current policy: Lp-Reg L4, SENT S11): the same forward with the parameters as they are
        now, giving π_θ's detached "cur_logp" (and "cur_entropy" if the method needs entropy). π_old's
        proxy and prompt log-probs are not recomputed (spec L5: they stay π_old's). Every rank calls it
        together (FSDP2: matched forwards), with or without rows.
        """
        want = self.needs & ({"entropy"} if current else {"entropy", "prompt_logp"})
        fns = {} if current else self.method.token_field_fns()
        out = no_grad_fields(self.model, batch, rows, self.cfg.temperature, want, self.cfg.micro_batch_tokens,
                             self.cfg.logit_chunk_rows, fns, self.dist, self.tokenizer.pad_token_id)
        if current:
            return {f"cur_{k}": v for k, v in out.items()}
        out["old_logp"] = out.pop("logp")
        return out

    def update(self, batch: dict, rows: list[int]) -> dict:
        """One optimiser step on `rows` of the rollout batch; returns metrics."""
        cfg, dist, method = self.cfg, self.dist, self.method
        counted = method.loss_rows(batch, rows)  # (mask_truncated: truncated rows leave the normalisers)
        n_tokens = dist.sum(float(batch["response_mask"][counted].sum()))
        norm = Normaliser(n_tokens, dist.sum(len(counted)), cfg.max_new_tokens, dist.world)
        if method.needs_batch_fields:  # e.g. Lp-Reg's token selection over the whole optimisation batch
            method.prepare_update(batch, rows, dist)
        micro_batches = split_micro_batches(batch, rows, cfg.micro_batch_tokens) if rows else []
        n_padding = pad_forwards(dist, len(micro_batches))  # FSDP2: agree on the count before the first forward
        gap = LogprobGap(batch["rollout_logp"]) if batch.pop("gap_pending", False) else None  # vLLM, once per batch
        stats, loss_sum, entropy_sum = {}, 0.0, 0.0
        if self.ref_model is not None and cfg.ref_offload and micro_batches:
            self.ref_model.to(self.device)
        for mb in micro_batches:
            loss, mb_stats, entropy = self.micro_batch_loss(to_device(mb, self.device), batch, norm, gap)
            loss.backward()
            for k, v in mb_stats.items():
                stats[k] = stats.get(k, 0.0) + float(v)
            loss_sum += float(loss.detach()) / dist.world
            entropy_sum += entropy
        if self.ref_model is not None and cfg.ref_offload:
            self.ref_model.to("cpu")
        padding_backward(self.model, n_padding, self.tokenizer.pad_token_id, self.device, cfg.temperature)
        grad_norm, stepped = clip_and_step(self.model, self.optimizer, cfg.grad_clip, dist)
        if stepped:
            self.rollout.mark_stale()  # vLLM: send the new weights before the next generation
        out = {"loss": dist.sum(loss_sum), "grad_norm": grad_norm,
               "entropy": dist.sum(entropy_sum) / max(n_tokens, 1.0) if self.logs_entropy else None}
        if gap is not None:
            batch["rollout_gap"] = gap.metrics(dist)
        return {**out, **reduce_stats(stats, dist, n_tokens)}

    @property
    def logs_entropy(self) -> bool:
        return self.cfg.log_entropy or "entropy" in self.needs

    def micro_batch_loss(self, mb: dict, batch: dict, norm: Normaliser, gap) -> tuple[torch.Tensor, dict, float]:
        """Forward with grad, the fields the prepass did not give, the method's loss: (loss, stats, Σ entropy)."""
        cfg, have = self.cfg, set(batch.get("fields", {}))
        want = ({"entropy"} if self.logs_entropy else set()) | ({"prompt_logp"} & self.needs - have) \
            | ({"entropy_grad"} & self.needs)  # (the entropy bonus: this forward's H with its gradient)
        fns = {k: f for k, f in self.method.token_field_fns().items() if k not in have}
        with autocast(self.device):
            fields = token_fields(self.model, mb, cfg.temperature, want, with_grad=True,
                                  chunk_rows=cfg.logit_chunk_rows, field_fns=fns)
        mb["logp"] = fields.pop("logp")
        if gap is not None:
            gap.add(mb["logp"], mb["rows"], mb["response_mask"])
        # on-policy without a prepass: π_old = π_θ, so ρ = exp(logp − logp.detach()) = 1 in value, gradient kept
        mb.setdefault("old_logp", mb["logp"].detach())
        for k, v in fields.items():
            mb.setdefault(k, v)  # π_old's from the prepass when there is one, else this forward's
        if "entropy" in fields:  # this forward's entropy is always π_θ's (SENT micro-batch scope, S11)
            mb["cur_entropy"] = fields["entropy"]
        if self.ref_model is not None:
            with torch.no_grad(), autocast(self.device):
                mb["ref_logp"] = token_fields(self.ref_model, mb, cfg.temperature, set(), with_grad=False,
                                              chunk_rows=cfg.logit_chunk_rows)["logp"]
        loss, stats = self.method.loss(mb, norm)
        entropy = float((fields["entropy"].detach() * mb["response_mask"]).sum()) if "entropy" in fields else 0.0
        return loss, stats, entropy

    def rollout_metrics(self, batch: dict, rewards: torch.Tensor) -> dict:
        """Reward/length/diversity statistics over the global batch (gathered from all ranks)."""
        local = [(float(r), float(c), float(n), bool(t), k, res.status) for r, c, n, t, k, res in
                 zip(rewards, batch["correct"], batch["lengths"], batch["truncated"], batch["keys"], batch["results"])]
        rows = [x for part in self.dist.gather_objects(local) for x in part]
        G, n = self.cfg.group_size, max(len(rows), 1)
        r, c, lengths, truncated, keys, statuses = (list(x) for x in zip(*rows)) if rows else ([],) * 6
        r, c, lengths = torch.tensor(r), torch.tensor(c), torch.tensor(lengths)
        groups = r.reshape(-1, G)
        distinct = [len({k for k in keys[g * G:(g + 1) * G] if k is not None}) for g in range(len(groups))]
        mean = lambda x: float(x.mean()) if len(x) else 0.0  # noqa: E731
        solved = c.reshape(-1, G).bool()
        return {"reward_mean": mean(r), "reward_std": float(r.std()) if len(r) > 1 else 0.0, "correct_mean": mean(c),
                "frac_reward_zero_std": mean((groups.std(dim=1) == 0).float()), "response_length": mean(lengths),
                # groups GRPO cannot learn from (zero advantage): every response right, or every one wrong
                "frac_all_correct": mean(solved.all(dim=1).float()), "frac_all_wrong": mean((~solved).all(dim=1).float()),
                "truncated_frac": float(np.mean(truncated)) if rows else 0.0,
                "distinct_correct": float(np.mean(distinct)) if distinct else 0.0,
                "unparseable_frac": statuses.count("unparseable") / n, "timeout_frac": statuses.count("timeout") / n}

    def all_correct_share(self, batch: dict) -> float:
        """Σ|A| over the responses of all-correct groups / Σ|A| over the batch (all ranks): the share of the
        policy-gradient signal spent on prompts the policy already solves every time. 0 for GRPO (such a
        group's advantages are 0); DSDR's diversity bonus is what makes it > 0 (ARM shifts inside the loss: it
        logs its own split, arm/shift_abs_all_correct)."""
        G, adv = self.cfg.group_size, batch["advantages"].abs().double()
        all_correct = batch["correct"].reshape(-1, G).bool().all(dim=1).repeat_interleave(G)
        part, total = self.dist.sum(float(adv[all_correct].sum())), self.dist.sum(float(adv.sum()))
        return part / total if total > 0 else 0.0

    # ---- 3. the run -------------------------------------------------------------------------------
    def fit(self, on_step=None) -> dict:
        """Train to cfg.steps; `on_step(step, metrics)` is called after each logged step (study.py study)."""
        from tqdm.auto import tqdm

        cfg = self.cfg
        bar = tqdm(range(self.start_step, cfg.steps), initial=self.start_step, total=cfg.steps,
                   desc=f"{cfg.method}", disable=not (cfg.progress and self.dist.is_main), dynamic_ncols=True)
        if cfg.final_eval and cfg.eval_at_start and self.start_step == 0:
            self.write_json("eval_start.json", self.evaluate())
        last_eval = (None, None)
        for step in bar:
            metrics, done = self.train_step(step), step + 1
            if step_was_skipped(metrics.get("grad_norm", 0.0)):  # update() did not step the optimiser
                self.skipped_steps += 1
                if self.dist.is_main:
                    warn_line(f"step {done}: gradient norm {metrics['grad_norm']}, the optimiser step was skipped "
                              f"({self.skipped_steps} skipped so far; metrics.jsonl: skipped_steps)")
            metrics["skipped_steps"] = self.skipped_steps
            if cfg.eval_every and done % cfg.eval_every == 0:
                last_eval = (done, self.evaluate())
                metrics.update(evaluation.flat_metrics(last_eval[1]))
                # the whole evaluation, per-prompt record included: study.py bootstraps differences over
                # prompts and draws the accuracy–diversity frontier from every checkpoint, not only the last
                self.write_json(f"evals/step_{done:06d}.json", last_eval[1])
            self.logger.log(done, metrics)
            if on_step is not None:
                on_step(done, metrics)
            bar.set_postfix(reward=f"{metrics['reward_mean']:.3f}", entropy=f"{metrics.get('entropy') or 0:.3f}",
                            distinct=f"{metrics['distinct_correct']:.2f}")
            if done % cfg.save_every == 0 or done == cfg.steps:
                try:
                    save_checkpoint(self.run_dir, done, self.model, self.tokenizer, self.optimizer, self.sampler,
                                    self.method, cfg, self.dist, cfg.keep_checkpoints,
                                    extra={"skipped_steps": self.skipped_steps, "reference_step": self.reference_step})
                except CheckpointError as e:  # (rank 0) one line, not a traceback; the run cannot go on
                    bar.close()
                    self.logger.close()
                    close_run_folder(self._run_lock)
                    raise SystemExit(f"error: {e}") from None
        summary = {}
        if cfg.final_eval:  # the held-out evaluation of the final policy (done already if --eval-every hit it)
            summary = last_eval[1] if last_eval[0] == cfg.steps else self.evaluate()
            self.write_json("summary.json", summary)
            if self.dist.is_main:
                plot_run(self.run_dir)
        self.logger.close()
        close_run_folder(self._run_lock)  # the run folder is complete: another training may take it
        return summary

    def write_json(self, name: str, value: dict) -> None:
        if self.dist.is_main:
            (self.run_dir / name).parent.mkdir(parents=True, exist_ok=True)
            (self.run_dir / name).write_text(json.dumps(value, indent=2))

    def evaluate(self) -> dict:
        """Held-out evaluation (pass@k curve, avg@n, distinct correct) without disturbing training RNG."""
        cfg = self.cfg
        if not hasattr(self, "_eval_examples"):  # loaded and rendered once
            eval_cfg = dataclasses.replace(cfg, dataset=cfg.eval_dataset, dataset_config=None) \
                if cfg.eval_dataset else cfg
            self._eval_examples = render_prompts(load_prompts(eval_cfg, split="heldout")[: cfg.eval_prompts],
                                                 self.tokenizer, cfg.prompt_template)
        saved = rng_state()
        try:
            return evaluation.evaluate_policy(self.rollout, self.tokenizer, self._eval_examples, cfg.eval_samples,
                                              cfg.temperature, cfg.top_p, cfg.max_new_tokens, seed=12345,
                                              dist=self.dist, diversity=cfg.eval_diversity,
                                              entropy_model=self.model, answer_mode=cfg.answer_mode)
        finally:
            set_rng_state(saved)


# ====================================================================================================
# The same-base control (--with-control; study.py's controls)
# ====================================================================================================
def same_base_control(method: Method) -> dict | None:
    """The settings of `method`'s base objective that differ from the grpo preset: `--method grpo` with them
    trains exactly like the method with its mechanism switched off (its class's `control_overrides`;
    tests/test_controls.py checks the weights are bit-identical). None for grpo / dapo / dr_grpo themselves."""
    if type(method) is Method:
        return None
    preset = PRESETS["grpo"]
    return {f.name: getattr(method.cfg, f.name) for f in dataclasses.fields(GRPOConfig)
            if getattr(method.cfg, f.name) != getattr(preset, f.name)}


def train_control(trainer: Trainer, summary: dict) -> None:
    """--with-control: train the same-base control of `trainer`'s finished run (same seed, steps, prompts and
    evaluation) into <out>-control and print both held-out evaluations side by side (vs_control.md)."""
    control = same_base_control(trainer.method)
    if control is None or not summary:
        if trainer.dist.is_main:
            print(f"--with-control: {trainer.cfg.method} is a base objective (its own control)" if control is None
                  else "--with-control: no final evaluation to compare (--no-final-eval)")
        return
    cfg, run_dir = trainer.cfg, trainer.run_dir
    out = run_dir.with_name(run_dir.name + "-control")
    resume = cfg.resume and latest_checkpoint(out) is not None
    start = run_dir / "eval_start.json"  # the same starting policy, prompts and sampling seed: computed once
    ccfg = dataclasses.replace(cfg, method="grpo", out=str(out), with_control=False, resume=resume,
                               overwrite=cfg.overwrite and not resume)
    share_start = not resume and start_evaluation_matches(start, ccfg)
    ccfg.eval_at_start = cfg.eval_at_start and not share_start
    label = "grpo:" + ":".join(f"{k}={v}" for k, v in control.items())
    if trainer.dist.is_main:
        print(f"--with-control: training the same-base control ({label}) into {out}")
    control_trainer = Trainer(ccfg, control)
    if share_start and control_trainer.dist.is_main:
        reuse_start_evaluation(start, out)
    control_summary = control_trainer.fit()
    control_trainer.rollout.close()
    if control_trainer.dist.is_main and control_summary:
        table = evaluation.comparison_table(summary, control_summary, cfg.method, label)
        (run_dir / "vs_control.md").write_text(table)
        print(f"\n{cfg.method} against its same-base control (the mechanism switched off), step {cfg.steps}:\n")
        print(table)


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
        build_method(cfg.method, overrides, toy=uses_toy_strengths(resolved))
        trainer = Trainer(cfg, overrides)
    except ConfigError as e:
        report_config_error(e)
        return 2
    summary = trainer.fit()
    if trainer.dist.is_main and summary:
        print(json.dumps({k: v for k, v in summary.items() if not isinstance(v, (dict, list))}, indent=None))
    trainer.rollout.close()
    if cfg.with_control:
        try:
            train_control(trainer, summary)
        except ConfigError as e:
            report_config_error(e)
            return 2
    if trainer.dist.enabled and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    set_torch_threads()  # this process's share of the CPUs (distributed.py)
    sys.exit(main())
