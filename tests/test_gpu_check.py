"""scripts/gpu_check.py, the one-shot GPU check (issue 18), in its dry-run mode: a tiny model on the CPU.

The dry run executes every check's code that a CPU can run (model build, the Lp-Reg proxy passes, GRPO and
DSDR steps, FSDP2 under torchrun vs the plain step) and must report, for every line, either a value or
an explicit skip reason (GPU memory and the vLLM checks need CUDA). A check that raises or overruns its
time budget is reported as FAIL with a one-line reason while the others still run. The memory estimate
the GPU run compares with must reproduce the README's own table.
"""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.py"


def _module():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gpu_check = _module()


def _dry_run(tmp_path, *extra, timeout=1200):
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--json", str(out),
                           "--workdir", str(tmp_path / "work"), *extra],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    report = json.loads(out.read_text()) if out.exists() else None
    printed = {}
    for line in proc.stdout.splitlines():
        words = line.split()
        if words and words[0] in gpu_check.ALL_LINES:
            printed[words[0]] = line
    return proc, report, printed


def test_dry_run_reports_every_check(tmp_path):
    proc, report, printed = _dry_run(tmp_path)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-3000:]
    assert list(report["checks"]) == gpu_check.ALL_LINES
    for name, check in report["checks"].items():
        assert check["status"] in ("ok", "skip"), (name, check)  # a raising check is FAIL: the test fails
        assert check["value"] if check["status"] == "ok" else check["reason"], (name, check)
        line = printed[name]  # one printed line per check: name, value (or reason), target, status
        assert line.rstrip().endswith(check["status"]) and (check["value"] or check["reason"]) in line, line
    # what the CPU can run did run, with real figures
    for name in ("build_models", "1.grpo_step_hf", "1.dsdr_step_hf", "5.fsdp_match"):
        assert report["checks"][name]["status"] == "ok", name
    rows = report["checks"]["1.grpo_step_hf"]["figures"]["rows"]
    assert len(rows) == 2 and all(r["time_generate"] > 0 and r["time_update"] > 0 for r in rows)
    lp = report["checks"]["4.lp_proxy_memory"]["figures"]
    assert all(lp[mode][kind]["seconds"] > 0 for mode in ("no_grad", "training") for kind in ("plain", "proxy"))
    estimate = report["checks"]["1.peak_memory"]["figures"]["estimate_gb"]
    assert estimate["total_allocated"] > 0 and estimate["activations"] > 0
    fsdp = report["checks"]["5.fsdp_match"]["figures"]
    assert fsdp["fsdp_rows"][0]["grad_norm"] > 0  # the compared gradients are not zero
    assert all(step["grad_cos"] > 0.999 and step["grad_norm_rel"] < 1e-4 for step in fsdp["steps"])  # fp32
    # the vLLM lines say why they did not run
    assert "CUDA" in report["checks"]["2.sync_tied"]["reason"] or "vLLM" in report["checks"]["2.sync_tied"]["reason"]


def test_a_raising_check_fails_alone_and_a_slow_one_hits_its_budget(tmp_path):
    proc, report, printed = _dry_run(tmp_path / "a", "--checks", "build,lp_proxy", "--inject-failure", "lp_proxy")
    assert proc.returncode == 1, proc.stdout[-3000:]
    assert report["checks"]["4.lp_proxy_memory"]["status"] == "FAIL"
    assert "injected failure" in report["checks"]["4.lp_proxy_memory"]["reason"]
    assert printed["4.lp_proxy_memory"].rstrip().endswith("FAIL")
    assert report["checks"]["build_models"]["status"] == "ok"  # the other group still ran
    proc, report, printed = _dry_run(tmp_path / "b", "--checks", "lp_proxy", "--check-timeout", "2")
    assert proc.returncode == 1
    check = report["checks"]["4.lp_proxy_memory"]
    assert check["status"] == "FAIL" and "time budget of 2 s" in check["reason"], check


def test_memory_estimate_reproduces_the_readme_table():
    """README "Scaling up": Qwen3-1.7B, 8 GPUs, 16,384-token micro-batches, 4,096 logit rows, the engine at
    0.3 x 80 GB: ~80 GB without checkpointing, ~42 GB with it."""
    import bench

    arch = dict(bench.REAL_SIZES["qwen3-1.7b"][1])
    kw = dict(world=8, tokens=16384, logit_rows=4096, engine_gb=0.3 * 80)
    plain = gpu_check.readme_memory_estimate(arch, 1.7e9, gc=False, **kw)
    ckpt = gpu_check.readme_memory_estimate(arch, 1.7e9, gc=True, **kw)
    assert plain["states"] == pytest.approx(3.4, abs=0.05)
    assert plain["activations"] == pytest.approx(41, abs=1)
    assert ckpt["activations"] == pytest.approx(3.4, abs=0.3)
    assert plain["logits"] == pytest.approx(7.5, abs=0.1)
    assert plain["total"] == pytest.approx(80, abs=1.5) and ckpt["total"] == pytest.approx(42, abs=1.5)
    readme = (ROOT / "README.md").read_text()
    assert "~90 KB per token per layer" in readme and "**~80 / ~42**" in readme, "README table changed"
    # the GPU run's model: more MLP per layer than Qwen3-1.7B, so more activation per token
    small = dict(bench.REAL_SIZES["qwen2.5-1.5b"][1])
    assert gpu_check._activation_units(small) > gpu_check._activation_units(arch)


def test_fsdp_comparison_bites():
    """Fingerprints that disagree (a gradient with flipped signs, a different norm) fail the comparison."""
    names = [f"p{i}" for i in range(8)]
    grad = {n: [float(i - 3.5), 1.0 + i] for i, n in enumerate(names)}
    run = {"rows": [{"entropy": 6.9, "grad_norm": 2.0}], "fingerprints": [{"grad": grad, "update": grad}]}
    ok, _, _ = gpu_check.compare_fsdp(run, run)
    assert ok
    flipped = {n: [-d, g] for n, (d, g) in grad.items()}
    bad = {"rows": [{"entropy": 6.9, "grad_norm": 2.0}], "fingerprints": [{"grad": flipped, "update": flipped}]}
    ok, value, _ = gpu_check.compare_fsdp(run, bad)
    assert not ok and "grad cos -1" in value
    off = {"rows": [{"entropy": 6.9, "grad_norm": 2.4}], "fingerprints": [{"grad": grad, "update": grad}]}
    assert not gpu_check.compare_fsdp(run, off)[0]
