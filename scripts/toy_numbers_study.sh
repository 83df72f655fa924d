#!/usr/bin/env bash
# Lp-Reg on the whole-number toy (issue 16, item 6): the same study as scripts/toy_study.sh, on
# `--model toy-numbers` (toy.py's 1,012-token vocabulary with a label-smoothed warm start, where the min-p
# proxy has a tail to cut: `python scripts/lpreg_proxy.py --model toy-numbers [--rho 0.1]`), for Lp-Reg at
# the paper's values, at ρ = 0.1 (at ρ = 0.01 the lowest-probability negative tokens are all below the min-p
# cut, so none is selected) with β = 1 and 10, and its same-base control; 3 seeds, 100 steps, held-out
# 200 prompts x 64 samples. Two processes, one CPU thread each.
#
#   scripts/toy_numbers_study.sh [OUT]     # default OUT = studies/toy-numbers (12 runs)
#   python study.py report OUT/study.json --out docs/studies/toy-numbers   # the tables and figures again
set -euo pipefail
OUT=${1:-studies/toy-numbers}
PY=${PY:-.venv/bin/python}
SEEDS=${SEEDS:-3}
export OMP_NUM_THREADS=1
COMMON=(--seeds "$SEEDS" --steps 100 --no-progress --out "$OUT")
TRAIN=(-- --model toy-numbers --eval-prompts 200 --eval-samples 64 --no-eval-diversity --no-tensorboard)

CONTROL="grpo:eps_low=1.0:eps_high=9.0:agg=token-mean"
HALF_A="lpreg:beta=1"
HALF_B="lpreg:rho=0.1:beta=1|10"

mkdir -p "$OUT"
( "$PY" study.py study --methods "$CONTROL" --eval-every 25 "${COMMON[@]}" "${TRAIN[@]}" \
  && "$PY" study.py study --methods "$HALF_A" --eval-every 100 "${COMMON[@]}" "${TRAIN[@]}" ) > "$OUT/process_a.log" 2>&1 &
A=$!
"$PY" study.py study --methods "$HALF_B" --eval-every 100 "${COMMON[@]}" "${TRAIN[@]}" > "$OUT/process_b.log" 2>&1 &
B=$!
wait $A $B
# every run is finished now: this call trains nothing and writes study.md / study.json / effects / figures
"$PY" study.py study --methods "$CONTROL,$HALF_A,$HALF_B" --eval-every 100 "${COMMON[@]}" "${TRAIN[@]}"
