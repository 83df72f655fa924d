"""Data safety of the run folder (issue 14): nothing is lost or mixed silently.

One training per run folder (a lock), no fresh run over an old one (--resume or --overwrite), --out checked
before the model loads, checkpoints verified against their manifest (an older intact one is taken when
the newest is damaged), metrics.jsonl always valid JSON (torn lines skipped, skipped steps counted), a
failed save cleaned up with one line, and kill -9 anywhere (mid-step, inside the save) then --resume still
bit-exact. Settings are tiny (2 prompts x 2 samples per step) so that each run takes seconds.
"""

import errno
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import train
from runfolder import checkpoint_problem

ROOT = Path(__file__).resolve().parents[1]
COMMON = ["--prompts-per-step", "2", "--group-size", "2", "--save-every", "1", "--seed", "1",
          "--no-final-eval", "--no-progress", "--no-tensorboard"]


def _run(out: Path, *extra: str, steps: int = 2) -> int:
    return train.main([*COMMON, "--steps", str(steps), "--out", str(out), *extra])


def _params(ckpt: Path) -> dict:
    return load_file(str(ckpt / "model.safetensors"))


def _steps(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def _ckpts(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").iterdir())


def _assert_same_params(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _error_line(capsys) -> str:
    """The one line a refused run prints (nothing else on stderr: it stopped before the model loaded)."""
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: ")
    return lines[0]


@pytest.fixture
def no_model_load(monkeypatch):
    """The refusals must come before the (expensive) model load: loading it fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the run folder was checked")

    monkeypatch.setattr(train, "load_policy", refuse)


@pytest.fixture(scope="module")
def two_steps(toy_model_dir, tmp_path_factory):
    """A finished 2-step run, checkpoints step_000001 and step_000002; tests copy it before changing it."""
    out = tmp_path_factory.mktemp("base") / "run"
    assert _run(out, steps=2) == 0
    return out


@pytest.fixture(scope="module")
def three_steps(toy_model_dir, tmp_path_factory):
    """The uninterrupted 3-step run every resumed run must match bit for bit."""
    out = tmp_path_factory.mktemp("straight") / "run"
    assert _run(out, steps=3) == 0
    return _params(out / "checkpoints" / "step_000003")


def _copy(run: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(run, out)
    return out


# ---- 1. two trainings into one --out ----------------------------------------------------------------
def test_second_training_into_a_busy_run_folder_is_refused(toy_model_dir, tmp_path, capsys, monkeypatch):
    """Today both exit 0, metrics.jsonl interleaves the two runs and their checkpoints replace each other."""
    out = tmp_path / "run"
    first = train.Trainer(*train.parse_args([*COMMON, "--steps", "2", "--out", str(out)]))
    capsys.readouterr()  # (its model loading output)
    with monkeypatch.context() as m:  # the second one stops before loading its model
        m.setattr(train, "load_policy", lambda *a, **k: pytest.fail("second training loaded its model"))
        assert _run(out, steps=2) == 2
        assert _run(out, "--resume", steps=3) == 2  # resuming a folder that is being written: refused too
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(f"run folder {out} is in use by another training (pid {os.getpid()})" in line
                                 for line in err), err
    first.fit()
    assert _steps(out) == [1, 2]  # only the first run's rows
    # the lock is released when the run ends: the folder can be continued
    assert _run(out, "--resume", steps=3) == 0
    assert _steps(out) == [1, 2, 3]


# ---- 2. a fresh run into an existing run folder -----------------------------------------------------
def test_fresh_run_into_a_used_run_folder_needs_resume_or_overwrite(two_steps, tmp_path, capsys, monkeypatch):
    """Today the old metrics.jsonl is truncated but its checkpoints stay, and a later --resume continues
    from them (metrics steps [1, 3])."""
    out = _copy(two_steps, tmp_path)
    metrics = (out / "metrics.jsonl").read_bytes()
    with monkeypatch.context() as m:
        m.setattr(train, "load_policy", lambda *a, **k: pytest.fail("model loaded before the folder check"))
        assert _run(out, steps=1) == 2
        line = _error_line(capsys)
        assert f"run folder {out} already holds a run" in line and "--resume" in line and "--overwrite" in line
        assert _run(out, "--resume", "--overwrite", steps=3) == 2  # contradictory: refused, nothing deleted
        assert "--overwrite" in _error_line(capsys)
    assert (out / "metrics.jsonl").read_bytes() == metrics
    assert _ckpts(out) == ["step_000001", "step_000002"]
    # --overwrite starts over in a cleared folder: no old checkpoint can be resumed into the new run
    assert _run(out, "--overwrite", steps=1) == 0
    assert _steps(out) == [1] and _ckpts(out) == ["step_000001"]


# ---- 3. an --out that cannot be a run folder ---------------------------------------------------------
@pytest.mark.parametrize("kind", ["file", "below-a-file", "unwritable", "read-only"])
def test_unusable_out_is_refused_before_the_model_loads(kind, toy_model_dir, tmp_path, capsys, no_model_load):
    """Today these fail with a traceback after the model has loaded."""
    if kind == "file":
        out = tmp_path / "taken"
        out.write_text("not a folder")
    elif kind == "below-a-file":
        (tmp_path / "taken").write_text("not a folder")
        out = tmp_path / "taken" / "run"
    elif kind == "unwritable":  # an existing folder nobody can create files in, root included
        out = Path("/proc")
    else:
        if os.geteuid() == 0:
            pytest.skip("root writes into read-only folders (the 'unwritable' case covers the probe)")
        out = tmp_path / "ro"
        out.mkdir()
        out.chmod(0o500)
    try:
        assert _run(out, steps=1) == 2
    finally:
        if kind == "read-only":
            out.chmod(0o700)
    line = _error_line(capsys)
    assert str(out) in line


# ---- 4. damaged checkpoints ----------------------------------------------------------------------------
def _set_first_weight_nan(path: Path) -> None:
    """Overwrite the first element of a floating-point tensor in a .safetensors file with NaN (a flipped
    exponent, as bit rot or a bad copy would do): the file stays the same size and parses."""
    data = bytearray(path.read_bytes())
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    nan = {"F32": b"\x00\x00\xc0\x7f", "BF16": b"\xc0\x7f", "F16": b"\x00\x7e"}
    name, meta = next((k, v) for k, v in header.items() if k != "__metadata__" and v["dtype"] in nan)
    start = 8 + n + meta["data_offsets"][0]
    data[start:start + len(nan[meta["dtype"]])] = nan[meta["dtype"]]
    path.write_bytes(bytes(data))


def _damage(ckpt: Path, how: str) -> str:
    """Damage one file of a checkpoint; returns its name."""
    name = {"model": "model.safetensors", "state": "trainer_state.pt", "optim": "optimizer.pt"}[how.split("-")[0]]
    path = ckpt / name
    if how.endswith("-truncated"):  # a copy or a disk that stopped half-way
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif how.endswith("-empty"):
        path.write_bytes(b"")
    elif how.endswith("-missing"):
        path.unlink()
    elif how.endswith("-nan"):
        _set_first_weight_nan(path)
    elif how.endswith("-nan-no-manifest"):  # an older checkpoint (no manifest): the finite check catches it
        _set_first_weight_nan(path)
        (ckpt / "manifest.json").unlink()
    return name


@pytest.mark.parametrize("how", ["model-truncated", "model-empty", "model-nan", "model-nan-no-manifest",
                                 "state-truncated", "optim-truncated", "optim-missing"])
def test_resume_skips_a_damaged_checkpoint_for_the_older_intact_one(how, two_steps, tmp_path, capsys):
    """Today: a 17-23 line traceback (or, for a NaN weight, a failure at the first rollout) and no fallback
    to step_000001. Now: one warning naming the bad file, resume from step 1, and step 2 trained again to
    the very parameters the damaged checkpoint held."""
    out = _copy(two_steps, tmp_path)
    bad = _damage(out / "checkpoints" / "step_000002", how)
    assert _run(out, "--resume", steps=2) == 0
    warnings = [ln for ln in capsys.readouterr().err.splitlines() if "step_000002" in ln]
    assert len(warnings) == 1 and warnings[0].startswith("warning: ") and bad in warnings[0], warnings
    assert _steps(out) == [1, 2]
    _assert_same_params(_params(out / "checkpoints" / "step_000002"),
                        _params(two_steps / "checkpoints" / "step_000002"))
    assert checkpoint_problem(out / "checkpoints" / "step_000002") is None  # replaced by an intact one


def test_resume_without_an_intact_checkpoint_is_one_line(two_steps, tmp_path, capsys, no_model_load):
    out = _copy(two_steps, tmp_path)
    _damage(out / "checkpoints" / "step_000002", "model-truncated")
    _damage(out / "checkpoints" / "step_000001", "optim-missing")
    assert _run(out, "--resume", steps=3) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "no intact checkpoint" in err[-1]
    assert len(err) == 3 and all(ln.startswith("warning: ") for ln in err[:2])  # one per skipped checkpoint


def test_checkpoints_without_manifest_are_accepted_with_a_warning(two_steps, tmp_path, capsys):
    """Runs saved before manifests existed still resume (their files cannot be verified: one warning)."""
    out = _copy(two_steps, tmp_path)
    for ckpt in (out / "checkpoints").iterdir():
        (ckpt / "manifest.json").unlink()
    assert _run(out, "--resume", steps=3) == 0
    warnings = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("warning: ")]
    assert len(warnings) == 1 and "step_000002" in warnings[0] and "manifest" in warnings[0], warnings
    assert _steps(out) == [1, 2, 3]
    assert (out / "checkpoints" / "step_000003" / "manifest.json").exists()


def test_manifest_lists_every_file_with_size_and_sha256(two_steps):
    import hashlib

    ckpt = two_steps / "checkpoints" / "step_000002"
    manifest = json.loads((ckpt / "manifest.json").read_text())
    files = {p.name for p in ckpt.iterdir() if p.name != "manifest.json"}
    assert set(manifest["files"]) == files and {"model.safetensors", "optimizer.pt", "trainer_state.pt"} <= files
    for name, meta in manifest["files"].items():
        data = (ckpt / name).read_bytes()
        assert meta == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


# ---- 5. metrics.jsonl ----------------------------------------------------------------------------------
def test_torn_metrics_line_does_not_block_resume(two_steps, tmp_path, capsys):
    """Killed while appending a row: today --resume dies with a JSONDecodeError in Logger.__init__."""
    out = _copy(two_steps, tmp_path)
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 0.12')  # no closing brace, no newline
    assert _run(out, "--resume", steps=3) == 0
    warnings = [ln for ln in capsys.readouterr().err.splitlines() if "metrics.jsonl" in ln]
    assert len(warnings) == 1 and warnings[0].startswith("warning: ")
    assert _steps(out) == [1, 2, 3]


def _strict_json(line: str) -> dict:
    def reject(constant):
        raise ValueError(f"{constant} is not JSON")

    return json.loads(line, parse_constant=reject)


def test_skipped_step_is_valid_json_counted_and_warned(toy_model_dir, tmp_path, capsys, monkeypatch):
    """A non-finite gradient norm skips the optimiser step. Today the row holds a bare NaN (not JSON) and
    nothing says a step was skipped."""
    out = tmp_path / "run"
    original, calls = torch.nn.utils.clip_grad_norm_, []

    def nan_on_second_call(*args, **kwargs):
        norm = original(*args, **kwargs)
        calls.append(1)
        return torch.tensor(float("nan")) if len(calls) == 2 else norm

    with monkeypatch.context() as m:
        m.setattr(torch.nn.utils, "clip_grad_norm_", nan_on_second_call)
        assert _run(out, steps=2) == 0
    rows = [_strict_json(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert math.isfinite(rows[0]["grad_norm"]) and rows[1]["grad_norm"] is None
    assert [r["skipped_steps"] for r in rows] == [0, 1]
    warnings = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("warning: ")]
    assert len(warnings) == 1 and "step 2" in warnings[0] and "skipped" in warnings[0], warnings
    # the step really was skipped: the weights did not move
    _assert_same_params(_params(out / "checkpoints" / "step_000001"), _params(out / "checkpoints" / "step_000002"))
    # the count survives --resume
    assert _run(out, "--resume", steps=3) == 0
    rows = [_strict_json(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_steps"] for r in rows] == [0, 1, 1]


# ---- 6. disk full during a save ------------------------------------------------------------------------
def test_disk_full_while_saving_stops_with_one_line_and_cleans_up(toy_model_dir, tmp_path, monkeypatch):
    """Today: an opaque traceback and a half-written step_000002.tmp left behind."""
    out = tmp_path / "run"
    original = torch.save

    def full_disk(obj, f, *args, **kwargs):
        if Path(f).parent.name == "step_000002.tmp" and Path(f).name == "optimizer.pt":
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(obj, f, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(torch, "save", full_disk)
        with pytest.raises(SystemExit) as stop:
            _run(out, steps=3)
    message = str(stop.value.code)
    assert "\n" not in message and message.startswith(
        f"error: no space left on device while saving checkpoint step 2 to {out / 'checkpoints' / 'step_000002'}")
    assert f"{out / 'checkpoints' / 'step_000001'} is intact" in message
    assert _ckpts(out) == ["step_000001"]  # no .tmp left behind
    # the previous checkpoint is whole: the run continues from it once there is space again (and the
    # stopped run released its lock)
    assert _run(out, "--resume", steps=2) == 0
    assert _steps(out) == [1, 2]


# ---- 7. --steps below the checkpoint -------------------------------------------------------------------
def test_resume_with_fewer_steps_than_the_checkpoint_is_one_line(two_steps, tmp_path, capsys, no_model_load):
    out = _copy(two_steps, tmp_path)
    assert _run(out, "--resume", steps=1) == 2
    line = _error_line(capsys)
    assert "--steps 1" in line and "step 2" in line
    assert _steps(out) == [1, 2] and _ckpts(out) == ["step_000001", "step_000002"]


# ---- 8. kill -9 mid-step and inside the save, then --resume --------------------------------------------
# Runs train.main in a subprocess that SIGKILLs itself at one point (no hook in train.py: the script wraps
# the function that runs at that point). Intra-op threads as in conftest.py, so that the parameters can be
# compared bit for bit with the in-process run.
KILLER = textwrap.dedent("""
    import os, signal, sys
    import torch
    torch.set_num_threads(int(sys.argv[3]))
    import train
    where, at = sys.argv[1], int(sys.argv[2])
    tmp = f"step_{at:06d}.tmp"

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    if where == "mid-step":  # right after step `at` changed the weights, before it is logged or saved
        count, step = [0], torch.optim.AdamW.step

        def killing_step(self, *args, **kwargs):
            out = step(self, *args, **kwargs)
            count[0] += 1
            if count[0] == at:
                die()
            return out

        torch.optim.AdamW.step = killing_step
    elif where == "save-half-written":  # inside save_checkpoint: model and optimiser are in the tmp folder
        save = torch.save

        def killing_save(obj, f, *args, **kwargs):
            if os.path.basename(str(f)) == "trainer_state.pt" and os.path.basename(os.path.dirname(str(f))) == tmp:
                die()
            return save(obj, f, *args, **kwargs)

        torch.save = killing_save
    elif where == "save-before-rename":  # inside save_checkpoint: the tmp folder is complete, not renamed
        replace = os.replace

        def killing_replace(src, dst, *args, **kwargs):
            if os.path.basename(str(src)) == tmp:
                die()
            return replace(src, dst, *args, **kwargs)

        os.replace = killing_replace
    sys.exit(train.main(sys.argv[4:]))
""")


@pytest.mark.parametrize("where", ["mid-step", "save-half-written", "save-before-rename"])
def test_kill_9_then_resume_is_bit_exact(where, three_steps, tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", KILLER, where, "2", str(torch.get_num_threads()), *COMMON,
                           "--steps", "3", "--out", str(out)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    if where.startswith("save"):  # it died inside the save of step 2: a partial tmp folder, no step_000002
        assert _ckpts(out) == ["step_000001", "step_000002.tmp"]
        assert (out / "checkpoints" / "step_000002.tmp" / "model.safetensors").exists()
    else:
        assert _ckpts(out) == ["step_000001"]
    # the killed process held the run folder's lock: the kernel released it, so --resume is not refused
    assert _run(out, "--resume", steps=3) == 0
    assert _steps(out) == [1, 2, 3]
    assert _ckpts(out) == ["step_000002", "step_000003"]  # the partial tmp folder was replaced
    _assert_same_params(_params(out / "checkpoints" / "step_000003"), three_steps)
