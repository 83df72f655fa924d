#!/usr/bin/env bash
# Five seeds where the differences are small (issue 16): at their toy strengths, the entropy bonus (c = 0.01)
# and Lp-Reg (β = 100), whose 3-seed intervals came closest to 0, and DSDR (λ_d = λ_ℓ = 0.01, the `make
# train` method), with the two same-base controls; seeds 0-4, the same settings as scripts/toy_study.sh.
# (ARM α = 0.3 and SENT's release β kept 3 seeds: their intervals were further from 0.) Runs already in OUT
# (seeds 0-2 of scripts/toy_study.sh) are reused, so after that study this trains seeds 3 and 4 only
# (10 runs, two processes of one thread).
#
#   scripts/toy_study_five_seeds.sh [OUT]      # default OUT = studies/toy (the folder toy_study.sh filled)
#   python study.py report OUT/study.json --out docs/studies/toy-5seeds   # the tables and figures again
# (the last call writes OUT/study.json for these entries only: copy the 3-seed one first if you need it)
set -euo pipefail
OUT=${1:-studies/toy}
PY=${PY:-.venv/bin/python}
export OMP_NUM_THREADS=1
COMMON=(--seeds 5 --steps 100 --no-progress --out "$OUT")
TRAIN=(-- --eval-prompts 200 --eval-samples 64 --no-eval-diversity --no-tensorboard)

CONTROLS="grpo:eps_high=0.28:agg=token-mean,grpo:eps_low=1.0:eps_high=9.0:agg=token-mean"
ENTRIES="dsdr:lambda_d=0.01:lambda_l=0.01,entropy:coef=0.01,lpreg:beta=100"

mkdir -p "$OUT"
"$PY" study.py study --methods "$CONTROLS" --eval-every 25 "${COMMON[@]}" "${TRAIN[@]}" > "$OUT/five_a.log" 2>&1 &
A=$!
"$PY" study.py study --methods "$ENTRIES" --eval-every 100 "${COMMON[@]}" "${TRAIN[@]}" > "$OUT/five_b.log" 2>&1 &
B=$!
wait $A $B
"$PY" study.py study --methods "$CONTROLS,$ENTRIES" --eval-every 100 "${COMMON[@]}" "${TRAIN[@]}"
