"""study.py — several training runs side by side: compare run folders, or train a methods × seeds study.

    python study.py compare runs/grpo-s0 runs/grpo-s1 runs/dapo-s0       # compare.md + compare.png
    python study.py study --methods grpo,dapo --seeds 3 --steps 150      # train all, then compare

`compare` pools the seeds of one setting (mean ± std) into one Markdown table of the final held-out
evaluations and one figure of the training and held-out curves. `study` trains every method × seed on the
toy default with the same budget (train.py), evaluates at every checkpoint, then compares them. The plot
of one run (training.png, written by train.py at the end of a run) is runfolder.plot_run; one evaluation's
numbers (pass@k, diversity, ...) come from eval.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
from pathlib import Path

import numpy as np
import torch

import train
from config import ConfigError, OneLineParser
from eval import flat_metrics, k_values
from runfolder import latest_checkpoint, read_metrics


# ====================================================================================================
# Comparing runs: one table and one figure, seeds pooled as mean ± std
# ====================================================================================================
# A run folder is what train.py writes (config.json, metrics.jsonl, eval_start.json, summary.json).
# Runs that differ only in their seed form one row: their folder names with a trailing "-s<seed>"
# removed are equal (train.py's default folder is runs/<method>-s<seed>, and `study` names them so).

# (key in summary.json, column title) of the comparison table, in order
TABLE_COLUMNS = (("pass@1", "pass@1"), ("pass@kmax", "pass@{kmax}"), ("distinct_correct_on_solvable",
                 "distinct correct (solved prompts)"), ("semantic_diversity_correct", "semantic div. (correct)"),
                 ("formula_diversity_correct", "formula div. (correct)"), ("token_entropy", "token entropy"))
# (metrics.jsonl key, title, smoothed) of the curves over training steps
CURVES = (("reward_mean", "training reward", True), ("entropy", "token entropy (training)", True),
          ("distinct_correct", "distinct correct / group (training)", True),
          ("eval/pass@1", "held-out pass@1", False), ("eval/pass@kmax", "held-out pass@{kmax}", False),
          ("eval/distinct_correct_on_solvable", "held-out distinct correct (solved)", False),
          ("eval/semantic_diversity_correct", "held-out semantic div. (correct)", False),
          ("eval/formula_diversity_correct", "held-out formula div. (correct)", False))
SMOOTH = 10  # moving-average window (steps) for the noisy per-step training curves


def run_label(run_dir: Path) -> str:
    return re.sub(r"-s\d+$", "", Path(run_dir).resolve().name)


def load_run(run_dir: Path) -> dict:
    """The parts of a run folder that `compare` reads; a clear error when it is not a run folder."""
    run_dir = Path(run_dir)
    if not (run_dir / "metrics.jsonl").exists():
        raise SystemExit(f"error: {run_dir} is not a train.py run folder (no metrics.jsonl); pass run folders")
    read = lambda name: json.loads((run_dir / name).read_text()) if (run_dir / name).exists() else None
    return {"dir": run_dir, "label": run_label(run_dir), "rows": read_metrics(run_dir),
            "start": read("eval_start.json"), "end": read("summary.json")}


def _table_values(result: dict | None, kmax: int) -> dict:
    if not result:
        return {}
    values = {key: result.get(key) for key, _ in TABLE_COLUMNS}
    values["pass@1"] = result["pass_at_k"].get("1")
    values["pass@kmax"] = result["pass_at_k"].get(str(kmax))
    return values


def _mean_std(values: list) -> str:
    values = [v for v in values if v is not None and not np.isnan(v)]
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{np.mean(values):.3f} ± {np.std(values, ddof=1):.3f}"


def _curve(rows: list[dict], key: str, start: dict | None, kmax: int) -> tuple[list, list]:
    """(steps, values) of one metric over a run; held-out curves start at step 0 from eval_start.json."""
    key = key.replace("kmax", str(kmax))
    steps, values = [], []
    if key.startswith("eval/") and start:
        flat = flat_metrics(start)
        if flat.get(key) is not None:
            steps.append(0)
            values.append(flat[key])
    for r in rows:
        if r.get(key) is not None:
            steps.append(r["step"])
            values.append(r[key])
    return steps, values


def compare_runs(run_dirs: list, out: Path) -> str:
    """Writes out/compare.md (the table) and out/compare.png (curves); returns the table."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [load_run(d) for d in run_dirs]
    if not runs:
        raise SystemExit("error: compare needs at least one run folder")
    groups: dict[str, list[dict]] = {}
    for run in runs:
        groups.setdefault(run["label"], []).append(run)
    # the largest k every finished run has: pass@k is only comparable at equal n
    ns = [int(run["end"]["n_samples"]) for run in runs if run["end"]]
    kmax = min(ns) if ns else 1
    kmax = max(k for k in k_values(kmax))
    titles = [t.format(kmax=kmax) for _, t in TABLE_COLUMNS]
    lines = ["| run | seeds | steps | " + " | ".join(titles) + " |", "|---" * (len(titles) + 3) + "|"]
    starts = [run for run in runs if run["start"]]
    if starts:  # the common starting policy (the same for every run that started from the same model)
        vals = [_table_values(run["start"], kmax) for run in starts[:1]]
        lines.append("| start (step 0) | – | 0 | " + " | ".join(_mean_std([v.get(k) for v in vals])
                                                           for k, _ in TABLE_COLUMNS) + " |")
    for label, members in groups.items():
        vals = [_table_values(run["end"], kmax) for run in members]
        steps = sorted({run["rows"][-1]["step"] for run in members if run["rows"]})
        lines.append(f"| {label} | {len(members)} | {'/'.join(map(str, steps)) or '–'} | "
                     + " | ".join(_mean_std([v.get(k) for v in vals]) for k, _ in TABLE_COLUMNS) + " |")
    end = next((run["end"] for run in runs if run["end"]), None)
    note = ""
    if end:
        s = end["sampling"]
        note = (f"\nHeld-out evaluation at the end of each run: {end['n_problems']} prompts × n = {s['n']} samples, "
                f"T = {s['temperature']}, top_p = {s['top_p']}; mean ± std over seeds (sample std). Diversity "
                f"columns: mean pairwise (1 − cos)/2 of MiniLM embeddings and DSDR's D_eq, among correct samples.\n")
    table = "\n".join(lines) + "\n" + note

    fig, axes = plt.subplots(2, 4, figsize=(18, 7.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (key, title, smooth) in zip(axes.flat, CURVES):
        for ci, (label, members) in enumerate(groups.items()):
            curves = [_curve(run["rows"], key, run["start"], kmax) for run in members]
            curves = [(np.asarray(x), np.asarray(y, dtype=float)) for x, y in curves if len(x)]
            if not curves:
                continue
            if smooth:  # trailing moving average: step t shows the mean of steps t-SMOOTH+1..t
                curves = [(x, np.convolve(y, np.ones(SMOOTH), "full")[:len(y)] / np.minimum(np.arange(1, len(y) + 1), SMOOTH))
                          for x, y in curves]
            common = sorted(set.intersection(*[set(x.tolist()) for x, _ in curves]))
            ys = np.array([[dict(zip(x.tolist(), y))[t] for t in common] for x, y in curves])
            mean = ys.mean(0)
            color = colors[ci % len(colors)]
            ax.plot(common, mean, color=color, marker=None if smooth else "o", ms=3,
                    label=f"{label} (n={len(curves)})")
            if len(curves) > 1:
                std = ys.std(0, ddof=1)
                ax.fill_between(common, mean - std, mean + std, color=color, alpha=0.2)
        ax.set_title(title.format(kmax=kmax) + (f" (avg of {SMOOTH} steps)" if smooth else ""), fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 6), fontsize=9, frameon=False)
    fig.suptitle("mean ± std over seeds (shaded)")
    fig.tight_layout(rect=(0, 0.05, 1, 1))  # room for the legend below the panels
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    fig.savefig(out / "compare.png", dpi=110)
    plt.close(fig)
    (out / "compare.md").write_text(table)
    return table


def compare_main(argv) -> int:
    parser = OneLineParser(prog="study.py compare",
                           description="one Markdown table and one figure for several run folders")
    parser.add_argument("runs", nargs="+", help="train.py run folders (seeds of one setting are pooled)")
    parser.add_argument("--out", default="compare_out", help="folder for compare.md and compare.png")
    args = parser.parse_args(argv)
    table = compare_runs(args.runs, Path(args.out))
    print(table)
    print(f"wrote {Path(args.out) / 'compare.md'} and {Path(args.out) / 'compare.png'}")
    return 0


# ====================================================================================================
# The toy study: methods × seeds at an equal budget, then `compare`
# ====================================================================================================


def parse_variant(spec: str) -> tuple[str, list[tuple[str, str | None]]]:
    """A study entry "method[:flag[=value]]...": "dsdr:no_coupling" is dsdr with --no-coupling,
    "dsdr:tau=0" is dsdr with --tau 0 (the paper's ablation rows as study entries)."""
    name, *flags = spec.split(":")
    return name, [(f.split("=", 1)[0], f.split("=", 1)[1] if "=" in f else None) for f in flags if f]


def variant_args(flags: list[tuple[str, str | None]]) -> list[str]:
    """train.py arguments of a study entry's flags: no_x → --no-x, x → --x, x=v → --x v."""
    args = []
    for key, value in flags:
        key = key.replace("_", "-")
        if value is None or value.lower() in ("true", "false"):  # a switch: --flag / --no-flag
            args.append(f"--{key}" if value is None or value.lower() == "true" else f"--no-{key}")
        else:
            args += [f"--{key}", value]
    return args


def study(methods: list[str], seeds: list[int], steps: int, out: Path, eval_every: int, train_args: list[str],
          progress: bool = True) -> str:
    """Train every method × seed on the toy default with the same budget (steps, prompts per step, group
    size) and, per seed, the same prompt order; evaluate the held-out prompts at every checkpoint; then
    write study.md and study.png (via compare_runs).

    The policy is evaluated in the training loop each time a checkpoint is saved (`--eval-every` =
    `--save-every`): the same weights a later pass would load, without reloading them. Resumable: a run
    that reached `steps` and has summary.json is finished and skipped; any other run continues from its latest checkpoint
    (train.py's bit-exact --resume). DAPO's dynamic sampling draws extra batches, so its prompt order
    drifts from GRPO's after the first step that drops a group.
    """
    import transformers
    from tqdm.auto import tqdm

    transformers.utils.logging.disable_progress_bar()  # one bar: the study's (not one per checkpoint save)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plan = [(m, s) for s in seeds for m in methods]
    method_configs = {}
    for m in methods:  # unknown / unimplemented methods and bad variants fail here, before any training
        name, flags = parse_variant(m)
        try:
            method = train.build_method(name, train.parse_args(["--method", name, *variant_args(flags)])[1])
        except (ConfigError, SystemExit) as e:
            raise SystemExit(f"error: study entry {m!r}: {e}")
        method_configs[m] = dataclasses.asdict(method.cfg)
    run_dirs = [out / f"{m.replace(':', '-').replace('=', '')}-s{s}" for m, s in plan]
    def done(run_dir: Path) -> bool:  # finished: evaluated at the end of a run of exactly `steps` steps
        rows = read_metrics(run_dir)
        return (run_dir / "summary.json").exists() and bool(rows) and rows[-1]["step"] == steps

    total = len(plan) * steps
    bar = tqdm(total=total, desc="study", unit="step", disable=not progress, dynamic_ncols=True)
    for (method, seed), run_dir in zip(plan, run_dirs):  # a folder from other settings is never reused
        saved = json.loads((run_dir / "config.json").read_text())["method"] if (run_dir / "config.json").exists() else None
        if saved is not None and saved != method_configs[method]:
            diff = sorted(k for k in saved.keys() | method_configs[method].keys()
                          if saved.get(k) != method_configs[method].get(k))
            raise SystemExit(f"error: {run_dir} was trained with other {method} settings ({', '.join(diff[:4])}); "
                             f"remove it or use another --out")
    for (method, seed), run_dir in zip(plan, run_dirs):
        if done(run_dir):
            bar.update(steps)
            continue
        name, flags = parse_variant(method)
        variant = variant_args(flags)
        argv = ["--method", name, *variant, "--seed", str(seed), "--steps", str(steps), "--out", str(run_dir),
                "--eval-every", str(eval_every), "--save-every", str(eval_every), "--no-progress", *train_args]
        resume = latest_checkpoint(run_dir) is not None if run_dir.exists() else False
        if resume:
            argv.append("--resume")
        elif run_dir.exists():  # interrupted before its first checkpoint: nothing to keep, start it again
            argv.append("--overwrite")
        try:
            cfg, overrides = train.parse_args(argv)
            trainer = train.Trainer(cfg, overrides)
        except ConfigError as e:
            raise SystemExit(f"error: {method} seed {seed}: {e}")
        bar.update(trainer.start_step)
        bar.set_description(f"study {method} seed {seed}")

        def on_step(step, metrics):
            bar.update(1)
            bar.set_postfix(reward=f"{metrics['reward_mean']:.3f}", distinct=f"{metrics['distinct_correct']:.2f}")

        trainer.fit(on_step=on_step)
        if trainer.dist.enabled:
            torch.distributed.destroy_process_group()
    bar.close()
    table = compare_runs(run_dirs, out)
    os.replace(out / "compare.md", out / "study.md")
    os.replace(out / "compare.png", out / "study.png")
    return table


def study_main(argv) -> int:
    parser = OneLineParser(prog="study.py study", description=study.__doc__.split("\n\n")[0],
                           epilog="Arguments after -- go to train.py, e.g. -- --group-size 16")
    parser.add_argument("--methods", default="grpo,dapo",
                        help="comma-separated train.py methods; variants as method:flag or method:key=value, "
                             "e.g. dsdr:no_global_diversity,dsdr:no_coupling,dsdr:tau=0")
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 per method")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--eval-every", type=int, default=25, help="checkpoint + held-out evaluation period")
    parser.add_argument("--out", default="study")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("train_args", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.seeds < 1 or args.steps < 1 or args.eval_every < 1:
        parser.error("--seeds, --steps and --eval-every must be >= 1")
    table = study([m for m in args.methods.split(",") if m], list(range(args.seeds)), args.steps,
                  Path(args.out), args.eval_every, args.train_args, progress=not args.no_progress)
    print(table)
    print(f"wrote {Path(args.out) / 'study.md'} and {Path(args.out) / 'study.png'}")
    return 0


# ====================================================================================================
# Command line
# ====================================================================================================


COMMANDS = {"compare": compare_main, "study": study_main}


def main(argv=None) -> int:
    """study.py compare | study ...: bad input is one line on stderr ("error: ... "), exit code 2."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    try:
        if not argv or argv[0] not in COMMANDS:
            got = repr(argv[0]) if argv else "none"
            raise ConfigError(f"study.py needs a command, compare or study (got {got}); see python study.py --help")
        return COMMANDS[argv[0]](argv[1:])
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
