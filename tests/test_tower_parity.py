"""The whole SAM + compressor + CLIP join (+ projector) against transformers' own port of this trunk,
`transformers.models.unlimited_ocr.UnlimitedOcrVisionModel`, on identical random weights."""

import pytest
import torch
from helpers import random_model, rel_err, tiny_config, unlimited_ocr_reference

from deepencoder import DeepEncoderConfig, attention

TOL = 1e-4


@pytest.mark.parametrize("size", [(128, 128), (256, 256), (320, 320), (384, 384), (256, 192), (192, 320)])
@pytest.mark.parametrize("kernel", ["mask", "folded"])
def test_tiny_tower_matches_unlimited_ocr(size, kernel):
    """Square sizes below, at and above the pretraining grid (pos-embed and rel-pos interpolation both ways) and
    non-square grids (`native` mode): per-axis interpolation, windows with padding, global blocks; with each SDPA
    rel-pos kernel."""
    model = random_model()
    model.set_attention_kernel(kernel)
    reference, projector = unlimited_ocr_reference(model)
    pixels = torch.randn(2, 3, *size)
    with torch.no_grad():
        ours = model.encode_views(pixels, output_pre_projector=True)
        theirs = reference(pixels).last_hidden_state
        theirs_projected = projector(theirs)
    assert ours.grid == (size[0] // 64, size[1] // 64)
    assert rel_err(ours.pre_projector, theirs) < TOL
    assert rel_err(ours.image_embeds, theirs_projected) < TOL


@pytest.mark.parametrize("implementation,kernel", [("eager", None), ("sdpa", "mask"), ("sdpa", "folded")])
def test_each_attention_path_runs_its_kernel_and_matches_unlimited_ocr(monkeypatch, implementation, kernel):
    """The eager reference path never calls SDPA; each SDPA kernel is the one that runs; all three against
    transformers' port."""
    pixels = torch.randn(1, 3, 320, 256)
    model = random_model(tiny_config(attn_implementation=implementation))
    model.set_attention_kernel(kernel)
    reference, projector = unlimited_ocr_reference(model)
    with torch.no_grad():
        theirs = projector(reference(pixels).last_hidden_state)
    calls = {"sdpa": 0, **{name: 0 for name in attention.REL_POS_KERNELS}}
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def count_sdpa(*args, **kwargs):
        calls["sdpa"] += 1
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", count_sdpa)
    for name, function in list(attention.REL_POS_KERNELS.items()):
        counted = lambda *a, _f=function, _n=name, **k: calls.__setitem__(_n, calls[_n] + 1) or _f(*a, **k)  # noqa: E731
        monkeypatch.setitem(attention.REL_POS_KERNELS, name, counted)
    with torch.no_grad():
        ours = model.encode_views(pixels).image_embeds
    # 4 SAM blocks (all with rel-pos) + 2 CLIP layers
    assert calls[kernel or "eager"] == 4, calls
    assert sum(calls[name] for name in attention.REL_POS_KERNELS) == 4, calls
    if implementation == "eager":
        assert calls["sdpa"] == 0, calls
    else:
        assert calls["sdpa"] >= 6, calls
    assert rel_err(ours, theirs) < TOL


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
