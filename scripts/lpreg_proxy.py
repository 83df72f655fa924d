"""Does Lp-Reg's min-p proxy have anything to cut? The distribution of Z on real rollout batches.

    python scripts/lpreg_proxy.py [--model toy|toy-numbers|CHECKPOINT] [--batches 4] [--seed 0] [--rho 0.01]

Lp-Reg (lpreg.py) keeps, at every response position, the tokens with p ≥ κ·max p (κ = 0.02) and
renormalises them: Z is the kept mass. On-policy it reshapes a selected token's advantage to A + β(1/Z − 1)
(spec, "What it does"), so the regularizer only acts where Z is clearly below 1 *at the selected tokens*:
the lowest-probability tokens of failed responses (ρ = 1 % of them). This script samples a few rollout
batches of the training setting (16 prompts × 8, T = 1), runs one forward over them and prints, over all
response positions:

  * quantiles of Z and its mean removed mass 1 − Z, the share of positions with Z < 0.99 / 0.9 / 0.5;
  * the size of the keep set |K| and of the "tail" (tokens below κ·max p);
  * the same at the tokens Lp-Reg selects (lpreg.select_tokens at --rho, with the batch's GRPO advantages),
    whose mean of 1/Z − 1 is the push per unit β.

Character toy vs whole-number toy on the same prompts is the comparison README "Lp-Reg on whole-number
tokens" reports.
"""

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import lpreg  # noqa: E402
import train  # noqa: E402
from grpo import group_advantages  # noqa: E402


@torch.no_grad()
def position_stats(model, batch, kappa: float) -> dict:
    """Per valid response position [N]: Z (kept mass), |K| (kept tokens) and the sampled token's log p."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    P, T = batch["prompt_len"], batch["response_mask"].shape[1]
    logits = out.logits[:, P - 1:P - 1 + T].float()  # the logits that predicted each response token
    logp_all = torch.log_softmax(logits, dim=-1)
    kept = logp_all >= logp_all.max(dim=-1, keepdim=True).values + math.log(kappa)  # p ≥ κ·max p (raw = T 1)
    z = (logp_all.exp() * kept).sum(-1)
    targets = batch["input_ids"][:, P:P + T]
    logp = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    # log π_proxy of the sampled token (log p − log Z where kept, else "noise"): the function training uses
    V = logits.shape[-1]
    proxy = lpreg.proxy_logp(logits.reshape(-1, V), logits.reshape(-1, V), torch.logsumexp(logits, -1).reshape(-1),
                             targets.reshape(-1), kappa=kappa).reshape(targets.shape)
    return {"z": z, "kept": kept.sum(-1).float(), "logp": logp, "proxy": proxy, "vocab": logits.shape[-1]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="toy", help="'toy', 'toy-numbers' (warm starts) or a checkpoint folder")
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rho", type=float, default=0.01, help="Lp-Reg's ρ: share of negative tokens ranked")
    parser.add_argument("--kappa", type=float, default=0.02, help="the min-p ratio κ")
    parser.add_argument("--out", default="/tmp/lpreg_proxy", help="scratch run folder (overwritten)")
    args = parser.parse_args(argv)
    cfg, overrides = train.parse_args(["--method", "grpo", "--model", args.model, "--seed", str(args.seed),
                                       "--out", args.out, "--overwrite", "--max-new-tokens", "40",
                                       "--no-final-eval", "--no-progress", "--no-tensorboard"])
    trainer = train.Trainer(cfg, overrides)
    G = cfg.group_size
    zs, ks, zs_sel, n_valid, n_sel, pass1 = [], [], [], 0, 0, []
    vocab = None
    for _ in range(args.batches):
        batch, _ = trainer.rollout_batch()
        stats = position_stats(trainer.model, batch, args.kappa)
        vocab = stats["vocab"]
        valid = batch["response_mask"].bool()
        adv = group_advantages(batch["correct"], G)
        selected = lpreg.select_tokens(stats["logp"], adv, valid.float(), stats["proxy"], args.rho)
        zs.append(stats["z"][valid])
        ks.append(stats["kept"][valid])
        zs_sel.append(stats["z"][selected & valid])
        n_valid += int(valid.sum())
        n_sel += int((selected & valid).sum())
        pass1.append(float(batch["correct"].mean()))
    z, k, z_sel = torch.cat(zs).numpy(), torch.cat(ks).numpy(), torch.cat(zs_sel).numpy()
    q = np.quantile(z, [0.01, 0.1, 0.5, 0.9])
    print(f"model {args.model}: vocabulary {vocab}, {args.batches} batches of {cfg.prompts_per_step}×{G}, "
          f"{n_valid} response positions, training reward {np.mean(pass1):.3f}")
    print(f"Z over all positions: mean removed mass 1 − Z = {1 - z.mean():.4f}; quantiles 1/10/50/90 % = "
          f"{q[0]:.4f} / {q[1]:.4f} / {q[2]:.4f} / {q[3]:.4f}; share with Z < 0.99: {np.mean(z < 0.99):.3f}, "
          f"< 0.9: {np.mean(z < 0.9):.3f}, < 0.5: {np.mean(z < 0.5):.3f}")
    print(f"keep set |K| (tokens with p ≥ κ·max p): mean {k.mean():.2f}, max {int(k.max())}; "
          f"tail (tokens cut) mean {vocab - k.mean():.0f} of {vocab}")
    if len(z_sel):
        print(f"selected tokens (ρ = {args.rho}): {n_sel} = {n_sel / n_valid:.4f} of positions; at them mean Z = "
              f"{z_sel.mean():.4f}, Z < 0.9 at {np.mean(z_sel < 0.9):.2f}; push per unit β, mean(1/Z − 1) = "
              f"{np.mean(1 / z_sel - 1):.4f}")
    else:
        print(f"selected tokens (ρ = {args.rho}): none")
    return 0


if __name__ == "__main__":
    sys.exit(main())
