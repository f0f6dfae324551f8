"""The resolution modes: one table (name -> global view, tile size, crop bound, token layout), read by the image
processor, the model configs and the command line. Plain data: importing it imports nothing else."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class ResolutionMode:
    """How a page becomes views.

    base_size: side of the global view (`native`: its long side). global_view: `resize` (stretch to a square),
    `pad` (aspect-preserving `ImageOps.pad` to a square) or `native` (aspect kept, sides multiples of the token
    size, no padding). tile_size: side of the local tiles, or None for no tiling. max_crops: most tiles of a tiled
    page (candidate grids hold 2..max_crops tiles). layout: `grid` (DeepEncoder v1: token rows + newlines) or
    `queries` (DeepEncoder V2: each view gives (side / 64)**2 query tokens, no newlines).
    """

    name: str
    base_size: int
    global_view: Literal["resize", "pad", "native"]
    tile_size: int | None = None
    max_crops: int = 9
    layout: Literal["grid", "queries"] = "grid"


RESOLUTION_MODES: dict[str, ResolutionMode] = {
    mode.name: mode
    for mode in (
        ResolutionMode("tiny", 512, "resize"),
        ResolutionMode("small", 640, "resize"),
        ResolutionMode("base", 1024, "pad"),
        ResolutionMode("large", 1280, "pad"),
        ResolutionMode("gundam", 1024, "pad", 640),
        ResolutionMode("gundam-m", 1280, "pad", 1024),
        ResolutionMode("native", 1024, "native"),
        # DeepEncoder V2 (DeepSeek-OCR-2): 768 px tiles when a side exceeds 768, 2..6 of them
        ResolutionMode("ocr2", 1024, "pad", 768, max_crops=6, layout="queries"),
        ResolutionMode("ocr2-base", 1024, "pad", layout="queries"),
    )
}

AUTO = "auto"  # per page, the cheapest of `auto_modes` that keeps the page readable (image_processing_auto_mode)
DEFAULT_AUTO_MODES = ("tiny", "small", "base", "large", "gundam")  # DeepEncoder v1's modes a page may get
V2_AUTO_MODES = ("ocr2-base", "ocr2")  # DeepEncoder V2's: one global view, or with 768 px tiles
DEFAULT_MAX_COMPRESSION = 10.0  # most estimated text tokens per vision token (~97% precision in DeepSeek-OCR's paper)
