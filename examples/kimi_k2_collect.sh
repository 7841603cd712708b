#!/usr/bin/env bash
# Collect layer-N residual activations of Kimi-K2 (DeepseekV3 architecture, 61 layers, d_model 7168)
# with 4 writer processes, one per node or per group of GPUs, all writing into one store on a shared
# disk. Each writer spreads the model over its GPUs with accelerate's device map (--device auto).
#
#   bash examples/kimi_k2_collect.sh            # starts shards 0..3 here, one per GPU group
#   SHARD=2 bash examples/kimi_k2_collect.sh    # on a multi-node cluster: run one shard per node
#
# The same layout launched by torchrun on 4 nodes: examples/kimi_k2_collect_torchrun.sh.
# Re-running the same command after a crash resumes each shard from its last complete chunk.
# Watch progress with:  saelab monitor "$OUT" --watch 10
# Check the result with: saelab verify "$OUT"
set -euo pipefail

MODEL=${MODEL:-moonshotai/Kimi-K2-Instruct}   # or a local directory with the weights
LAYER=${LAYER:-30}
CORPUS=${CORPUS:-champ-cot}
OUT=${OUT:-data/kimi_k2_layer${LAYER}}
TOKENS=${TOKENS:-50M}
NUM_SHARDS=4
GPUS_PER_SHARD=${GPUS_PER_SHARD:-2}

run_shard() {
  local s=$1
  local first=$((s * GPUS_PER_SHARD))
  local gpus
  gpus=$(seq -s, "$first" $((first + GPUS_PER_SHARD - 1)))
  CUDA_VISIBLE_DEVICES=$gpus saelab collect --model "$MODEL" --layer "$LAYER" --corpus "$CORPUS" \
    --out "$OUT" --tokens "$TOKENS" --chunk-tokens 262144 --max-length 1024 --batch-size 4 \
    --dtype bfloat16 --device auto --shard "$s" --num-shards "$NUM_SHARDS" --quiet
}

if [ -n "${SHARD:-}" ]; then
  run_shard "$SHARD"
else
  for s in $(seq 0 $((NUM_SHARDS - 1))); do run_shard "$s" & done
  wait
  saelab verify "$OUT"
fi
