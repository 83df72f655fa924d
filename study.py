"""study.py — several training runs side by side: compare run folders, or train a methods × seeds study.

    python study.py compare runs/grpo-s0 runs/grpo-s1 runs/dapo-s0       # compare.md + compare.png
    python study.py study --methods grpo,dapo --seeds 3 --steps 150      # train all, then compare
    python study.py study --methods 'arm:alpha=0.3|1|3' --seeds 3        # a sweep + its same-base control
    python study.py report docs/studies/toy/study.json                   # effects, dose-response, frontier

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
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

import train
from config import ConfigError, OneLineParser
from distributed import set_torch_threads
from eval import PER_PROMPT_KEYS as EVAL_PER_PROMPT_KEYS
from eval import COMPARED, bootstrap_difference, bootstrap_mean, flat_metrics, k_values, per_prompt_values
from runfolder import latest_checkpoint, read_metrics, reuse_start_evaluation, start_evaluation_matches


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
    "dsdr:tau=0" is dsdr with --tau 0 (the paper's ablation rows as study entries), and "dsdr:control"
    is dsdr with its mechanism switched off (the method's `control_overrides`: its same-base control)."""
    name, *flags = spec.split(":")
    pairs = []
    for f in (f for f in flags if f):
        if f == "control":
            pairs += [(k, str(v)) for k, v in train.method_class(name).control_overrides.items()]
        else:
            pairs.append((f.split("=", 1)[0], f.split("=", 1)[1] if "=" in f else None))
    return name, pairs


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


# ====================================================================================================
# Sweeps and same-base controls
# ====================================================================================================
# A finding counts only against a control that differs from the method in its mechanism alone. Every paper
# here changes its base objective too (DSDR and ARM train with DAPO's token-mean and ε_high = 0.28, Lp-Reg
# with a [0, 10] clip), so "method vs grpo" would mix the mechanism with the base. The control of an entry
# is therefore the base `Method` ("grpo") with exactly the entry's base-objective settings (the GRPOConfig
# fields): "dsdr" → "grpo:eps_high=0.28:agg=token-mean". It trains the same as "dsdr:control" (DSDR with
# λ_d = λ_ℓ = 0, the class's `control_overrides`) — tests/test_controls.py checks the two runs end with
# bit-identical weights for every method — so methods that share a base share one control run per seed.
def expand_entry(spec: str) -> list[tuple[str, dict | None]]:
    """A sweep entry → (entry, sweep info) per point: "dsdr:lambda_d=0:lambda_l=0.001|0.01|0.1" is three
    entries, one per λ_ℓ. Several "|" lists in one entry must have the same length and are zipped, not
    crossed ("sent:beta_high=0.2|1:beta_low=0.05|0.25" is two entries that scale both β together); write
    two entries for a grid. The sweep info names the line a dose-response figure draws: its knob (the first
    listed key) and this point's value."""
    name, *flags = spec.split(":")
    lists = {i: f.split("=", 1)[1].split("|") for i, f in enumerate(flags) if "=" in f and "|" in f}
    if not lists:
        return [(spec, None)]
    lengths = {len(v) for v in lists.values()}
    if len(lengths) > 1:
        raise ConfigError(f"study entry {spec!r}: the '|' lists have different lengths {sorted(lengths)}; "
                          f"lists in one entry are zipped, so give them equal lengths (or write two entries)")
    first = min(lists)
    knob = flags[first].split("=", 1)[0]
    points = []
    for j in range(lengths.pop()):
        parts = [f if i not in lists else f"{f.split('=', 1)[0]}={lists[i][j]}" for i, f in enumerate(flags)]
        try:
            value = float(lists[first][j])
        except ValueError:
            raise ConfigError(f"study entry {spec!r}: a swept value must be a number, got {lists[first][j]!r}")
        points.append((":".join([name, *parts]), {"line": spec, "method": name, "knob": knob, "value": value}))
    return points


def entry_config(entry: str):
    """The method config an entry trains with (its defaults, then the entry's flags)."""
    name, flags = parse_variant(entry)
    try:
        return train.build_method(name, train.parse_args(["--method", name, *variant_args(flags)])[1]).cfg
    except (ConfigError, SystemExit) as e:
        raise ConfigError(f"study entry {entry!r}: {e}")


def _flag(key: str, value) -> str:
    return f"{key}={str(value).lower() if isinstance(value, bool) else value}"


def control_entry(entry: str) -> str | None:
    """The same-base control of an entry: "grpo" with the entry's base-objective settings (the GRPOConfig
    fields that differ from the grpo preset), or None when the entry is the base objective itself."""
    name, _ = parse_variant(entry)
    base = train.same_base_control(train.method_class(name)(entry_config(entry)))
    return None if base is None else ":".join(["grpo", *(_flag(k, v) for k, v in base.items())])


def plan_entries(specs: list[str]) -> tuple[list[str], dict]:
    """The study's entries (sweeps expanded, controls added after the entries that need them, each once)
    and per entry its info: {"control": entry or None, "sweep": sweep info or None}."""
    entries, info = [], {}
    for spec in specs:
        for entry, sweep in expand_entry(spec):
            if entry in info:
                continue
            control = control_entry(entry)
            entries.append(entry)
            info[entry] = {"control": control, "sweep": sweep}
    for entry in list(entries):
        control = info[entry]["control"]
        if control is not None and control not in info:
            entries.append(control)
            info[control] = {"control": None, "sweep": None}
    return entries, info


def run_dir_name(entry: str, seed: int) -> str:
    return f"{entry.replace(':', '-').replace('=', '')}-s{seed}"


def study(methods: list[str], seeds: list[int], steps: int, out: Path, eval_every: int, train_args: list[str],
          progress: bool = True) -> str:
    """Train every entry × seed on the toy default with the same budget (steps, prompts per step, group
    size) and, per seed, the same prompt order; evaluate the held-out prompts at every checkpoint; then
    write study.md and study.png (via compare_runs), and with sweeps or controls the statistics
    (study.json, effects.md, dose-response and frontier figures; see `report`).

    Entries are expanded by `plan_entries`: "|" lists become one entry per value and each entry's
    same-base control is added (once). The policy is evaluated in the training loop each time a checkpoint
    is saved (`--eval-every` = `--save-every`): the same weights a later pass would load, without
    reloading them. Resumable: a run that reached `steps` and has summary.json is finished and skipped; any
    other run continues from its latest checkpoint (train.py's bit-exact --resume). Several `study`
    processes may share one --out with disjoint entries (e.g. one per core, OMP_NUM_THREADS=1): each
    trains only what is unfinished and not locked by another. DAPO's dynamic sampling draws extra batches,
    so its prompt order drifts from GRPO's after the first step that drops a group.
    """
    import transformers
    from tqdm.auto import tqdm

    transformers.utils.logging.disable_progress_bar()  # one bar: the study's (not one per checkpoint save)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    entries, info = plan_entries(methods)  # bad entries fail here, before any training
    method_configs = {m: dataclasses.asdict(entry_config(m)) for m in entries}
    plan = [(m, s) for s in seeds for m in entries]
    run_dirs = [out / run_dir_name(m, s) for m, s in plan]
    shared_start = out / "eval_start.json"  # the starting policy's held-out evaluation (see below)

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
        # --paper-defaults: an entry is the paper's values plus its own flags, on the toy too (not the toy
        # strengths of `make train`), so that a study's command names every value it trains with
        argv = ["--method", name, *variant_args(flags), "--seed", str(seed), "--steps", str(steps), "--out",
                str(run_dir), "--eval-every", str(eval_every), "--save-every", str(eval_every), "--no-progress",
                "--paper-defaults", *train_args]
        resume = latest_checkpoint(run_dir) is not None if run_dir.exists() else False
        if resume:
            argv.append("--resume")
        elif run_dir.exists():  # interrupted before its first checkpoint: nothing to keep, start it again
            argv.append("--overwrite")
        # Every run starts from the same policy and evaluates it on the same prompts with the same sampling
        # seed, so the step-0 evaluation is computed once per study and copied into each run folder.
        try:
            cfg, overrides = train.parse_args(argv)
            share_start = not resume and start_evaluation_matches(shared_start, cfg)
            cfg.eval_at_start = cfg.eval_at_start and not share_start
            trainer = train.Trainer(cfg, overrides)
        except ConfigError as e:
            if "in use by another training" in str(e):  # another study process is training it now
                bar.update(steps)
                continue
            raise SystemExit(f"error: {method} seed {seed}: {e}")
        if share_start:
            reuse_start_evaluation(shared_start, run_dir)
        bar.update(trainer.start_step)
        bar.set_description(f"study {method} seed {seed}")

        def on_step(step, metrics):
            bar.update(1)
            bar.set_postfix(reward=f"{metrics['reward_mean']:.3f}", distinct=f"{metrics['distinct_correct']:.2f}")

        trainer.fit(on_step=on_step)
        if trainer.dist.enabled:
            torch.distributed.destroy_process_group()
        if not shared_start.exists() and (run_dir / "eval_start.json").exists():
            shutil.copyfile(run_dir / "eval_start.json", shared_start)
    bar.close()
    finished = [d for d in run_dirs if done(d)]
    if len(finished) < len(run_dirs):  # another process still trains the rest: it writes the report
        return f"{len(finished)} of {len(run_dirs)} runs finished; the last process to finish writes the report"
    table = compare_runs(run_dirs, out)
    os.replace(out / "compare.md", out / "study.md")
    os.replace(out / "compare.png", out / "study.png")
    if any(i["control"] for i in info.values()):
        cache = collect(out, entries, info, seeds, steps, train_args)
        (out / "study.json").write_text(json.dumps(cache, separators=(",", ":")))
        table += "\n" + report(cache, out)
    return table


# ====================================================================================================
# Statistics of a study: effects against the same-base control, dose-response, accuracy–diversity frontier
# ====================================================================================================
# `collect` keeps, per entry × seed × checkpoint, the held-out evaluation's per-prompt record (train.py
# writes run/evals/step_N.json at every --eval-every; eval_start.json is step 0), small enough to commit
# (docs/studies/*.json). `report` needs only that file: every number and figure can be redrawn without
# the runs. Intervals are percentile bootstraps over prompts (paired: all entries see the same held-out
# prompts) and over seeds (independent runs), eval.bootstrap_difference / bootstrap_mean.
METRICS = COMPARED  # (metric, title): the metrics a run is compared on with its control, as eval.comparison_table
# the per-prompt record's keys a study keeps (the prompt ids once, in meta, as all runs share the prompts)
PER_PROMPT_KEYS = tuple(k for k in EVAL_PER_PROMPT_KEYS if k != "id")


def _compact(per_prompt: dict) -> dict:
    out = {"n": per_prompt["n"]}
    for key in PER_PROMPT_KEYS:
        if key in per_prompt:
            out[key] = [round(float(v), 5) for v in per_prompt[key]]
    return out


def collect(out: Path, entries: list[str], info: dict, seeds: list[int], steps: int, train_args: list[str]) -> dict:
    """The study's per-prompt records: {"meta", "entries": {entry: info}, "records": {entry: {seed: {step:
    per-prompt}}}} (steps as strings: JSON keys)."""
    records, ids, n = {}, None, None
    for entry in entries:
        for seed in seeds:
            run_dir = Path(out) / run_dir_name(entry, seed)
            evals = {0: run_dir / "eval_start.json"}
            evals.update({int(p.stem.split("_")[1]): p for p in sorted((run_dir / "evals").glob("step_*.json"))})
            for step, path in evals.items():
                if not path.exists():
                    continue
                result = json.loads(path.read_text())
                if "per_prompt" not in result:
                    raise SystemExit(f"error: {path} has no per-prompt record (written by an older train.py); "
                                     f"rerun that run")
                ids = ids or result["per_prompt"]["id"]
                n = result["per_prompt"]["n"]
                records.setdefault(entry, {}).setdefault(str(seed), {})[str(step)] = _compact(result["per_prompt"])
    meta = {"steps": steps, "seeds": list(seeds), "train_args": list(train_args), "prompt_ids": ids, "n_samples": n,
            "command": "python study.py study " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["study"] else None}
    return {"meta": meta, "entries": {e: info[e] for e in entries}, "records": records}


def metric_matrix(cache: dict, entry: str, step: int, metric: str) -> np.ndarray:
    """[seeds, prompts] of one per-prompt metric of an entry at a checkpoint (seeds that reached it)."""
    kmax = cache["meta"]["n_samples"]
    name, k = (("pass@k", kmax) if metric == "pass@kmax" else ("pass@k", int(metric[5:])) if metric.startswith("pass@")
               else (metric, None))
    rows = [per_prompt_values({"per_prompt": by_step[str(step)]}, name, k)
            for _, by_step in sorted(cache["records"][entry].items()) if str(step) in by_step]
    return np.array(rows, dtype=float)


def final_step(cache: dict, entry: str) -> int:
    return max(int(s) for by_step in cache["records"][entry].values() for s in by_step)


def effects(cache: dict, n_boot: int = 2000) -> list[dict]:
    """Per entry with a control, at the last checkpoint: per metric the entry's mean, the control's, and the
    difference with its 95 % bootstrap interval (significant when the interval excludes 0)."""
    rows = []
    for entry, info in cache["entries"].items():
        control = info["control"]
        if control is None or control not in cache["records"] or entry not in cache["records"]:
            continue
        step = min(final_step(cache, entry), final_step(cache, control))
        row = {"entry": entry, "control": control, "step": step, "sweep": info["sweep"]}
        for metric, _ in METRICS:
            t, c = metric_matrix(cache, entry, step, metric), metric_matrix(cache, control, step, metric)
            d = bootstrap_difference(t, c, n_boot=n_boot)
            row[metric] = {"entry": float(np.nanmean(t)), "control": float(np.nanmean(c)), "diff": d["diff"],
                           "lo": d["lo"], "hi": d["hi"], "significant": bool(d["lo"] > 0 or d["hi"] < 0),
                           "seeds": [int(d["n_seeds_t"]), int(d["n_seeds_c"])]}
        rows.append(row)
    return rows


def frontier_gap(cache: dict, entry: str, control: str, y_metric: str, n_boot: int = 1000, seed: int = 0) -> dict:
    """How much more (or less) of `y_metric` an entry has at its last checkpoint than its control had at the
    same pass@1 on the way there: the control's checkpoints (pass@1, y) form the "stop GRPO early" line
    (linear in between, sorted by pass@1, clamped beyond its ends), and gap = y_entry − line(pass@1_entry).
    > 0: the entry buys its diversity at a better price than stopping the control early. The interval is a
    percentile bootstrap resampling prompts (shared) and each arm's seeds, the x and y of one arm together."""
    steps = sorted({int(s) for by_step in cache["records"][control].values() for s in by_step})
    end = final_step(cache, entry)
    ex, ey = metric_matrix(cache, entry, end, "pass@1"), metric_matrix(cache, entry, end, y_metric)
    cx = np.stack([metric_matrix(cache, control, t, "pass@1") for t in steps])  # [steps, seeds, prompts]
    cy = np.stack([metric_matrix(cache, control, t, y_metric) for t in steps])

    def gap(e_seeds, c_seeds, prompts):
        x, y = np.nanmean(ex[e_seeds][:, prompts]), np.nanmean(ey[e_seeds][:, prompts])
        lx = np.nanmean(cx[:, c_seeds][:, :, prompts], axis=(1, 2))
        ly = np.nanmean(cy[:, c_seeds][:, :, prompts], axis=(1, 2))
        order = np.argsort(lx)
        return y - np.interp(x, lx[order], ly[order])

    rng = np.random.default_rng(seed)
    n_e, n_c, n_p = ex.shape[0], cx.shape[1], ex.shape[1]
    reps = [gap(rng.integers(n_e, size=n_e), rng.integers(n_c, size=n_c), rng.integers(n_p, size=n_p))
            for _ in range(n_boot)]
    lo, hi = np.nanpercentile(reps, [2.5, 97.5])
    return {"gap": float(gap(np.arange(n_e), np.arange(n_c), np.arange(n_p))), "lo": float(lo), "hi": float(hi),
            "control_steps": steps}


def frontier_table(cache: dict, n_boot: int = 1000) -> str:
    """Per entry with a control evaluated at several checkpoints: its frontier gaps (see frontier_gap)."""
    kmax = cache["meta"]["n_samples"]
    lines = [f"| entry | pass@1 | gap in effective solutions [95 % CI] | gap in pass@{kmax} [95 % CI] |",
             "|---|---|---|---|"]
    for entry, info in cache["entries"].items():
        control = info["control"]
        if control is None or entry not in cache["records"] or control not in cache["records"]:
            continue
        if len({s for by_step in cache["records"][control].values() for s in by_step}) < 3:
            continue  # no line to compare with: the control was evaluated at start and end only
        cells = []
        for metric in ("effective_solutions", "pass@kmax"):
            g = frontier_gap(cache, entry, control, metric, n_boot)
            cell = f"{_signed(g['gap'])} [{_signed(g['lo'])}, {_signed(g['hi'])}]"
            cells.append(f"**{cell}**" if g["lo"] > 0 or g["hi"] < 0 else cell)
        x = np.nanmean(metric_matrix(cache, entry, final_step(cache, entry), "pass@1"))
        lines.append(f"| {entry} | {x:.3f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + ("\n\nGap = the entry's value at its last checkpoint minus its control's at the same "
                               "pass@1 along the control's checkpoints (linear in between): > 0 means the mechanism "
                               "buys diversity more cheaply than stopping the control early. **bold**: the "
                               "interval excludes 0.\n")


def _signed(x: float) -> str:
    return f"{x:+.3f}".replace("-", "−")


def effects_table(rows: list[dict], kmax: int) -> str:
    titles = [t.format(kmax=kmax) for _, t in METRICS]
    lines = ["| entry | control | step | seeds | " + " | ".join(f"Δ {t}" for t in titles) + " |",
             "|---" * (len(titles) + 4) + "|"]
    for row in rows:
        cells = []
        for metric, _ in METRICS:
            m = row[metric]
            cell = f"{_signed(m['diff'])} [{_signed(m['lo'])}, {_signed(m['hi'])}]"
            cells.append(f"**{cell}**" if m["significant"] else cell)
        seeds = row[METRICS[0][0]]["seeds"]
        lines.append(f"| {row['entry']} | {row['control']} | {row['step']} | {seeds[0]} vs {seeds[1]} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines) + ("\n\nΔ = entry − its same-base control at the last checkpoint; [95 % bootstrap interval "
                               "over prompts and seeds]; **bold**: the interval excludes 0.\n")


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def mean_interval(cache: dict, entry: str, step: int, metric: str, n_boot: int = 1000) -> tuple[float, float, float]:
    m = bootstrap_mean(metric_matrix(cache, entry, step, metric), n_boot=n_boot)
    return m["mean"], m["lo"], m["hi"]


def plot_dose_response(cache: dict, method: str, path: Path) -> None:
    """One figure per method: every metric against the strength of each of its swept knobs at the last
    checkpoint, mean over seeds with its 95 % bootstrap band; the same-base control drawn at strength 0
    (symlog x axis, linear below the smallest strength swept)."""
    plt = _plt()
    kmax = cache["meta"]["n_samples"]
    lines: dict[str, list] = {}
    for entry, info in cache["entries"].items():
        if info["sweep"] and info["sweep"]["method"] == method and entry in cache["records"]:
            lines.setdefault(info["sweep"]["line"], []).append((info["sweep"]["value"], entry, info["control"]))
    fig, grid = plt.subplots(2, 3, figsize=(7, 4.6))
    axes, legend_ax = grid.flat[:len(METRICS)], grid.flat[-1]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    smallest = min((v for pts in lines.values() for v, _, _ in pts if v > 0), default=1.0)
    for li, (line, points) in enumerate(sorted(lines.items())):
        points.sort()
        control = points[0][2]
        knob = cache["entries"][points[0][1]]["sweep"]["knob"]
        fixed = ":".join(f for f in line.split(":")[1:] if "|" not in f)
        label = f"{knob}" + (f" ({fixed})" if fixed else "")
        for ax, (metric, title) in zip(axes, METRICS):
            xs, stats = [0.0], [mean_interval(cache, control, final_step(cache, control), metric)]
            for value, entry, _ in points:
                xs.append(value)
                stats.append(mean_interval(cache, entry, final_step(cache, entry), metric))
            mean, lo, hi = (np.array(v) for v in zip(*stats))
            color = colors[li % len(colors)]
            ax.plot(xs, mean, marker="o", ms=3, color=color, label=label)
            ax.fill_between(xs, lo, hi, color=color, alpha=0.18, lw=0)
            ax.set_xscale("symlog", linthresh=smallest)
            ax.set_title(title.format(kmax=kmax), fontsize=8)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
    for ax in axes:
        ax.set_xlabel("strength (0 = same-base control)", fontsize=7)
    handles, labels = axes[0].get_legend_handles_labels()
    legend_ax.axis("off")  # the sixth panel holds the legend, outside the data
    legend_ax.legend(handles, labels, loc="center", fontsize=7, frameon=False, title="knob swept", title_fontsize=7)
    fig.suptitle(f"{method}: dose-response at step {cache['meta']['steps']} (mean over seeds, 95 % bootstrap band)",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_frontier(cache: dict, path: Path) -> None:
    """Accuracy against diversity, one point per checkpoint per entry (mean over seeds): pass@1 against
    pass@kmax and against the effective number of solutions. Each control's points over training are
    joined and labelled by step — "stop GRPO early" is a point on that line — and every other entry is
    drawn at its checkpoints in its method's colour, last checkpoint larger. An entry buys diversity
    at a better price than early stopping when it lies above its control's line."""
    plt = _plt()
    kmax = cache["meta"]["n_samples"]
    fig, axes = plt.subplots(1, 2, figsize=(7, 3.4))
    methods = sorted({parse_variant(e)[0] for e, i in cache["entries"].items() if i["control"]})
    colors = dict(zip(methods, plt.rcParams["axes.prop_cycle"].by_key()["color"][1:]))
    controls = sorted({i["control"] for i in cache["entries"].values() if i["control"]})
    for ax, y_metric in zip(axes, ("pass@kmax", "effective_solutions")):
        for entry in cache["entries"]:
            if entry not in cache["records"]:
                continue
            steps = sorted({int(s) for by_step in cache["records"][entry].values() for s in by_step})
            pts = np.array([[np.nanmean(metric_matrix(cache, entry, st, "pass@1")),
                             np.nanmean(metric_matrix(cache, entry, st, y_metric))] for st in steps])
            if entry in controls:
                style = "-" if controls.index(entry) == 0 else "--"
                ax.plot(pts[:, 0], pts[:, 1], style, color="black", lw=1.2, marker="o", ms=3,
                        label=f"control {entry}")
                for st, (x, y) in zip(steps, pts):
                    ax.annotate(str(st), (x, y), fontsize=6, xytext=(2, 2), textcoords="offset points")
            elif cache["entries"][entry]["control"]:
                color = colors[parse_variant(entry)[0]]
                ax.plot(pts[:, 0], pts[:, 1], "-", color=color, lw=0.6, alpha=0.5)
                ax.scatter(pts[-1:, 0], pts[-1:, 1], s=18, color=color, zorder=3)
        ax.set_xlabel("held-out pass@1", fontsize=8)
        ax.set_ylabel(dict(METRICS)[y_metric].format(kmax=kmax), fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    handles += [plt.Line2D([], [], color=c, marker="o", ls="", ms=4) for c in colors.values()]
    labels += list(colors)
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=7, frameon=False)
    fig.suptitle("accuracy–diversity frontier: one point per checkpoint (mean over seeds); numbers = control's step",
                 fontsize=8)
    fig.tight_layout(rect=(0, 0.16, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def report(cache: dict, out: Path, n_boot: int = 2000) -> str:
    """From a study.json cache: effects.md (+ effects.csv), dose_<method>.png per swept method, frontier.png
    and frontier.md (the gaps to the control's early-stopping line) in `out`; returns both tables."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = effects(cache, n_boot)
    table = effects_table(rows, cache["meta"]["n_samples"])
    (out / "effects.md").write_text(table)
    with open(out / "effects.csv", "w") as f:
        f.write("entry,control,step,metric,entry_mean,control_mean,diff,lo,hi,significant\n")
        for row in rows:
            for metric, _ in METRICS:
                m = row[metric]
                f.write(f"{row['entry']},{row['control']},{row['step']},{metric},{m['entry']:.5f},{m['control']:.5f},"
                        f"{m['diff']:.5f},{m['lo']:.5f},{m['hi']:.5f},{int(m['significant'])}\n")
    for method in sorted({i["sweep"]["method"] for i in cache["entries"].values() if i["sweep"]}):
        plot_dose_response(cache, method, out / f"dose_{method}.png")
    plot_frontier(cache, out / "frontier.png")
    frontier = frontier_table(cache, max(n_boot // 2, 1))
    (out / "frontier.md").write_text(frontier)
    return table + "\n" + frontier


def study_main(argv) -> int:
    parser = OneLineParser(prog="study.py study", description=study.__doc__.split("\n\n")[0],
                           epilog="Arguments after -- go to train.py, e.g. -- --group-size 16")
    parser.add_argument("--methods", default="grpo,dapo",
                        help="comma-separated train.py methods; variants as method:flag or method:key=value, "
                             "e.g. dsdr:no_global_diversity,dsdr:no_coupling,dsdr:tau=0; method:control = the "
                             "mechanism off; a sweep as key=v1|v2|v3 (quote it), e.g. 'arm:alpha=0.3|1|3'. "
                             "Each entry's same-base control is added and trained too")
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


def report_main(argv) -> int:
    parser = OneLineParser(prog="study.py report",
                           description="effects table, dose-response and frontier figures from a study.json")
    parser.add_argument("cache", help="the study.json a study wrote (or a copy under docs/studies)")
    parser.add_argument("--out", default=None, help="folder for the outputs (default: the cache's folder)")
    parser.add_argument("--n-boot", type=int, default=2000, help="bootstrap replicates per interval")
    args = parser.parse_args(argv)
    path = Path(args.cache)
    if not path.is_file():
        raise ConfigError(f"{path} is not a file; pass the study.json that `study.py study` wrote")
    table = report(json.loads(path.read_text()), Path(args.out) if args.out else path.parent, args.n_boot)
    print(table)
    return 0


# ====================================================================================================
# Command line
# ====================================================================================================


COMMANDS = {"compare": compare_main, "study": study_main, "report": report_main}


def main(argv=None) -> int:
    """study.py compare | study ...: bad input is one line on stderr ("error: ... "), exit code 2."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    try:
        if not argv or argv[0] not in COMMANDS:
            got = repr(argv[0]) if argv else "none"
            raise ConfigError(f"study.py needs a command, compare, study or report (got {got}); see python study.py --help")
        return COMMANDS[argv[0]](argv[1:])
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    set_torch_threads()  # this process's share of the CPUs (distributed.py)
    sys.exit(main())
