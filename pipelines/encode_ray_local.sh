#!/usr/bin/env bash
# The Ray engine on this machine (a local Ray instance is started and stopped): one tower actor per GPU.
#   pipelines/encode_ray_local.sh INPUT... --out DIR [--concurrency N]
set -euo pipefail
exec deepencoder encode --engine ray --mode "${MODE:-gundam}" --batch-size "${BATCH_SIZE:-16}" "$@"
