"""Peak tensor memory of one tower forward, counted without running it: the model and inputs live on the meta device
(no data, no FLOPs) and torch's `MemTracker` adds up every storage alive at each moment, weights included.

    python -m benchmarks.memory --mode gundam --tiles 9 --batch 8 --dtype bf16 [--budget-gb 16]

What this counts: parameters plus every activation and temporary the default inference path creates, at the
moment their sum peaks (the figure a caching allocator must hold at least). What it does not: the CUDA context and
library workspaces (cuBLAS, cuDNN; a few hundred MB), allocator rounding and fragmentation. Tensors on the meta
device take the library's non-CPU code paths, as a GPU would (one fused qkv launch, the MLP in one piece); SDPA on
meta is the unfused math form, whose (heads x rows x keys) logits a fused GPU kernel never holds, so attention is
over-counted rather than under-counted.
"""

from __future__ import annotations

import argparse
import sys

import torch
from torch.distributed._tools.mem_tracker import MemTracker

from deepencoder import DeepEncoderConfig, DeepEncoderModel

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# (global view px, tile px) per resolution mode; tiles only where the mode tiles
MODES = {
    "tiny": (512, 0),
    "small": (640, 0),
    "base": (1024, 0),
    "large": (1280, 0),
    "gundam": (1024, 640),
    "gundam-m": (1280, 1024),
}


def peak_bytes(config: DeepEncoderConfig, mode: str, batch: int, tiles: int, dtype: torch.dtype) -> dict[str, int]:
    """{"peak": bytes, "weights": bytes} of `batch` pages of `mode` (with `tiles` tiles each where it tiles)."""
    size, tile_size = MODES[mode]
    with torch.device("meta"):
        model = DeepEncoderModel(config).to(dtype).eval()
        views = torch.empty(batch, 3, size, size, dtype=dtype)
        tile_views = torch.empty(batch * tiles, 3, tile_size, tile_size, dtype=dtype) if tile_size and tiles else None
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    grids = [(tiles, 1)] * batch if tile_views is not None else None
    tracker = MemTracker()
    tracker.track_external(model, views, *([tile_views] if tile_views is not None else []))
    with tracker, torch.inference_mode():
        model(views, pixel_values_tiles=tile_views, tile_grids=grids)
    peak = tracker.get_tracker_snapshot("peak")[torch.device("meta")]["Total"]
    return {"peak": peak, "weights": weights}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=sorted(MODES), default="gundam")
    parser.add_argument("--tiles", type=int, default=9, help="tiles per page (modes that tile)")
    parser.add_argument("--batch", type=int, default=8, help="pages per forward")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--budget-gb", type=float, default=16.0, help="the device memory to compare against")
    args = parser.parse_args(argv)
    result = peak_bytes(DeepEncoderConfig(), args.mode, args.batch, args.tiles, DTYPES[args.dtype])
    gib = 2**30
    size, tile_size = MODES[args.mode]
    tiles = f" + {args.tiles} tiles of {tile_size} px" if tile_size else ""
    print(
        f"{args.batch} x ({size} px global view{tiles}), {args.dtype}: peak {result['peak'] / gib:.2f} GiB "
        f"(weights {result['weights'] / gib:.2f} GiB); {args.budget_gb:g} GB budget: "
        + ("fits" if result["peak"] <= args.budget_gb * 1e9 else "DOES NOT FIT")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
