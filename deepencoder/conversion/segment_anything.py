"""segment-anything's SAM (`sam_vit_{b,l,h}_*.pth`) and transformers' `SamModel` -> the DeepEncoder SAM stage.

Only the image encoder is used; its names under segment-anything's `image_encoder.` prefix are already this
library's names under `sam.` (the table below states it key by key). The prompt encoder and mask decoder are
dropped. The architecture (ViT-B / L / H, global blocks, window) is read from tensor shapes, not from the file name.
"""

from __future__ import annotations

from .common import DEEPENCODER, KeyTable, map_stage_keys
from .formats import CheckpointFormat, StateDict, bare_prefix

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
LICENCE = "Apache-2.0 (segment-anything model weights)"


def drop_reason(key: str) -> str | None:
    """Why a SAM checkpoint key is not converted, or None for an image-encoder key."""
    for prefix, reason in DROPPED_PREFIXES.items():
        if key.startswith(prefix):
            return reason
    return None


def is_needed(key: str) -> bool:
    return drop_reason(key) is None


def convert_segment_anything(state_dict: StateDict, source: str) -> StateDict:
    """segment-anything image-encoder tensors (`image_encoder.*`) -> DeepEncoder `sam.*` tensors."""
    return map_stage_keys(state_dict, SEGMENT_ANYTHING_MAP, source, "SAM", prefix="image_encoder.")


def convert_hf_sam(state_dict: StateDict, source: str) -> StateDict:
    """transformers `SamVisionEncoder` tensors (`vision_encoder.*`) -> DeepEncoder `sam.*` tensors."""
    return map_stage_keys(state_dict, HF_SAM_MAP, source, "SAM", prefix="vision_encoder.")


SEGMENT_ANYTHING = CheckpointFormat(
    name="segment-anything",
    description="segment-anything sam_vit_*.pth: a full `Sam` (image_encoder.*, prompt_encoder.*, mask_decoder.*) "
    "or its image encoder alone",
    family=DEEPENCODER,
    provides=frozenset({"sam"}),
    signatures=(("image_encoder.patch_embed.proj.weight",), ("patch_embed.proj.weight", "neck.0.weight")),
    convert=convert_segment_anything,
    needed=is_needed,
    drop_reason=drop_reason,
    canonical=bare_prefix("image_encoder."),
    licence=LICENCE,
)
HF_SAM = CheckpointFormat(
    name="hf-sam",
    description="transformers' `SamModel` / `SamVisionModel` (vision_encoder.*)",
    family=DEEPENCODER,
    provides=frozenset({"sam"}),
    signatures=(
        ("vision_encoder.patch_embed.projection.weight",),
        ("patch_embed.projection.weight", "neck.conv1.weight"),
    ),
    convert=convert_hf_sam,
    needed=is_needed,
    drop_reason=drop_reason,
    canonical=bare_prefix("vision_encoder."),
    licence=LICENCE,
)
FORMATS = (SEGMENT_ANYTHING, HF_SAM)
