#!/usr/bin/env bash
# The toy study behind README "Results on the toy" and docs/studies/toy/ (issue 16): every mechanism's
# strength on a log grid, each against its same-base control, 3 seeds, 100 steps, the held-out evaluation
# on all 200 held-out prompts x 64 samples. Two processes, one CPU thread each (on 2 cores this is faster
# than one process with two threads); they share the output folder and skip each other's runs.
#
#   scripts/toy_study.sh [OUT]          # default OUT = studies/toy; about 100 min on 2 cores (66 runs)
#   python study.py report OUT/study.json --out docs/studies/toy    # the tables and figures again
#
# The controls are evaluated every 25 steps (their points over training are the "stop GRPO early"
# line of the frontier figure); the other entries at the end (step 0 is the shared starting policy).
set -euo pipefail
OUT=${1:-studies/toy}
PY=${PY:-.venv/bin/python}
SEEDS=${SEEDS:-3}
export OMP_NUM_THREADS=1
COMMON=(--seeds "$SEEDS" --steps 100 --no-progress --out "$OUT")
TRAIN=(-- --eval-prompts 200 --eval-samples 64 --no-eval-diversity --no-tensorboard)

CONTROLS="grpo:eps_high=0.28:agg=token-mean,grpo:eps_low=1.0:eps_high=9.0:agg=token-mean"
HALF_A="dsdr:lambda_l=0:lambda_d=0.001|0.01|0.1,dsdr:lambda_d=0:lambda_l=0.001|0.01|0.1,lpreg:beta=1|100,lpreg:kappa=0.3,dsdr:lambda_d=0.01:lambda_l=0.01"
HALF_B="arm:alpha=0.3|1|3,entropy:coef=0.001|0.01|0.1,entropy:adaptive,sent:eps_high=0.28:beta_high=0|0.2|1:beta_low=0|0.05|0.25"

mkdir -p "$OUT"
( "$PY" study.py study --methods "$CONTROLS" --eval-every 25 "${COMMON[@]}" "${TRAIN[@]}" \
  && "$PY" study.py study --methods "$HALF_A" --eval-every 100 "${COMMON[@]}" "${TRAIN[@]}" ) > "$OUT/process_a.log" 2>&1 &
A=$!
"$PY" study.py study --methods "$HALF_B" --eval-every 100 "${COMMON[@]}" "${TRAIN[@]}" > "$OUT/process_b.log" 2>&1 &
B=$!
wait $A $B
# every run is finished now: this call trains nothing and writes study.md / study.json / effects / figures
"$PY" study.py study --methods "$CONTROLS,$HALF_A,$HALF_B" --eval-every 100 "${COMMON[@]}" "${TRAIN[@]}"
