"""Execute the notebooks in notebooks/ with nbclient and save them with their outputs.

    python notebooks/run_all.py                      # every notebook, full mode, in place (make notebooks)
    python notebooks/run_all.py 01 03                # only the notebooks whose names start with 01 / 03
    python notebooks/run_all.py --fast --out /tmp/nb # fast mode (RLVR_NOTEBOOK_FAST=1), copies in /tmp/nb

Each notebook runs in a fresh kernel of the interpreter that runs this script (the "python3" kernel
spec resolves to sys.executable), with the repository root as its working directory and on PYTHONPATH,
so `import train, eval, dsdr` work. Fast mode shrinks every training run and sample count so that the
whole set executes in a few minutes (the test suite uses it); the figures are then only a smoke test.
Training runs write their folders under $RLVR_NOTEBOOK_RUNS (default studies/notebooks/, git-ignored).

Prints the wall time of each notebook and of the whole set; exits non-zero if any cell raised. A notebook
that fails is not written back in place (the committed version with its outputs stays as it was).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def find_notebooks(prefixes: list[str] | None = None) -> list[Path]:
    """The numbered notebooks of this folder in order, optionally filtered by prefix: NN_name.ipynb and
    NNx_name.ipynb (a letter after the number, e.g. 00b_bandit.ipynb, sorts between 00_* and 01_*: '_' < 'a')."""
    paths = sorted({*HERE.glob("[0-9][0-9]_*.ipynb"), *HERE.glob("[0-9][0-9][a-z]_*.ipynb")})
    if prefixes:
        paths = [p for p in paths if any(p.name.startswith(x) or p.stem == x for x in prefixes)]
    return paths


def kernel_env(fast: bool, runs_dir: str | None = None) -> dict[str, str]:
    """The environment of the notebook kernel: this process's, plus the mode, the repo on PYTHONPATH,
    offline Hugging Face and, optionally, where training runs go."""
    env = dict(os.environ)
    env["RLVR_NOTEBOOK_FAST"] = "1" if fast else "0"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])])
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("PYDEVD_DISABLE_FILE_VALIDATION", "1")  # silence the debugger's frozen-modules note
    if runs_dir is not None:
        env["RLVR_NOTEBOOK_RUNS"] = str(runs_dir)
    return env


def execute(path: Path, out_path: Path | None = None, fast: bool = False, timeout: int | None = 3600,
            runs_dir: str | None = None, kernel_name: str = "python3"):
    """Run every cell of `path` in a fresh kernel and write the executed notebook to `out_path`
    (default: `path` itself). Raises nbclient's CellExecutionError on the first failing cell (then
    nothing is written). Returns the executed notebook."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=timeout, kernel_name=kernel_name, record_timing=False,
                            resources={"metadata": {"path": str(ROOT)}})
    client.execute(env=kernel_env(fast, runs_dir))
    nb.metadata.pop("widgets", None)
    nbformat.write(nb, out_path or path)
    return nb


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("notebooks", nargs="*", help="name prefixes to run (default: all), e.g. 01 02_dsdr")
    parser.add_argument("--fast", action="store_true",
                        help="fast mode: RLVR_NOTEBOOK_FAST=1 for the kernel (few steps, few samples)")
    parser.add_argument("--out", default=None,
                        help="write the executed notebooks into this folder instead of in place")
    parser.add_argument("--runs", default=None,
                        help="folder for the notebooks' training runs (default: studies/notebooks/)")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds allowed per cell")
    args = parser.parse_args(argv)
    paths = find_notebooks(args.notebooks)
    if not paths:
        print(f"no notebooks match {args.notebooks or 'NN_*.ipynb'} in {HERE}", file=sys.stderr)
        return 2
    out_dir = Path(args.out) if args.out else None
    if out_dir:
        out_dir.mkdir(parents=True, exist_ok=True)
    mode = "fast" if args.fast else "full"
    print(f"executing {len(paths)} notebook(s) in {mode} mode with {sys.executable}", flush=True)
    failures, t_all = [], time.perf_counter()
    for path in paths:
        t0 = time.perf_counter()
        target = out_dir / path.name if out_dir else path
        try:
            execute(path, target, fast=args.fast, timeout=args.timeout, runs_dir=args.runs)
            status = f"ok -> {target.relative_to(ROOT) if target.is_relative_to(ROOT) else target}"
        except Exception as e:  # a cell error (CellExecutionError), a timeout or a dead kernel
            failures.append(path.name)
            status = f"FAILED ({type(e).__name__})"
            print(str(e)[-4000:], file=sys.stderr)
        print(f"{path.name:32s} {time.perf_counter() - t0:7.1f} s  {status}", flush=True)
    total = time.perf_counter() - t_all
    print(f"{'total':32s} {total:7.1f} s  ({len(paths) - len(failures)}/{len(paths)} ok, {mode} mode)")
    if failures:
        print(f"failed: {', '.join(failures)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
