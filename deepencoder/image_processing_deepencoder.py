"""Image processor: resolution modes, global view, dynamic tiling, exact token counts.

Pixels are exactly those of the PIL calls DeepSeek-OCR makes (resize / `ImageOps.pad` with bicubic, fill 127,
`(x / 255 - 0.5) / 0.5`); only Pillow, numpy and torch are needed.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature

from .image_processing_auto_mode import (
    DEFAULT_MAX_COMPRESSION,
    PIXEL_CALIBRATION,
    ModeChoice,
    TextEstimate,
    check_auto_modes,
    choose_mode,
    count_text_tokens,
    estimate_pixel_text_tokens,
)
from .image_processing_modes import AUTO, DEFAULT_AUTO_MODES, RESOLUTION_MODES, ResolutionMode
from .layout import count_query_tokens, count_tokens

ImageLike = Image.Image | np.ndarray | str | os.PathLike


def candidate_grids(min_crops: int, max_crops: int) -> list[tuple[int, int]]:
    """All (cols, rows) with min_crops <= cols * rows <= max_crops, ordered by tile count as DeepSeek-OCR orders
    them (a set sorted by area, so equal-area grids keep CPython's set order of int tuples)."""
    grids = {
        (cols, rows)
        for n in range(min_crops, max_crops + 1)
        for cols in range(1, n + 1)
        for rows in range(1, n + 1)
        if min_crops <= cols * rows <= max_crops
    }
    return sorted(grids, key=lambda grid: grid[0] * grid[1])


def choose_tile_grid(
    width: int, height: int, tile_size: int, min_crops: int = 2, max_crops: int = 9
) -> tuple[int, int]:
    """(cols, rows) whose aspect ratio is closest to the page's; on a tie the later (larger) grid wins when the page's
    area exceeds half of that grid's area in pixels."""
    aspect = width / height
    area = width * height
    best, best_diff = (1, 1), float("inf")
    for cols, rows in candidate_grids(min_crops, max_crops):
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and area > 0.5 * tile_size * tile_size * cols * rows:
            best = (cols, rows)
    return best


def native_size(width: int, height: int, long_side: int, step: int) -> tuple[int, int]:
    """(width, height) with the aspect kept, the long side `long_side`, both sides multiples of `step` (>= step)."""
    scale = long_side / max(width, height)
    new_w = max(step, round(width * scale / step) * step)
    new_h = max(step, round(height * scale / step) * step)
    return min(new_w, long_side), min(new_h, long_side)


def load_image(image: ImageLike, name: str | None = None) -> Image.Image:
    """Open / validate an image; return it as RGB with its EXIF orientation applied.

    Raises ValueError naming the image when it cannot be read or has no pixels.
    """
    label = name or (str(image) if isinstance(image, (str, os.PathLike)) else "image")
    try:
        if isinstance(image, (str, os.PathLike)):
            with Image.open(image) as opened:
                opened.load()
                image = ImageOps.exif_transpose(opened)
        elif isinstance(image, np.ndarray):
            image = Image.fromarray(image)
        elif isinstance(image, Image.Image):
            image.load()
            image = ImageOps.exif_transpose(image)
        else:
            raise TypeError(f"unsupported image type {type(image).__name__}; pass PIL images, uint8 arrays or paths")
        if image.width == 0 or image.height == 0:
            raise ValueError(f"image has no pixels ({image.width}x{image.height})")
        return to_rgb(image)
    except (OSError, SyntaxError, ValueError, TypeError, Image.DecompressionBombError) as error:
        raise ValueError(f"{label}: cannot use image ({error})") from error


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB. 16-bit and 32-bit grayscale are scaled to 8 bits (PIL's own conversion clips them);
    transparent pixels are composited onto white (PIL's `convert("RGB")` would expose whatever colour lies under
    the alpha, often black); everything else goes through `convert("RGB")`."""
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I") or image.mode == "F":
        array = np.asarray(image, dtype=np.float64)
        if image.mode.startswith("I;16"):
            top = 65535.0
        else:
            top = 1.0 if image.mode == "F" and array.max() <= 1.0 else max(float(array.max()), 1.0)
        array = np.clip(np.nan_to_num(array) / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(array).convert("RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


@functools.lru_cache(maxsize=32)
def _normalization_constants(
    mean: tuple[float, ...], std: tuple[float, ...], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """255, the mean and the std as float32 tensors on `device`, made once per device: a tensor made from Python
    numbers on CUDA is a copy from pageable memory, which waits for all the work queued on the stream (it would
    hold each batch's upload back until the forward before it is done). Ordinary tensors (not inference tensors),
    whatever mode the first call ran in, and never written to."""
    with torch.inference_mode(False), torch.no_grad():
        scale = torch.full((), 255.0, device=device)
        return scale, torch.tensor(mean, device=device).view(-1, 1, 1), torch.tensor(std, device=device).view(-1, 1, 1)


def image_to_uint8(image: Image.Image) -> torch.Tensor:
    """RGB PIL -> (3, H, W) uint8 tensor viewing the image's (H, W, 3) pixels (channels-last strides: no
    transposing copy; `DeepEncoderImageProcessor.normalize` reads it in place, on whatever device it is moved to)."""
    return torch.from_numpy(np.array(image, dtype=np.uint8)).movedim(-1, -3)


def images_to_uint8(images: Sequence[Image.Image]) -> torch.Tensor:
    """Same-size RGB PIL images -> (n, 3, H, W) uint8 tensor viewing their stacked (n, H, W, 3) pixels."""
    return torch.from_numpy(np.stack([np.asarray(image, dtype=np.uint8) for image in images])).movedim(-1, -3)


def pixels_in_memory_order(pixels: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """uint8 pixels (..., 3, H, W) as they lie in memory: a channels-last view (what `image_to_uint8` makes) as its
    contiguous (..., H, W, 3) tensor and True; anything else as a contiguous (..., 3, H, W) tensor and False. Copies,
    stacks and transfers of pages work on this form: plain copies, never a transposition."""
    last = pixels.movedim(-3, -1)
    if last.is_contiguous():
        return last, True
    return pixels.contiguous(), False


@dataclass(frozen=True)
class PadSpot:
    """Where a page lands, unresampled, in its padded global view: the view's (width, height), the (x, y) of the
    page's top-left corner in it and the colour around it (see `DeepEncoderImageProcessor.pad_spot`)."""

    size: tuple[int, int]
    offset: tuple[int, int]
    color: tuple[int, ...]


@dataclass(frozen=True)
class PagePlan:
    """What the processor decided for one page. global_size: (width, height) of the global view in pixels;
    tile_grid: (cols, rows), (1, 1) meaning no tiles; tile_size: tile side in pixels (0 without tiles)."""

    global_size: tuple[int, int]
    tile_grid: tuple[int, int]
    tile_size: int
    num_tokens: int

    @property
    def num_tiles(self) -> int:
        cols, rows = self.tile_grid
        return cols * rows if self.tile_size else 0


class DeepEncoderImageProcessor(BaseImageProcessor):
    """Pages -> `pixel_values` (global views), `pixel_values_tiles` (all local tiles of the batch) and
    `tile_grids` (one (cols, rows) per page, Python ints).

    Args:
        mode: one of `RESOLUTION_MODES` (tiny | small | base | large | gundam | gundam-m | native for DeepEncoder
            v1; ocr2 | ocr2-base for DeepEncoder V2).
        base_size: override the mode's global-view size (`native`: its long side).
        tile_size: override the mode's tile size.
        min_crops, max_crops: bounds on the number of tiles of a tiled page (max_crops: the mode's when None, 9;
            6 in `ocr2`).
        downsample: pixels per output token side (patch 16 x two stride-2 convs = 64).
        image_mean, image_std: normalisation (0.5, 0.5); the padding colour is `int(mean * 255)`.
        max_compression, auto_modes: `mode="auto"`: each page gets the cheapest of `auto_modes` (default: tiny,
            small, base, large, gundam) whose vision tokens keep its text tokens per vision token at or under
            `max_compression` (see `image_processing_auto_mode`); the output reports the choice per page.
    """

    model_input_names = ["pixel_values", "pixel_values_tiles", "tile_grids"]
    _auto_class = "AutoImageProcessor"  # save_pretrained writes auto_map and this file (trust_remote_code loading)

    def __init__(
        self,
        mode: str = "gundam",
        base_size: int | None = None,
        tile_size: int | None = None,
        min_crops: int = 2,
        max_crops: int | None = None,
        downsample: int = 64,
        image_mean: Sequence[float] = (0.5, 0.5, 0.5),
        image_std: Sequence[float] = (0.5, 0.5, 0.5),
        max_compression: float = DEFAULT_MAX_COMPRESSION,
        auto_modes: Sequence[str] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if mode == AUTO:
            auto_modes = check_auto_modes(auto_modes or DEFAULT_AUTO_MODES, RESOLUTION_MODES, max_compression)
            if base_size is not None or tile_size is not None:
                raise ValueError("mode='auto' takes no base_size / tile_size override (each mode keeps its sizes)")
        elif mode not in RESOLUTION_MODES:
            raise ValueError(f"unknown mode {mode!r}; choose one of {[*RESOLUTION_MODES, AUTO]}")
        mode_crops = max(RESOLUTION_MODES[name].max_crops for name in (auto_modes if mode == AUTO else (mode,)))
        if not 1 <= min_crops <= (mode_crops if max_crops is None else max_crops):
            raise ValueError(f"need 1 <= min_crops <= max_crops, got {min_crops}, {max_crops}")
        self.mode = mode
        self.base_size = base_size
        self.tile_size = tile_size
        self.min_crops = min_crops
        self.max_crops = max_crops
        self.downsample = downsample
        self.image_mean = list(image_mean)
        self.image_std = list(image_std)
        self.max_compression = float(max_compression)
        self.auto_modes = list(auto_modes) if auto_modes else None

    # ------------------------------------------------------------------ planning
    @property
    def resolution(self) -> ResolutionMode:
        if self.mode == AUTO:
            raise ValueError("mode='auto' has no single resolution: see mode_processors() / choose_mode()")
        mode = RESOLUTION_MODES[self.mode]
        base = self.base_size or mode.base_size
        tile = mode.tile_size if self.tile_size is None else (self.tile_size or None)
        for label, size in (("base_size", base), ("tile_size", tile)):
            if size is not None and size % self.downsample:
                raise ValueError(f"{label} {size} must be a multiple of {self.downsample}")
        max_crops = mode.max_crops if self.max_crops is None else self.max_crops
        return replace(mode, base_size=base, tile_size=tile, max_crops=max_crops)

    def plan(self, width: int, height: int) -> PagePlan:
        """Global-view size, tile grid and token count for a page of width x height pixels."""
        if width <= 0 or height <= 0:
            raise ValueError(f"page size must be positive, got {width}x{height}")
        mode = self.resolution
        if mode.global_view == "native":
            global_size = native_size(width, height, mode.base_size, self.downsample)
        else:
            global_size = (mode.base_size, mode.base_size)
        tile_grid, tile = (1, 1), 0
        if mode.tile_size is not None and (width > mode.tile_size or height > mode.tile_size):
            tile = mode.tile_size
            tile_grid = choose_tile_grid(width, height, tile, self.min_crops, mode.max_crops)
        grid = (global_size[1] // self.downsample, global_size[0] // self.downsample)
        tile_side = math.ceil(tile / self.downsample) if tile else 0
        if mode.layout == "queries":
            tiles = tile_grid[0] * tile_grid[1] if tile else 0
            tokens = count_query_tokens(grid[0] * grid[1], tiles, tile_side * tile_side)
        else:
            tokens = count_tokens(grid, tile_grid, tile_side)
        return PagePlan(global_size, tile_grid, tile, tokens)

    def num_image_tokens(self, width: int, height: int) -> int:
        """Number of vision tokens (rows, newlines, separator) the model emits for a width x height page."""
        return self.plan(width, height).num_tokens

    # ------------------------------------------------------------------ pixels
    def _pad_color(self) -> tuple[int, ...]:
        return tuple(int(m * 255) for m in self.image_mean)

    def pad_spot(self, width: int, height: int, plan: PagePlan | None = None) -> PadSpot | None:
        """When the global view of a width x height page is the page itself, not resampled, centred on the pad
        colour (`ImageOps.pad` keeps a page that already fits the view at its size), and the page has no tiles:
        where it lands. A renderer can then draw the page straight into the view (`pipeline.sources`), which is the
        view `global_view` makes, pixel for pixel. None otherwise (the view needs the page image)."""
        plan = plan or self.plan(width, height)
        if self.resolution.global_view != "pad" or plan.num_tiles:
            return None
        if type(self).global_view is not DeepEncoderImageProcessor.global_view:  # a subclass makes its own view
            return None
        view_w, view_h = plan.global_size
        # ImageOps.contain's size for the page (its rounding), then ImageOps.pad's placement
        fitted = (view_w, view_h)
        if width / height != view_w / view_h:
            if width / height > view_w / view_h:
                fitted = (view_w, round(height / width * view_w))
            else:
                fitted = (round(width / height * view_h), view_h)
        if fitted != (width, height):
            return None
        x = round((view_w - width) * 0.5) if width != view_w else 0
        y = round((view_h - height) * 0.5) if width == view_w else 0
        return PadSpot((view_w, view_h), (x, y), self._pad_color())

    def global_view(self, image: Image.Image, plan: PagePlan) -> Image.Image:
        mode = self.resolution
        if mode.global_view == "pad":
            return ImageOps.pad(image, plan.global_size, method=Image.Resampling.BICUBIC, color=self._pad_color())
        return image.resize(plan.global_size, Image.Resampling.BICUBIC)

    def tiles(self, image: Image.Image, plan: PagePlan) -> list[Image.Image]:
        """The page resized to cols*tile x rows*tile and cut row-major into tiles."""
        if not plan.num_tiles:
            return []
        cols, rows = plan.tile_grid
        tile = plan.tile_size
        resized = image.resize((cols * tile, rows * tile), Image.Resampling.BICUBIC)
        return [
            resized.crop((c * tile, r * tile, (c + 1) * tile, (r + 1) * tile)) for r in range(rows) for c in range(cols)
        ]

    def tile_pixels(self, image: Image.Image, plan: PagePlan) -> torch.Tensor | None:
        """`tiles` as one uint8 (n, 3, t, t) tensor (a channels-last view), cut out of the resized page's pixels
        with one copy instead of a crop, a conversion and a stack per tile; None without tiles."""
        if not plan.num_tiles:
            return None
        if type(self).tiles is not DeepEncoderImageProcessor.tiles:  # a subclass cuts its own tiles
            return images_to_uint8(self.tiles(image, plan))
        cols, rows = plan.tile_grid
        tile = plan.tile_size
        resized = np.asarray(image.resize((cols * tile, rows * tile), Image.Resampling.BICUBIC), dtype=np.uint8)
        tiles = resized.reshape(rows, tile, cols, tile, 3).swapaxes(1, 2).reshape(rows * cols, tile, tile, 3)
        if not tiles.flags.writeable:  # one column: the reshape was a view of the resized page's read-only pixels
            tiles = tiles.copy()
        return torch.from_numpy(tiles).movedim(-1, -3)

    def to_tensor(self, image: Image.Image) -> torch.Tensor:
        """RGB PIL -> (3, H, W) float32, (x / 255 - mean) / std."""
        return self.normalize(image_to_uint8(image))

    def normalize(
        self, pixels: torch.Tensor, dtype: torch.dtype | None = None, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """uint8 pixels (..., 3, H, W), on any device -> (x / 255 - mean) / std computed in float32 on that device
        (the same operations as `to_tensor`, so the values are bit-identical), then cast to `dtype` if given; into
        `out` if given (its dtype wins). Pipelines move pages as uint8 (a quarter of the bytes) and normalise after
        the copy to the device. Every divisor is a tensor: a Python-number divisor lets CUDA multiply by its
        reciprocal instead, one rounding away from the CPU's division."""
        device = pixels.device
        scale, mean, std = _normalization_constants(tuple(self.image_mean), tuple(self.image_std), device)
        work = out if out is not None and out.dtype == torch.float32 else torch.empty(pixels.shape, device=device)
        work.copy_(pixels)  # in place from here: one buffer, not one per operation
        work.div_(scale)
        work.sub_(mean)
        work.div_(std)
        if out is not None:
            return out if out is work else out.copy_(work)
        return work if dtype is None or dtype == work.dtype else work.to(dtype)

    def preprocess(
        self,
        images: ImageLike | Sequence[ImageLike],
        return_tensors: str | None = "pt",
        mode: str | None = None,
        text: str | Sequence[str | None] | None = None,
        tokenizer: Any = None,
        **kwargs: Any,
    ) -> BatchFeature:
        """Pages -> BatchFeature with
        `pixel_values`: (B, 3, S, S) tensor, or a list of (3, H, W) when `native` pages differ in size;
        `pixel_values_tiles`: (T, 3, t, t) all tiles of all pages in page order (present when any page is tiled);
        `tile_grids`: list of (cols, rows) per page; `num_image_tokens`: list of ints.

        mode: this call's resolution mode instead of the processor's (`processor(page, mode="tiny")`). Any other
        keyword is an error: a misspelt or unsupported option never passes silently.

        With `mode="auto"` each page is processed in the mode `choose_mode` picks for it, exactly as a call in that
        mode would (views of different sizes come back as a list); `text` (one string or None per page) is the
        pages' known text, counted with `tokenizer` if given, else by the characters-per-token rule; a page without
        text is estimated from its pixels. The output adds per page `modes`, `text_tokens_estimate`,
        `estimate_source`, `compression` and `fits` (`num_image_tokens` are the chosen modes' vision tokens)."""
        if kwargs:
            raise TypeError(
                f"unexpected keyword arguments {sorted(kwargs)}; {type(self).__name__} takes images, "
                "return_tensors and mode (other settings belong to the constructor)"
            )
        if mode is not None and mode != self.mode:
            if mode not in RESOLUTION_MODES:
                raise ValueError(f"unknown mode {mode!r}; choose one of {list(RESOLUTION_MODES)}")
            settings = {**self.to_dict(), "mode": mode}
            settings.pop("image_processor_type", None)
            return type(self)(**settings).preprocess(
                images, return_tensors=return_tensors, text=text, tokenizer=tokenizer
            )
        if return_tensors not in (None, "pt"):
            raise ValueError("only return_tensors='pt' is supported")
        if isinstance(images, (Image.Image, np.ndarray, str, os.PathLike)):
            images = [images]
        images = list(images)
        if not images:
            raise ValueError("no images given")
        if self.mode == AUTO:
            return self._preprocess_auto(images, text, tokenizer)
        if text is not None or tokenizer is not None:
            raise TypeError("text / tokenizer are only used by mode='auto'")
        globals_, tiles, grids, tokens = [], [], [], []
        for index, raw in enumerate(images):
            image = load_image(raw, name=raw if isinstance(raw, (str, os.PathLike)) else f"image {index}")
            plan = self.plan(image.width, image.height)
            globals_.append(self.to_tensor(self.global_view(image, plan)))
            tiles.extend(self.to_tensor(t) for t in self.tiles(image, plan))
            grids.append(plan.tile_grid if plan.num_tiles else (1, 1))
            tokens.append(plan.num_tokens)
        same_size = len({tuple(g.shape) for g in globals_}) == 1
        data: dict[str, Any] = {
            "pixel_values": torch.stack(globals_) if same_size else globals_,
            "tile_grids": grids,
            "num_image_tokens": tokens,
        }
        if tiles:
            data["pixel_values_tiles"] = torch.stack(tiles)
        return BatchFeature(data=data, skip_tensor_conversion={"tile_grids", "num_image_tokens"})

    def __call__(self, images: ImageLike | Sequence[ImageLike], **kwargs: Any) -> BatchFeature:
        return self.preprocess(images, **kwargs)

    # ------------------------------------------------------------------ mode="auto"
    def mode_processors(self) -> dict[str, DeepEncoderImageProcessor]:
        """`mode="auto"`: one processor per allowed mode (same settings otherwise), in the allowed order."""
        settings = {**self.to_dict()}
        for key in ("image_processor_type", "mode", "auto_modes", "max_compression"):
            settings.pop(key, None)
        return {name: type(self)(mode=name, **settings) for name in self.auto_modes or ()}

    def choose_mode(
        self,
        width: int,
        height: int,
        text_tokens: int | None = None,
        source: str = "text-layer",
        image: ImageLike | None = None,
        sizes: dict[str, tuple[int, int]] | None = None,
    ) -> ModeChoice:
        """`mode="auto"`: the mode for a width x height page holding `text_tokens` (counted from `source`), or,
        without them, the pixel estimate of `image` (the decision then applies the calibration's margin).
        sizes: the page's pixel size per mode where it differs (a PDF rendered to each mode's size)."""
        if image is not None and text_tokens is None:
            estimate, margin = TextEstimate(estimate_pixel_text_tokens(load_image(image)), "pixels"), None
        elif text_tokens is not None:
            estimate, margin = TextEstimate(int(text_tokens), source), 1.0
        else:
            raise ValueError("choose_mode needs text_tokens or an image")
        vision = {
            name: processor.num_image_tokens(*(sizes or {}).get(name, (width, height)))
            for name, processor in self.mode_processors().items()
        }
        margin = PIXEL_CALIBRATION.decision_margin if margin is None else margin
        return choose_mode(estimate, vision, self.max_compression, margin)

    def _preprocess_auto(self, images: list, text: Any, tokenizer: Any) -> BatchFeature:
        texts = [text] * len(images) if text is None or isinstance(text, str) else list(text)
        if len(texts) != len(images):
            raise ValueError(f"{len(texts)} texts for {len(images)} images")
        processors = self.mode_processors()
        parts, choices = [], []
        for index, (raw, page_text) in enumerate(zip(images, texts)):
            image = load_image(raw, name=raw if isinstance(raw, (str, os.PathLike)) else f"image {index}")
            if page_text is None:
                choice = self.choose_mode(image.width, image.height, image=image)
            else:
                tokens, source = count_text_tokens(page_text, tokenizer)
                choice = self.choose_mode(image.width, image.height, tokens, source)
            choices.append(choice)
            parts.append(processors[choice.mode].preprocess(image))
        views = [view for part in parts for view in part["pixel_values"]]
        tiles = [part["pixel_values_tiles"] for part in parts if "pixel_values_tiles" in part]
        data: dict[str, Any] = {
            "pixel_values": torch.stack(views) if len({tuple(v.shape) for v in views}) == 1 else views,
            "tile_grids": [grid for part in parts for grid in part["tile_grids"]],
            "num_image_tokens": [tokens for part in parts for tokens in part["num_image_tokens"]],
            "modes": [choice.mode for choice in choices],
            "text_tokens_estimate": [choice.text_tokens for choice in choices],
            "estimate_source": [choice.source for choice in choices],
            "compression": [round(choice.compression, 3) for choice in choices],
            "fits": [choice.fits for choice in choices],
        }
        if tiles:
            data["pixel_values_tiles"] = torch.cat(tiles)
        skip = set(data) - {"pixel_values", "pixel_values_tiles"}
        return BatchFeature(data=data, skip_tensor_conversion=skip)
