#!/usr/bin/env bash
# Depth extrapolation on prefix parity (docs/results.md "Depth extrapolation", issue #14): train looped
# models on 1..10 bits with the loop count tied to the difficulty (T(d) = d + U{0..2}) and the last-state
# readout, NoPE and RoPE side by side (3 seeds each), baselines with the same parameters (1 loop; a fixed 12
# loops), a full-attention control, a PonderNet run, DeepThinking's progressive loss (12 loops, the last 4
# with gradient), and the JAX twin on the headline recipe; then
# evaluate 15 difficulties in 4..30 at every inference step 1..40 (one pass of step-wise logits) and plot.
# Each training takes a few minutes on one core (the model has ~0.1M parameters). Run from the repository
# root; PY defaults to .venv/bin/python, OUT to out/depth, JOBS (parallel trainings) to 2.
set -euo pipefail
# one thread per process: the runs share the cores
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
PY=${PY:-.venv/bin/python}
OUT=${OUT:-out/depth}
STEPS=${STEPS:-1500}
JAX_STEPS=${JAX_STEPS:-$STEPS}
JOBS=${JOBS:-2}
ONLY=${ONLY:-}              # e.g. ONLY="nope-s0 jax-nope-s0": train only these runs (the report reads every run in OUT)
mkdir -p "$OUT"
D=examples/depth
COMMON=(--task pparity --difficulty 1-10 --batch-size 64 --lr 2e-3 --warmup 100 --checkpoint-every 500
        --eval-difficulty 4-20 --eval-loops 22)
TIED=(--loop-plan difficulty --loops-extra 2)

# arm name | spec | extra flags  (one line per training)
runs=(
  "nope-s0|$D/pparity-nope.yaml|--seed 0 ${TIED[*]}"
  "nope-s1|$D/pparity-nope.yaml|--seed 1 ${TIED[*]}"
  "nope-s2|$D/pparity-nope.yaml|--seed 2 ${TIED[*]}"
  "rope-s0|$D/pparity-rope.yaml|--seed 0 ${TIED[*]}"
  "rope-s1|$D/pparity-rope.yaml|--seed 1 ${TIED[*]}"
  "rope-s2|$D/pparity-rope.yaml|--seed 2 ${TIED[*]}"
  "one-loop-s0|$D/pparity-nope.yaml|--seed 0 --loops-min 1 --loops-max 1"
  "fixed12-s0|$D/pparity-nope.yaml|--seed 0 --loops-min 12 --loops-max 12"
  "nope-full-s0|$D/pparity-nope-full.yaml|--seed 0 ${TIED[*]}"
  "ponder-s0|$D/pparity-ponder.yaml|--seed 0 --loops-min 13 --loops-max 13"
  "progressive-s0|$D/pparity-nope.yaml|--seed 0 --loop-plan progressive --progressive-k 4"
  "jax-nope-s0|$D/pparity-nope.yaml|--seed 0 ${TIED[*]} --backend jax"
)

train() {  # name|spec|flags
  IFS='|' read -r name spec flags <<< "$1"
  local steps=$STEPS
  [[ $name == jax-* ]] && steps=$JAX_STEPS
  [[ $flags == *--backend* ]] || flags="$flags --backend torch"
  # shellcheck disable=SC2086
  $PY -m mythos.cli train "$spec" "${COMMON[@]}" --steps "$steps" $flags --out "$OUT/$name" \
      > "$OUT/$name.txt" 2>&1 && echo "done: $name" || { echo "FAILED: $name (see $OUT/$name.txt)"; return 1; }
}

started=$(date +%s)
status=0
for run in "${runs[@]}"; do
  [[ -z $ONLY || " $ONLY " == *" ${run%%|*} "* ]] || continue
  while (( $(jobs -rp | wc -l) >= JOBS )); do wait -n || status=1; done
  train "$run" &
done
while (( $(jobs -rp | wc -l) > 0 )); do wait -n || status=1; done
echo "trainings: $(( $(date +%s) - started )) s"
[[ ${REPORT:-1} == 1 ]] && $PY examples/depth_report.py "$OUT"
exit $status
