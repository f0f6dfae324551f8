"""Image processor: modes, tiling, exact pixels, token counts, image modes and errors."""

import math

import numpy as np
import pytest
import torch
from helpers import random_model
from PIL import Image, ImageOps
from transformers.models.unlimited_ocr.image_processing_unlimited_ocr import get_optimal_tiled_canvas

from deepencoder import DeepEncoderImageProcessor
from deepencoder.image_processing_deepencoder import choose_tile_grid

MODES = {
    "tiny": (512, None),
    "small": (640, None),
    "base": (1024, None),
    "large": (1280, None),
    "gundam": (1024, 640),
    "gundam-m": (1280, 1024),
}


def page(width, height, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def expected_tokens(mode, width, height):
    """The closed form written independently of the library, with the tile grid from transformers' own port of
    DeepSeek-OCR's tiling (`get_optimal_tiled_canvas`, 2..9 tiles)."""
    base, tile = MODES[mode]
    q = math.ceil(base / 64)
    total = q * (q + 1) + 1
    if tile and (width > tile or height > tile):
        cols, rows = get_optimal_tiled_canvas((height, width), (tile, tile), 2, 9)
        qt = math.ceil(tile / 64)
        total += (qt * rows) * (qt * cols + 1)
    return total


@pytest.mark.parametrize("mode", list(MODES))
def test_token_counts_sweep(mode):
    processor = DeepEncoderImageProcessor(mode=mode)
    for width, height in [
        (300, 200),
        (640, 640),
        (641, 300),
        (800, 1200),
        (1700, 2200),
        (3000, 900),
        (1024, 1024),
        (1300, 1300),
        (500, 4000),
        (20000, 1),
    ]:
        assert processor.num_image_tokens(width, height) == expected_tokens(mode, width, height), (width, height)
    assert (
        DeepEncoderImageProcessor(mode=mode).num_image_tokens(100, 100)
        == {"tiny": 73, "small": 111, "base": 273, "large": 421, "gundam": 273, "gundam-m": 421}[mode]
    )


@pytest.mark.parametrize(
    "size,grid",
    [
        ((640, 1920), (1, 3)),  # tall 1:3
        ((2000, 600), (3, 1)),  # wide 3.3:1 -> 3x1 is closest
        ((1000, 1000), (2, 2)),  # square tie 2x2 vs 3x3: page area 1e6 < half of 3x3 tiles' area -> 2x2
        ((1500, 1500), (3, 3)),  # square tie: 2.25e6 > 0.5 * 640^2 * 9 -> the larger grid
        ((1280, 960), (3, 2)),  # 4:3 itself needs 12 tiles > max 9; 3:2 is the closest allowed
        # aspect 1.077: 1x1 is not allowed (min 2 tiles); 2x2 and 3x3 tie and 455,000 px is below half of either
        # grid's area, so the first (2x2) stays
        ((700, 650), (2, 2)),
    ],
)
def test_tile_grids(size, grid):
    width, height = size
    assert choose_tile_grid(width, height, 640) == grid
    processor = DeepEncoderImageProcessor(mode="gundam")
    inputs = processor(page(width, height))
    cols, rows = grid
    assert inputs["tile_grids"] == [grid]
    assert inputs["pixel_values_tiles"].shape == (cols * rows, 3, 640, 640)


def test_small_pages_are_not_tiled_and_max_crops_is_configurable():
    processor = DeepEncoderImageProcessor(mode="gundam")
    inputs = processor(page(640, 500))
    assert "pixel_values_tiles" not in inputs and inputs["tile_grids"] == [(1, 1)]
    assert choose_tile_grid(6000, 500, 640, max_crops=4) == (4, 1)
    assert DeepEncoderImageProcessor(mode="gundam", max_crops=4).plan(6000, 500).tile_grid == (4, 1)
    assert choose_tile_grid(6000, 500, 640) == (9, 1)


def to_pixels(image):
    array = np.asarray(image, dtype=np.float32) / 255.0
    return torch.from_numpy((array - 0.5) / 0.5).permute(2, 0, 1)


def test_pixels_are_exactly_the_pil_calls():
    image = page(900, 1300, seed=3)
    base = DeepEncoderImageProcessor(mode="gundam")(image)
    padded = ImageOps.pad(image, (1024, 1024), method=Image.BICUBIC, color=(127, 127, 127))
    assert torch.equal(base["pixel_values"][0], to_pixels(padded))
    cols, rows = base["tile_grids"][0]
    resized = image.resize((640 * cols, 640 * rows), Image.BICUBIC)
    tile = resized.crop((640, 0, 1280, 640))  # second tile of the first row
    assert torch.equal(base["pixel_values_tiles"][1], to_pixels(tile))
    tiny = DeepEncoderImageProcessor(mode="tiny")(image)
    assert torch.equal(tiny["pixel_values"][0], to_pixels(image.resize((512, 512), Image.BICUBIC)))


def test_native_mode_keeps_aspect_and_pays_no_padding():
    processor = DeepEncoderImageProcessor(mode="native")
    plan = processor.plan(1024, 768)
    assert plan.global_size == (1024, 768) and plan.num_tokens == 12 * 17 + 1 == 205
    assert processor.plan(850, 1100).global_size == (768, 1024)
    inputs = processor([page(1024, 768), page(600, 900), page(2048, 1536)])
    assert isinstance(inputs["pixel_values"], list)
    assert [tuple(p.shape) for p in inputs["pixel_values"]] == [(3, 768, 1024), (3, 1024, 704), (3, 768, 1024)]
    model = random_model()
    with torch.no_grad():
        out = model(**inputs)
    assert [len(t) for t in out.image_embeds] == inputs["num_image_tokens"] == [205, 16 * 12 + 1, 205]


@pytest.mark.parametrize("mode", ["tiny", "gundam", "gundam-m", "native"])
def test_model_output_length_equals_processor_count(mode):
    processor = DeepEncoderImageProcessor(mode=mode)
    pages = [page(1400, 900), page(300, 300), page(700, 2100)]
    inputs = processor(pages, return_tensors="pt")
    with torch.no_grad():
        out = random_model()(**inputs)
    for image, tokens in zip(pages, out.image_embeds):
        assert tokens.shape == (processor.num_image_tokens(*image.size), 80)


@pytest.mark.parametrize("mode_name", ["L", "RGBA", "CMYK", "P", "I;16", "LA", "1", "F"])
def test_any_image_mode_becomes_rgb(mode_name):
    rgb = page(64, 48)
    if mode_name == "I;16":
        image = Image.fromarray(np.asarray(rgb.convert("L"), dtype=np.uint16) * 257)
        assert image.mode == "I;16"
    elif mode_name == "F":
        image = Image.fromarray(np.asarray(rgb.convert("L"), dtype=np.float32))
    else:
        image = rgb.convert(mode_name)
    inputs = DeepEncoderImageProcessor(mode="tiny")(image)
    assert inputs["pixel_values"].shape == (1, 3, 512, 512)
    if mode_name == "I;16":
        # scaled 16 -> 8 bits: same pixels as the 8-bit grayscale page
        expected = DeepEncoderImageProcessor(mode="tiny")(rgb.convert("L"))["pixel_values"]
        assert torch.equal(inputs["pixel_values"], expected)


def test_alpha_is_composited_on_white():
    image = Image.new("RGBA", (32, 32), (0, 0, 0, 0))
    pixels = DeepEncoderImageProcessor(mode="tiny")(image)["pixel_values"]
    assert torch.all(pixels == 1.0)


def test_exif_orientation_is_applied(tmp_path):
    image = page(60, 40)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 clockwise on display
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif)
    processor = DeepEncoderImageProcessor(mode="native")
    assert processor(str(path))["pixel_values"].shape[-2:] == (1024, 704)  # portrait after rotation


def test_bad_images_raise_value_errors_naming_them(tmp_path):
    processor = DeepEncoderImageProcessor(mode="base")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(ValueError, match="broken.png"):
        processor(str(broken))
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="empty.jpg"):
        processor(str(empty))
    with pytest.raises(ValueError, match="image 1"):
        processor([page(10, 10), np.zeros((0, 5, 3), dtype=np.uint8)])
    with pytest.raises(ValueError, match="unknown mode"):
        DeepEncoderImageProcessor(mode="huge")
    with pytest.raises(ValueError):
        processor.num_image_tokens(0, 100)


def test_processor_round_trip(tmp_path):
    from transformers import AutoImageProcessor

    processor = DeepEncoderImageProcessor(mode="gundam-m", max_crops=6)
    processor.save_pretrained(tmp_path)
    loaded = DeepEncoderImageProcessor.from_pretrained(tmp_path)
    auto = AutoImageProcessor.from_pretrained(tmp_path)
    for other in (loaded, auto):
        assert type(other) is DeepEncoderImageProcessor
        assert (other.mode, other.max_crops) == ("gundam-m", 6)
        assert other.num_image_tokens(3000, 1000) == processor.num_image_tokens(3000, 1000)


def test_unknown_keywords_raise_and_mode_can_be_set_per_call():
    processor = DeepEncoderImageProcessor(mode="gundam")
    with pytest.raises(TypeError, match="modee"):
        processor(page(700, 500), modee="tiny")
    with pytest.raises(ValueError, match="unknown mode"):
        processor(page(700, 500), mode="huge")
    image = page(1500, 900)
    tiny = processor(image, mode="tiny")
    assert processor.mode == "gundam"  # the override is for that call only
    assert tiny["pixel_values"].shape == (1, 3, 512, 512) and "pixel_values_tiles" not in tiny
    assert tiny["num_image_tokens"] == [73]
    expected = np.asarray(image.resize((512, 512), Image.Resampling.BICUBIC), dtype=np.float32) / 255 * 2 - 1
    assert torch.allclose(tiny["pixel_values"][0].permute(1, 2, 0), torch.from_numpy(expected), atol=1e-6)
    assert processor(image)["pixel_values_tiles"].shape[0] > 1
