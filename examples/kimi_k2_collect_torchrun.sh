#!/usr/bin/env bash
# Collect layer-N residual activations of Kimi-K2 on 4 nodes with torchrun: one rank per node, each
# rank one writer holding one copy of the model spread over its node's GPUs (--device auto), all
# writing into one store on a shared disk. torchrun sets RANK and WORLD_SIZE; saelab takes
# shard = RANK and num_shards = WORLD_SIZE from them, so the store is the one four hand-started
# `--shard r --num-shards 4` writers give (examples/kimi_k2_collect.sh does that by hand).
#
# Run the same command on every node (NODE_RANK 0..3; MASTER_ADDR = node 0's address):
#   MASTER_ADDR=node0 NODE_RANK=2 bash examples/kimi_k2_collect_torchrun.sh
#
# Why one process per node: a Kimi-K2 copy (~1T parameters, ~1 TB in fp8 / 2 TB in bf16) needs all
# 8 GPUs of a node, so `--nproc-per-node 8 --device cuda` (one GPU per rank, right for a model that
# fits one GPU) would not fit; saelab refuses --device auto with more than one rank per node.
# The ranks never talk to each other during collection (the rendezvous only hands out ranks, and
# --verify makes rank 0 wait for the others with one barrier).
# Re-running the same command after a crash resumes each shard from its last complete chunk.
# Watch progress with:  saelab monitor "$OUT" --watch 10      Check it with: saelab verify "$OUT"
set -euo pipefail

MODEL=${MODEL:-moonshotai/Kimi-K2-Instruct}   # or a local directory with the weights (on every node)
LAYER=${LAYER:-30}
CORPUS=${CORPUS:-champ-cot}
OUT=${OUT:-/shared/data/kimi_k2_layer${LAYER}}   # the same shared directory on every node, or the same
                                                 # s3://bucket/path (pip install 'saelab[s3]'; docs/scale-out.md)
TOKENS=${TOKENS:-1B}
NNODES=${NNODES:-4}

torchrun --nnodes "$NNODES" --nproc-per-node 1 --node-rank "${NODE_RANK:?set NODE_RANK (0..NNODES-1)}" \
  --master-addr "${MASTER_ADDR:?set MASTER_ADDR to node 0}" --master-port "${MASTER_PORT:-29500}" \
  -m saelab collect --model "$MODEL" --layer "$LAYER" --corpus "$CORPUS" --out "$OUT" --tokens "$TOKENS" \
  --chunk-tokens 262144 --max-length 1024 --batch-size 4 --dtype bfloat16 --device auto --verify --quiet
