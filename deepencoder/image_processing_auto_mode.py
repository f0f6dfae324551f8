"""`mode="auto"`: how many text tokens a page holds, and the cheapest resolution mode that keeps it readable.

DeepSeek-OCR's paper measures decoding precision against the compression ratio (text tokens / vision tokens): about
97% under 10x, about 87% near 12-13x, about 60% at 20x. The processor and `deepencoder encode --mode auto` pick, per
page, the cheapest allowed mode whose vision tokens keep the page at or under a target ratio (`choose_mode`).

The text tokens come from, in order of preference:
- `tokenizer`: the page's text counted exactly by a tokenizer (any object with `encode(text)`, e.g. a local
  transformers tokenizer directory loaded offline);
- `text-layer`: the page's text (a PDF's text layer, or text the caller gives) turned into tokens by
  `rule_text_tokens`: DeepSeek's published approximation for its tokenizers, 0.3 tokens per character of
  English and other alphabetic text (about 3.3 characters per token) and 0.6 per CJK character, whitespace runs
  counted as one character;
- `pixels`: an estimate from the page's pixels alone (`estimate_pixel_text_tokens`): the page is binarised, ruling
  lines and filled areas removed, cut into text lines (recursive XY cuts), and each line's length counted in line
  heights; characters = `chars_per_line_height` * sum(width / height), fitted on rendered pages whose text is known (`benchmarks/auto_mode.py` regenerates the pages and the fit, `PixelCalibration`).

Only numpy and Pillow are used here; nothing imports a model.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from PIL import Image

from .image_processing_modes import DEFAULT_MAX_COMPRESSION

ESTIMATE_SOURCES = ("tokenizer", "text-layer", "pixels")

# DeepSeek's API documentation ("Token & Token Usage"): 1 English character ~ 0.3 token, 1 Chinese character ~ 0.6
# token. DeepSeek-OCR's decoder (DeepSeek-3B-MoE) uses the same tokenizer family.
TOKENS_PER_CHAR = 0.3
TOKENS_PER_CJK_CHAR = 0.6
_CJK = re.compile(r"[\u1100-\u11ff\u2e80-\u9fff\ua960-\ua97f\uac00-\ud7ff\uf900-\ufaff\uff00-\uffef]")
_SPACE = re.compile(r"\s+")


class Tokenizer(Protocol):
    def encode(self, text: str, *args: Any, **kwargs: Any) -> Sequence[int]: ...


def normalize_text(text: str) -> str:
    """Whitespace runs -> one space, ends stripped (what the rule counts)."""
    return _SPACE.sub(" ", text).strip()


def rule_text_tokens(text: str) -> int:
    """Text tokens of `text` by the documented rule: 0.3 per character, 0.6 per CJK character (rounded up)."""
    text = normalize_text(text)
    cjk = len(_CJK.findall(text))
    return math.ceil(TOKENS_PER_CHAR * (len(text) - cjk) + TOKENS_PER_CJK_CHAR * cjk)


def count_text_tokens(text: str, tokenizer: Tokenizer | None = None) -> tuple[int, str]:
    """(tokens, source) for a page's text: exact with a tokenizer (special tokens left out), else the rule."""
    if tokenizer is not None:
        try:
            ids = tokenizer.encode(text, add_special_tokens=False)
        except TypeError:  # a `tokenizers.Tokenizer` or another encode(text) without that keyword
            ids = tokenizer.encode(text)
        ids = getattr(ids, "ids", ids)
        return len(ids), "tokenizer"
    return rule_text_tokens(text), "text-layer"


# ---------------------------------------------------------------------------------------------- pixels
@dataclass(frozen=True)
class PixelCalibration:
    """Constants of the pixel estimate. `chars_per_line_height`: characters per line height of text-line length
    (the median over the calibration pages); `decision_margin`: the factor the decision applies to a pixel estimate (the 90th percentile
    of true / estimated tokens on the calibration pages), so that an underestimate rarely picks too small a mode;
    `work_long_side`: pages are analysed with their long side at most this many pixels. Fitted by
    `python -m benchmarks.auto_mode` (benchmarks/results/auto-mode.json holds the run)."""

    chars_per_line_height: float = 2.0
    decision_margin: float = 1.0
    work_long_side: int = 1600


# `python -m benchmarks.auto_mode` (seed 21): fitted on 120 calibration pages (seed 1021)
PIXEL_CALIBRATION = PixelCalibration(chars_per_line_height=1.862, decision_margin=1.104)


@dataclass(frozen=True)
class LineFeatures:
    """What the pixel estimate measures on a page: `lines` text-line boxes (y0, y1, x0, x1) in working pixels,
    `length`: sum over lines of width / height (a line's length in line heights)."""

    lines: tuple[tuple[int, int, int, int], ...] = ()
    length: float = 0.0

    @property
    def count(self) -> int:
        return len(self.lines)


def grey_page(image: Image.Image | np.ndarray, long_side: int) -> np.ndarray:
    """Any page -> (H, W) uint8 grey, downscaled (box filter) so its long side is at most `long_side`."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    grey = image.convert("L")
    scale = long_side / max(grey.size)
    if scale < 1:
        size = (max(1, round(grey.width * scale)), max(1, round(grey.height * scale)))
        grey = grey.resize(size, Image.Resampling.BOX)
    return np.asarray(grey)


def ink_mask(grey: np.ndarray, min_contrast: int = 40) -> np.ndarray:
    """(H, W) uint8 -> (H, W) bool ink. The background is the median grey (a dark page is inverted first); ink is
    darker than it by 45% of the page's contrast. A page without contrast has no ink."""
    values = grey.astype(np.int16)
    background = int(np.median(values))
    if background < 128:
        values, background = 255 - values, 255 - background
    darkest = int(np.percentile(values, 0.5))
    contrast = background - darkest
    if contrast < min_contrast:
        return np.zeros(grey.shape, dtype=bool)
    return values < background - 0.45 * contrast


def _long_runs(mask: np.ndarray, length: int) -> np.ndarray:
    """Pixels of horizontal ink runs at least `length` long: mask (H, W) bool -> (H, W) bool."""
    height, width = mask.shape
    if length > width:
        return np.zeros_like(mask)
    sums = np.zeros((height, width + 1), dtype=np.int32)
    np.cumsum(mask, axis=1, out=sums[:, 1:])
    full = (sums[:, length:] - sums[:, :-length]) == length  # (H, W - length + 1): a full window starts here
    marks = np.zeros((height, width + 1), dtype=np.int32)
    marks[:, : full.shape[1]] += full
    marks[:, length : length + full.shape[1]] -= full
    return np.cumsum(marks, axis=1)[:, :width] > 0


def remove_rules(mask: np.ndarray) -> np.ndarray:
    """Drop ruling lines, box borders, underlines and filled areas: horizontal ink runs longer than 1/20 of the
    width and vertical ones longer than 1/12 of the height (no glyph of text that fits a page has such runs)."""
    height, width = mask.shape
    long_h = _long_runs(mask, max(24, width // 20))
    long_v = _long_runs(mask.T, max(24, height // 12)).T
    return mask & ~long_h & ~long_v


def _runs(flags: np.ndarray, min_gap: int = 1) -> list[tuple[int, int]]:
    """[start, end) of the True runs of a 1-D bool array, runs closer than `min_gap` merged."""
    edges = np.diff(np.concatenate(([0], flags.view(np.int8), [0])))
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    if len(starts) > 1 and min_gap > 1:
        keep = (starts[1:] - ends[:-1]) >= min_gap
        starts = np.concatenate((starts[:1], starts[1:][keep]))
        ends = np.concatenate((ends[:-1][keep], ends[-1:]))
    return list(zip(starts.tolist(), ends.tolist()))


def typical_line_height(mask: np.ndarray, strips: int = 8) -> float:
    """Median height of the ink row-bands seen in `strips` vertical strips (within a text column, bands are lines);
    0 when there is no ink."""
    height, width = mask.shape
    heights = []
    for index in range(strips):
        x0, x1 = width * index // strips, width * (index + 1) // strips
        heights += [b - a for a, b in _runs(mask[:, x0:x1].any(axis=1)) if b - a >= 3]
    return float(np.median(heights)) if heights else 0.0


def text_lines(mask: np.ndarray) -> LineFeatures:
    """Recursive XY cuts of an ink mask (rules removed) down to text lines.

    A region splits at every all-white row; each row-band then splits at white column gaps: in a band of one line
    (up to 2.5 typical line heights tall) gaps of 0.6 of its height (wider than word spaces), in a taller band gaps
    of one typical line height (gutters and table columns; word spaces of different lines rarely align). A region
    that splits no further is a line; specks and solid blocks are dropped, and a line taller than 1.6 typical
    heights is split again at rows of almost no ink (lines whose descenders touch the next line's ascenders)."""
    line_height = typical_line_height(mask)
    if not line_height:
        return LineFeatures()
    lines: list[tuple[int, int, int, int]] = []
    stack = [(0, mask.shape[0], 0, mask.shape[1])]
    while stack:
        y0, y1, x0, x1 = stack.pop()
        region = mask[y0:y1, x0:x1]
        bands = _merge_thin(_runs(region.any(axis=1)), 0.35 * line_height, 0.3 * line_height)
        for a, b in bands:
            height = b - a
            gap = 0.6 * height if height <= 2.5 * line_height else line_height
            pieces = _runs(region[a:b].any(axis=0), max(2, round(gap)))
            if len(bands) == 1 and len(pieces) == 1 and (a, b, *pieces[0]) == (0, y1 - y0, 0, x1 - x0):
                lines += _line_boxes(mask, (y0, y1, x0, x1), line_height)
                continue
            stack += [(y0 + a, y0 + b, x0 + p, x0 + q) for p, q in pieces]
    lines.sort()
    length = sum((x1 - x0) / (y1 - y0) for y0, y1, x0, x1 in lines)
    return LineFeatures(tuple(lines), float(length))


def _merge_thin(bands: list[tuple[int, int]], min_height: float, max_gap: float) -> list[tuple[int, int]]:
    """Row-bands thinner than `min_height` (descender tails, accents, dots cut off by a white row) joined to the
    nearer neighbour within `max_gap` rows."""
    merged = list(bands)
    index = 0
    while index < len(merged) and len(merged) > 1:
        a, b = merged[index]
        if b - a >= min_height:
            index += 1
            continue
        above = a - merged[index - 1][1] if index > 0 else math.inf
        below = merged[index + 1][0] - b if index + 1 < len(merged) else math.inf
        if min(above, below) > max_gap:
            index += 1
        elif above <= below:
            merged[index - 1 : index + 1] = [(merged[index - 1][0], b)]
            index -= 1
        else:
            merged[index : index + 2] = [(a, merged[index + 1][1])]
    return merged


def _line_boxes(mask: np.ndarray, box: tuple[int, int, int, int], line_height: float) -> list:
    y0, y1, x0, x1 = box
    height, width = y1 - y0, x1 - x0
    if height < 0.3 * line_height and width < 0.6 * line_height:
        return []  # a speck: a dot, noise
    region = mask[y0:y1, x0:x1]
    if region.mean() > 0.8:
        return []  # a solid block, not text
    if height <= 1.6 * line_height:
        return [box]
    rows = region.sum(axis=1)
    parts = _merge_thin(_runs(rows > max(1.0, 0.03 * width)), 0.5 * line_height, line_height)
    if len(parts) < 2:
        return [box]
    boxes = []
    for a, b in parts:
        cols = np.flatnonzero(region[a:b].any(axis=0))
        if b - a >= 2 and len(cols):
            boxes.append((y0 + a, y0 + b, x0 + int(cols[0]), x0 + int(cols[-1]) + 1))
    return boxes


def line_features(image: Image.Image | np.ndarray, calibration: PixelCalibration = PIXEL_CALIBRATION) -> LineFeatures:
    """A page's text lines as the pixel estimate measures them."""
    grey = grey_page(image, calibration.work_long_side)
    return text_lines(remove_rules(ink_mask(grey)))


def estimate_pixel_chars(features: LineFeatures, calibration: PixelCalibration = PIXEL_CALIBRATION) -> float:
    if not features.count:
        return 0.0
    return calibration.chars_per_line_height * features.length


def estimate_pixel_text_tokens(
    image: Image.Image | np.ndarray, calibration: PixelCalibration = PIXEL_CALIBRATION
) -> int:
    """Text tokens of a page estimated from its pixels (characters at the rule's 0.3 tokens each)."""
    return math.ceil(TOKENS_PER_CHAR * estimate_pixel_chars(line_features(image, calibration), calibration))


# ---------------------------------------------------------------------------------------------- decision
@dataclass(frozen=True)
class TextEstimate:
    tokens: int
    source: str  # one of ESTIMATE_SOURCES


@dataclass(frozen=True)
class ModeChoice:
    """The decision for one page. `vision_tokens`: of the chosen mode; `compression`: estimated text tokens per
    vision token in it; `fits`: False when no allowed mode reaches the target (the largest was taken);
    `candidates`: vision tokens of every allowed mode on this page."""

    mode: str
    text_tokens: int
    source: str
    vision_tokens: int
    compression: float
    fits: bool
    candidates: Mapping[str, int] = field(default_factory=dict)

    def row_fields(self) -> dict[str, Any]:
        """The manifest / plan fields of the choice."""
        return {
            "mode": self.mode,
            "text_tokens_estimate": self.text_tokens,
            "estimate_source": self.source,
            "vision_tokens": self.vision_tokens,
            "compression": round(self.compression, 3),
            "fits": self.fits,
            "vision_tokens_by_mode": dict(self.candidates),
        }


def check_auto_modes(modes: Sequence[str] | str, table: Mapping[str, Any], max_compression: float) -> tuple[str, ...]:
    """The allowed modes of `mode="auto"` as a tuple, or ValueError: names from `table` (the resolution-mode
    table), one tower's layout (v1 grid modes or V2 query modes), one tile size among the tiled modes (tiles of
    a batch run as one tensor), and a positive `max_compression`."""
    names = tuple(m.strip() for m in modes.split(",")) if isinstance(modes, str) else tuple(modes)
    if not names or not all(names):
        raise ValueError("auto mode needs at least one allowed mode")
    unknown = [name for name in names if name not in table]
    if unknown:
        raise ValueError(f"unknown modes {unknown} for auto mode; choose from {list(table)}")
    if len(set(names)) != len(names):
        raise ValueError(f"auto modes repeat a mode: {list(names)}")
    layouts = {table[name].layout for name in names}
    if len(layouts) > 1:
        raise ValueError(f"auto modes {list(names)} mix DeepEncoder v1 and V2 modes; one tower's modes only")
    tiles = {table[name].tile_size for name in names if table[name].tile_size}
    if len(tiles) > 1:
        raise ValueError(f"auto modes {list(names)} tile at different sizes {sorted(tiles)}; allow one of them")
    if not max_compression > 0:
        raise ValueError(f"max_compression must be positive, got {max_compression}")
    return names


def choose_mode(
    estimate: TextEstimate,
    vision_tokens: Mapping[str, int],
    max_compression: float = DEFAULT_MAX_COMPRESSION,
    margin: float = 1.0,
) -> ModeChoice:
    """The cheapest mode (fewest vision tokens on this page; ties: the earlier in `vision_tokens`) with
    `estimate.tokens * margin <= max_compression * vision_tokens`; when none reaches it, the mode with the most
    vision tokens, `fits=False`. `margin` >= 1 guards an uncertain estimate (the pixel estimate's)."""
    if not vision_tokens:
        raise ValueError("no modes to choose from")
    if max_compression <= 0:
        raise ValueError(f"max_compression must be positive, got {max_compression}")
    order = sorted(vision_tokens, key=lambda name: vision_tokens[name])  # stable: ties keep the given order
    needed = estimate.tokens * margin
    chosen = next((name for name in order if needed <= max_compression * vision_tokens[name]), None)
    fits = chosen is not None
    if chosen is None:
        chosen = max(vision_tokens, key=lambda name: vision_tokens[name])
    tokens = vision_tokens[chosen]
    return ModeChoice(chosen, estimate.tokens, estimate.source, tokens, estimate.tokens / tokens, fits,
                      dict(vision_tokens))  # fmt: skip
