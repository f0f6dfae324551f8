"""The README's "Building your own VLM" recipe, as written there: a saved tower loaded with `AutoModel`, any
`AutoModelForCausalLM`, a connector, through `OcrVisionLanguageModel`."""

from __future__ import annotations

import torch
from helpers import random_model, tiny_config
from PIL import Image
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

import deepencoder  # noqa: F401  (registers the tower with the Auto classes)
from deepencoder import DeepEncoderImageProcessor, DeepEncoderModel
from deepencoder.training import OcrVisionLanguageModel


def test_llava_style_recipe_trains_and_generates(tmp_path):
    random_model(tiny_config()).save_pretrained(tmp_path / "tower")
    DeepEncoderImageProcessor(mode="gundam", base_size=256, tile_size=128).save_pretrained(tmp_path / "tower")

    tower = AutoModel.from_pretrained(tmp_path / "tower")
    assert isinstance(tower, DeepEncoderModel)
    lm_config = AutoConfig.for_model(
        "qwen2",
        vocab_size=64,
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
    )
    language_model = AutoModelForCausalLM.from_config(lm_config)
    vlm = OcrVisionLanguageModel(tower, language_model)  # Linear connector: 80 -> 48
    assert isinstance(vlm.connector, torch.nn.Linear)
    assert (vlm.connector.in_features, vlm.connector.out_features) == (80, 48)

    processor = DeepEncoderImageProcessor.from_pretrained(tmp_path / "tower")
    pages = [Image.new("RGB", (300, 200), "white"), Image.new("RGB", (120, 100), "gray")]
    inputs = processor(pages, return_tensors="pt")
    input_ids = torch.randint(3, 64, (2, 5))
    attention_mask = torch.ones_like(input_ids)
    out = vlm(input_ids=input_ids, attention_mask=attention_mask, **inputs)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert vlm.connector.weight.grad is not None
    assert tower.projector.weight.grad is not None  # gradients reach the tower through the connector
    expected = [processor.num_image_tokens(*page.size) for page in pages]
    assert out.logits.shape[1] == max(n + 5 for n in expected)
