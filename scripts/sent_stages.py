"""Why SENT's training reward drops at its curriculum's stage switch: harder prompts, or damage?

    python scripts/sent_stages.py RUN [CONTROL]

RUN is a SENT run folder (its se_cache holds the starting policy's M answers per training prompt, from the
SE pass that built the curriculum); CONTROL an optional run without the curriculum (same seed and steps).
Prints, per stage, the starting policy π_0's accuracy and mean semantic entropy on that stage's prompts, and
the training reward over the 10 steps before and after the switch in both runs. If the later stage's π_0
accuracy is lower by about as much as the reward drops, the drop is the harder prompts (what a curriculum
ordered by rising SE should show); a drop well beyond it would point at the switch itself (with
--stage-restart the reference and the optimiser are replaced there; by default nothing is, spec S7).
Countdown (the toy) only: an answer is correct when it equals the target.
"""

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import toy  # noqa: E402
from curriculum import CurriculumConfig, semantic_entropy, sample_weights, stage_split  # noqa: E402


def rewards(run: Path) -> np.ndarray:
    return np.array([json.loads(line)["reward_mean"] for line in (run / "metrics.jsonl").read_text().splitlines()])


def main(argv: list[str]) -> int:
    if not argv or not (Path(argv[0]) / "se_cache").is_dir():
        print("usage: python scripts/sent_stages.py SENT_RUN [CONTROL_RUN] (a run folder with se_cache/)",
              file=sys.stderr)
        return 2
    run = Path(argv[0])
    ccfg = CurriculumConfig()
    lines = next((run / "se_cache").glob("se-*.jsonl")).read_text().splitlines()
    records = {r["i"]: r for r in map(json.loads, lines[1:])}
    train = toy.load_split("train")
    n = len(records)
    acc = np.array([np.mean([a == str(train[i]["target"]) for a in records[i]["answers"]]) for i in range(n)])
    se = np.array([semantic_entropy(records[i]["clusters"], sample_weights(records[i]["mean_logp"], ccfg.se_weights))
                   for i in range(n)])
    for s, idx in enumerate(stage_split(se, ccfg.n_stages)):
        print(f"stage {s}: {len(idx)} prompts, starting policy's accuracy {acc[idx].mean():.3f}, "
              f"mean SE {se[idx].mean():.3f}")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    stages = [r.get("curriculum_stage") for r in rows]
    switch = next((i for i, (a, b) in enumerate(zip(stages, stages[1:])) if a is not None and b != a), None)
    switch = len(rows) // 2 if switch is None else switch + 1  # (runs from before curriculum_stage was logged)
    for label, path in [("SENT", run)] + ([("control", Path(argv[1]))] if len(argv) > 1 else []):
        r = rewards(path)
        print(f"{label}: training reward, 10 steps before step {switch + 1}: {r[switch - 10:switch].mean():.3f}, "
              f"10 steps from it: {r[switch:switch + 10].mean():.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
