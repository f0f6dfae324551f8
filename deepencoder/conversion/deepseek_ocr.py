"""DeepSeek-OCR's released checkpoint -> DeepEncoderModel.

Only the vision tensors are read (`model.sam_model.*`, `model.vision_model.*`, `model.projector.*`,
`model.image_newline`, `model.view_seperator`), from local shards or, for a hub id, by HTTP range requests.
"""

from __future__ import annotations

from typing import Any

import torch

from ..configuration_deepencoder import DeepEncoderConfig
from ..modeling_deepencoder import DeepEncoderModel
from .common import build_model, clip_config_from_state_dict, sam_config_from_state_dict
from .io import CheckpointError
from .remote import open_checkpoint, read_tensors
from .report import ConversionReport

PREFIX_MAP: tuple[tuple[str, str], ...] = (
    ("model.sam_model.", "sam."),
    ("model.vision_model.", "clip."),
    ("model.projector.layers.", "projector."),
)
EXACT_MAP: dict[str, str] = {"model.image_newline": "image_newline", "model.view_seperator": "view_separator"}
UNUSED: dict[str, str] = {
    "model.vision_model.embeddings.patch_embedding.weight": "CLIP's conv patch embedding: the tower feeds SAM tokens",
    "model.vision_model.embeddings.position_ids": "index buffer, recomputed",
}


def is_vision_key(key: str) -> bool:
    return key in EXACT_MAP or any(key.startswith(prefix) for prefix, _ in PREFIX_MAP)


def is_deepseek_ocr(keys) -> bool:
    return any(key.startswith("model.sam_model.") for key in keys) and "model.view_seperator" in set(keys)


def convert_deepseek_ocr(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], ConversionReport]:
    """Pure key map: DeepSeek-OCR names -> DeepEncoderModel names. Non-vision keys are ignored; a vision key that
    maps nowhere is an error naming it."""
    report = ConversionReport(source="deepseek-ocr")
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, tensor in state_dict.items():
        if not is_vision_key(key):
            continue
        if key in UNUSED:
            report.dropped[key] = UNUSED[key]
            continue
        if key in EXACT_MAP:
            out[EXACT_MAP[key]] = tensor
            continue
        for prefix, target in PREFIX_MAP:
            if key.startswith(prefix):
                out[target + key[len(prefix) :]] = tensor
                break
        else:  # pragma: no cover - is_vision_key guarantees a prefix
            unknown.append(key)
    if unknown:
        raise CheckpointError(f"unmapped DeepSeek-OCR vision keys: {unknown}")
    return out, report


def config_from_converted(state_dict: dict[str, torch.Tensor], **kwargs: Any) -> DeepEncoderConfig:
    sam = sam_config_from_state_dict(state_dict, **kwargs.pop("sam_config", {}))
    clip = clip_config_from_state_dict(state_dict, **kwargs.pop("clip_config", {}))
    projector = state_dict.get("projector.weight")
    if projector is not None:
        kwargs.setdefault("projector_dim", projector.shape[0])
        kwargs.setdefault("projector_bias", "projector.bias" in state_dict)
    return DeepEncoderConfig(sam_config=sam, clip_config=clip, **kwargs)


def load_deepseek_ocr(
    path_or_repo_id: str,
    *,
    revision: str | None = None,
    dtype: torch.dtype | None = None,
    config_kwargs: dict[str, Any] | None = None,
    filesystem: Any = None,
) -> DeepEncoderModel:
    """Local directory / file or hub id -> DeepEncoderModel with the released vision weights.

    filesystem: an fsspec-style file system to read through (defaults: local files, or `HfFileSystem` for a hub id).
    """
    model, _ = load_deepseek_ocr_with_report(
        path_or_repo_id, revision=revision, dtype=dtype, config_kwargs=config_kwargs, filesystem=filesystem
    )
    return model


def load_deepseek_ocr_with_report(
    path_or_repo_id: str,
    *,
    revision: str | None = None,
    dtype: torch.dtype | None = None,
    config_kwargs: dict[str, Any] | None = None,
    filesystem: Any = None,
) -> tuple[DeepEncoderModel, ConversionReport]:
    source = open_checkpoint(path_or_repo_id, revision=revision, filesystem=filesystem)
    raw = read_tensors(source, is_vision_key)
    if not raw:
        raise CheckpointError(f"{path_or_repo_id}: no DeepSeek-OCR vision tensors (model.sam_model.* ...) found")
    state_dict, report = convert_deepseek_ocr(raw)
    report.source = str(path_or_repo_id)
    config = config_from_converted(state_dict, **(config_kwargs or {}))
    model = build_model(config, state_dict, report, dtype=dtype)
    return model, report
