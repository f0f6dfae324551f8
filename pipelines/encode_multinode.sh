#!/usr/bin/env bash
# Several nodes with torchrun. Run on every node with the same MASTER_ADDR and its own NODE_RANK, e.g.
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 pipelines/encode_multinode.sh /data/pdfs --out /shared/runs/pdfs
# Under SLURM: srun --nodes=2 --ntasks-per-node=1 env NODE_RANK=$SLURM_NODEID ... pipelines/encode_multinode.sh ...
set -euo pipefail
exec torchrun \
  --nnodes "${NNODES:?set NNODES}" \
  --node-rank "${NODE_RANK:?set NODE_RANK}" \
  --nproc-per-node "${GPUS_PER_NODE:-8}" \
  --rdzv-backend c10d \
  --rdzv-endpoint "${MASTER_ADDR:?set MASTER_ADDR}:${MASTER_PORT:-29500}" \
  -m deepencoder encode --mode "${MODE:-gundam}" --batch-size "${BATCH_SIZE:-16}" --compute-dtype bfloat16 "$@"
