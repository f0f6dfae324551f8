#!/usr/bin/env bash
# The GPU figures the README leaves open, in one run on a CUDA machine (budget: under 10 minutes on an H200).
#
#   bash benchmarks/gpu_session.sh [RESULTS_DIR]        (default: $OUT if set, else benchmarks/results)
#
# Each step has its own time limit and the next one runs whatever the previous gave; the log names the card.
# 1. CUDA branches of the data path against the CPU: uint8 upload + on-device normalisation (bit-identical in fp32),
#    the encode loop with pinned copies / side stream / event-synchronised copy back (pages equal to a CPU run).
# 2. benchmarks.pipeline: end to end, feed-only and tower-only pages/s, first-batch seconds (Base b32, Gundam b8),
#    and `deepencoder encode` itself in a fresh process (--command: seconds from its start to its first batch).
# 3. benchmarks.tower / tower_v2 (quick): kernels, compiled and peers at Base b1 / b32, V2 views.
# 4. if time is left: Gundam b8 again with --views-per-call 16 (the eager bound on a batch's tile passes).
#
# The whole script stops before GPU_SESSION_SECONDS (default 570: a device call is cut at 600 s): each step's limit
# shrinks to the time left and a step with under 30 s left is skipped. The log is also written to RESULTS_DIR, so it
# comes back with the results even if the call is cut.
set -uo pipefail
cd "$(dirname "$0")/.."
results=${1:-${OUT:-benchmarks/results}}
mkdir -p "$results"
exec > >(tee -a "$results/gpu_session.log") 2>&1
budget=${GPU_SESSION_SECONDS:-570}
python3 -c "import torch; print(torch.__version__, torch.cuda.get_device_name(0))" || exit 1

step() {  # step SECONDS NAME COMMAND...
  local limit=$1 name=$2 left=$((budget - SECONDS))
  shift 2
  if ((left < 30)); then
    echo "=== $name: skipped, ${left}s of the session's ${budget}s left"
    return
  fi
  ((limit > left)) && limit=$left
  echo "=== $name (limit ${limit}s)"
  local start=$SECONDS
  timeout "$limit" "$@" 2>&1 | tail -40
  echo "=== $name: exit ${PIPESTATUS[0]}, $((SECONDS - start)) s"
}

step 120 "CUDA data path against the CPU" python3 - <<'EOF'
import tempfile, torch
from pathlib import Path
from PIL import Image, ImageDraw
from deepencoder import DeepEncoderConfig, DeepEncoderImageProcessor, DeepEncoderModel
from deepencoder.pipeline import encode
from deepencoder.pipeline import EncodedPages

processor = DeepEncoderImageProcessor(mode="gundam", base_size=256, tile_size=128)
pixels = torch.randint(0, 256, (4, 3, 256, 256), dtype=torch.uint8)
on_gpu = processor.normalize(pixels.cuda()).cpu()
print("normalise on cuda == cpu, bit for bit:", torch.equal(on_gpu, processor.normalize(pixels)))
config = DeepEncoderConfig(
    sam_config=dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=2, global_attn_indexes=[1, 3],
                    window_size=6, image_size=256, out_channels=32, compressor_channels=[48, 64]),
    clip_config=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128),
    projector_dim=80)
torch.manual_seed(0)
model = DeepEncoderModel(config).eval()
work = Path(tempfile.mkdtemp())
(work / "in").mkdir()
pages = []
for i in range(7):
    page = Image.new("RGB", (500 + 40 * i, 700), "white")
    ImageDraw.Draw(page).text((20, 20), f"page {i} " * 20, fill="black")
    pages.append(page)
pages[0].save(work / "in" / "doc.pdf", save_all=True, append_images=pages[1:])
encode([str(work / "in")], work / "cpu", model, processor, batch_size=3, workers=2, progress=False)
encode([str(work / "in")], work / "cuda", model.cuda(), processor, batch_size=3, workers=2, progress=False)
key = lambda row: (row["source"], row["page"])  # noqa: E731
a = {key(r): r["image_embeds"] for r in EncodedPages(work / "cpu" / "manifest.jsonl")}
b = {key(r): r["image_embeds"] for r in EncodedPages(work / "cuda" / "manifest.jsonl")}
assert a.keys() == b.keys(), (sorted(a), sorted(b))
worst = max(((a[k] - b[k]).abs().max() / a[k].abs().max()).item() for k in a)
print(f"encode on cuda vs cpu, fp32, {len(a)} pages: max relative difference {worst:.2e}")
EOF

step 240 "pipeline Base b32" python3 -m benchmarks.pipeline --tower real --modes base --pages 288 --batch-size 32 \
  --workers 15 --device cuda --compute-dtype bfloat16 --command --out "$results/pipeline-base"
step 150 "pipeline Gundam b8" python3 -m benchmarks.pipeline --tower real --modes gundam --pages 96 --batch-size 8 \
  --workers 15 --device cuda --compute-dtype bfloat16 --command --out "$results/pipeline-gundam"
step 240 "tower (quick)" python3 -m benchmarks.tower --device cuda --dtype bf16 --quick --out "$results"
step 120 "tower V2" python3 -m benchmarks.tower_v2 --device cuda --dtype bf16
step 150 "pipeline Gundam b8, at most 16 views per pass" python3 -m benchmarks.pipeline --tower real --modes gundam \
  --pages 96 --batch-size 8 --workers 15 --device cuda --compute-dtype bfloat16 --views-per-call 16 \
  --out "$results/pipeline-gundam"
