"""`mode="auto"` without a model: the characters-per-token rule, the pixel estimate, the decision at its edges, the
processor choosing per page (outputs equal to the chosen modes' own), the tokenizer path with a tokenizer built
here, and `deepencoder plan` (table and `--json`)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from auto_mode_support import WORDS, lines_of_text, text_image, text_pdf
from PIL import Image, ImageDraw, ImageOps

from deepencoder import DeepEncoderImageProcessor
from deepencoder.cli import main
from deepencoder.image_processing_auto_mode import (
    TextEstimate,
    check_auto_modes,
    choose_mode,
    count_text_tokens,
    estimate_pixel_text_tokens,
    rule_text_tokens,
)
from deepencoder.image_processing_deepencoder import DEFAULT_AUTO_MODES, RESOLUTION_MODES
from deepencoder.pipeline.auto_mode import ROW_FIELDS, plan_pages

PAGE = (1000, 1300)


def vision_tokens(modes=DEFAULT_AUTO_MODES, size=PAGE) -> dict[str, int]:
    """Each mode's vision tokens on a page of `size`, from the mode table (the processor's own count)."""
    return {mode: DeepEncoderImageProcessor(mode=mode).num_image_tokens(*size) for mode in modes}


# ---------------------------------------------------------------------------------------------- the rule
def test_characters_per_token_rule():
    assert rule_text_tokens("hello world") == 4  # 11 characters * 0.3 = 3.3
    assert rule_text_tokens("  a \n\n\t b  ") == 1  # whitespace runs count once, ends stripped: "a b"
    assert rule_text_tokens("文字認識") == 3  # 4 CJK characters * 0.6 = 2.4
    assert rule_text_tokens("OCR 文字") == 3  # 4 * 0.3 + 2 * 0.6 = 2.4
    assert rule_text_tokens("") == 0
    assert count_text_tokens("hello world") == (4, "text-layer")


# ---------------------------------------------------------------------------------------------- the decision
def test_a_page_exactly_at_the_ratio_takes_the_cheaper_mode():
    vision = vision_tokens()
    assert len(set(vision.values())) == len(vision)  # the modes differ in cost on this page
    cheapest = min(vision, key=vision.get)
    at = choose_mode(TextEstimate(10 * vision[cheapest], "text-layer"), vision, max_compression=10)
    assert (at.mode, at.compression, at.fits) == (cheapest, 10.0, True)
    above = choose_mode(TextEstimate(10 * vision[cheapest] + 1, "text-layer"), vision, max_compression=10)
    second = sorted(vision, key=vision.get)[1]
    assert above.mode == second and above.vision_tokens == vision[second] and above.fits


def test_the_cheapest_mode_wins_whatever_order_the_modes_are_given_in():
    vision = vision_tokens(("gundam", "large", "tiny"))
    assert choose_mode(TextEstimate(5, "pixels"), vision).mode == "tiny"


def test_a_blank_page_takes_the_cheapest_mode():
    vision = vision_tokens()
    choice = choose_mode(TextEstimate(0, "pixels"), vision)
    assert choice.mode == min(vision, key=vision.get) and choice.compression == 0 and choice.fits
    processor = DeepEncoderImageProcessor(mode="auto")
    for page in (Image.new("RGB", PAGE, "white"), Image.new("RGB", PAGE, (128, 128, 128))):
        out = processor(page)
        assert out["text_tokens_estimate"] == [0] and out["estimate_source"] == ["pixels"]
        assert out["modes"] == [min(vision, key=vision.get)]


def test_a_page_no_mode_can_serve_takes_the_largest_and_says_so():
    vision = vision_tokens()
    largest = max(vision, key=vision.get)
    choice = choose_mode(TextEstimate(10 * vision[largest] + 1, "text-layer"), vision, max_compression=10)
    assert choice.mode == largest and not choice.fits and choice.compression > 10
    assert choice.row_fields()["fits"] is False
    # the processor's output says so too, for a page given as text
    processor = DeepEncoderImageProcessor(mode="auto", auto_modes=["tiny", "small"])
    page = Image.new("RGB", PAGE, "white")
    out = processor(page, text="word " * 3000)  # 14999 characters: 4500 tokens, far above 10 * 111
    assert out["modes"] == ["small"] and out["fits"] == [False] and out["compression"][0] > 10


def test_the_margin_guards_an_uncertain_estimate():
    vision = vision_tokens()
    cheapest = min(vision, key=vision.get)
    estimate = TextEstimate(10 * vision[cheapest], "pixels")
    assert choose_mode(estimate, vision, margin=1.0).mode == cheapest
    assert choose_mode(estimate, vision, margin=1.2).mode != cheapest


def test_allowed_modes_are_checked():
    with pytest.raises(ValueError, match="mix"):
        check_auto_modes(["tiny", "ocr2"], RESOLUTION_MODES, 10)
    with pytest.raises(ValueError, match="tile at different sizes"):
        check_auto_modes(["gundam", "gundam-m"], RESOLUTION_MODES, 10)
    with pytest.raises(ValueError, match="unknown"):
        check_auto_modes(["tiny", "huge"], RESOLUTION_MODES, 10)
    with pytest.raises(ValueError, match="positive"):
        DeepEncoderImageProcessor(mode="auto", max_compression=0)
    with pytest.raises(ValueError, match="override"):
        DeepEncoderImageProcessor(mode="auto", base_size=512)
    assert check_auto_modes("ocr2-base, ocr2", RESOLUTION_MODES, 10) == ("ocr2-base", "ocr2")


# ---------------------------------------------------------------------------------------------- pixel estimate
def known_page(lines: int = 40, words: int = 9, font_px: int = 22, size=(1100, 1500)) -> tuple[Image.Image, int]:
    text = lines_of_text(lines, words)
    image = text_image(size, text, font_px)
    drawn = [line for i, line in enumerate(text) if 30 + i * round(font_px * 1.4) + font_px <= size[1] - 30]
    return image, rule_text_tokens("\n".join(drawn))


def test_pixel_estimate_is_near_the_known_text():
    for lines, words, font_px in ((40, 9, 22), (12, 5, 40), (70, 12, 13)):
        image, truth = known_page(lines, words, font_px)
        estimate = estimate_pixel_text_tokens(image)
        assert abs(estimate - truth) <= 0.35 * truth, (lines, words, font_px, estimate, truth)


def test_pixel_estimate_ignores_polarity_scale_and_rules():
    image, _ = known_page()
    reference = estimate_pixel_text_tokens(image)
    assert abs(estimate_pixel_text_tokens(ImageOps.invert(image)) - reference) <= 0.1 * reference
    half = image.resize((image.width // 2, image.height // 2), Image.Resampling.LANCZOS)
    assert abs(estimate_pixel_text_tokens(half) - reference) <= 0.2 * reference
    ruled = image.copy()
    draw = ImageDraw.Draw(ruled)
    for y in range(20, ruled.height, 31):  # table rules through the text
        draw.line((10, y, ruled.width - 10, y), fill="black", width=2)
    draw.rectangle((5, 5, ruled.width - 6, ruled.height - 6), outline="black", width=3)
    assert abs(estimate_pixel_text_tokens(ruled) - reference) <= 0.25 * reference
    grid = Image.new("RGB", (1000, 1300), "white")
    draw = ImageDraw.Draw(grid)
    for k in range(0, 1000, 100):
        draw.line((k, 0, k, 1299), fill="black", width=2)
        draw.line((0, k, 999, k), fill="black", width=2)
    assert estimate_pixel_text_tokens(grid) <= 5  # rules alone hold no text
    assert estimate_pixel_text_tokens(np.asarray(image)) == reference  # arrays as pages


# ---------------------------------------------------------------------------------------------- processor
def test_processor_chooses_per_page_and_equals_each_mode_alone():
    sparse, _ = known_page(3, 4, 30)
    dense, _ = known_page(70, 12, 13)
    wide = text_image((1800, 900), lines_of_text(30, 20, seed=3), 16)
    processor = DeepEncoderImageProcessor(mode="auto", max_compression=2)
    pages = [sparse, dense, wide]
    out = processor(pages)
    assert len(set(out["modes"])) >= 2 and "gundam" in out["modes"]  # a mixed batch, tiles included
    assert isinstance(out["pixel_values"], list)  # views of different sizes
    tiles = []
    for index, (page, mode) in enumerate(zip(pages, out["modes"])):
        alone = DeepEncoderImageProcessor(mode=mode)(page)
        torch.testing.assert_close(out["pixel_values"][index], alone["pixel_values"][0], rtol=0, atol=0)
        assert out["tile_grids"][index] == alone["tile_grids"][0]
        assert out["num_image_tokens"][index] == alone["num_image_tokens"][0]
        if "pixel_values_tiles" in alone:
            tiles.append(alone["pixel_values_tiles"])
        assert out["estimate_source"][index] == "pixels"
        assert out["compression"][index] == round(out["text_tokens_estimate"][index] / alone["num_image_tokens"][0], 3)
    torch.testing.assert_close(out["pixel_values_tiles"], torch.cat(tiles), rtol=0, atol=0)


def test_processor_takes_the_text_when_given(tmp_path):
    page = Image.new("RGB", (800, 1000), "white")  # blank pixels: only the text can make this page dense
    processor = DeepEncoderImageProcessor(mode="auto")
    text = "abcde " * 500  # 2999 characters once stripped: 899.7 -> 900 tokens
    out = processor([page, page], text=[text, None])
    assert out["text_tokens_estimate"] == [900, 0]
    assert out["estimate_source"] == ["text-layer", "pixels"]
    assert out["modes"][0] == "small" and out["modes"][1] == "tiny"  # 900 > 10 * 73, <= 10 * 111
    assert "modes" not in processor(page, mode="tiny")  # an explicit mode still wins
    processor.save_pretrained(tmp_path)
    again = DeepEncoderImageProcessor.from_pretrained(tmp_path)
    assert (again.mode, again.max_compression, again.auto_modes) == ("auto", 10.0, list(DEFAULT_AUTO_MODES))


# ---------------------------------------------------------------------------------------------- tokenizer
def word_tokenizer(folder):
    """A WordLevel tokenizer over WORDS (anything else is [UNK]), whitespace-split, saved as transformers does."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, **{word: i + 1 for i, word in enumerate(WORDS)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]").save_pretrained(folder)
    return folder


def test_tokenizer_counts_text_layer_pages_exactly(tmp_path):
    pages = [lines_of_text(20, 7, seed=1), lines_of_text(50, 11, seed=2)]
    pdf = text_pdf(tmp_path / "doc.pdf", pages)
    tokenizer = word_tokenizer(tmp_path / "tokenizer")
    processor = DeepEncoderImageProcessor(mode="auto")
    rows = plan_pages([str(pdf)], processor, tokenizer=str(tokenizer))["pages"]
    assert [row["estimate_source"] for row in rows] == ["tokenizer", "tokenizer"]
    assert [row["text_tokens_estimate"] for row in rows] == [sum(len(line.split()) for line in p) for p in pages]
    rule = plan_pages([str(pdf)], processor)["pages"]
    assert [row["estimate_source"] for row in rule] == ["text-layer", "text-layer"]
    assert [row["text_tokens_estimate"] for row in rule] == [rule_text_tokens(" ".join(p)) for p in pages]
    with pytest.raises(ValueError, match="cannot load a tokenizer"):
        plan_pages([str(pdf)], processor, tokenizer=str(tmp_path / "missing"))


# ---------------------------------------------------------------------------------------------- plan
def test_plan_json_shape(tmp_path, capsys):
    pdf = text_pdf(tmp_path / "doc.pdf", [lines_of_text(5, 5), lines_of_text(60, 12)])
    image, _ = known_page()
    image.save(tmp_path / "page.png")
    image.save(tmp_path / "scan.pdf", resolution=150.0)  # an image-only PDF: no text layer
    assert main(["plan", str(pdf), str(tmp_path / "page.png"), str(tmp_path / "scan.pdf"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result) == {"pages", "summary"}
    assert [(row["source"].rsplit("/", 1)[-1], row["page"]) for row in result["pages"]] == [
        ("doc.pdf", 0), ("doc.pdf", 1), ("page.png", 0), ("scan.pdf", 0)]  # fmt: skip
    for row in result["pages"]:
        assert set(row) == {"source", "page", *ROW_FIELDS}
        assert row["vision_tokens"] == row["vision_tokens_by_mode"][row["mode"]]
    assert [row["estimate_source"] for row in result["pages"]] == ["text-layer", "text-layer", "pixels", "pixels"]
    summary = result["summary"]
    assert summary["pages"] == 4 and summary["errors"] == 0
    assert summary["vision_tokens"] == sum(row["vision_tokens"] for row in result["pages"])
    assert sum(mode["pages"] for mode in summary["by_mode"].values()) == 4
    assert summary["fixed_mode_vision_tokens"]["gundam"] == sum(
        row["vision_tokens_by_mode"]["gundam"] for row in result["pages"]
    )
    assert main(["plan", str(pdf), "--max-compression", "5", "--auto-modes", "base,large"]) == 0
    table = capsys.readouterr().out
    assert "auto mode:" in table and "the same pages in one mode" in table and "tiny" not in table
    assert main(["plan", str(pdf), "--auto-modes", "tiny,ocr2"]) == 2
