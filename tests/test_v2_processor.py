"""The `ocr2` / `ocr2-base` processor modes against DeepSeek-OCR-2's own processor (golden fixtures: token counts on a
sweep of sizes, pixels of the golden pages), and each place where transformers' `deepseek_ocr2` port preprocesses
differently (tried as a new user would): ours is DeepSeek's; the port is compared, and may be fixed."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import torch
import transformers
from fixtures.v2_support import PAGES, SWEEP_SIZES, make_page
from packaging.version import Version
from PIL import Image, ImageOps
from transformers import DeepseekOcr2ImageProcessor
from transformers.models.deepseek_ocr2.image_processing_pil_deepseek_ocr2 import DeepseekOcr2ImageProcessorPil

from deepencoder import DeepEncoderImageProcessor

GOLDENS = json.loads((Path(__file__).parent / "fixtures" / "deepseek_ocr2_goldens.json").read_text())
SWEEP = {tuple(row["size"]): row for row in GOLDENS["sweep"]}


def sha256(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.contiguous().numpy().tobytes()).hexdigest()


def port_tokens(patches: int) -> int:
    """transformers' processor's token formula for `patches` (1 global + tiles) views."""
    return 256 + 144 * (patches - 1) + 1


def test_sweep_is_the_fixtures():
    assert set(SWEEP) == set(SWEEP_SIZES)


def test_token_counts_equal_deepseek_on_the_sweep():
    ocr2, base = DeepEncoderImageProcessor(mode="ocr2"), DeepEncoderImageProcessor(mode="ocr2-base")
    for (width, height), row in SWEEP.items():
        plan = ocr2.plan(width, height)
        assert plan.num_tokens == row["ocr2"] == row["ocr2_num_image_tokens"], (width, height)
        assert list(plan.tile_grid) == row["ocr2_grid"], (width, height)
        assert (plan.num_tiles > 0) == (max(width, height) > 768)
        assert base.num_image_tokens(width, height) == row["ocr2_base_num_image_tokens"] == 257


def test_ocr2_inputs_match_counts_and_tiles():
    processor = DeepEncoderImageProcessor(mode="ocr2")
    pages = [make_page("tiles_1x2"), make_page("untiled"), make_page("grey")]
    inputs = processor(pages)
    assert inputs["tile_grids"] == [(1, 2), (1, 1), (2, 3)]
    assert inputs["pixel_values"].shape == (3, 3, 1024, 1024)
    assert inputs["pixel_values_tiles"].shape == (2 + 6, 3, 768, 768)
    assert inputs["num_image_tokens"] == [GOLDENS["pages"][n]["tokens"] for n in ("tiles_1x2", "untiled", "grey")]


# ------------------------------------------------------------------------- against transformers' port
# transformers' `deepseek_ocr2` processors are compared, never required to be wrong: where a version of the port
# preprocesses differently from DeepSeek (the README lists where, for the version the `test` extra pins), each test
# accepts either DeepSeek's result or that documented difference, so a fixed port passes too.
def first_page_column(view: torch.Tensor) -> int:
    """Index of the first column of a padded global view that is not the (127, 127, 127) fill."""
    fill = 127 / 255 * 2 - 1
    columns = ((view - fill).abs() > 1e-6).any(dim=0).any(dim=0)
    return int(columns.nonzero()[0])


def page_columns(view: torch.Tensor) -> int:
    """How many columns of a padded global view hold the page (neither side's fill)."""
    fill = 127 / 255 * 2 - 1
    columns = ((view - fill).abs() > 1e-6).any(dim=0).any(dim=0).nonzero()
    return int(columns[-1] - columns[0]) + 1


def test_centring_round_half_even_against_the_ports_floor():
    """A 600 x 752 page becomes 817 x 1024 in the view: 207 px of padding, an odd number, so the conventions differ.
    DeepSeek (`ImageOps.pad`) puts the page at round(103.5) = 104; ours is DeepSeek's pixel for pixel. The port's
    views (both backends) hold the page at 104 or at floor(207 / 2) = 103 (transformers 5.23-5.25); its PIL
    backend's is the same resampled page."""
    page = make_page("untiled")
    ours = DeepEncoderImageProcessor(mode="ocr2")(page)["pixel_values"][0]
    assert sha256(ours) == GOLDENS["pages"]["untiled"]["global_sha256"]
    width = page_columns(ours)
    assert width == 817 and (1024 - width) % 2 == 1  # the page tells floor from round-half-even apart
    assert first_page_column(ours) == 104
    theirs = DeepseekOcr2ImageProcessorPil()(page, return_tensors="pt")["pixel_values"][0]
    left = first_page_column(theirs)
    assert left in (104, 103)
    assert torch.equal(theirs[..., left : left + width], ours[..., 104 : 104 + width])  # the same page, maybe moved
    tensors = DeepseekOcr2ImageProcessor()(page, return_tensors="pt")["pixel_values"][0]  # torchvision's resampling
    assert first_page_column(tensors) in (104, 103) and page_columns(tensors) == width


def exif_rotated(page: Image.Image) -> Image.Image:
    """`page` stored rotated, with EXIF orientation 6 saying how to show it upright (a phone photo)."""
    stored = page.transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    stored.save(buffer, format="PNG", exif=exif.tobytes())
    return Image.open(io.BytesIO(buffer.getvalue()))


def test_exif_orientation_applied_to_pil_inputs():
    """Ours shows the page upright, as DeepSeek's loader does. The port's PIL processor either does too, or (5.23-5.25)
    encodes the stored landscape picture, padded top and bottom instead of left and right."""
    page = make_page("untiled")
    rotated = exif_rotated(page)
    assert rotated.size == (752, 600)
    assert np.array_equal(np.asarray(ImageOps.exif_transpose(rotated)), np.asarray(page))  # the fixture is right
    ours = DeepEncoderImageProcessor(mode="ocr2")(rotated)["pixel_values"][0]
    assert sha256(ours) == GOLDENS["pages"]["untiled"]["global_sha256"]
    theirs = DeepseekOcr2ImageProcessorPil()(rotated, return_tensors="pt")["pixel_values"][0]
    landscape = page.transpose(Image.Transpose.ROTATE_90)  # the stored pixels, no EXIF
    stored = DeepseekOcr2ImageProcessorPil()(landscape, return_tensors="pt")["pixel_values"][0]
    upright = DeepseekOcr2ImageProcessorPil()(page, return_tensors="pt")["pixel_values"][0]
    assert torch.equal(theirs, upright) or (torch.equal(theirs, stored) and first_page_column(theirs) == 0)


def test_patch_counts_equal_deepseek_and_the_ports_helper():
    """Our counts are DeepSeek's on the whole sweep, the 768 px rule and aspect ties included. The port's
    `get_number_of_image_patches` agrees from transformers 5.25.0 on; before, it tiled pages <= 768 px and broke
    aspect ties with a 1024 px area, and nowhere else differed."""
    port = DeepseekOcr2ImageProcessorPil()
    ours = DeepEncoderImageProcessor(mode="ocr2")
    small = {(w, h) for w, h in SWEEP if max(w, h) <= 768}
    ties = {(1540, 1232), (1771, 1012), (1925, 770)}
    assert ties <= set(SWEEP) and small
    for size in SWEEP:
        assert ours.num_image_tokens(*size) == SWEEP[size]["ocr2"], size
    differ = {s for s in SWEEP if port_tokens(port.get_number_of_image_patches(s[1], s[0])) != SWEEP[s]["ocr2"]}
    if Version(transformers.__version__) >= Version("5.25.0"):
        assert not differ
    else:
        assert differ <= small | ties


def test_global_view_only_is_1024_and_takes_any_page():
    """`ocr2-base` gives the padded 1024 view (257 tokens) of any page, a 2000 x 1 line included."""
    page = make_page("base")
    inputs = DeepEncoderImageProcessor(mode="ocr2-base")(page)
    assert inputs["pixel_values"].shape == (1, 3, 1024, 1024) and "pixel_values_tiles" not in inputs
    assert sha256(inputs["pixel_values"][0]) == GOLDENS["pages"]["base"]["global_sha256"]
    assert inputs["num_image_tokens"] == [257]
    line = Image.new("RGB", (2000, 1), (10, 20, 30))
    view = DeepEncoderImageProcessor(mode="ocr2-base")(line)["pixel_values"]
    assert view.shape == (1, 3, 1024, 1024) and page_columns(view[0]) == 1024
    assert DeepEncoderImageProcessor(mode="ocr2")(line)["tile_grids"] == [(6, 1)]


def test_rgba_composited_on_white_and_grey_pages():
    for name in ("rgba", "grey"):
        golden = GOLDENS["pages"][name]
        inputs = DeepEncoderImageProcessor(mode=PAGES[name]["mode"])(make_page(name))
        assert sha256(inputs["pixel_values"][0]) == golden["global_sha256"]
        assert [sha256(t) for t in inputs["pixel_values_tiles"]] == golden["tiles_sha256"]
