"""ONNX export of the DeepEncoder V2 view encoder at a fixed mode (`deepencoder export-onnx --mode ocr2 --tiles`),
checked with onnxruntime against PyTorch (fp32, relative error <= 1e-5) at two batch sizes (dynamic batch axis)."""

from __future__ import annotations

from fixtures.v2_support import tiny_config_kwargs
from helpers import randomize_

from deepencoder import DeepEncoderV2Config, DeepEncoderV2Model
from deepencoder.cli import main
from deepencoder.export import verify_onnx

TOL = 1e-5


def test_export_ocr2_tiles_matches_pytorch(tmp_path):
    model = randomize_(DeepEncoderV2Model(DeepEncoderV2Config(**tiny_config_kwargs())), seed=3).eval()
    model.save_pretrained(tmp_path / "tower")
    out = tmp_path / "v2.onnx"
    assert (
        main(["export-onnx", "--weights", str(tmp_path / "tower"), "--mode", "ocr2", "--tiles", "--out", str(out)]) == 0
    )
    for batch in (1, 3):
        error, shape = verify_onnx(model, out, 768, batch=batch, seed=batch)
        assert shape == (batch, 144, model.config.projector_dim)
        assert error <= TOL, (batch, error)
