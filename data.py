"""data.py — prompts: where they come from, how they are rendered, in which order, and how they are batched.

Datasets (countdown, known hub datasets, local .jsonl / .json / .parquet files) become a list of examples
with "prompt", "answer" and "task" (`load_prompts`); templates turn questions into prompts once the
tokenizer is known (`render_prompts`; the template names are config.PROMPT_TEMPLATES); `PromptSampler`
gives the seeded order, and `collate` pads prompts with their responses into one batch of tensors.
Separate from the loop because evaluation, the SE curriculum and the notebooks read prompts the same way.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

import toy
from config import COUNTDOWN_SPLITS, ConfigError, TrainConfig

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


def known_dataset(name: str) -> str | None:
    """The canonical hub name of a known dataset (or one of its aliases), else None."""
    return _ALIASES.get(name.lower())


def _gsm8k_answer(solution: str) -> str:
    return solution.split("####")[-1].strip().replace(",", "")


LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet")


def dataset_label(dataset: str) -> str:
    """How messages name a dataset: "dataset file x.jsonl" for a local file, else "dataset <name>"."""
    return f"dataset file {dataset}" if Path(dataset).suffix in LOCAL_SUFFIXES else f"dataset {dataset}"


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


class PromptSampler:
    """Seeded epoch-wise shuffling; its state (epoch, position) is checkpointed for exact resume.
    `set_step` / `stage` are the curriculum sampler's interface (curriculum.CurriculumSampler): one stage."""

    stage = 0

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch, self.pos = n, seed, 0, 0
        self._perm = self._permutation()

    def set_step(self, step: int) -> None:
        pass

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
# The rollout batch
# ====================================================================================================
# The rollout batch: one dict per step on each rank, holding this rank's S = groups × G sequences.
#   from sampling (train.Trainer.sample_groups → rollout.sample_and_verify): prompt_indices, examples [S] (the example of each sequence), prompt_ids,
#     responses (token ids), texts, results (verifier verdicts), keys / answers [S], correct [S] float,
#     group_ids [S], group_size G, time_generate / time_score; with vLLM rollout_logp [S, T] (the engine's
#     log-prob of each sampled token, compared once with ours: rollout_gap)
#   from collate: input_ids / attention_mask [S, P+T] (prompts left-padded to P, responses right-
#     padded to T), prompt_mask [S, P], response_mask [S, T], prompt_len P, lengths [S], truncated [S]
#   from the method hooks: rewards [S], advantages [S] float32; a method may attach per_seq[name] [S]
#     (sliced into every micro-batch) and method_metrics[name] = (sum, count)
#   fields (the no-grad prepass, then prepare_update): per-token [S, T] tensors named by the policy they come
#     from: π_old's old_logp, entropy, prompt_logp (+ prompt_logp_mask) [S, P] and the method's own fields
#     (minp_proxy_logp); the current policy's cur_logp / cur_entropy (from the second mini-batch on); a
#     method's selections (lp_selected, sent_tier)
# A micro-batch `mb` (forward.slice_batch) holds the same per-sequence and per-token keys for its rows,
# trimmed to its own longest prompt / response, plus logp (with grad), cur_entropy (this forward's entropy,
# when computed) and, when needed, ref_logp.
# ====================================================================================================
def build_rollout_batch(raw: dict, G: int, tokenizer, max_new_tokens: int) -> dict:
    """Lists of whole groups (rollout.sample_and_verify + prompt_indices / examples) → the rollout batch:
    padded tensors plus everything the method hooks read."""
    batch = collate([p for p in raw["prompt_ids"] for _ in range(G)], raw["responses"], tokenizer.pad_token_id,
                    tokenizer.eos_token_id)
    batch.update(raw)
    results = raw["results"]
    batch.update({
        "examples": [ex for ex in raw["examples"] for _ in range(G)],
        "correct": torch.tensor([r.correct for r in results], dtype=torch.float32),
        "keys": [r.key for r in results], "answers": [r.answer for r in results],
        "group_ids": torch.arange(len(raw["examples"])).repeat_interleave(G), "group_size": G,
        "max_new_tokens": max_new_tokens,
    })
    if "rollout_logp" in raw:  # [S, T] like response_mask, compared with the trainer's in the update
        batch["rollout_logp"] = padded_engine_logp(raw["rollout_logp"], batch["response_mask"].shape[1])
        batch["gap_pending"] = True
    return batch


def keep_groups(raws: list[dict], chosen: list[int], B: int, G: int, rank: int, world: int) -> dict:
    """DAPO dynamic sampling: the groups `chosen` (indices in the global order of the rollout batches
    `raws`, B groups each, split over ranks in equal shares) that this rank holds, as one raw batch."""
    chosen, per_rank = set(chosen), B // world
    per_seq = ("responses", "texts", "results") + (("rollout_logp",) if "rollout_logp" in raws[0] else ())
    kept = {k: [] for k in ("prompt_indices", "examples", "prompt_ids") + per_seq}
    for j, r in enumerate(raws):
        for g in range(per_rank):
            if j * B + rank * per_rank + g in chosen:
                for k in ("prompt_indices", "examples", "prompt_ids"):
                    kept[k].append(r[k][g])
                for k in per_seq:
                    kept[k].extend(r[k][g * G:(g + 1) * G])
    kept["time_generate"] = sum(r["time_generate"] for r in raws)
    kept["time_score"] = sum(r["time_score"] for r in raws)
    return kept


def padded_engine_logp(logprobs: list[list[float]], T: int) -> torch.Tensor:
    """The engine's per-token log-probs as [S, T] like response_mask (zeros after each response)."""
    out = torch.zeros((len(logprobs), T), dtype=torch.float32)
    for i, lp in enumerate(logprobs):
        out[i, :len(lp)] = torch.tensor(lp, dtype=torch.float32)
    return out
