"""The embedded toy: a Countdown-style task and a ~1M-parameter model warm-started on it, all local.

Why a toy at all? Mode collapse under GRPO is a statement about *how many different correct solutions*
a policy still produces as RL goes on. To watch it (and to see diversity methods such as DSDR resist
it) on a laptop CPU, we need a task where

  * every prompt has several genuinely different correct answers (not one answer written many ways),
  * answers are checked exactly and cheaply (verifier.py), and
  * a tiny model starts out *imperfect but diverse*: it solves some prompts, sometimes, in several
    different ways, which leaves RL room both to improve pass@1 and to collapse.

The task (Countdown). A prompt lists a few small numbers and a target; the response is a chain of
arithmetic steps reaching the target, each given number used at most once (not necessarily all):

    prompt    "3 7 2 5>29:"               numbers 3 7 2 5, target 29 (">" reads "make", ":" ends it)
    response  "7*5=35,3*2=6,35-6=29"      one solution: (7*5)-(3*2)
              "5*3=15,7*2=14,15+14=29"    a genuinely different one: (5*3)+(7*2)

(the exact rules, and the canonical solution key that identifies "the same solution up to
commutativity", live in verifier.py; this file takes its keys from `check_countdown`, so two solutions
counted as different here are different for the verifier and for every diversity metric built on it).

This file, top to bottom:
  1. the task: an exhaustive solver, problem generation, deterministic train / held-out splits;
  2. a character-level tokenizer (`tokenizers`, wrapped as a `PreTrainedTokenizerFast`), or whole-number;
  3. a tiny `Qwen2ForCausalLM` (a `LlamaForCausalLM` for the whole-number vocabulary);
  4. the warm start: supervised fine-tuning (SFT) on sampled correct solutions, cached on disk (the
     project ships the weights it built, in toy_weights/, so a fresh clone copies them instead of
     running the SFT), and `measure_warm_start`, which checks the start has the properties RL needs.

A second vocabulary, `--model toy-numbers` (`NUMBERS_CONFIG`), makes every whole number one token (1,012
tokens) and smooths the warm start's labels, so that the policy has a low-probability tail over many tokens
as pretrained LLMs do: the regime Lp-Reg's min-p proxy is built for (lpreg.py). Same task, same splits.

`python toy.py [--model toy-numbers]` finds (or copies, or builds) the cached model and prints its measurements;
`python toy.py --rebuild [--write]` builds it from the seed and compares it with the shipped weights. Measured on
2 CPU cores with the default config: the splits take ~1 s (2000 train / 200 held-out problems, 10.9 distinct
solutions per problem on average, median 10); the warm start's SFT ~155 s (copying the shipped weights: 0.01 s);
on held-out prompts it then reaches pass@1 0.22 with 4.1 distinct correct solutions among 32 samples on the 98%
of prompts it solves at least once.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import platform
import random
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from functools import lru_cache

import torch

from verifier import check_countdown

# ====================================================================================================
# 0. Configuration
# ====================================================================================================
# Everything that changes the data, the tokenizer or the model is in `ToyConfig`; the cache folder's name
# is a hash of it (plus TOY_VERSION, bumped when the code changes in a way the config does not show), so
# a change never silently reuses a stale model.

# 2: byte-level tokenizer file (v1's lost every space when AutoTokenizer reloaded it), no padding by 1
TOY_VERSION = 2


@dataclass(frozen=True)
class ToyConfig:
    # --- task ---
    min_number: int = 2  # numbers are drawn uniformly from [min_number, max_number]
    max_number: int = 10
    # share of prompts with 3 numbers (the rest have 4). Few 3-number problems have >= 3 solutions (fewer
    # than 200 with these ranges, most with exactly 3), so the default uses 4 numbers.
    p_three_numbers: float = 0.0
    min_target: int = 10  # targets are drawn among the values in [min_target, max_target] that have
    max_target: int = 30  # >= min_solutions distinct solutions with the drawn numbers
    # Pick the target with probability proportional to its number of solutions (else uniformly). Measured:
    # with targets <= 30 instead of <= 60, this raised held-out pass@1 of the warm start from ~0.14 to
    # ~0.2 at equal SFT compute (more ways to be right) and gives more distinct solutions to lose.
    weight_targets_by_solutions: bool = True
    min_solutions: int = 3  # keep a (numbers, target) only if it has this many distinct solutions
    n_train: int = 2000
    n_heldout: int = 200
    data_seed: int = 1234
    # --- model (Qwen2 architecture, ~1M parameters) ---
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 448
    max_positions: int = 96
    # --- warm start (SFT) ---
    # 1500 steps x 64 sequences: each train problem is seen ~48 times, each of its solutions ~4 times.
    # "Realistic" here is early stopping: the model has learnt the format and the arithmetic of single
    # steps but not yet to plan, and its typical failure is a last step forced onto the target
    # ("14*3=45"), a clear signal for RL. Measured (held-out pass@1): with targets up to 60 drawn
    # uniformly, 600 / 800 / 1200 steps gave 0.08 / 0.12 / 0.14, so pass@1 grows slowly with compute;
    # lr 1e-2 trained much worse than 3e-3; at equal CPU time a 0.47M model (hidden 96, 2000 steps) did
    # ~0.04 better than this ~0.9M one, which we keep as the default size.
    sft_steps: int = 1500
    sft_batch_size: int = 64
    sft_lr: float = 3e-3
    sft_warmup: int = 50
    sft_weight_decay: float = 0.01
    sft_seed: int = 0
    # --- vocabulary (issue 16) ---
    # "characters": one token per character (22 tokens); the default, and what every study before issue 16
    # used. "numbers": every whole number 0..999 is ONE token (1,012 tokens in all), the rest as before.
    # Why a second vocabulary: Lp-Reg's min-p proxy (lpreg.py) removes the tokens below κ·max p and
    # renormalises. Real LLM vocabularies (150k tokens) spread a few percent of probability over thousands
    # of implausible tokens; 22 characters cannot, so the proxy removes ~0.2% of the mass and Lp-Reg has
    # nothing to act on. With 1,000 number tokens, after "7*5=" the model spreads its leftover mass over
    # the many wrong results, a tail of the kind the paper's proxy is built to cut.
    vocabulary: str = "characters"
    # Label smoothing of the SFT loss: the target puts sft_label_smoothing of its mass uniformly on the whole
    # vocabulary. Measured (scripts/lpreg_proxy.py, 4 batches of 16 x 8 at the warm start, κ = 0.02): the
    # whole-number vocabulary *alone* does not give a tail — the SFT model is confident (the keep set holds
    # 1.7 tokens on average) and the min-p filter removes 0.35 % of the mass (characters: 0.20 %). A
    # pretrained LLM keeps some mass on thousands of implausible tokens; smoothing is the simplest way to give
    # the toy's warm start the same. With ε = 0.02 (toy-numbers): removed mass 3.3 %, median Z 0.979, Z < 0.99
    # at 99 % of positions, Z < 0.9 at 4 %; held-out pass@1 0.155, 3.45 distinct correct per solvable prompt
    # (inside the warm-start targets; without smoothing 0.221 / 3.89).
    sft_label_smoothing: float = 0.0


DEFAULT_CONFIG = ToyConfig()
NUMBERS_CONFIG = ToyConfig(vocabulary="numbers", sft_label_smoothing=0.02)
# The toy models `--model` accepts, by name: each is built and cached on first use (`ensure_toy_model`).
# Both share the task, the splits and the SFT recipe; only the tokenizer (and so the model's embedding) differs.
MODELS = {"toy": DEFAULT_CONFIG, "toy-numbers": NUMBERS_CONFIG}
# Response budget for sampling (train.py's default for the toy): a 3-step chain is at most ~26 characters.
MAX_NEW_TOKENS = 40

# ====================================================================================================
# 1. The task
# ====================================================================================================
# Prompt format. Short and unambiguous for a character-level model: the numbers separated by spaces, ">",
# the target, ":" — e.g. "3 7 2 5>29:". The response follows the ":" directly, e.g. "7*5=35,3*2=6,35-6=29",
# and ends with the EOS token. Numbers keep the order they were drawn in (part of what the model reads).


def format_prompt(numbers: list[int], target: int) -> str:
    """'3 7 2 5>29:' — numbers separated by spaces, '>' then the target, ':' then the response."""
    return " ".join(str(n) for n in numbers) + f">{target}:"


# --- the solver ---
# We enumerate expression trees bottom-up, the way a person plays Countdown: repeatedly pick two of the
# available values (given numbers or earlier results), combine them with an operation, and put the result
# back. Every time a combination produces a value we record the chain of steps that built it.
# Two Countdown conventions keep the solutions meaningful:
#   * intermediate results are positive integers (no 0, no negatives, exact division);
#   * no step multiplies or divides by 1. Otherwise every solution of 27 from 9 3 2 3 that leaves 3 and 2
#     unused has padded twins, "9*3=27,3-2=1,27*1=27", "...,27/1=27", "3-2=1,9*1=9,9*3=27", ... which the
#     verifier keys apart but nobody would call different solutions (6 of the 14 keys in that example).
# The verifier is more permissive (it accepts "3-5=-2" or "27*1=27"), so the counts here are the genuinely
# different solutions, a lower bound of what it accepts. A policy that learns padding to look diverse is
# something the diversity metrics, not this solver, have to see.


def _combine(a: int, b: int):
    """All ways to combine values a and b by one Countdown step: (result, op, swapped), where
    swapped=True means the step is written "b op a" (the larger value first for -, the divisor second)."""
    # + and * are written larger operand first ("6+4=10"): one surface form per step, so the model's
    # probability mass is spread over different *solutions*, not over spellings of the same one.
    out = [(a + b, "+", b > a)]
    if a != 1 and b != 1:
        out.append((a * b, "*", b > a))
    if a != b:
        out.append((abs(a - b), "-", b > a))
    if b != 1 and a % b == 0:
        out.append((a // b, "/", False))
    if a != 1 and a != b and b % a == 0:
        out.append((b // a, "/", True))
    return out


@lru_cache(maxsize=None)
def _chains_by_value(numbers: tuple[int, ...]) -> dict[int, tuple[str, ...]]:
    """value -> every step chain (as a string) that ends on that value, for a sorted tuple of numbers.

    Chains are deduplicated by the tree they build (our own canonical string, commutative operands
    sorted, the same convention as the verifier's key) to keep the lists short; `solve` then groups them
    by the verifier's key, the one that counts.
    """
    found: dict[int, dict[str, str]] = {}
    visited: set[tuple] = set()

    # An item is (value, tree, steps): tree is a canonical string, steps the chain of steps that built it.
    def search(items: list[tuple[int, str, tuple[str, ...]]]):
        state = tuple(sorted((value, tree) for value, tree, _ in items))
        if state in visited:  # the same multiset of subtrees, reached by combining in another order
            return
        visited.add(state)
        for i in range(len(items)):
            for j in range(i + 1, len(items)):
                rest = items[:i] + items[i + 1 : j] + items[j + 1 :]
                for result, op, swapped in _combine(items[i][0], items[j][0]):
                    left, right = (items[j], items[i]) if swapped else (items[i], items[j])
                    t_left, t_right = left[1], right[1]
                    if op in "+*" and t_right < t_left:
                        t_left, t_right = t_right, t_left
                    tree = f"({t_left}{op}{t_right})"
                    steps = left[2] + right[2] + (f"{left[0]}{op}{right[0]}={result}",)
                    found.setdefault(result, {}).setdefault(tree, ",".join(steps))
                    search(rest + [(result, tree, steps)])

    search([(n, str(n), ()) for n in numbers])
    return {value: tuple(chains.values()) for value, chains in found.items()}


def solve(numbers: list[int], target: int) -> dict[str, str]:
    """All correct solutions of (numbers, target): verifier canonical key -> one step chain reaching it.

    Every chain returned is checked by `check_countdown`, so each one is correct and the keys are exactly
    the verifier's (solutions equal up to commutativity share a key; different associations do not).
    """
    solutions: dict[str, str] = {}
    for chain in _chains_by_value(tuple(sorted(int(n) for n in numbers))).get(int(target), ()):
        check = check_countdown(chain, numbers, target)
        assert check.correct, (chain, numbers, target, check.error)  # the solver and verifier must agree
        solutions.setdefault(check.key, chain)
    return solutions


# --- problems and splits ---


def _problem_key(numbers, target) -> tuple:
    """Identity of a problem for split disjointness: the multiset of numbers and the target."""
    return (tuple(sorted(numbers)), int(target))


def generate_problems(
    n: int,
    seed: int,
    config: ToyConfig = DEFAULT_CONFIG,
    exclude: set | None = None,
    id_prefix: str = "cd",
) -> list[dict]:
    """n distinct Countdown problems, each with at least `config.min_solutions` distinct solutions.

    For each problem we draw the numbers, solve for *every* target at once (one enumeration gives the
    solutions of all reachable values), keep the targets in [min_target, max_target] with enough distinct
    solutions, and pick one (in proportion to its solution count, see ToyConfig). Problems in `exclude`
    (keys from `_problem_key`) and repeats are skipped.
    """
    rng = random.Random(seed)
    seen = set(exclude or ())
    problems = []
    draws = 0
    while len(problems) < n:
        draws += 1
        if draws > 100 * n + 10_000:  # the ranges admit fewer than n distinct problems
            raise ValueError(f"could only generate {len(problems)} of {n} distinct problems; widen the ranges")
        k = 3 if rng.random() < config.p_three_numbers else 4
        numbers = [rng.randint(config.min_number, config.max_number) for _ in range(k)]
        candidates = [
            t
            for t, chains in sorted(_chains_by_value(tuple(sorted(numbers))).items())
            if config.min_target <= t <= config.max_target and t not in numbers and len(chains) >= config.min_solutions
        ]
        if not candidates:
            continue
        if config.weight_targets_by_solutions:
            # weights: the solver's tree counts, equal to the verifier's key counts but for rare ties
            # between a given number and an equal intermediate result (only a weight, checked just below)
            chains = _chains_by_value(tuple(sorted(numbers)))
            target = rng.choices(candidates, weights=[len(chains[t]) for t in candidates])[0]
        else:
            target = rng.choice(candidates)
        if _problem_key(numbers, target) in seen:
            continue
        solutions = solve(numbers, target)
        if len(solutions) < config.min_solutions:
            continue
        seen.add(_problem_key(numbers, target))
        problems.append(
            {
                "id": f"{id_prefix}-{len(problems):05d}",
                "task": "countdown",
                "numbers": numbers,
                "target": target,
                "prompt": format_prompt(numbers, target),
                "answer": str(target),
                "n_solutions": len(solutions),
            }
        )
    return problems


@lru_cache(maxsize=4)
def _splits(config: ToyConfig) -> dict[str, tuple[dict, ...]]:
    # One seeded stream: the held-out problems first, then train problems that exclude them. Asking for
    # more train problems therefore never changes the held-out split.
    heldout = generate_problems(config.n_heldout, config.data_seed, config, id_prefix="heldout")
    train = generate_problems(
        config.n_train,
        config.data_seed + 1,
        config,
        exclude={_problem_key(p["numbers"], p["target"]) for p in heldout},
        id_prefix="train",
    )
    return {"train": tuple(train), "heldout": tuple(heldout)}


def load_split(split: str, config: ToyConfig = DEFAULT_CONFIG) -> list[dict]:
    """The deterministic "train" or "heldout" split (fresh dict copies; generated in ~1 s, then cached)."""
    if split not in ("train", "heldout"):
        raise ValueError(f"unknown split {split!r}; use 'train' or 'heldout'")
    return [dict(p, numbers=list(p["numbers"])) for p in _splits(config)[split]]


# ====================================================================================================
# 2. Tokenizer: one token per character
# ====================================================================================================
# Character-level keeps the model honest about arithmetic (no multi-digit tokens to memorise) and makes
# the vocabulary tiny (22), so nearly all parameters are in the transformer blocks. We build it with the
# `tokenizers` library and wrap it as a `PreTrainedTokenizerFast`, so that everything downstream (RL
# trainer, evaluation, notebooks) uses the standard Hugging Face API and `AutoTokenizer` loads it.
#
# Why byte-level BPE with no merges, rather than a plain word-level vocabulary of characters? Because the
# folder also holds a Qwen2 config.json, and for model_type "qwen2" transformers' AutoTokenizer ignores the
# saved tokenizer class and rebuilds a `Qwen2Tokenizer` from our vocabulary: a byte-level BPE with its own
# pre-tokenizer, in which a space is the byte-level symbol "Ġ". A word-level vocabulary containing " "
# silently loses every space on reload ("3 7 2 10" becomes "37210"). Written in the byte-level alphabet
# ("Ġ" for space) with an empty merge list, our tokenizer is character-level under both classes, token for
# token, and `test_toy.py` checks the reload in a folder that has the model's config.json.

ALPHABET = "0123456789+-*/=,>: "  # digits, operations, the step and prompt separators, space
PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"


def build_tokenizer(config: ToyConfig = DEFAULT_CONFIG):
    """The toy's `PreTrainedTokenizerFast` for `config.vocabulary`: ids 0-2 are <pad>, <eos>, <unk>, then
    one id per character of ALPHABET ("characters") or per non-digit character and per whole number
    0..999 ("numbers"); left padding. Characters outside the alphabet are dropped (as in the Qwen2
    class that AutoTokenizer reloads it as); the task never produces one."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    if config.vocabulary == "numbers":
        return _build_numbers_tokenizer()
    if config.vocabulary != "characters":
        raise ValueError(f"ToyConfig.vocabulary must be 'characters' or 'numbers', got {config.vocabulary!r}")

    byte_to_symbol = bytes_to_unicode()  # the GPT-2 byte-level alphabet: " " -> "Ġ", printable ASCII unchanged
    symbols = [byte_to_symbol[ord(char)] for char in ALPHABET]
    vocab = {token: i for i, token in enumerate([PAD, EOS, UNK, *symbols])}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))  # no merges: one token per char
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD,
        eos_token=EOS,
        unk_token=UNK,  # declared so that a reload does not add Qwen2's default "<|endoftext|>" as a new token
        padding_side="left",  # batched generation: prompts right-aligned so responses start together
        clean_up_tokenization_spaces=False,
        model_max_length=DEFAULT_CONFIG.max_positions,
    )


# The "numbers" vocabulary. A word-level vocabulary: the pre-tokenizer cuts the text into runs of digits and
# single other characters ("35-6=29" -> "35" "-" "6" "=" "29"), and each piece is one token. Its model is a
# Llama, not a Qwen2 (`build_model`): for model_type "qwen2" AutoTokenizer would rebuild a Qwen2Tokenizer
# whose pre-tokenizer splits every digit (so "35" could never be one token), while for "llama" it loads the
# saved tokenizer.json as it is (test_toy.py checks the reload next to the model's config.json).
LARGEST_NUMBER_TOKEN = 999  # the solver's chains never exceed 300 with the default numbers and targets


def _build_numbers_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    symbols = [char for char in ALPHABET if not char.isdigit()]
    numbers = [str(n) for n in range(LARGEST_NUMBER_TOKEN + 1)]
    vocab = {token: i for i, token in enumerate([PAD, EOS, UNK, *symbols, *numbers])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[0-9]+|."), behavior="isolated")
    core.decoder = decoders.Fuse()  # concatenate the pieces back, no spaces added between them
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD,
        eos_token=EOS,
        unk_token=UNK,
        padding_side="left",
        clean_up_tokenization_spaces=False,
        model_max_length=DEFAULT_CONFIG.max_positions,
    )


# ====================================================================================================
# 3. Model: a tiny Qwen2
# ====================================================================================================
# The same architecture family as the real models the methods are meant for (RoPE, RMSNorm, SwiGLU,
# grouped-query attention), just small: 128 wide, 4 layers, tied embeddings, ~0.9M parameters.


def build_model(tokenizer, seed: int = 0, config: ToyConfig = DEFAULT_CONFIG):
    """A freshly initialised `Qwen2ForCausalLM` ("numbers" vocabulary: `LlamaForCausalLM`, the same blocks
    without Qwen2's attention biases, see the tokenizer section) whose generation config samples purely
    (T=1, no top-k/p)."""
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config_class, model_class = (LlamaConfig, LlamaForCausalLM) if config.vocabulary == "numbers" \
        else (Qwen2Config, Qwen2ForCausalLM)
    model_config = config_class(
        vocab_size=len(tokenizer),
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads,
        max_position_embeddings=config.max_positions,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    model = model_class(model_config)
    # Plain sampling from the model's distribution: RL theory (and the diversity we measure) is about the
    # policy itself, so no top-k / top-p truncation and temperature 1 unless a caller asks otherwise.
    model.generation_config = GenerationConfig(
        do_sample=True,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        max_new_tokens=MAX_NEW_TOKENS,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    return model


# ====================================================================================================
# 4. Warm start: SFT on sampled correct solutions, cached on disk
# ====================================================================================================
# RL from a random model would never see a reward, so the policy starts from a short supervised phase:
# teacher forcing on (prompt, correct solution) pairs of TRAIN problems, the solution drawn uniformly among
# that problem's distinct solutions each time (a uniform mixture over solutions is the most diverse start
# a model can be taught), loss on the response and EOS only. It is stopped early on purpose: the goal is
# not a good Countdown solver but an *imperfect, diverse* one — see the targets in `measure_warm_start`.


def _collate(examples, pad_id: int):
    """Right-pad a list of (ids, labels) into tensors. Right padding keeps position ids 0..L-1, exactly
    what `generate` computes for a left-padded prompt (it derives positions from the attention mask)."""
    length = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), length), -100, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), length), dtype=torch.long)
    for row, (ids, labs) in enumerate(examples):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(labs)] = torch.tensor(labs)
        attention_mask[row, : len(ids)] = 1
    return input_ids, attention_mask, labels


def sft_warm_start(model, tokenizer, config: ToyConfig = DEFAULT_CONFIG, progress: bool = True) -> list[float]:
    """Teacher-forced SFT of `model` in place; returns the loss of every step.

    Deterministic given the config: torch's seed fixes the initialisation (done in build_model), a
    `random.Random(sft_seed)` fixes the data order, and CPU kernels are deterministic at a fixed thread count.
    """
    from tqdm.auto import tqdm

    rng = random.Random(config.sft_seed)
    torch.manual_seed(config.sft_seed)
    train = load_split("train", config)
    # Each train problem with all its distinct solutions, tokenized once: (prompt ids, [response ids + EOS]).
    # A step draws problems uniformly, then one of the problem's solutions uniformly.
    eos = [tokenizer.eos_token_id]
    pool = [
        (
            tokenizer(p["prompt"])["input_ids"],
            [tokenizer(chain)["input_ids"] + eos for chain in solve(p["numbers"], p["target"]).values()],
        )
        for p in train
    ]

    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.sft_lr, betas=(0.9, 0.98), weight_decay=config.sft_weight_decay
    )

    def lr_factor(step: int) -> float:  # linear warm-up, then cosine decay to 10% of the peak
        if step < config.sft_warmup:
            return (step + 1) / config.sft_warmup
        progress_frac = (step - config.sft_warmup) / max(1, config.sft_steps - config.sft_warmup)
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress_frac))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    model.train()
    losses = []
    bar = tqdm(range(config.sft_steps), desc="toy warm start (SFT)", disable=not progress)
    for _ in bar:
        batch = []
        for _ in range(config.sft_batch_size):
            prompt_ids, responses = pool[rng.randrange(len(pool))]
            response_ids = rng.choice(responses)
            # labels: -100 on the prompt (we do not train on it), the response and EOS are predicted
            batch.append((prompt_ids + response_ids, [-100] * len(prompt_ids) + response_ids))
        input_ids, attention_mask, labels = _collate(batch, tokenizer.pad_token_id)
        if config.sft_label_smoothing:  # the shifted next-token loss, as the model computes it, smoothed
            logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                                     ignore_index=-100, label_smoothing=config.sft_label_smoothing)
        else:
            loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}")
    model.eval()
    return losses


@torch.no_grad()
def sample_responses(model, tokenizer, prompts: list[str], max_new_tokens: int = MAX_NEW_TOKENS, batch_size: int = 512):
    """Pure samples (T=1, no top-k/top-p), one per prompt, batched with left padding."""
    responses = []
    for start in range(0, len(prompts), batch_size):
        batch = tokenizer(prompts[start : start + batch_size], return_tensors="pt", padding=True)
        # the model's own generation_config (build_model): do_sample, T = 1, top_k = 0, top_p = 1, EOS/pad
        out = model.generate(**batch, generation_config=model.generation_config, max_new_tokens=max_new_tokens)
        responses += tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    return responses


def measure_warm_start(
    model_path,
    n_prompts: int = 200,
    n_samples: int = 32,
    seed: int = 0,
    split: str = "heldout",
    config: ToyConfig = DEFAULT_CONFIG,
    tokenizer=None,
) -> dict:
    """Measure what the warm start is tuned for, on the first `n_prompts` problems of `split`.

    `model_path` is a folder (model + tokenizer) or an in-memory model (then the toy tokenizer is used
    unless `tokenizer` is given). Each prompt gets `n_samples` pure samples (T=1, top_k=0, top_p=1).

    pass@1                        mean correctness over all n_prompts * n_samples samples;
    frac_solvable                 share of prompts with >= 1 correct sample among the n_samples;
    distinct_correct_on_solvable  mean number of distinct correct solutions (verifier keys) among the
                                  n_samples, over solvable prompts: the diversity RL can lose.
    Targets for the default toy: pass@1 in [0.15, 0.60] (room to improve), distinct >= 3 (room to collapse).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if isinstance(model_path, (str, os.PathLike)):
        model = AutoModelForCausalLM.from_pretrained(model_path)
        tokenizer = tokenizer or AutoTokenizer.from_pretrained(model_path)
    else:
        model, tokenizer = model_path, tokenizer or build_tokenizer(config)
    was_training = model.training
    model.eval()
    problems = load_split(split, config)[:n_prompts]
    prompts = [p["prompt"] for p in problems for _ in range(n_samples)]
    with torch.random.fork_rng(devices=[]):  # seeded sampling without touching the caller's RNG state
        torch.manual_seed(seed)
        responses = sample_responses(model, tokenizer, prompts)
    model.train(was_training)

    n_correct, distinct = 0, []  # distinct: one entry per solvable prompt
    for i, problem in enumerate(problems):
        keys = [
            check.key
            for response in responses[i * n_samples : (i + 1) * n_samples]
            if (check := check_countdown(response, problem["numbers"], problem["target"])).correct
        ]
        n_correct += len(keys)
        if keys:
            distinct.append(len(set(keys)))
    return {
        "pass@1": n_correct / len(prompts),
        "frac_solvable": len(distinct) / len(problems),
        "distinct_correct_on_solvable": sum(distinct) / max(1, len(distinct)),
        "n_prompts": len(problems),
        "n_samples": n_samples,
    }


def _config_hash(config: ToyConfig) -> str:
    fields = asdict(config)
    # fields added after TOY_VERSION 2 enter the name only when they are not at their default, so that the
    # default toy's cache folder (and every existing one) keeps its name
    for name, default in (("vocabulary", "characters"), ("sft_label_smoothing", 0.0)):
        if fields[name] == default:
            del fields[name]
    blob = json.dumps({"version": TOY_VERSION, **fields}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:10]


def default_cache_dir() -> str:
    """$RLVR_CACHE, else <repo>/.cache."""
    return os.environ.get("RLVR_CACHE", os.path.join(os.path.dirname(os.path.abspath(__file__)), ".cache"))


# --- the shipped warm starts ---
# The SFT takes minutes on a laptop, and it is deterministic only per machine: the same config, torch and CPU
# give the same weights bit for bit, another CPU's kernels an equally good warm start with other weights
# (`build_threads`). So the project commits the weights it built, in toy_weights/toy-<hash>/ (the cache
# folder's name and files, ~4 MB per toy), and `ensure_toy_model` copies them into the cache instead of
# building: a fresh clone starts in a second, and every machine starts RL from the same weights. The name
# carries the config hash, so a changed config (or TOY_VERSION) finds no copy and is built from the seed as
# before. `python toy.py --rebuild` builds from the seed and compares with the shipped copy (test_toy.py does
# it for the default toy in CI); `--rebuild --write` makes the new build the shipped copy, after a deliberate
# change of the recipe (a change of the code, not of the config, bumps TOY_VERSION as before: a new name).
SHIPPED_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "toy_weights")


def toy_folder_name(config: ToyConfig = DEFAULT_CONFIG) -> str:
    """"toy-<hash>": the name of a config's folder, in the cache and among the shipped copies."""
    return f"toy-{_config_hash(config)}"


def shipped_toy_dir(config: ToyConfig = DEFAULT_CONFIG) -> str:
    """Where the project's own build of `config` is committed (the folder exists only for shipped configs)."""
    return os.path.join(SHIPPED_DIR, toy_folder_name(config))


def ensure_toy_model(cache_dir: str | None = None, config: ToyConfig = DEFAULT_CONFIG, progress: bool = True) -> str:
    """Folder with the warm-started toy model and its tokenizer: the shipped copy, or built on first use
    (~3 min on 2 cores) when this config has none.

    The folder is `<cache>/toy-<hash of config and TOY_VERSION>`. It is written to a temporary folder and
    renamed into place with `os.replace` (atomic), so it either exists complete or not at all, even if the
    copy or the build crashes. A file lock serialises concurrent callers (e.g. several torchrun ranks): the
    first copies or builds, the others wait and then find the finished folder.
    """
    root = cache_dir or default_cache_dir()
    os.makedirs(root, exist_ok=True)
    path = os.path.join(root, toy_folder_name(config))
    if os.path.isdir(path):  # fast path, no lock: a folder at this name is always complete
        return path
    with open(path + ".lock", "w") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)  # blocks while another process builds; released on close
        if os.path.isdir(path):  # someone else built it while we waited
            return path
        # A builder killed outright (SIGKILL, or SIGTERM, which skips the cleanup below) leaves its temporary
        # folder behind. Holding the lock, we know no build of this config is running: remove them.
        for stale in os.listdir(root):
            if stale.startswith(os.path.basename(path) + ".tmp-"):
                shutil.rmtree(os.path.join(root, stale), ignore_errors=True)
        tmp = tempfile.mkdtemp(prefix=os.path.basename(path) + ".tmp-", dir=root)
        try:
            start, shipped = time.time(), shipped_toy_dir(config)
            if os.path.isdir(shipped):
                shutil.copytree(shipped, tmp, dirs_exist_ok=True)
                how = f"copied the project's build {os.path.basename(SHIPPED_DIR)}/{os.path.basename(shipped)}"
            else:
                _build_toy_model(tmp, config, progress)
                how = "built from the seed (no shipped copy of this config)"
            os.replace(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    print(f"toy warm start: {how} into {path} in {time.time() - start:.2f}s", flush=True)
    return path


@contextlib.contextmanager
def _torch_threads(n: int):
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def build_threads() -> int:
    """Threads for the SFT: this process's CPUs (or OMP_NUM_THREADS when set), at most 2.

    Why at most 2: the build should give the same weights on every machine that has the same kernels, and
    the thread count decides which kernels' partitions run. Measured (torch 2.13.0+cpu, 2-core AMD EPYC):
    1 and 2 threads give the same weights bit for bit after the whole SFT, while 4 threads already differ in
    the last bits after the first step, and the SFT amplifies any such difference into other weights (another
    CPU's kernels, AVX2 instead of AVX-512: max |Δ| 0.37 after the 1500 steps, as large as what training moves
    them; an equally good warm start, not the same one). A ~1M-parameter model gains little from more threads
    anyway (its matrices are 128 wide); on 2 cores, 2 threads are ~1.7x faster than 1."""
    from distributed import available_cpus, default_torch_threads

    return min(2, default_torch_threads(available_cpus(), 1, os.environ.get("OMP_NUM_THREADS")))


def build_environment() -> dict:
    """What decides the SFT's arithmetic besides the config and the thread count: the torch version and the
    CPU (its model, and the vector instructions torch's kernels use there). The same environment rebuilds
    the same weights bit for bit; another one an equally good warm start with other weights (build_threads)."""
    model = ""
    if os.path.exists("/proc/cpuinfo"):  # Linux; elsewhere the architecture alone
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    capability = torch.backends.cpu.get_cpu_capability()  # e.g. AVX512, AVX2 (ATEN_CPU_CAPABILITY can lower it)
    return {"torch": torch.__version__, "cpu": f"{model or platform.machine()} ({capability})"}


def _build_toy_model(out_dir: str, config: ToyConfig, progress: bool) -> dict:
    """Build tokenizer + model, run the SFT warm start, save both and toy_build.json (the build's facts,
    also returned) to out_dir."""
    start, threads = time.time(), build_threads()
    with _torch_threads(threads):
        tokenizer = build_tokenizer(config)
        model = build_model(tokenizer, seed=config.sft_seed, config=config)
        losses = sft_warm_start(model, tokenizer, config, progress=progress)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    info = {
        "toy_version": TOY_VERSION,
        "config": asdict(config),
        "n_parameters": sum(p.numel() for p in model.parameters()),
        "sft_final_loss": sum(losses[-50:]) / len(losses[-50:]),
        "build_seconds": round(time.time() - start, 1),
        "torch_threads": threads,
        **build_environment(),
    }
    with open(os.path.join(out_dir, "toy_build.json"), "w") as f:
        json.dump(info, f, indent=2)
    return info


def same_build_environment(info: dict, other: dict) -> bool:
    """Whether two toy_build.json records come from the same torch and CPU, where the same config rebuilds
    the same weights (otherwise only an equally good warm start: build_threads)."""
    return all(info.get(key) == other.get(key) for key in ("torch", "cpu"))


def weight_differences(folder: str, other: str) -> dict[str, float]:
    """Max |a - b| over each tensor of two toy folders' model.safetensors, by tensor name."""
    from safetensors.torch import load_file

    a = load_file(os.path.join(folder, "model.safetensors"))
    b = load_file(os.path.join(other, "model.safetensors"))
    if a.keys() != b.keys() or any(a[k].shape != b[k].shape for k in a):
        raise ValueError(f"{folder} and {other} hold different tensors; they are not builds of one config")
    return {k: (a[k].double() - b[k].double()).abs().max().item() for k in sorted(a)}


def write_shipped(folder: str, config: ToyConfig) -> str:
    """Make `folder` (a finished build of `config`) the shipped copy, replacing an earlier one; returns it.
    A developer's step (`python toy.py --rebuild --write`), then committed."""
    target = shipped_toy_dir(config)
    os.makedirs(SHIPPED_DIR, exist_ok=True)
    staged = tempfile.mkdtemp(prefix=os.path.basename(target) + ".tmp-", dir=SHIPPED_DIR)
    shutil.copytree(folder, staged, dirs_exist_ok=True)
    shutil.rmtree(target, ignore_errors=True)  # (os.replace cannot replace a non-empty folder)
    os.replace(staged, target)
    return target


# ====================================================================================================
# `python toy.py`: find (or copy, or build) the cached warm start and print what it is
# `python toy.py --rebuild [--write]`: build it from the seed and compare with the shipped copy
# ====================================================================================================


def _print_task(config: ToyConfig) -> None:
    t0 = time.time()
    train, heldout = load_split("train", config), load_split("heldout", config)
    mean_solutions = sum(p["n_solutions"] for p in train) / len(train)
    print(f"task: {len(train)} train / {len(heldout)} held-out problems, {mean_solutions:.1f} distinct solutions "
          f"per problem on average ({time.time() - t0:.1f}s); e.g. {train[0]['prompt']!r} -> "
          f"{next(iter(solve(train[0]['numbers'], train[0]['target']).values()))!r}")


def _rebuild(config: ToyConfig, out: str, write: bool) -> None:
    """Build `config` from the seed into `out` (the shipped copy and the cache are not read), print max |Δ|
    per tensor against the shipped copy, and with `write` make the build the shipped copy."""
    info = _build_toy_model(out, config, progress=True)
    print(f"rebuilt from the seed in {info['build_seconds']}s with {info['torch_threads']} torch threads "
          f"(torch {info['torch']}, {info['cpu']})")
    shipped = shipped_toy_dir(config)
    if os.path.isdir(shipped):
        with open(os.path.join(shipped, "toy_build.json")) as f:
            shipped_info = json.load(f)
        diffs = weight_differences(out, shipped)
        for name, diff in diffs.items():
            print(f"  max |delta| {diff:.3g}  {name}")
        print(f"max |delta| against {shipped}: {max(diffs.values()):.3g} "
              f"({sum(d == 0 for d in diffs.values())} of {len(diffs)} tensors bit-identical); final SFT loss "
              f"{info['sft_final_loss']:.4f}, shipped {shipped_info['sft_final_loss']:.4f}")
        if not same_build_environment(info, shipped_info):
            print(f"(the shipped copy was built with torch {shipped_info.get('torch', '?')} on "
                  f"{shipped_info.get('cpu', '?')}: other kernels give other weights; compare the loss and the measurements)")
    else:
        print(f"no shipped copy of this config yet ({shipped})")
    if write:
        print(f"written: {write_shipped(out, config)} (commit it)")


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Find (or copy, or build) a cached toy warm start and measure it.")
    parser.add_argument("--model", default="toy", choices=sorted(MODELS), help="which toy (default: toy)")
    parser.add_argument("--rebuild", action="store_true",
                        help="build from the seed (ignoring the shipped copy and the cache), compare with the "
                             "shipped weights (max |delta| per tensor) and measure the new build")
    parser.add_argument("--write", action="store_true",
                        help="with --rebuild: make the new build the shipped copy in toy_weights/")
    args = parser.parse_args()
    if args.write and not args.rebuild:
        parser.error("--write needs --rebuild")
    toy_config = MODELS[args.model]
    _print_task(toy_config)
    with tempfile.TemporaryDirectory(prefix="toy-rebuild-") as scratch:
        if args.rebuild:
            path = scratch
            _rebuild(toy_config, scratch, args.write)
        else:
            t0 = time.time()
            path = ensure_toy_model(config=toy_config)
            print(f"model: {path} (ready in {time.time() - t0:.0f}s)")
        with open(os.path.join(path, "toy_build.json")) as f:
            print("build:", json.load(f))
        t0 = time.time()
        result = measure_warm_start(path, config=toy_config)
        print(f"warm start on held-out ({time.time() - t0:.0f}s):", json.dumps(result))
