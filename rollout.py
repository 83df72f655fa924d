"""rollout.py — the policy model and how responses are sampled from it.

`load_policy` loads a model and its tokenizer (`resolve_model_path`: "toy" is built locally on first use);
`HFRollout` samples with `model.generate` on the training weights, `VLLMRollout` with a colocated vLLM
engine whose weights are synced after every optimiser step. Both answer the same `generate` call, so the
loop, evaluation and the SE curriculum do not care which one runs (`make_rollout` picks by --rollout).
"""

from __future__ import annotations

import os
import time

import torch

import toy
import verifier
from config import TrainConfig, check_vllm, is_toy
from distributed import Dist, autocast, pad_forwards

# ====================================================================================================
# Model loading
# ====================================================================================================
def resolve_model_path(name: str) -> str:
    if is_toy(name):
        return toy.ensure_toy_model(config=toy.MODELS[name])
    return name


def load_policy(name: str, device: torch.device):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(name)
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "left"  # batched generation appends to the right
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    # fp32 master weights; bf16 autocast on CUDA for speed (train_step).
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device)
    return model, tokenizer


def enable_gradient_checkpointing(model) -> None:
    """Recompute the decoder's activations in backward (call before FSDP2 sharding, which wraps the
    checkpointed layers)."""
    enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5.2x
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


# ====================================================================================================
# Rollouts
# ====================================================================================================
class HFRollout:
    """Sampling with `model.generate`. `VLLMRollout` below implements the same calls."""

    def __init__(self, model, tokenizer, cfg: TrainConfig, device, dist: "Dist | None" = None):
        self.model, self.tokenizer, self.cfg, self.device = model, tokenizer, cfg, device
        self.dist = dist
        self.last_logprobs = None  # HF generate does not report the sampled tokens' log-probs

    def mark_stale(self) -> None:  # generate reads the training weights directly: always in sync
        pass

    def close(self) -> None:  # nothing to shut down
        pass

    @torch.no_grad()
    def generate(self, prompt_ids: list[list[int]], n: int, temperature=None, top_p=None,
                 max_new_tokens=None, top_k: int = 0) -> list[list[int]]:
        """n samples per prompt; returns response token ids (EOS kept, padding dropped), grouped.
        temperature 0 = greedy (evaluation protocols); top_k 0 = off (training always samples purely)."""
        cfg, tok = self.cfg, self.tokenizer
        max_new_tokens = max_new_tokens or cfg.max_new_tokens
        temperature, top_p = sampling_settings(cfg, temperature, top_p)
        sampling = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=top_k, min_p=None) \
            if temperature > 0 else dict(do_sample=False, temperature=None, top_p=None, top_k=None)
        was_training = self.model.training
        self.model.eval()
        out: list[list[int]] = []
        per_call = max(1, min(cfg.gen_batch_prompts, cfg.gen_batch_rows // max(n, 1)))  # prompts per generate()
        starts = list(range(0, len(prompt_ids), per_call))
        synced = self.dist is not None and self.dist.fsdp
        # FSDP2: every generate step is a collective. synced_gpus keeps ranks stepping until all are done;
        # a rank with fewer chunks generates from a one-token dummy prompt (discarded) to match the calls.
        starts += [None] * (pad_forwards(self.dist, len(starts)) if synced else 0)
        for start in starts:
            chunk = prompt_ids[start:start + per_call] if start is not None else [[tok.pad_token_id]]
            width = max(len(p) for p in chunk)
            ids = torch.full((len(chunk), width), tok.pad_token_id, dtype=torch.long)
            attn = torch.zeros_like(ids)
            for i, p in enumerate(chunk):
                ids[i, width - len(p):] = torch.tensor(p)
                attn[i, width - len(p):] = 1
            with autocast(self.device):
                gen = self.model.generate(
                    input_ids=ids.to(self.device), attention_mask=attn.to(self.device),
                    **sampling, max_new_tokens=max_new_tokens,
                    num_return_sequences=n if start is not None and temperature > 0 else 1,
                    eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, synced_gpus=synced)
            if start is None:
                continue
            for row in gen[:, width:].tolist():
                if tok.eos_token_id in row:
                    row = row[:row.index(tok.eos_token_id) + 1]
                out.extend([row] * (1 if temperature > 0 else n))  # greedy: n identical samples
        self.model.train(was_training)
        return out


def sampling_settings(cfg: TrainConfig, temperature, top_p) -> tuple[float, float]:
    """A generate call's temperature / top_p: the caller's (evaluation protocols), else the config's."""
    return (cfg.temperature if temperature is None else temperature, cfg.top_p if top_p is None else top_p)


class VLLMRollout:
    """Sampling with a colocated vLLM engine: one `vllm.LLM` per rank, in the training process.

    * The engine loads the policy's starting weights; after every optimiser step the trainer's weights
      are marked stale and sent before the next generation (`sync_weights`): full tensors gathered from
      FSDP2 one parameter at a time, loaded in place with vLLM's `reload_weights`, prefix cache reset.
    * Sampling is pure (T, top_p of the config, no top_k / min_p), so the trainer's recomputed
      log-probs (logits / T, forward.token_fields) describe the sampling distribution. vLLM returns the
      *processed* log-prob of each sampled token (after temperature), which the loop compares with its
      own recomputation every step (`rollout_logp_gap_*` metrics): a large gap means the engine samples
      from a different policy (stale weights, precision) and the on-policy assumption ρ = 1 is off.
    * Seeds come from the torch RNG, so runs are reproducible and `--resume` restores the sampler.
    """

    def __init__(self, model, tokenizer, cfg: TrainConfig, device, dist: "Dist | None" = None,
                 model_path: str | None = None):
        check_vllm()
        # in-process engine (no extra worker processes); on CPU a 1 GiB KV cache is plenty for the toy
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        if device.type == "cpu":
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
            # vLLM pins its OpenMP threads to cores by default, which is right for a dedicated server but
            # pins the trainer (same process) too: on a shared 2-core machine steps became 5-20x slower
            # (measured 8 steps: 55 s pinned vs 34 s unpinned while another process was busy)
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
        from vllm import LLM

        self.model, self.tokenizer, self.cfg, self.device = model, tokenizer, cfg, device
        self.dist = dist
        self.sleeping, self.stale = False, False
        self.last_logprobs: list[list[float]] | None = None
        path = model_path or resolve_model_path(cfg.model)
        kwargs = dict(model=path, seed=cfg.seed + (dist.rank if dist else 0),
                      dtype="bfloat16" if device.type == "cuda" else "float32",
                      logprobs_mode="processed_logprobs",  # after temperature: what the loss assumes
                      skip_tokenizer_init=True)  # we pass token ids in and read token ids out
        if device.type == "cuda":
            kwargs.update(gpu_memory_utilization=cfg.vllm_gpu_memory_utilization, enable_sleep_mode=cfg.vllm_sleep)
        if dist is not None and dist.enabled:
            # torchrun already started one process per rank: each runs its own engine (data parallel)
            kwargs["distributed_executor_backend"] = "external_launcher"
        self.llm = LLM(**kwargs)

    def mark_stale(self) -> None:
        """Called after each optimiser step: the engine's weights are out of date."""
        self.stale = True

    def named_tensors(self):
        """(HF name, full tensor) for every parameter, one at a time. Tied weights appear under both names
        (remove_duplicate=False): vLLM keeps a separate LM head for some models, and a tied model that
        only receives `embed_tokens` would silently keep sampling from the old head."""
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        for name, p in self.model.named_parameters(remove_duplicate=False):
            t = p.full_tensor() if hasattr(p, "full_tensor") else p  # FSDP2 shard → full (a collective)
            yield name, t.detach().to(dtype)

    @torch.no_grad()
    def sync_weights(self) -> None:
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": self.named_tensors()})
        self.llm.reset_prefix_cache()  # cached KV blocks were computed with the old weights
        self.stale = False

    @torch.no_grad()
    def generate(self, prompt_ids: list[list[int]], n: int, temperature=None, top_p=None,
                 max_new_tokens=None, top_k: int = 0) -> list[list[int]]:
        """As HFRollout.generate; also keeps the engine's log-prob of every sampled token (last_logprobs)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        cfg, tok = self.cfg, self.tokenizer
        if self.sleeping:
            self.llm.wake_up()
            self.sleeping = False
        if self.stale and self.model is not None:
            self.sync_weights()  # every rank: the FSDP2 gathers are collectives
        seed = int(torch.randint(0, 2**31 - 1, (1,)))  # from the (checkpointed) torch RNG
        out, logprobs = [], []
        if prompt_ids:
            temperature, top_p = sampling_settings(cfg, temperature, top_p)
            params = [SamplingParams(n=n, temperature=temperature, top_p=top_p if temperature > 0 else 1.0,
                                     top_k=top_k if temperature > 0 else 0, min_p=0.0,
                                     max_tokens=max_new_tokens or cfg.max_new_tokens,
                                     stop_token_ids=[tok.eos_token_id], logprobs=0, seed=seed + i,
                                     detokenize=False) for i in range(len(prompt_ids))]
            results = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompt_ids], params,
                                        use_tqdm=False)
            for res in results:  # outputs come back in prompt order, n completions each
                for c in res.outputs:
                    ids = list(c.token_ids)
                    if tok.eos_token_id in ids:  # EOS kept, as HFRollout does
                        ids = ids[:ids.index(tok.eos_token_id) + 1]
                    out.append(ids)
                    logprobs.append([next(iter(d.values())).logprob for d in (c.logprobs or [])][:len(ids)])
        self.last_logprobs = logprobs
        if self.device.type == "cuda" and self.cfg.vllm_sleep:
            self.llm.sleep(level=1)  # weights offloaded to CPU, KV cache freed: room for the update
            self.sleeping = True
        return out

    def close(self) -> None:
        """Shut the engine down while torch.distributed is still up: its teardown destroys vLLM's process
        groups (and the default group) and fails at interpreter exit if the loop destroyed them first."""
        self.llm.llm_engine.engine_core.shutdown()


def make_rollout(model, tokenizer, cfg: TrainConfig, device, dist: "Dist | None" = None, model_path=None):
    if cfg.rollout == "vllm":
        return VLLMRollout(model, tokenizer, cfg, device, dist, model_path=model_path)
    return HFRollout(model, tokenizer, cfg, device, dist)


def sample_and_verify(rollout, tokenizer, examples: list[dict], n: int, answer_mode: str, generate: bool = True,
                      **sampling) -> dict:
    """Prompts → n responses each → decoded texts → verifier verdicts: the one rollout path of training,
    evaluation and the SE curriculum. `sampling` goes to `rollout.generate` (temperature, top_p, ...);
    generate=False skips the engine call (a rank with no prompts when generation is not a collective).
    Returns lists, grouped by prompt: prompt_ids [P], responses / texts / results [P·n], time_generate /
    time_score in seconds."""
    prompt_ids = [tokenizer(ex["prompt"], add_special_tokens=True)["input_ids"] for ex in examples]
    t0 = time.perf_counter()
    responses = rollout.generate(prompt_ids, n, **sampling) if generate else []
    t_gen = time.perf_counter() - t0
    t0 = time.perf_counter()
    texts = tokenizer.batch_decode(responses, skip_special_tokens=True) if responses else []
    results = verifier.verify_batch(texts, [ex for ex in examples for _ in range(n)], mode=answer_mode)
    return {"prompt_ids": prompt_ids, "responses": responses, "texts": texts, "results": results,
            "time_generate": t_gen, "time_score": time.perf_counter() - t0}


class LogprobGap:
    """|trainer − engine| log-prob of the sampled tokens (vLLM rollouts), accumulated over micro-batches
    and reduced over ranks: how far the engine's sampling distribution is from the one trained on."""

    def __init__(self, engine_logp: torch.Tensor):
        self.engine_logp, self.total, self.max, self.count = engine_logp, 0.0, 0.0, 0.0

    def add(self, logp: torch.Tensor, rows: torch.Tensor, mask: torch.Tensor) -> None:
        engine = self.engine_logp[rows.cpu()][:, :mask.shape[1]].to(logp.device)
        gap = (logp.detach().float() - engine).abs() * mask
        self.total, self.max = self.total + float(gap.sum()), max(self.max, float(gap.max()))
        self.count += float(mask.sum())

    def metrics(self, dist: Dist) -> dict:  # every rank calls it (a rank without rows adds 0)
        return {"rollout_logp_gap_mean": dist.sum(self.total) / max(dist.sum(self.count), 1.0),
                "rollout_logp_gap_max": dist.max(self.max)}
