#!/usr/bin/env bash
# One machine, one process (the GPU if there is one, else the CPU).
#   pipelines/encode_local.sh scans/ books/*.pdf --out runs/scans [--weights /path/to/DeepSeek-OCR] [--mode gundam]
set -euo pipefail
exec deepencoder encode --mode "${MODE:-gundam}" --batch-size "${BATCH_SIZE:-8}" --workers "${WORKERS:-4}" "$@"
