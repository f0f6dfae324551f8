"""DeepEncoder V2 against DeepSeek-OCR-2's own code, through the golden fixtures `make_deepseek_ocr2_goldens.py`
wrote by running it (transformers 4.46.3, its mixed attention mask) on seeded random weights: the same weights are
rebuilt here by name in DeepSeek-OCR-2's checkpoint layout and loaded with `from_deepseek_ocr2`; pages are drawn by
the same code. Checked per page: the processor's pixels (bit-exact hashes), tile grid and token count, and the page
embeddings (fp32, max |ours - DeepSeek| / max |DeepSeek| <= 1e-4)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from fixtures.v2_support import PAGES, make_page, seeded_state_dict
from helpers import rel_err
from safetensors.torch import load_file, save_file

from deepencoder import DeepEncoderImageProcessor, DeepEncoderV2Model

FIXTURES = Path(__file__).parent / "fixtures"
GOLDENS = json.loads((FIXTURES / "deepseek_ocr2_goldens.json").read_text())
TENSORS = load_file(str(FIXTURES / "deepseek_ocr2_goldens.safetensors"))
TOL = 1e-4


def sha256(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.contiguous().numpy().tobytes()).hexdigest()


def language_model_tensors() -> dict[str, torch.Tensor]:
    """A few tensors of DeepSeek-OCR-2's language model, which `from_deepseek_ocr2` must not read."""
    generator = torch.Generator().manual_seed(9)
    return {
        name: torch.randn(shape, generator=generator)
        for name, shape in {
            "model.embed_tokens.weight": (32, 16),
            "model.layers.0.self_attn.q_proj.weight": (16, 16),
            "model.layers.0.mlp.experts.0.up_proj.weight": (8, 16),
            "model.norm.weight": (16,),
            "lm_head.weight": (32, 16),
        }.items()
    }


@pytest.fixture(scope="module")
def small_model(tmp_path_factory) -> DeepEncoderV2Model:
    shapes = GOLDENS["small_checkpoint_shapes"]
    folder = tmp_path_factory.mktemp("deepseek_ocr2_small")
    save_file({**seeded_state_dict(shapes, seed=0), **language_model_tensors()}, str(folder / "model.safetensors"))
    return DeepEncoderV2Model.from_deepseek_ocr2(str(folder)).eval()


def encode_page(model: DeepEncoderV2Model, name: str):
    spec = PAGES[name]
    inputs = DeepEncoderImageProcessor(mode=spec["mode"])(make_page(name))
    with torch.inference_mode():
        return inputs, model(**inputs).image_embeds[0]


def check_pixels_and_count(inputs, golden: dict) -> None:
    assert inputs["num_image_tokens"][0] == golden["tokens"]
    assert list(inputs["tile_grids"][0]) == golden["grid"]
    assert sha256(inputs["pixel_values"][0]) == golden["global_sha256"]
    tiles = inputs.get("pixel_values_tiles")
    assert ([sha256(t) for t in tiles] if tiles is not None else []) == golden["tiles_sha256"]


@pytest.mark.parametrize("name", list(PAGES))
def test_small_pages_match_deepseek_ocr2(small_model, name):
    golden = GOLDENS["pages"][name]
    inputs, embeds = encode_page(small_model, name)
    check_pixels_and_count(inputs, golden)
    expected = TENSORS[f"small.{name}"]
    assert embeds.shape == expected.shape == (golden["tokens"], 64)
    assert rel_err(embeds, expected) <= TOL


def test_goldens_exercise_tiles_and_modes():
    """The page set covers what the parity claim names: untiled, 1x2, 2x1, a larger grid, grey, RGBA, ocr2-base."""
    grids = {name: tuple(page["grid"]) for name, page in GOLDENS["pages"].items()}
    assert grids["untiled"] == (1, 1) and grids["tiles_1x2"] == (1, 2) and grids["tiles_2x1"] == (2, 1)
    assert grids["grey"] == (2, 3) and grids["rgba"] == (2, 1)
    assert GOLDENS["pages"]["base"]["tokens"] == 257 and GOLDENS["pages"]["base"]["mode"] == "ocr2-base"
    assert make_page("grey").mode == "L" and make_page("rgba").mode == "RGBA"
    assert GOLDENS["transformers"] == "4.46.3"  # the version whose Qwen2Model calls DeepSeek's mask override


@pytest.mark.slow
def test_real_size_pages_match_deepseek_ocr2():
    """The released architecture (SAM ViT-B, 24-layer Qwen2-0.5B-shaped encoder, 896 -> 1280) on the 1x2 page (two
    768 tiles, the 1024 view, the separator); the fixture keeps every 8th token and each view's first and last token
    and the separator. (It also holds the untiled page, 5.1e-6 when last measured: left out here to keep the suite
    within its time.)"""
    from deepencoder.conversion.sources import build_model, convert_state_dict

    state = seeded_state_dict(GOLDENS["real_checkpoint_shapes"], seed=0)
    model, _ = build_model(convert_state_dict(state, "deepseek-ocr2"))
    model.eval()
    assert model.config.encoder_config.num_hidden_layers == 24 and model.config.projector_dim == 1280
    del state
    for name in ("tiles_1x2",):
        golden = GOLDENS["pages"][name]
        inputs, embeds = encode_page(model, name)
        check_pixels_and_count(inputs, golden)
        assert embeds.shape == (golden["tokens"], 1280)
        assert rel_err(embeds[golden["real_rows"]], TENSORS[f"real.{name}"]) <= TOL
