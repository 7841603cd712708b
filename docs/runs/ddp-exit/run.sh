#!/bin/bash
cd /work/tmp/ddpflake
/work/main/.venv/bin/python -c "
from saelab.store.synthetic import make_synthetic_store
make_synthetic_store('s', d_in=16, n_tokens=24 * 512, chunk_tokens=512, seed=0)" 2>/dev/null
for i in $(seq 1 40); do
  rm -rf out
  OMP_NUM_THREADS=1 /work/main/.venv/bin/python -m torch.distributed.run --nproc_per_node=2 --standalone -m saelab train --data s --out out --quiet --batch-size 64 --tokens 7680 --expansion-factor 2 --k 4 --eval-every 0 --eval-tokens 4096 --checkpoint-every 20 --warmup-steps 5 --init-tokens 1024 --shuffle-chunks 2 --val-fraction 0.2 --lr 3e-3 --log-every 10 > o_$i.txt 2> e_$i.txt
  rc=$?
  echo "$i rc=$rc $(date -u +%T)"
  [ $rc -eq 0 ] && rm -f o_$i.txt e_$i.txt
done
