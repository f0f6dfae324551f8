"""What VLM stacks read from a vision tower's config (`hidden_size`, `image_size`, `patch_size`, tokens per view)
holds for both towers: checked against what the towers and the processor actually produce (tiny configs)."""

from __future__ import annotations

import json

import pytest
import torch
from fixtures.v2_support import tiny_config_kwargs
from helpers import random_model
from PIL import Image

from deepencoder import DeepEncoderConfig, DeepEncoderImageProcessor, DeepEncoderV2Config, DeepEncoderV2Model


def tiny_v2() -> DeepEncoderV2Model:
    kwargs = tiny_config_kwargs()
    kwargs["encoder_config"]["query_counts"] = (4, 16)  # 128 px tiles, 256 px views
    kwargs["sam_config"]["image_size"] = 256
    return DeepEncoderV2Model(DeepEncoderV2Config(**kwargs)).eval()


@pytest.mark.parametrize("tower", ["v1", "v2"])
def test_vision_tower_attributes_match_the_outputs(tower):
    """An untiled `image_size` page: the processor's token count and the tower's sequence are `num_image_tokens`
    long and `hidden_size` wide; one view gives `(image_size // patch_size) ** 2 == num_patches` tokens."""
    model = random_model() if tower == "v1" else tiny_v2()
    config = model.config
    mode = "base" if tower == "v1" else "ocr2-base"
    processor = DeepEncoderImageProcessor(mode=mode, base_size=config.image_size)
    inputs = processor(Image.new("RGB", (config.image_size, config.image_size), "white"), return_tensors="pt")
    with torch.no_grad():
        views = model.encode_views(inputs["pixel_values"]).image_embeds
        page = model(pixel_values=inputs["pixel_values"], tile_grids=inputs["tile_grids"]).image_embeds[0]
    assert views.shape[1] == (config.image_size // config.patch_size) ** 2 == config.num_patches
    assert page.shape == (config.num_image_tokens, config.hidden_size)
    assert list(inputs["num_image_tokens"]) == [config.num_image_tokens]
    assert config.hidden_size == config.projector_dim


@pytest.mark.parametrize("config_class", [DeepEncoderConfig, DeepEncoderV2Config])
def test_released_values_and_saved_format(tmp_path, config_class):
    """The released towers: 1280-wide tokens, 1024 px views of 64 px per token; `hidden_size` is an alias of
    `projector_dim` (setting one sets the other) and none of these is written to config.json (derived values)."""
    config = config_class()
    assert (config.hidden_size, config.image_size, config.patch_size, config.num_patches) == (1280, 1024, 64, 256)
    assert config.num_image_tokens == (16 * 17 + 1 if config_class is DeepEncoderConfig else 256 + 1)
    config.hidden_size = 896
    assert config.projector_dim == 896
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["projector_dim"] == 896
    assert not {"hidden_size", "image_size", "patch_size", "num_patches", "num_image_tokens"} & set(saved)
    assert config_class.from_pretrained(tmp_path).hidden_size == 896
