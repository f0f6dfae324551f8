"""Which layout a checkpoint is in, from its key names alone (timm's `checkpoint_filter_fn` habit)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

from .io import CheckpointError

SourceFormat = Literal["deepencoder", "deepseek-ocr", "segment-anything", "hf-sam", "open-clip", "hf-clip"]

# format -> keys that identify it (any one of the tuples present in full)
SIGNATURES: dict[str, tuple[tuple[str, ...], ...]] = {
    "deepseek-ocr": (("model.sam_model.patch_embed.proj.weight",), ("model.view_seperator",)),
    "deepencoder": (("sam.patch_embed.proj.weight",), ("clip.embeddings.class_embedding",)),
    "segment-anything": (("image_encoder.patch_embed.proj.weight",), ("patch_embed.proj.weight", "neck.0.weight")),
    "hf-sam": (
        ("vision_encoder.patch_embed.projection.weight",),
        ("patch_embed.projection.weight", "neck.conv1.weight"),
    ),
    "open-clip": (("visual.class_embedding",), ("class_embedding", "conv1.weight")),
    "hf-clip": (("vision_model.embeddings.class_embedding",), ("embeddings.class_embedding", "pre_layrnorm.weight")),
}


def detect_format(keys: Iterable[str]) -> SourceFormat:
    """Name the layout of a state dict from its keys:

    - `deepseek-ocr`: DeepSeek-OCR's released checkpoint (`model.sam_model.*`, `model.vision_model.*`, ...)
    - `deepencoder`: this library's own names (`sam.*`, `clip.*`, `projector.*`)
    - `segment-anything`: a full SAM (`image_encoder.*`, `prompt_encoder.*`, `mask_decoder.*`) or its image encoder
    - `hf-sam`: transformers' `SamModel` / `SamVisionModel` (`vision_encoder.*`)
    - `open-clip`: open_clip / OpenAI CLIP (`visual.*` beside the text tower, or a bare visual tower)
    - `hf-clip`: transformers' `CLIPModel` / `CLIPVisionModel` (`vision_model.*`)
    """
    present = set(keys)
    for name, signatures in SIGNATURES.items():
        if any(all(key in present for key in signature) for signature in signatures):
            return name  # type: ignore[return-value]
    sample = sorted(present)[:8]
    raise CheckpointError(
        f"unrecognised checkpoint layout (first keys: {sample}); expected one of {sorted(SIGNATURES)}: "
        "DeepSeek-OCR, segment-anything sam_vit_*.pth, transformers SAM / CLIP, open_clip / OpenAI CLIP, or deepencoder"
    )
