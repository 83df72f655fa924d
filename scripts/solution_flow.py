"""Where does a mechanism move probability? Top solution vs other correct solutions vs wrong answers.

    python scripts/solution_flow.py --entry studies/toy/arm-alpha1-s{0,1,2} --control studies/toy/grpo-eps_high0.28-aggtoken-mean-s{0,1,2}

For every run folder, its last checkpoint samples the held-out prompts (the toy's 200 × 64, the study's
sampling seed) and each prompt's samples are split into three shares: the prompt's most frequent correct
solution (by the verifier's canonical key), the other correct solutions, and wrong answers; they add up to
1. The table gives each share for the entry and its control and the difference with a 95 % bootstrap
interval over prompts (paired) and seeds (eval.bootstrap_difference). A mechanism that spreads a collapsed
policy (ARM's confidence shift, DSDR's bonus, an entropy bonus) lowers the top share; the question is
whether that mass goes to *other correct* solutions (exploration that pays) or to *wrong* answers.
"""

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from config import TrainConfig, resolve_defaults  # noqa: E402
from data import load_prompts, render_prompts  # noqa: E402
from eval import bootstrap_difference  # noqa: E402
from rollout import HFRollout, load_policy, sample_and_verify  # noqa: E402
from runfolder import latest_checkpoint  # noqa: E402

SHARES = ("top correct solution", "other correct solutions", "wrong answers")


def solution_shares(run_dir: Path, prompts: int, n: int, seed: int = 12345) -> np.ndarray:
    """[prompts, 3]: per held-out prompt, the share of its n samples on its most frequent correct solution,
    on other correct solutions, and wrong."""
    ckpt = latest_checkpoint(Path(run_dir))
    if ckpt is None:
        raise SystemExit(f"error: {run_dir} has no checkpoint")
    cfg = resolve_defaults(TrainConfig())  # the toy's sampling settings (max_new_tokens, template)
    model, tokenizer = load_policy(str(ckpt), torch.device("cpu"))
    examples = render_prompts(load_prompts(cfg, split="heldout")[:prompts], tokenizer, cfg.prompt_template)
    torch.manual_seed(seed)
    raw = sample_and_verify(HFRollout(model, tokenizer, cfg, torch.device("cpu")), tokenizer, examples, n,
                            cfg.answer_mode, temperature=1.0, top_p=1.0, max_new_tokens=cfg.max_new_tokens)
    out = np.zeros((len(examples), 3))
    for i in range(len(examples)):
        results = raw["results"][i * n:(i + 1) * n]
        counts: dict = {}
        for r in results:
            if r.correct:
                counts[r.key] = counts.get(r.key, 0) + 1
        top = max(counts.values(), default=0)
        correct = sum(counts.values())
        out[i] = (top / n, (correct - top) / n, 1 - correct / n)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--entry", nargs="+", required=True, help="run folders of the entry (one per seed)")
    parser.add_argument("--control", nargs="+", required=True, help="run folders of its same-base control")
    parser.add_argument("--prompts", type=int, default=200)
    parser.add_argument("--n", type=int, default=64)
    args = parser.parse_args(argv)
    entry = np.stack([solution_shares(d, args.prompts, args.n) for d in args.entry])  # [seeds, prompts, 3]
    control = np.stack([solution_shares(d, args.prompts, args.n) for d in args.control])
    print(f"| share of samples ({args.prompts} prompts × {args.n}) | entry | control | difference [95 % CI] |")
    print("|---|---|---|---|")
    for j, name in enumerate(SHARES):
        d = bootstrap_difference(entry[..., j], control[..., j])
        print(f"| {name} | {entry[..., j].mean():.3f} | {control[..., j].mean():.3f} | "
              f"{d['diff']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}] |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
