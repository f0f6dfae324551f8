"""The README's "Building your own VLM" recipe, as written there: a saved tower (either) loaded with `AutoModel`, any
`AutoModelForCausalLM`, a connector, through `OcrVisionLanguageModel`."""

from __future__ import annotations

import pytest
import torch
from fixtures.v2_support import tiny_config_kwargs
from helpers import random_model, randomize_, tiny_config
from PIL import Image
from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoModelForCausalLM

import deepencoder  # noqa: F401  (registers the towers with the Auto classes)
from deepencoder import DeepEncoderConfig, DeepEncoderImageProcessor, DeepEncoderV2Config, DeepEncoderV2Model
from deepencoder.training import OcrVisionLanguageModel

# (tower, processor, pages): v1 with small views, V2 with its real ones (1024 px global view, 768 px tiles)
TOWERS = {
    "v1": (
        lambda: random_model(tiny_config()),
        DeepEncoderImageProcessor(mode="gundam", base_size=256, tile_size=128),
        [(300, 200), (120, 100)],
    ),
    "v2": (
        lambda: randomize_(DeepEncoderV2Model(DeepEncoderV2Config(**tiny_config_kwargs()))).eval(),
        DeepEncoderImageProcessor(mode="ocr2"),
        [(1500, 800), (600, 500)],
    ),
}


@pytest.mark.parametrize("name", sorted(TOWERS))
def test_llava_style_recipe_trains(name, tmp_path):
    make_tower, processor, sizes = TOWERS[name]
    make_tower().save_pretrained(tmp_path / "tower")
    processor.save_pretrained(tmp_path / "tower")

    tower = AutoModel.from_pretrained(tmp_path / "tower")
    processor = AutoImageProcessor.from_pretrained(tmp_path / "tower")
    assert isinstance(tower.config, DeepEncoderV2Config if name == "v2" else DeepEncoderConfig)
    lm_config = AutoConfig.for_model(
        "qwen2",
        vocab_size=64,
        hidden_size=40,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
    )
    language_model = AutoModelForCausalLM.from_config(lm_config)
    vlm = OcrVisionLanguageModel(tower, language_model)  # a Linear connector: projector_dim -> 40
    assert isinstance(vlm.connector, torch.nn.Linear)
    assert (vlm.connector.in_features, vlm.connector.out_features) == (tower.config.projector_dim, 40)

    pages = [Image.new("RGB", size, "white") for size in sizes]
    input_ids = torch.randint(3, 64, (2, 5))
    out = vlm(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **processor(pages, return_tensors="pt"))
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert vlm.connector.weight.grad is not None
    assert tower.projector.weight.grad is not None  # gradients reach the tower through the connector
    expected = [processor.num_image_tokens(*size) for size in sizes]
    assert out.logits.shape[1] == max(n + 5 for n in expected)
