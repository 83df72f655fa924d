"""bench.py — speed and memory of each method on the toy default; prints numbers, asserts nothing.

    python bench.py                          # every implemented method, 8 steps each (first 2 = warm-up)
    python bench.py --methods grpo,dapo --steps 12 --json bench.json

Each method runs in its own process (so peak RSS is that method's alone) with the same seed, prompts,
and settings; we report the median over the measured steps of the step time split into
generate / score (verify + reward shaping + advantages) / update (forwards, backward, optimiser),
the ratio to GRPO's step time, and the process's peak resident memory.
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


def summarise(result: dict, warmup: int) -> dict:
    rows = result["rows"][warmup:]
    med = {k: statistics.median(r[k] for r in rows) for k in ("time_generate", "time_score", "time_update",
                                                                 "time_step")}
    return {**med, "peak_rss_mb": result["peak_rss_mb"], "steps_measured": len(rows)}


def main(argv=None) -> int:
    import train

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default=None, help="comma-separated (default: every implemented one)")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--json", default=None, help="also write the numbers to this file")
    parser.add_argument("extra", nargs="*", help="extra train.py arguments, after --")
    args = parser.parse_args(argv)
    if args.steps <= args.warmup:
        parser.error("--steps must be larger than --warmup")
    methods = args.methods.split(",") if args.methods else [m for m in train.METHODS if _implemented(m)]
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


def _implemented(method: str) -> bool:
    import importlib.util

    import train

    return importlib.util.find_spec(train.METHODS[method][0]) is not None


if __name__ == "__main__":
    sys.exit(main())
