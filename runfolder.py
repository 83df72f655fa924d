"""runfolder.py — everything a run writes to disk: checkpoints, the run folder's lock, and the metrics.

Checkpoints are atomic and verified (`save_checkpoint` writes a manifest of sizes and sha256s last;
`resume_checkpoint` takes the newest one that verifies); `open_run_folder` locks --out for one training and
refuses to mix two runs in it; `Logger` writes metrics.jsonl (strict JSON), TensorBoard and wandb.
Separate because it is the loop's contract with the file system, read back by --resume and eval.py.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import hashlib
import json
import math
import os
import shutil
import sys
from pathlib import Path

import torch

from config import ConfigError, TrainConfig
from distributed import Dist, rng_state

# ====================================================================================================
# Checkpoints: atomic, complete (model, optimiser, RNG states, step, data position, method state)
# ====================================================================================================
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
                warn_line(f"checkpoint {ckpt} has no {MANIFEST} (saved by an older version): its files are not "
                      f"verified")
            return ckpt, state
        if verbose:
            warn_line(f"skipping checkpoint {ckpt}: {problem}")
    raise ConfigError(f"--resume: no intact checkpoint in {run_dir / 'checkpoints'} (see the warnings above); "
                      f"start over with --overwrite or choose another --out")


def warn_line(message: str) -> None:
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
                warn_line(f"{self.path}: skipped {torn} unreadable line(s), cut short by a crash while written")
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
# The run's metrics and its plot (training.png)
# ====================================================================================================


# ----------------------------------------------------------------------------------------------------
# The starting policy's held-out evaluation, computed once for the runs that share it
# ----------------------------------------------------------------------------------------------------
# Runs that start from the same policy (a study's entries × seeds, a run and its --with-control) would each
# spend ~50 s evaluating the same weights on the same prompts with the same sampling seed (train.Trainer
# .evaluate always uses seed 12345). The first run's eval_start.json is copied into the others instead.
def start_evaluation_matches(path: Path, cfg: TrainConfig) -> bool:
    """Whether `path` (an eval_start.json) evaluated the held-out prompts and sampling `cfg` asks for. The
    starting model is the caller's to guarantee (the same --model for every run that shares the file)."""
    if not path.exists():
        return False
    start = json.loads(path.read_text())
    sampling = start["sampling"]
    return (start["n_problems"] == cfg.eval_prompts and sampling["n"] == cfg.eval_samples
            and sampling["temperature"] == cfg.temperature and sampling["top_p"] == cfg.top_p
            and sampling["max_new_tokens"] == cfg.max_new_tokens)


def reuse_start_evaluation(path: Path, run_dir: Path) -> None:
    """Copy a shared step-0 evaluation into a run folder, as if the run had computed it."""
    shutil.copyfile(path, run_dir / "eval_start.json")


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_run(run_dir: Path) -> Path:
    """training.png in the run folder: reward, entropy and distinct correct over steps, final pass@k."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else None
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    steps = [r["step"] for r in rows]
    for ax, key, label in zip(axes[:3], ("reward_mean", "entropy", "distinct_correct"),
                              ("mean training reward", "token entropy (nats)", "distinct correct / group")):
        ys = [r.get(key) for r in rows]
        if any(y is not None for y in ys):
            ax.plot([s for s, y in zip(steps, ys) if y is not None], [y for y in ys if y is not None])
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.set_title(label)
        ax.grid(alpha=0.3)
    ax = axes[3]
    start_path = run_dir / "eval_start.json"
    curves = [("start", json.loads(start_path.read_text()) if start_path.exists() else None), ("end", summary)]
    for label, result in curves:
        if result and "pass_at_k" in result:
            ks = [int(k) for k in result["pass_at_k"]]
            ax.plot(ks, [result["pass_at_k"][str(k)] for k in ks], marker="o", label=label)
            ax.set_xscale("log", base=2)
            s = result["sampling"]
            ax.set_title(f"held-out pass@k (T={s['temperature']}, n={s['n']})")
    if any(result for _, result in curves):
        ax.legend()
    ax.set_xlabel("k")
    ax.set_ylabel("pass@k")
    ax.grid(alpha=0.3)
    fig.suptitle(run_dir.name)
    fig.tight_layout()
    out = run_dir / "training.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
