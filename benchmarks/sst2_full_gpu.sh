#!/usr/bin/env bash
# Issue 4 on the whole SST-2 training set, on one GPU: the dense model and TFWSVD + ft for 2 epochs,
# then LPAF (1 epoch of pruning + 1 of mixed-rank fine-tuning) against it at equal steps, for
# several seeds side by side. Each process gets its share of the cores: three processes with all
# of them each stalled for minutes in the prune stage's CPU work (BENCHMARKS.md, "SST-2 on the
# full training set, on a GPU").
#
#   GLUE_DIR=../shared/data/glue PYTHON=.venv/bin/python bash benchmarks/sst2_full_gpu.sh 42 43 44
#
# Every step resumes from benchmarks/runs/sst2-train67349; logs go to its logs/ folder.
set -euo pipefail
PY=${PYTHON:-.venv/bin/python}
SEEDS=(${@:-42 43 44})
N=67349
RUNS=benchmarks/runs/sst2-train$N
LOGS=$RUNS/logs
mkdir -p "$LOGS"
side_by_side=$(( ${#SEEDS[@]} * 2 - 1 ))
THREADS=$(( $(nproc) / side_by_side )); (( THREADS > 0 )) || THREADS=1

QUALITY=(benchmarks/quality.py --task sst2 --train $N --methods svd,fwsvd,tfwsvd --ratios 0.15 --ft-epochs 2
         --ft-ratios 0.15 --ft-methods tfwsvd --allocation-methods fwsvd --min-rank-shares 0.5)
LPAF=(benchmarks/lpaf.py --task sst2 --train $N --ratios 0.15 --prune-epochs 1 --mrft-epochs 1
      --density-factor 2 --pruned-weight 0.6 --ablations p0 --threads $THREADS)

# the dense model, its Fisher and the factorizations, once, with every core
"$PY" "${QUALITY[@]}" --ft-seed "${SEEDS[0]}" > "$LOGS/quality-${SEEDS[0]}.log" 2>&1
pids=()
for seed in "${SEEDS[@]:1}"; do
  "$PY" "${QUALITY[@]}" --ft-seed "$seed" --threads $THREADS > "$LOGS/quality-$seed.log" 2>&1 & pids+=($!)
done
for seed in "${SEEDS[@]}"; do
  "$PY" "${LPAF[@]}" --seed "$seed" > "$LOGS/lpaf-$seed.log" 2>&1 & pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
(( status == 0 )) || { echo "a run failed: see $LOGS" >&2; exit 1; }
"$PY" benchmarks/equal_steps.py --task sst2 --train $N
