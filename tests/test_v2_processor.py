"""The `ocr2` / `ocr2-base` processor modes against DeepSeek-OCR-2's own processor (golden fixtures: token counts on a
sweep of sizes, pixels of the golden pages), and each place where transformers' `deepseek_ocr2` port preprocesses
differently (tried as a new user would): ours is DeepSeek's, and the test shows the page actually hits the port's
behaviour."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures.v2_support import PAGES, SWEEP_SIZES, make_page
from PIL import Image, ImageOps
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


# ------------------------------------------------------------------------- where transformers' port differs
def first_page_column(view: torch.Tensor) -> int:
    """Index of the first column of a padded global view that is not the (127, 127, 127) fill."""
    fill = 127 / 255 * 2 - 1
    columns = ((view - fill).abs() > 1e-6).any(dim=0).any(dim=0)
    return int(columns.nonzero()[0])


def test_centring_round_half_even_not_floor():
    """A 600 x 752 page becomes 817 x 1024 in the view: 207 px of padding. DeepSeek (`ImageOps.pad`) puts it at
    round(103.5) = 104, the port at 103 (floor); ours is DeepSeek's pixel for pixel."""
    page = make_page("untiled")
    ours = DeepEncoderImageProcessor(mode="ocr2")(page)["pixel_values"][0]
    theirs = DeepseekOcr2ImageProcessorPil()(page, return_tensors="pt")["pixel_values"][0]
    assert sha256(ours) == GOLDENS["pages"]["untiled"]["global_sha256"]
    assert first_page_column(ours) == 104
    assert first_page_column(theirs) == 103


def exif_rotated(page: Image.Image) -> Image.Image:
    """`page` stored rotated, with EXIF orientation 6 saying how to show it upright (a phone photo)."""
    stored = page.transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    stored.save(buffer, format="PNG", exif=exif.tobytes())
    return Image.open(io.BytesIO(buffer.getvalue()))


def test_exif_orientation_applied_to_pil_inputs():
    page = make_page("untiled")
    rotated = exif_rotated(page)
    assert rotated.size == (752, 600)
    assert np.array_equal(np.asarray(ImageOps.exif_transpose(rotated)), np.asarray(page))  # the fixture is right
    ours = DeepEncoderImageProcessor(mode="ocr2")(rotated)["pixel_values"][0]
    assert sha256(ours) == GOLDENS["pages"]["untiled"]["global_sha256"]
    theirs = DeepseekOcr2ImageProcessorPil()(rotated, return_tensors="pt")["pixel_values"][0]
    assert first_page_column(theirs) == 0  # the stored landscape picture: padded top and bottom, not left and right


def test_patch_count_follows_the_768_rule_and_tie_break():
    """The port's `get_number_of_image_patches` tiles pages <= 768 px and breaks aspect ties with a 1024 px area."""
    port = DeepseekOcr2ImageProcessorPil()
    ours = DeepEncoderImageProcessor(mode="ocr2")
    small = [(w, h) for w, h in SWEEP if max(w, h) <= 768]
    ties = [(1540, 1232), (1771, 1012), (1925, 770)]
    for size in small + ties:
        assert ours.num_image_tokens(*size) == SWEEP[size]["ocr2"]
    wrong_small = [s for s in small if port_tokens(port.get_number_of_image_patches(s[1], s[0])) != SWEEP[s]["ocr2"]]
    wrong_ties = [s for s in ties if port_tokens(port.get_number_of_image_patches(s[1], s[0])) != SWEEP[s]["ocr2"]]
    assert wrong_small and wrong_ties == ties


def test_global_view_only_is_1024_and_takes_any_page():
    """`ocr2-base` gives the padded 1024 view (257 tokens); the port's `crop_to_patches=False` gives a 768 view and
    cannot resize a 2000 x 1 page."""
    page = make_page("base")
    inputs = DeepEncoderImageProcessor(mode="ocr2-base")(page)
    assert inputs["pixel_values"].shape == (1, 3, 1024, 1024) and "pixel_values_tiles" not in inputs
    assert sha256(inputs["pixel_values"][0]) == GOLDENS["pages"]["base"]["global_sha256"]
    assert inputs["num_image_tokens"] == [257]
    port = DeepseekOcr2ImageProcessorPil()
    assert port(page, crop_to_patches=False, return_tensors="pt")["pixel_values"].shape[-1] == 768
    line = Image.new("RGB", (2000, 1), (10, 20, 30))
    assert DeepEncoderImageProcessor(mode="ocr2-base")(line)["pixel_values"].shape == (1, 3, 1024, 1024)
    assert DeepEncoderImageProcessor(mode="ocr2")(line)["tile_grids"] == [(6, 1)]
    with pytest.raises(ValueError):
        port(line, crop_to_patches=False, return_tensors="pt")


def test_rgba_composited_on_white_and_grey_pages():
    for name in ("rgba", "grey"):
        golden = GOLDENS["pages"][name]
        inputs = DeepEncoderImageProcessor(mode=PAGES[name]["mode"])(make_page(name))
        assert sha256(inputs["pixel_values"][0]) == golden["global_sha256"]
        assert [sha256(t) for t in inputs["pixel_values_tiles"]] == golden["tiles_sha256"]
