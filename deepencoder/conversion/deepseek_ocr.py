"""DeepSeek-OCR's released checkpoint -> the whole v1 tower.

Only the vision tensors are read (`model.sam_model.*`, `model.vision_model.*`, `model.projector.*`,
`model.image_newline`, `model.view_seperator`), from local shards or, for a hub id, by HTTP range requests. This is
also the layout transformers' `UnlimitedOcrForConditionalGeneration.save_pretrained` writes by default (it saves in
the original checkpoint's names); such a directory's config.json states what the shapes cannot (CLIP heads, eps).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection

from .common import DEEPENCODER, KeyTable, map_keys
from .formats import CheckpointFormat, StateDict
from .io import CheckpointError
from .unlimited_ocr import deepencoder_config_values

DEEPSEEK_OCR_MAP: KeyTable = (
    (r"model\.sam_model\.(.+)", r"sam.\1"),
    (r"model\.vision_model\.(.+)", r"clip.\1"),
    (r"model\.projector\.layers\.(weight|bias)", r"projector.\1"),
    (r"model\.image_newline", "image_newline"),
    (r"model\.view_seperator", "view_separator"),
)
UNUSED: dict[str, str] = {
    "model.vision_model.embeddings.patch_embedding.weight": "CLIP's conv patch embedding: the tower feeds SAM tokens",
    "model.vision_model.embeddings.position_ids": "index buffer, recomputed",
}
VISION_KEY = re.compile("|".join(f"(?:{pattern})" for pattern, _ in DEEPSEEK_OCR_MAP))


def is_vision_key(key: str) -> bool:
    return VISION_KEY.fullmatch(key) is not None


def canonical(keys: Collection[str]) -> Callable[[str], str]:
    """transformers' `UnlimitedOcrModel` (without the `ForConditionalGeneration` head) saves the same names without
    the leading `model.`: they are read as if they had it."""
    if any(key.startswith("sam_model.") for key in keys):
        return lambda key: "model." + key
    return lambda key: key


def convert_deepseek_ocr(state_dict: StateDict, source: str) -> StateDict:
    """Pure key map: DeepSeek-OCR vision tensors -> DeepEncoderModel names; a key no row maps is an error naming it."""
    out, unmatched = map_keys(state_dict, DEEPSEEK_OCR_MAP)
    if unmatched:
        raise CheckpointError(f"{source}: keys that are not DeepSeek-OCR vision tensors: {sorted(unmatched)}")
    return out


DEEPSEEK_OCR = CheckpointFormat(
    name="deepseek-ocr",
    description="DeepSeek-OCR's released checkpoint (model.sam_model.*, model.vision_model.*, ...), also what "
    "transformers' UnlimitedOcr models save by default",
    family=DEEPENCODER,
    provides=DEEPENCODER.stages,
    signatures=(
        ("model.sam_model.patch_embed.proj.weight",),
        ("model.view_seperator",),
        ("sam_model.patch_embed.proj.weight",),
    ),
    convert=convert_deepseek_ocr,
    needed=lambda key: is_vision_key(key) and key not in UNUSED,
    drop_reason=UNUSED.get,
    canonical=canonical,
    config_from_json=deepencoder_config_values,
    licence="MIT (DeepSeek-OCR model weights)",
)
FORMATS = (DEEPSEEK_OCR,)
