"""notebooks/ (issue 9): every notebook is committed with its outputs and runs end to end in fast mode.

Fast mode (RLVR_NOTEBOOK_FAST=1) shrinks every training run and sample count, so the whole set executes
in a couple of minutes on 2 CPU cores; the committed outputs come from the full mode (`make notebooks`).
Each notebook runs in a fresh kernel via nbclient (notebooks/run_all.py's `execute`), writing the executed
copy and its training runs under tmp_path, so the committed notebooks are never modified here.
"""

import importlib.util
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

ROOT = Path(__file__).resolve().parents[1]
NB_DIR = ROOT / "notebooks"
# NN_name.ipynb and NNx_name.ipynb (00b_bandit sorts between 00_* and 01_*), as run_all.find_notebooks finds them
NOTEBOOKS = sorted({*NB_DIR.glob("[0-9][0-9]_*.ipynb"), *NB_DIR.glob("[0-9][0-9][a-z]_*.ipynb")})
IDS = [p.stem for p in NOTEBOOKS]


def _run_all():
    spec = importlib.util.spec_from_file_location("notebooks_run_all", NB_DIR / "run_all.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _outputs(nb):
    return [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]


def _images(nb) -> int:
    return sum("image/png" in o.get("data", {}) for o in _outputs(nb))


def test_one_notebook_per_mechanism_after_the_overview():
    prefixes = {p.name[:2] for p in NOTEBOOKS}
    assert {"01", "02", "03", "04", "05"} <= prefixes, [p.name for p in NOTEBOOKS]
    assert (NB_DIR / "01_mode_collapse.ipynb").exists()


def test_lettered_notebooks_are_found_in_order():
    """00b_bandit.ipynb (a letter after the number) is run by run_all.py and the tests, after 00_* and before 01_*."""
    names = [p.name for p in _run_all().find_notebooks()]
    assert names == [p.name for p in NOTEBOOKS]
    assert "00b_bandit.ipynb" in names
    assert names == sorted(names)
    assert names.index("00b_bandit.ipynb") < names.index("01_mode_collapse.ipynb")
    assert all(n < "00b_bandit.ipynb" for n in names if n.startswith("00_"))
    assert [p.name for p in _run_all().find_notebooks(["00b"])] == ["00b_bandit.ipynb"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_committed_with_outputs_from_the_full_mode(path):
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.get("execution_count") for c in code), "every code cell must have been executed"
    assert _images(nb) >= 1, "the committed notebook must show its figures (image/png outputs)"
    errors = [o for o in _outputs(nb) if o.get("output_type") == "error"]
    assert not errors, f"committed with an error output: {errors[0].get('ename')}: {errors[0].get('evalue')}"
    setup = "".join(o.get("text", "") for o in code[0].get("outputs", []))
    assert "fast mode: False" in setup, "commit the outputs of `make notebooks` (full mode), not of the fast mode"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_runs_end_to_end_in_fast_mode(path, tmp_path):
    out = tmp_path / path.name
    # raises nbclient's CellExecutionError (with the cell and the traceback) on any failing cell
    nb = _run_all().execute(path, out, fast=True, timeout=600, runs_dir=str(tmp_path / "runs"))
    assert out.exists()
    assert not [o for o in _outputs(nb) if o.get("output_type") == "error"]
    assert _images(nb) >= 1
    setup = "".join(o.get("text", "") for o in [c for c in nb.cells if c.cell_type == "code"][0].get("outputs", []))
    assert "fast mode: True" in setup
