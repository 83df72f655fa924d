"""bench.py — speed and memory of each method on the toy default; prints numbers, asserts nothing.

    python bench.py                          # every method, 8 steps each (first 2 = warm-up)
    python bench.py --methods grpo,dapo --steps 12 --json bench.json
    python bench.py --real-size qwen2.5-1.5b --steps 3 --warmup 1 -- --max-new-tokens 1024   # on a GPU
    python bench.py --vs-trl --steps 12      # GRPO step against TRL's GRPOTrainer (pip install trl)
    python bench.py --vs-trl --steps 12 -- --micro-batch-tokens 2048   # ours with a speed setting
    python bench.py --roofline               # the step's parts against this machine's matmul peak

Each method runs in its own process (so peak RSS is that method's alone) with the same seed, prompts,
and settings; we report the median over the measured steps of the step time split into
generate / score (verify + reward shaping + advantages) / update (forwards, backward, optimiser),
the ratio to GRPO's step time, and the process's peak resident memory.

`--real-size NAME` replaces the toy model by a randomly initialised model with a real model's
architecture (no download: the sizes are written below, the tokenizer is the toy one, whose ids are a
subset of the vocabulary). A random model almost never samples EOS, so every response runs to
--max-new-tokens: a worst case for rollout throughput and memory. It is run with and without
--gradient-checkpointing and reports rollout tokens/s and the peak GPU memory of each step.

`--vs-trl` times our GRPO step against TRL's `GRPOTrainer` on identical work: the same toy model, training
prompts and verifier reward, B prompts x 8 samples (B = 16 and 32), T = 1, no KL (beta 0), HF generate,
fp32, one optimiser step per batch. Both run in child processes with the same torch thread count; TRL's
step is timed from `on_step_begin` to `on_step_end` (generation happens inside its step). Skipped, with a
one-line message, when TRL is not installed (it is an optional extra: `pip install -e ".[trl]"`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent


# Architectures of real models (their config.json), for random-weight measurements on a GPU machine that
# cannot download them.
REAL_SIZES = {
    "qwen2.5-1.5b": ("Qwen2Config", dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                                         num_attention_heads=12, num_key_value_heads=2, vocab_size=151936,
                                         max_position_embeddings=32768, rope_theta=1e6, tie_word_embeddings=True)),
    "qwen3-1.7b": ("Qwen3Config", dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                                       num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                                       vocab_size=151936, max_position_embeddings=40960, rope_theta=1e6,
                                       tie_word_embeddings=True)),
}


def build_real_size(name: str, out: Path) -> str:
    """A random model with `name`'s architecture and the toy tokenizer, saved like a hub model."""
    import torch
    import transformers

    import toy

    if (out / "config.json").exists():
        return str(out)
    cls_name, sizes = REAL_SIZES[name]
    tok = toy.build_tokenizer()
    config = getattr(transformers, cls_name)(**sizes, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                                             bos_token_id=None)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    n = sum(p.numel() for p in model.parameters())
    print(f"built a random {name} ({n / 1e9:.2f} B parameters) in {out}", flush=True)
    return str(out)


def run_one(method: str, steps: int, extra: list[str]) -> dict:
    """Train `steps` steps of `method` in a child process; return its per-step timings and peak RSS."""
    with tempfile.TemporaryDirectory() as out:
        code = (
            "import resource, sys, json, train;"
            f"rc = train.main({['--method', method, '--steps', str(steps), '--out', out, '--no-final-eval', '--no-progress', '--no-tensorboard', '--save-every', str(10**6)] + extra!r});"
            "print('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
        )
        proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                              env={**os.environ, "HF_HUB_OFFLINE": "1"})
        if proc.returncode != 0:
            return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
        rows = [json.loads(line) for line in Path(out, "metrics.jsonl").read_text().splitlines()]
    peak = next(int(line.split()[1]) for line in proc.stdout.splitlines() if line.startswith("PEAK_RSS_KB"))
    return {"rows": rows, "peak_rss_mb": peak / 1024}


# The TRL side of --vs-trl, run as `python -c` in a child process: a plain-text prompt column (the toy's
# prompts are already in the format the warm start was trained on) and the project's Countdown checker as
# the reward function (TRL passes the dataset's other columns to it as keyword arguments).
TRL_CHILD = """
import json, sys, tempfile, time
import transformers, datasets, trl
import config as project_config, toy, verifier
steps, prompts_per_step, G, max_new = (int(a) for a in sys.argv[1:5])
rows = toy.load_split("train")
dataset = datasets.Dataset.from_list([{"prompt": r["prompt"], "numbers": r["numbers"], "target": r["target"]}
                                      for r in rows])

def countdown_reward(completions, numbers, target, **_):
    return [float(verifier.check_countdown(c, n, t).correct) for c, n, t in zip(completions, numbers, target)]

class StepTimer(transformers.TrainerCallback):
    times = []
    def on_step_begin(self, args, state, control, **kw):
        self.t0 = time.perf_counter()
    def on_step_end(self, args, state, control, **kw):
        self.times.append(time.perf_counter() - self.t0)

path = toy.ensure_toy_model(progress=False)
with tempfile.TemporaryDirectory() as out:
    config = trl.GRPOConfig(
        output_dir=out, max_steps=steps, per_device_train_batch_size=prompts_per_step * G, num_generations=G,
        steps_per_generation=1, gradient_accumulation_steps=1, max_completion_length=max_new,
        temperature=1.0, beta=0.0, learning_rate=project_config.TOY_LR, use_cpu=True, bf16=False, fp16=False,
        report_to="none", save_strategy="no", logging_steps=10**6, disable_tqdm=True, seed=0,
        dataloader_num_workers=0)
    trainer = trl.GRPOTrainer(model=path, reward_funcs=countdown_reward, args=config, train_dataset=dataset,
                              callbacks=[StepTimer()])
    trainer.train()
print("TRL_STEP_TIMES", json.dumps(StepTimer.times))
"""


def run_trl(steps: int, prompts_per_step: int, group_size: int, max_new_tokens: int) -> dict:
    proc = subprocess.run([sys.executable, "-c", TRL_CHILD, str(steps), str(prompts_per_step), str(group_size),
                           str(max_new_tokens)], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("TRL_STEP_TIMES")), None)
    if proc.returncode != 0 or line is None:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
    return {"times": json.loads(line.split(" ", 1)[1])}


def vs_trl(steps: int, warmup: int, extra: list[str] | None = None) -> int:
    """Median step time of our GRPO and of TRL's GRPOTrainer at 16 x 8 and 32 x 8; prints the ratio.
    `extra`: train.py arguments for our side only (settings of ours that change speed, not the work)."""
    extra = list(extra or [])
    try:
        import trl
    except ImportError:
        print("--vs-trl skipped: TRL is not installed (pip install trl, or pip install -e \".[trl]\")")
        return 0
    import toy

    G, max_new = 8, toy.MAX_NEW_TOKENS  # both sides get them explicitly (ours: also its defaults on the toy)
    print(f"GRPO step vs TRL {trl.__version__} GRPOTrainer on the toy: G = {G}, {max_new} new tokens, T = 1, "
          f"beta 0, fp32, HF generate; {steps} steps ({warmup} warm-up), median seconds per step"
          + (f"; ours with {' '.join(extra)}" if extra else ""))
    print(f"{'prompts x G':12} {'ours':>8} {'TRL':>8} {'TRL / ours':>11}")
    for prompts in (16, 32):
        ours = run_one("grpo", steps, ["--prompts-per-step", str(prompts), "--group-size", str(G),
                                       "--max-new-tokens", str(max_new), *extra])  # grpo: β = 0 by default
        theirs = run_trl(steps, prompts, G, max_new)
        if "error" in ours or "error" in theirs:
            print(f"{prompts:>4} x {G}     failed: {ours.get('error') or theirs.get('error')}", flush=True)
            continue
        t_ours = summarise(ours, warmup)["time_step"]
        t_trl = statistics.median(theirs["times"][warmup:])
        print(f"{prompts:>4} x {G}     {t_ours:8.3f} {t_trl:8.3f} {t_trl / t_ours:10.2f}x", flush=True)
    return 0


# --roofline: how far the toy step is from this machine's matmul peak. The work of a step is counted as the
# multiply-adds of the linear layers (2 FLOPs per weight per token forward, 4 more backward); attention
# scores and the element-wise ops are left out (at ~44 positions and width 128 the scores add ~5 %), so the
# achieved rates below are slight underestimates. "real" counts prompt + response tokens, "padded" what the
# forwards actually run: padding to the longest row of a forward, and for generation every row decoding
# until the longest one of its call ends. The peak is a plain fp32 matmul of the MLP's shape at the
# update's size, the largest and most efficient matmul the step runs.
def linear_weights(model) -> int:
    """Weights that multiply activations (nn.Linear, incl. a tied LM head once): 2 FLOPs/token each forward."""
    import torch

    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def matmul_peak(rows: int, inner: int, outer: int, repeats: int = 10) -> float:
    """GFLOP/s of an fp32 [rows, inner] @ [inner, outer] matmul on this machine (best of `repeats`)."""
    import time

    import torch

    a, b = torch.randn(rows, inner), torch.randn(inner, outer)
    best = float("inf")
    for _ in range(repeats + 2):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * rows * inner * outer / best / 1e9


def roofline(prompts_per_step: int, repeats: int) -> dict:
    """Time the parts of a toy GRPO step on one rollout batch and set their FLOPs against the matmul peak."""
    import time

    import torch

    import dsdr
    import train
    from forward import split_micro_batches

    with tempfile.TemporaryDirectory() as out:
        cfg, overrides = train.parse_args(["--method", "grpo", "--out", out, "--no-final-eval", "--no-progress",
                                           "--no-tensorboard", "--prompts-per-step", str(prompts_per_step)])
        trainer = train.Trainer(cfg, overrides)
        for step in range(2):  # warm-up: first calls allocate and pick kernels
            trainer.train_step(step)
        n_mm = linear_weights(trainer.model)
        gen, upd, enc = [], [], []
        encoder = dsdr.get_encoder()
        for _ in range(repeats):
            batch, _ = trainer.rollout_batch()
            gen.append(batch["time_generate"])
            batch["rewards"] = trainer.method.shape_rewards(batch)
            batch["advantages"] = trainer.method.advantages(batch, batch["rewards"]).to(torch.float32)
            rows = list(range(len(batch["texts"])))
            t0 = time.perf_counter()
            trainer.update(batch, rows)
            upd.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            encoder.encode(batch["texts"])  # DSDR's extra work per step (its `score` column in the table)
            enc.append(time.perf_counter() - t0)
        trainer.rollout.close()
    # token counts of the last batch (the batches of a run are alike in size)
    prompt_tokens, lengths = batch["prompt_mask"].sum(-1), batch["lengths"].clamp(min=1)
    real = int(prompt_tokens.sum() + lengths.sum())
    padded_update = sum(mb["input_ids"].numel() for mb in split_micro_batches(batch, rows, cfg.micro_batch_tokens))
    S, G = len(rows), cfg.group_size
    per_call = max(1, min(cfg.gen_batch_prompts, cfg.gen_batch_rows // G)) * G  # rows per generate() call
    padded_generate = sum(int(prompt_tokens[i:i + per_call].max() + lengths[i:i + per_call].max()) *
                          len(range(i, min(i + per_call, S))) for i in range(0, S, per_call))
    wordpieces = sum(len(ids) for ids in encoder.model.tokenizer(list(dict.fromkeys(batch["texts"])))["input_ids"])
    peak = matmul_peak(padded_update, trainer.model.config.hidden_size, trainer.model.config.intermediate_size)
    t_gen, t_upd, t_enc = (statistics.median(x) for x in (gen, upd, enc))
    parts = {  # name: (seconds, FLOPs of real tokens, FLOPs as run)
        "generate": (t_gen, 2 * n_mm * real, 2 * n_mm * padded_generate),
        "update": (t_upd, 6 * n_mm * real, 6 * n_mm * padded_update),
        "dsdr encoder": (t_enc, 2 * linear_weights(encoder.model) * wordpieces, None),
    }
    report = {"threads": torch.get_num_threads(), "rows": S, "linear_weights": n_mm, "real_tokens": real,
              "padded_update_tokens": padded_update, "padded_generate_tokens": padded_generate,
              "matmul_peak_gflops": peak, "parts": {}}
    for name, (seconds, flops_real, flops_run) in parts.items():
        run = flops_run if flops_run is not None else flops_real
        report["parts"][name] = {"seconds": seconds, "gflop_real": flops_real / 1e9, "gflop_run": run / 1e9,
                                 "gflops_achieved": run / seconds / 1e9, "of_peak": run / seconds / 1e9 / peak,
                                 "floor_seconds": flops_real / 1e9 / peak}
    return report


def print_roofline(r: dict) -> None:
    print(f"toy GRPO step, {r['rows']} rows, {r['threads']} torch threads: linear-layer FLOPs "
          f"({r['linear_weights'] / 1e6:.2f}M weights) against a {r['matmul_peak_gflops']:.0f} GFLOP/s fp32 matmul")
    print(f"tokens: {r['real_tokens']} real, {r['padded_update_tokens']} in the update's forwards, "
          f"{r['padded_generate_tokens']} in generation")
    print(f"{'part':14} {'seconds':>8} {'GFLOP real':>11} {'GFLOP run':>10} {'GFLOP/s':>8} {'of peak':>8} "
          f"{'floor s':>8}")
    for name, p in r["parts"].items():
        print(f"{name:14} {p['seconds']:8.3f} {p['gflop_real']:11.2f} {p['gflop_run']:10.2f} "
              f"{p['gflops_achieved']:8.0f} {p['of_peak']:7.0%} {p['floor_seconds']:8.3f}")
    step = r["parts"]["generate"]["seconds"] + r["parts"]["update"]["seconds"]
    floor = r["parts"]["generate"]["floor_seconds"] + r["parts"]["update"]["floor_seconds"]
    print(f"GRPO generate + update: {step:.3f} s; the same work at the matmul peak on real tokens only: "
          f"{floor:.3f} s (at most {step / floor:.1f}x faster, with no padding and no per-op overhead)")


def summarise(result: dict, warmup: int) -> dict:
    rows = result["rows"][warmup:]
    keys = ("time_generate", "time_score", "time_update", "time_step", "rollout_tokens_per_s", "peak_gpu_gb")
    med = {k: statistics.median(r[k] for r in rows) for k in keys if all(k in r for r in rows)}
    return {**med, "peak_rss_mb": result["peak_rss_mb"], "steps_measured": len(rows)}


def main(argv=None) -> int:
    import train

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default=None, help="comma-separated (default: every method)")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--json", default=None, help="also write the numbers to this file")
    parser.add_argument("--real-size", default=None, choices=sorted(REAL_SIZES),
                        help="a random model of this architecture instead of the toy (GPU measurements)")
    parser.add_argument("--model-dir", default="/tmp/bench_models", help="where --real-size models are built")
    parser.add_argument("--vs-trl", action="store_true",
                        help="time our GRPO step against TRL's GRPOTrainer at 16 x 8 and 32 x 8 (needs trl)")
    parser.add_argument("--roofline", action="store_true",
                        help="the toy GRPO step's parts against this machine's matmul peak (FLOPs, GFLOP/s)")
    parser.add_argument("--prompts-per-step", type=int, default=16, help="--roofline's batch (x 8 samples)")
    parser.add_argument("extra", nargs="*", help="extra train.py arguments, after --")
    args = parser.parse_args(argv)
    if args.steps <= args.warmup:
        parser.error("--steps must be larger than --warmup")
    if args.vs_trl:
        return vs_trl(args.steps, args.warmup, args.extra)
    if args.roofline:
        train.set_torch_threads()  # as train.py would (bench's other modes run train.main in children)
        report = roofline(args.prompts_per_step, repeats=args.steps - args.warmup)
        print_roofline(report)
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=2))
        return 0
    methods = args.methods.split(",") if args.methods else list(train.METHODS)
    if args.real_size:
        path = build_real_size(args.real_size, Path(args.model_dir) / args.real_size)
        methods = [m for m in (args.methods or "grpo").split(",")]
        runs = [(f"{m}", ["--model", path, *args.extra]) for m in methods] + \
               [(f"{m}+gc", ["--model", path, "--gradient-checkpointing", *args.extra]) for m in methods]
        print(f"{args.real_size} (random weights), {args.steps} steps ({args.warmup} warm-up); median per step")
        print(f"{'run':12} {'generate s':>10} {'tokens/s':>10} {'update s':>9} {'step s':>8} {'peak GPU':>9}")
        for label, extra in runs:
            result = run_one(label.split("+")[0], args.steps, extra)
            if "error" in result:
                print(f"{label:12} failed: {result['error']}", flush=True)
                continue
            s = summarise(result, args.warmup)
            print(f"{label:12} {s['time_generate']:10.2f} {s.get('rollout_tokens_per_s', 0):10.0f} "
                  f"{s['time_update']:9.2f} {s['time_step']:8.2f} {s.get('peak_gpu_gb', 0):7.1f}GB", flush=True)
        return 0
    print(f"toy default, {args.steps} steps per method ({args.warmup} warm-up), {os.cpu_count()} CPU cores, "
          f"torch threads = default; median seconds per step")
    header = f"{'method':10} {'generate':>9} {'score':>8} {'update':>8} {'step':>8} {'vs grpo':>8} {'peak RSS':>10}"
    print(header)
    print("-" * len(header))
    report, base = {}, None
    for m in methods:
        result = run_one(m, args.steps, args.extra)
        if "error" in result:
            print(f"{m:10} failed: {result['error']}")
            continue
        s = summarise(result, args.warmup)
        base = s["time_step"] if m == "grpo" else base
        s["ratio_vs_grpo"] = s["time_step"] / base if base else None
        report[m] = s
        ratio = f"{s['ratio_vs_grpo']:.2f}x" if s["ratio_vs_grpo"] else "-"
        print(f"{m:10} {s['time_generate']:9.3f} {s['time_score']:8.3f} {s['time_update']:8.3f} "
              f"{s['time_step']:8.3f} {ratio:>8} {s['peak_rss_mb']:8.0f}MB", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
