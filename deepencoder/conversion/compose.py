"""A new DeepEncoder from public parts, the way DeepEncoder itself was initialised before training: the SAM stage
of one checkpoint (segment-anything, transformers SAM, DeepSeek-OCR or a deepencoder directory) and the CLIP stage
of another (open_clip / OpenAI, transformers CLIP, DeepSeek-OCR or a deepencoder directory). The compressor
(`net_2`, `net_3`, unless the SAM source has one), projector, newline and separator are initialised and reported."""

from __future__ import annotations

from typing import Any

import torch

from ..modeling_deepencoder import DeepEncoderModel
from .report import ConversionReport
from .sources import assemble_model, read_converted

SAM_SOURCES = ("segment-anything", "hf-sam", "deepseek-ocr", "deepencoder")
CLIP_SOURCES = ("open-clip", "hf-clip", "deepseek-ocr", "deepencoder")


def load_composed(
    sam: str,
    clip: str,
    *,
    revision: str | None = None,
    dtype: torch.dtype | None = None,
    sam_config: dict[str, Any] | None = None,
    clip_config: dict[str, Any] | None = None,
    config_kwargs: dict[str, Any] | None = None,
    filesystem: Any = None,
) -> tuple[DeepEncoderModel, ConversionReport]:
    """SAM stage from `sam`, CLIP stage from `clip` (local paths or hub ids) -> DeepEncoderModel + report.

    The compressor's widths default to (CLIP width / 2, CLIP width), 512 and 1024 for CLIP-L, as in DeepEncoder.
    `revision` and `filesystem` apply to both sources."""
    sam_part = read_converted(sam, formats=SAM_SOURCES, revision=revision, filesystem=filesystem)
    clip_part = read_converted(clip, formats=CLIP_SOURCES, revision=revision, filesystem=filesystem)
    return assemble_model(
        sam_part,
        clip_part,
        source=f"SAM stage: {sam}; CLIP stage: {clip}",
        dtype=dtype,
        sam_config=sam_config,
        clip_config=clip_config,
        config_kwargs=config_kwargs,
    )
