#!/usr/bin/env bash
# Issue 4 on the whole SST-2 training set, on one GPU: the dense model and TFWSVD + ft for 2 epochs,
# then LPAF (1 epoch of pruning + 1 of mixed-rank fine-tuning) against it at equal steps, for
# several seeds, each side a `lowrank sweep` of a spec under benchmarks/specs/ (the sweep splits the
# cores among its workers; BENCHMARKS.md, "SST-2 on the full training set, on a GPU").
#
#   GLUE_DIR=../shared/data/glue PYTHON=.venv/bin/python bash benchmarks/sst2_full_gpu.sh 42 43 44
#
# Every step resumes from the store (artifacts/store/).
set -euo pipefail
PY=${PYTHON:-.venv/bin/python}
SEEDS=(${@:-42 43 44})
N=67349

# Each seed is one sweep per side; the dense model and its Fisher come from the store after the first.
for seed in "${SEEDS[@]}"; do
  "$PY" benchmarks/quality.py --task sst2 --train $N --ft-epochs 2 --ft-seed "$seed" --spec benchmarks/specs/sst2-full-quality.yaml
  "$PY" benchmarks/lpaf_ablations.py --task sst2 --train $N --prune-epochs 1 --mrft-epochs 1 --density-factor 2 --pruned-weight 0.6 \
    --seed "$seed" --spec benchmarks/specs/sst2-full-lpaf.yaml
done
"$PY" benchmarks/equal_steps.py --task sst2 --train $N
