"""The whole SAM + compressor + CLIP join (+ projector) against transformers' own port of this trunk,
`transformers.models.unlimited_ocr.UnlimitedOcrVisionModel`, on identical random weights."""

import pytest
import torch
from helpers import random_model, rel_err, tiny_config, unlimited_ocr_reference

from deepencoder import DeepEncoderConfig

TOL = 1e-4


@pytest.mark.parametrize("size", [(128, 128), (256, 256), (320, 320), (384, 384), (256, 192), (192, 320)])
@pytest.mark.parametrize("rel_pos_attention", ["folded", "mask"])
def test_tiny_tower_matches_unlimited_ocr(size, rel_pos_attention):
    """Square sizes below, at and above the pretraining grid (pos-embed and rel-pos interpolation both ways) and
    non-square grids (`native` mode): per-axis interpolation, windows with padding, global blocks."""
    model = random_model(tiny_config(sam_config={"rel_pos_attention": rel_pos_attention}))
    reference, projector = unlimited_ocr_reference(model)
    pixels = torch.randn(2, 3, *size)
    with torch.no_grad():
        ours = model.encode_views(pixels, output_pre_projector=True)
        theirs = reference(pixels).last_hidden_state
        theirs_projected = projector(theirs)
    assert ours.grid == (size[0] // 64, size[1] // 64)
    assert rel_err(ours.pre_projector, theirs) < TOL
    assert rel_err(ours.image_embeds, theirs_projected) < TOL


def test_eager_equals_sdpa_paths(monkeypatch):
    pixels = torch.randn(1, 3, 320, 256)
    outs = {}
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(
        torch.nn.functional, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or sdpa(*a, **k)
    )
    for implementation in ("eager", "sdpa"):
        for mode in ("folded", "mask"):
            config = tiny_config(sam_config={"rel_pos_attention": mode}, attn_implementation=implementation)
            model = random_model(config)
            calls.clear()
            with torch.no_grad():
                outs[implementation, mode] = model.encode_views(pixels).image_embeds
            # 4 SAM blocks + 2 CLIP layers go through SDPA unless eager was asked for
            assert len(calls) == (0 if implementation == "eager" else 6), (implementation, len(calls))
    reference = outs["eager", "folded"]
    for key, value in outs.items():
        assert rel_err(value, reference) < 1e-5, key


@pytest.mark.slow
@pytest.mark.parametrize("size", [512])
def test_real_size_tower_matches_unlimited_ocr(size):
    """The released architecture (SAM ViT-B, CLIP-L/14, 2048 -> 1280) at Tiny resolution."""
    model = random_model(DeepEncoderConfig(), std=0.02)
    reference, projector = unlimited_ocr_reference(model)
    pixels = torch.randn(1, 3, size, size)
    with torch.no_grad():
        ours = model.encode_views(pixels, output_pre_projector=True)
        theirs = reference(pixels).last_hidden_state
        assert ours.image_embeds.shape == (1, (size // 64) ** 2, 1280)
        assert rel_err(ours.pre_projector, theirs) < TOL
        assert rel_err(ours.image_embeds, projector(theirs)) < TOL


def released_geometry_config(**kwargs):
    """Narrow and shallow, but the released geometry: 64x64 pos-embed grid, 14x14 windows, 127-row global rel-pos
    tables, CLIP's 16x16 position grid. Inputs of 512/640/1024/1280 px then take exactly the released model's
    interpolation paths (64 -> 32/40/64/80 for SAM, 16 -> 8/10/16/20 for CLIP)."""
    return tiny_config(
        sam_config={"image_size": 1024, "window_size": 14, "num_hidden_layers": 3, "global_attn_indexes": [1]},
        clip_config={"image_size": 224, "num_hidden_layers": 1},
        **kwargs,
    )


@pytest.mark.parametrize("size", [512, 640, 1024, 1280])
def test_released_geometry_matches_unlimited_ocr(size):
    model = random_model(released_geometry_config())
    reference, projector = unlimited_ocr_reference(model)
    pixels = torch.randn(1, 3, size, size)
    with torch.no_grad():
        ours = model.encode_views(pixels, output_pre_projector=True)
        theirs = reference(pixels).last_hidden_state
    assert ours.grid == (size // 64, size // 64)
    assert rel_err(ours.pre_projector, theirs) < TOL
    assert rel_err(ours.image_embeds, projector(theirs)) < TOL


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_tracks_fp32(dtype):
    """Low-precision weights and activations; interpolations still computed in fp32 (2e-2 relative)."""
    model = random_model(released_geometry_config())
    pixels = torch.randn(1, 3, 640, 384)
    with torch.no_grad():
        reference = model.encode_views(pixels).image_embeds
        low = model.to(dtype).encode_views(pixels.to(dtype)).image_embeds
    assert low.dtype == dtype
    assert rel_err(low.float(), reference) < 2e-2
