"""How big are DSDR's two terms next to the policy gradient? Gradient norms on real rollout batches.

    python scripts/dsdr_terms.py [--model toy|CHECKPOINT] [--batches 8] [--seed 0]

On each of a few rollout batches of the toy (16 prompts × 8, DSDR's defaults, λ_ℓ set to 1 to measure the
local term per unit of λ_ℓ) the update's gradient is taken three times on the *same* batch, without an
optimiser step:
  g_pg       the policy-gradient term with DSDR's shaped rewards (λ_ℓ = 0);
  g_local    the local term L_local of Eq. 16 alone (λ_ℓ = 1 minus λ_ℓ = 0);
  g_pg_all   the policy-gradient term from the all-correct groups only (other rows' advantages set to 0):
             with λ_d = 0 GRPO gives those groups no signal; DSDR's bonus is what puts it there.
It prints per batch and on average the share of all-correct groups, ‖g_pg_all‖ / ‖g_pg‖, and
‖g_local‖ / ‖g_pg‖ per unit λ_ℓ, so the ratio at a given λ_ℓ is λ_ℓ times it (the term is linear in λ_ℓ).
"""

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import train  # noqa: E402


def flat_grad(model) -> torch.Tensor:
    return torch.cat([p.grad.detach().flatten() for p in model.parameters() if p.grad is not None])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="toy", help="'toy' (the warm start) or a checkpoint folder")
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lambda-d", default="0.001", help="DSDR's λ_d for the shaped rewards")
    parser.add_argument("--out", default="/tmp/dsdr_terms", help="scratch run folder (overwritten)")
    args = parser.parse_args(argv)
    cfg, overrides = train.parse_args(["--method", "dsdr", "--model", args.model, "--lambda-l", "1", "--lambda-d",
                                       args.lambda_d, "--seed", str(args.seed), "--out", args.out, "--overwrite",
                                       "--max-new-tokens", "40",  # the toy's budget (a checkpoint is not "toy")
                                       "--no-final-eval", "--no-progress", "--no-tensorboard", "--paper-defaults"])
    trainer = train.Trainer(cfg, overrides)
    grads = {}
    train.clip_and_step = lambda model, *a, **k: (grads.__setitem__("g", flat_grad(model)), (0.0, False))[1]
    method, G = trainer.method, cfg.group_size
    rows_out = []
    for b in range(args.batches):
        batch, _ = trainer.rollout_batch()
        rewards = batch["rewards"] = method.shape_rewards(batch)
        adv = method.advantages(batch, rewards).to(torch.float32)
        all_correct = batch["correct"].reshape(-1, G).bool().all(dim=1).repeat_interleave(G)
        rows = list(range(len(batch["texts"])))
        measured = {}
        for name, lambda_l, advantages in (("pg", 0.0, adv), ("full", 1.0, adv),
                                           ("pg_all", 0.0, adv * all_correct.float())):
            method.cfg.lambda_l = lambda_l
            batch["advantages"] = advantages.clone()
            trainer.model.zero_grad(set_to_none=True)
            trainer.update(batch, rows)
            measured[name] = grads["g"].clone()
        method.cfg.lambda_l = 1.0
        pg = measured["pg"].norm()
        row = (float(all_correct.float().mean()), float(measured["pg_all"].norm() / pg),
               float((measured["full"] - measured["pg"]).norm() / pg))
        rows_out.append(row)
        print(f"batch {b}: all-correct groups {row[0]:.3f}, ‖g_pg_all‖/‖g_pg‖ {row[1]:.4f}, "
              f"‖g_local‖/‖g_pg‖ per unit λ_ℓ {row[2]:.4f}", flush=True)
    mean = np.mean(rows_out, axis=0)
    print(f"mean over {args.batches} batches: all-correct groups {mean[0]:.3f}, ‖g_pg_all‖/‖g_pg‖ {mean[1]:.4f}, "
          f"‖g_local‖/‖g_pg‖ per unit λ_ℓ {mean[2]:.4f} (so {mean[2] * 1e-3:.1e} at the paper's λ_ℓ = 0.001)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
