#!/usr/bin/env bash
# Issue 21, item 2: the demo's forward rows run (act k=1 6000 steps, forward k=1 3000, act k=16 800: 1.1-1.6x the demo's quiet-machine steps, 4-8x what a 20 s demo row got under load ~10-18),
# with the gradient check at every evaluation (40 of them), 2 seeds each.
#   experiments/stability/measure.sh OUT_ROOT [extra Hydra overrides for every run]
# The two sets of results/stability (+experiment=demo now sets optimizer.schedule=cosine,
# which without a time budget is optax's cosine over train.steps):
#   experiments/stability/measure.sh outputs/stability/constant optimizer.schedule=constant
#   experiments/stability/measure.sh outputs/stability/cosine optimizer.schedule=cosine
# Runs every (row, seed) one after the other; each run's directory is OUT_ROOT/<row>_s<seed>.
set -euo pipefail
out=$1; shift
PY=${PY:-/work/main/.venv/bin/python}
ROWS=${ROWS:-"act1 fwd1 act16"}
SEEDS=${SEEDS:-"0 1"}
for row in $ROWS; do
  case $row in
    act1)  steps=6000; o="estimator=forward estimator.perturbation=activity optimizer.lr=0.03" ;;
    fwd1)  steps=3000;  o="estimator=forward estimator.num_tangents=1 optimizer.lr=0.2" ;;
    act16) steps=800;  o="estimator=forward estimator.perturbation=activity estimator.num_tangents=16 estimator.aggregation=orthogonal optimizer.lr=0.1" ;;
    *) echo "unknown row $row" >&2; exit 2 ;;
  esac
  every=$((steps / 40))
  for seed in $SEEDS; do
    $PY experiments/train.py +experiment=demo $o seed=$seed train.steps=$steps \
      train.log_every=$every train.eval_every=$every train.grad_check_every=$every \
      hydra.run.dir="$out/${row}_s$seed" "$@" > /dev/null 2>&1 || echo "FAILED $row $seed"
    echo "$(date +%T) done $row s$seed"
  done
done
