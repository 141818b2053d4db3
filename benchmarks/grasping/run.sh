#!/usr/bin/env bash
# The grasping benchmark, end to end: BC base -> Flow-GRPO -> expert / base / RL-tuned on the same
# 200 held-out seeds (and OOD placements). One thread per process (a 2-core machine).
# Usage: bash benchmarks/grasping/run.sh [RL_STEPS]   (from the repository root)
set -euo pipefail
export OMP_NUM_THREADS=1
RL_STEPS=${1:-450}
FC=.venv/bin/flowcoach
mkdir -p runs

# 1. The base, remade with the shipped domains/grasping/base's flags into runs/ (the shipped one is
#    left as it is): 30 noisy expert demos, 1000 flow-matching steps.
BASE=runs/benchmarks/grasping-base
/usr/bin/time -v $FC pretrain grasping --steps 1000 --eval-samples 200 --eval-num-steps 10 \
    --output $BASE 2> runs/grasping_pretrain.time

# 2. Flow-GRPO on episodes (G episodes per reset seed, success + 0.02 x env return).
OUT=runs/benchmarks/grasping
start=$(date +%s)
/usr/bin/time -v $FC train grasping --base $BASE --algo flow-grpo --steps "$RL_STEPS" \
    --groups-per-step 16 --group-size 8 --sampler.num-steps 10 --sampler.eval-num-steps 10 \
    --sampler.noise-level 0.7 --sampler.logprob-reduction sum --optim.lr 1e-4 --optimizer-steps-per-epoch 4 \
    --eval-samples 100 --eval-every 10 --sample-every 0 --checkpoint-every 10 --keep-checkpoints 20 \
    --no-tensorboard --output-dir "$OUT" 2> runs/grasping_rl.time
wall=$(( $(date +%s) - start ))
RUN=$(ls -d "$OUT"/grasping__flow-grpo__0__* | tail -n 1)

# 3. Expert, base and RL-tuned on the same 200 held-out seeds.
.venv/bin/python benchmarks/grasping/evaluate.py --run "$RUN" --base $BASE --wall-seconds "$wall" \
    --out benchmarks/results/grasping.json
