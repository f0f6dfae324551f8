"""ONNX export of the view encoder (SAM + compressor + CLIP + projector) on tiny configs, checked with
onnxruntime against PyTorch (fp32, relative error <= 1e-5) at two batch sizes (the batch axis is dynamic)."""

import pytest
import torch
from helpers import random_model, rel_err

from deepencoder.export import bake_view_size, export_onnx, verify_onnx

TOL = 1e-5


@pytest.mark.parametrize("kernel,size", [("mask", 384), ("folded", 192)])
def test_export_matches_pytorch_with_dynamic_batch(tmp_path, kernel, size):
    """384 px: position tables resized up from the 256 px pretraining size; 192 px: down, windows padded."""
    model = random_model()
    model.set_attention_kernel(kernel)
    path = export_onnx(model, tmp_path / "tower.onnx", size, opset=18)
    for batch in (1, 3):
        error, shape = verify_onnx(model, path, size, batch=batch)
        assert shape == (batch, (size // 64) ** 2, model.config.projector_dim)
        assert error <= TOL, (batch, error)


def test_baked_view_size_keeps_outputs():
    model = random_model()
    pixels = torch.randn(2, 3, 320, 320)
    with torch.inference_mode():
        expected = model.encode_views(pixels).image_embeds
        actual = bake_view_size(model, 320).encode_views(pixels).image_embeds
    assert rel_err(actual, expected) < 1e-6


def test_cli_export_rejects_low_opset(tmp_path):
    model = random_model()
    with pytest.raises(ValueError, match="opset"):
        export_onnx(model, tmp_path / "x.onnx", 256, opset=16)
