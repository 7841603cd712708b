#!/bin/bash
# usage: faithful_ctl.sh TAG: the faithful plan's matched control (and any run no other process holds)
echo "start $1 $(date -u +%FT%H:%M:%S) $(git -C /work/main rev-parse --short HEAD)"; t0=$(date +%s)
OMP_NUM_THREADS=1 SAELAB_TORCH_THREADS=1 /work/main/.venv/bin/saelab experiment rkcnn-arms --plan faithful \
  --arms data_rows-seed --data /work/data/rk/l15 --seeds 5 --out /work/data/rk/runs/faithful -v
echo "end $1 rc=$? $(( $(date +%s) - t0 )) s $(date -u +%FT%H:%M:%S)"
