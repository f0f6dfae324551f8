"""Shared test helpers: tiny configs that still exercise windows (with padding), global blocks, rel-pos and
position interpolation; random weights; key maps onto the independent reference implementations."""

from __future__ import annotations

import torch

from deepencoder import DeepEncoderConfig, DeepEncoderModel
from deepencoder.conversion.unlimited_ocr import to_unlimited_ocr_vision, unlimited_ocr_vision_config

TINY_SAM = dict(
    hidden_size=64,
    num_hidden_layers=4,
    num_attention_heads=2,
    global_attn_indexes=[1, 3],
    window_size=6,
    image_size=256,
    out_channels=32,
    compressor_channels=[48, 64],
)
TINY_CLIP = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, image_size=56)


def tiny_config(**overrides) -> DeepEncoderConfig:
    sam = {**TINY_SAM, **overrides.pop("sam_config", {})}
    clip = {**TINY_CLIP, **overrides.pop("clip_config", {})}
    return DeepEncoderConfig(
        sam_config=sam, clip_config=clip, projector_dim=overrides.pop("projector_dim", 80), **overrides
    )


def randomize_(module: torch.nn.Module, seed: int = 0, std: float = 0.05) -> torch.nn.Module:
    """Fill every parameter with seeded noise: norms around 1, everything else N(0, std) (so zero-initialised
    tables such as rel-pos, pos-embed and biases matter in the comparison)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            noise = torch.randn(param.shape, generator=generator, dtype=torch.float32)
            is_norm = any(part in name for part in ("norm", "neck.1", "neck.3", "layrnorm")) and param.ndim == 1
            if is_norm and name.endswith("weight"):
                param.copy_(1.0 + 0.1 * noise)
            else:
                param.copy_(std * noise)
    return module


def random_model(config: DeepEncoderConfig | None = None, seed: int = 0, std: float = 0.05) -> DeepEncoderModel:
    model = DeepEncoderModel(config or tiny_config())
    return randomize_(model, seed, std).eval()


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected|."""
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-12)).item()


# ---------------------------------------------------------------- key maps onto references
# transformers' port of the tower: key names and config from the library's one mapping (conversion/unlimited_ocr.py),
# which tests/test_conversion_sources.py checks against transformers' own classes and a save_pretrained checkpoint
to_unlimited_ocr = to_unlimited_ocr_vision  # our names -> UnlimitedOcrVisionModel's (without the projector)


def unlimited_ocr_reference(model: DeepEncoderModel):
    """transformers' own port of the trunk with our weights, plus our projector weights in a plain Linear."""
    from transformers.models.unlimited_ocr.modeling_unlimited_ocr import UnlimitedOcrVisionModel

    reference = UnlimitedOcrVisionModel(unlimited_ocr_vision_config(model.config)).eval()
    missing, unexpected = reference.load_state_dict(to_unlimited_ocr_vision(model.state_dict()), strict=False)
    assert not unexpected, unexpected
    assert set(missing) <= {"vision_encoder.embeddings.patch_embedding.weight"}, missing
    projector = torch.nn.Linear(model.projector.in_features, model.projector.out_features)
    projector.load_state_dict(model.projector.state_dict())
    return reference, projector


def to_deepseek_ocr(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our names -> the released DeepSeek-OCR checkpoint's names (test-only inverse of the converter)."""
    out = {}
    for key, value in state_dict.items():
        if key.startswith("sam."):
            out["model.sam_model." + key[4:]] = value
        elif key.startswith("clip."):
            out["model.vision_model." + key[5:]] = value
        elif key.startswith("projector."):
            out["model.projector.layers." + key[len("projector.") :]] = value
        elif key == "image_newline":
            out["model.image_newline"] = value
        elif key == "view_separator":
            out["model.view_seperator"] = value
    return out
