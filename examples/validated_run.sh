#!/usr/bin/env bash
# The validated run of docs/results.md: the same spec, seed and batches in both twins, a non-looped
# baseline (the same spec and parameters, trained and evaluated with 1 loop step), a torch run with a
# random loop count per batch (1..8, recurrent-depth training), then evaluation and plots.
# Run from the repository root; PY defaults to .venv/bin/python.
set -euo pipefail
# one thread per process: four runs share two cores, and oversubscribed threads made torch ~10x slower
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
PY=${PY:-.venv/bin/python}
OUT=${OUT:-out/validated}
STEPS=${STEPS:-2000}        # torch, jax and the baseline
RD_STEPS=${RD_STEPS:-2000}  # the random-depth run
mkdir -p "$OUT"
COMMON=(examples/modadd-small.yaml --task modadd --difficulty 1-4 --batch-size 64 --lr 2e-3
        --warmup 100 --seed 0 --checkpoint-every 500 --eval-difficulty 1-8)
$PY -m mythos.cli train "${COMMON[@]}" --steps "$STEPS" --backend torch --out "$OUT/torch" > "$OUT.torch.txt" 2>&1 &
$PY -m mythos.cli train "${COMMON[@]}" --steps "$STEPS" --backend jax --out "$OUT/jax" > "$OUT.jax.txt" 2>&1 &
$PY -m mythos.cli train "${COMMON[@]}" --steps "$STEPS" --backend torch --loops-min 1 --loops-max 1 --eval-loops 1 \
    --out "$OUT/baseline" > "$OUT.baseline.txt" 2>&1 &
$PY -m mythos.cli train "${COMMON[@]}" --steps "$RD_STEPS" --backend torch --loops-min 1 --loops-max 8 \
    --out "$OUT/random-depth" > "$OUT.random-depth.txt" 2>&1 &
wait
$PY examples/report.py "$OUT"
