"""segment-anything's SAM (`sam_vit_{b,l,h}_*.pth`) and transformers' `SamModel` -> the DeepEncoder SAM stage.

Only the image encoder is used; its names under segment-anything's `image_encoder.` prefix are already this
library's names under `sam.` (the table below states it key by key). The prompt encoder and mask decoder are
dropped. The architecture (ViT-B / L / H, global blocks, window) is read from tensor shapes, not from the file name.
"""

from __future__ import annotations

from typing import Any

import torch

from ..modeling_deepencoder import DeepEncoderModel
from .common import KeyTable, map_stage_keys
from .report import ConversionReport

# segment-anything `ImageEncoderViT` names (after `image_encoder.`) -> DeepEncoder names
SEGMENT_ANYTHING_MAP: KeyTable = (
    (r"patch_embed\.proj\.(weight|bias)", r"sam.patch_embed.proj.\1"),
    (r"pos_embed", "sam.pos_embed"),
    (r"blocks\.(\d+)\.(norm1|norm2)\.(weight|bias)", r"sam.blocks.\1.\2.\3"),
    (r"blocks\.(\d+)\.attn\.(qkv|proj)\.(weight|bias)", r"sam.blocks.\1.attn.\2.\3"),
    (r"blocks\.(\d+)\.attn\.(rel_pos_h|rel_pos_w)", r"sam.blocks.\1.attn.\2"),
    (r"blocks\.(\d+)\.mlp\.(lin1|lin2)\.(weight|bias)", r"sam.blocks.\1.mlp.\2.\3"),
    (r"neck\.([0-3])\.(weight|bias)", r"sam.neck.\1.\2"),  # conv 1x1, LayerNorm2d, conv 3x3, LayerNorm2d
)

# transformers `SamVisionEncoder` names (after `vision_encoder.`) -> DeepEncoder names
HF_SAM_MAP: KeyTable = (
    (r"patch_embed\.projection\.(weight|bias)", r"sam.patch_embed.proj.\1"),
    (r"pos_embed", "sam.pos_embed"),
    (r"layers\.(\d+)\.layer_norm1\.(weight|bias)", r"sam.blocks.\1.norm1.\2"),
    (r"layers\.(\d+)\.layer_norm2\.(weight|bias)", r"sam.blocks.\1.norm2.\2"),
    (r"layers\.(\d+)\.attn\.(qkv|proj)\.(weight|bias)", r"sam.blocks.\1.attn.\2.\3"),
    (r"layers\.(\d+)\.attn\.(rel_pos_h|rel_pos_w)", r"sam.blocks.\1.attn.\2"),
    (r"layers\.(\d+)\.mlp\.(lin1|lin2)\.(weight|bias)", r"sam.blocks.\1.mlp.\2.\3"),
    (r"neck\.conv1\.weight", "sam.neck.0.weight"),
    (r"neck\.layer_norm1\.(weight|bias)", r"sam.neck.1.\1"),
    (r"neck\.conv2\.weight", "sam.neck.2.weight"),
    (r"neck\.layer_norm2\.(weight|bias)", r"sam.neck.3.\1"),
)

# source key prefix -> why it is not used
DROPPED_PREFIXES: dict[str, str] = {
    "prompt_encoder.": "SAM's prompt encoder: not part of the vision tower",
    "mask_decoder.": "SAM's mask decoder: not part of the vision tower",
    "shared_image_embedding.": "SAM's prompt positional encoding: not part of the vision tower",
    "pixel_mean": "SAM's normalisation constant: the image processor normalises",
    "pixel_std": "SAM's normalisation constant: the image processor normalises",
}

ENCODER_PREFIX = {"segment-anything": "image_encoder.", "hf-sam": "vision_encoder."}


def drop_reason(key: str) -> str | None:
    """Why a SAM checkpoint key is not converted, or None for an image-encoder key."""
    for prefix, reason in DROPPED_PREFIXES.items():
        if key.startswith(prefix):
            return reason
    return None


def is_needed(key: str) -> bool:
    return drop_reason(key) is None


def _convert(
    state_dict: dict[str, torch.Tensor], table: KeyTable, prefix: str, source: str
) -> tuple[dict[str, torch.Tensor], ConversionReport]:
    report = ConversionReport(source=source)
    bare = not any(key.startswith(prefix) for key in state_dict)  # the image encoder's own state dict
    encoder: dict[str, torch.Tensor] = {}
    original: dict[str, str] = {}  # encoder-relative name -> name in the checkpoint
    for key, tensor in state_dict.items():
        reason = drop_reason(key)
        if reason is not None:
            report.dropped[key] = reason
            continue
        name = key[len(prefix) :] if key.startswith(prefix) else key
        if not bare and not key.startswith(prefix):
            name = "\0" + key  # outside the image encoder and not a known part: matches no row
        encoder[name] = tensor
        original[name] = key
    out = map_stage_keys(encoder, table, source, "SAM", original)
    report.converted = sorted(out)
    return out, report


def convert_segment_anything(
    state_dict: dict[str, torch.Tensor], source: str = "segment-anything"
) -> tuple[dict[str, torch.Tensor], ConversionReport]:
    """segment-anything state dict (a full `Sam`, keys `image_encoder.*`, or an `ImageEncoderViT` alone) ->
    DeepEncoder `sam.*` tensors. Prompt encoder / mask decoder keys are dropped with their reason; any other key
    that the table does not map is an error naming it."""
    return _convert(state_dict, SEGMENT_ANYTHING_MAP, ENCODER_PREFIX["segment-anything"], source)


def convert_hf_sam(
    state_dict: dict[str, torch.Tensor], source: str = "hf-sam"
) -> tuple[dict[str, torch.Tensor], ConversionReport]:
    """transformers `SamModel` / `SamVisionModel` state dict (keys `vision_encoder.*`, or the encoder alone) ->
    DeepEncoder `sam.*` tensors."""
    return _convert(state_dict, HF_SAM_MAP, ENCODER_PREFIX["hf-sam"], source)


def load_segment_anything(
    path_or_repo_id: str,
    *,
    revision: str | None = None,
    dtype: torch.dtype | None = None,
    sam_config: dict[str, Any] | None = None,
    clip_config: dict[str, Any] | None = None,
    config_kwargs: dict[str, Any] | None = None,
    filesystem: Any = None,
) -> tuple[DeepEncoderModel, ConversionReport]:
    """A segment-anything `sam_vit_*.pth` (or transformers SAM checkpoint) -> DeepEncoderModel whose SAM trunk and
    neck hold its image encoder; the compressor, the CLIP stage (released CLIP-L/14 config unless `clip_config`
    says otherwise), the projector, newline and separator are freshly initialised and listed in the report."""
    from .sources import assemble_model, read_converted

    part = read_converted(
        path_or_repo_id, formats=("segment-anything", "hf-sam"), revision=revision, filesystem=filesystem
    )
    return assemble_model(
        part,
        None,
        source=str(path_or_repo_id),
        dtype=dtype,
        sam_config=sam_config,
        clip_config=clip_config,
        config_kwargs=config_kwargs,
    )
