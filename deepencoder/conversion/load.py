"""The conversions users call: a checkpoint (local path or hub id) -> a model + report, each one `read_converted`
followed by `build_model` (a whole tower) or `assemble_model` (stages, the rest initialised)."""

from __future__ import annotations

from typing import Any

import torch
from transformers import PreTrainedModel

from ..modeling_deepencoder import DeepEncoderModel
from .common import DEEPENCODER
from .deepseek_ocr2 import DEEPENCODER_V2, assemble_v2
from .formats import ModelFamily
from .registry import FORMATS
from .report import ConversionReport
from .sources import assemble_model, build_model, read_converted


def formats_providing(stage: str, family: ModelFamily = DEEPENCODER) -> tuple[str, ...]:
    """Names of the registered formats of `family` holding `stage`."""
    return tuple(name for name, record in FORMATS.items() if record.family is family and stage in record.provides)


def whole_tower_formats(family: ModelFamily | None = DEEPENCODER) -> tuple[str, ...]:
    """Names of the registered formats holding a whole tower of `family` (None: of any family)."""
    return tuple(
        name for name, record in FORMATS.items() if record.whole_tower and (family is None or record.family is family)
    )


def load_tower(
    path_or_repo_id: str,
    *,
    family: ModelFamily | None = DEEPENCODER,
    revision: str | None = None,
    dtype: torch.dtype | None = None,
    config_kwargs: dict[str, Any] | None = None,
    filesystem: Any = None,
) -> tuple[PreTrainedModel, ConversionReport]:
    """Any checkpoint holding a whole tower of `family` (for v1: DeepSeek-OCR, transformers' UnlimitedOcr models
    in either naming, a deepencoder directory; for V2: DeepSeek-OCR-2; None: whichever tower the checkpoint holds,
    its family read from its layout) -> the model, loaded strictly, and the report. Only the vision tensors are
    read."""
    part = read_converted(
        path_or_repo_id, formats=whole_tower_formats(family), revision=revision, filesystem=filesystem
    )
    return build_model(part, dtype=dtype, config_kwargs=config_kwargs)


def load_deepseek_ocr(
    path_or_repo_id: str,
    *,
    revision: str | None = None,
    dtype: torch.dtype | None = None,
    config_kwargs: dict[str, Any] | None = None,
    filesystem: Any = None,
) -> DeepEncoderModel:
    """Local directory / file or hub id of DeepSeek-OCR (or of transformers' UnlimitedOcr port) -> DeepEncoderModel
    with the released vision weights.

    filesystem: an fsspec-style file system to read through (defaults: local files, or `HfFileSystem` for a hub id).
    """
    model, _ = load_tower(
        path_or_repo_id, revision=revision, dtype=dtype, config_kwargs=config_kwargs, filesystem=filesystem
    )
    return model


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
    """A checkpoint holding a SAM stage (segment-anything `sam_vit_*.pth`, transformers SAM, ...) -> DeepEncoderModel
    whose SAM trunk and neck hold its image encoder; the compressor (unless the source has one), the CLIP stage
    (released CLIP-L/14 config unless `clip_config` says otherwise), the projector, newline and separator are
    freshly initialised and listed in the report."""
    part = read_converted(path_or_repo_id, formats=formats_providing("sam"), revision=revision, filesystem=filesystem)
    return assemble_model(
        part,
        None,
        source=str(path_or_repo_id),
        dtype=dtype,
        sam_config=sam_config,
        clip_config=clip_config,
        config_kwargs=config_kwargs,
    )


def load_clip(
    path_or_repo_id: str,
    *,
    revision: str | None = None,
    dtype: torch.dtype | None = None,
    sam_config: dict[str, Any] | None = None,
    clip_config: dict[str, Any] | None = None,
    config_kwargs: dict[str, Any] | None = None,
    filesystem: Any = None,
) -> tuple[DeepEncoderModel, ConversionReport]:
    """A checkpoint holding a CLIP stage (open_clip / OpenAI, transformers CLIP, ...) -> DeepEncoderModel whose CLIP
    stage holds its vision transformer; the SAM stage (released ViT-B config unless `sam_config` says otherwise),
    projector, newline and separator are freshly initialised and listed in the report. Only the vision tensors are
    read from safetensors.

    open_clip checkpoints do not state their activation: quick-GELU (OpenAI's weights) is assumed; pass
    `clip_config={"hidden_act": "gelu"}` for towers trained with exact GELU. transformers directories carry a
    config.json whose heads, activation and LayerNorm eps are used."""
    part = read_converted(path_or_repo_id, formats=formats_providing("clip"), revision=revision, filesystem=filesystem)
    return assemble_model(
        None,
        part,
        source=str(path_or_repo_id),
        dtype=dtype,
        sam_config=sam_config,
        clip_config=clip_config,
        config_kwargs=config_kwargs,
    )


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
    """A new DeepEncoder from public parts, the way DeepEncoder itself was initialised before training: SAM stage
    from `sam`, CLIP stage from `clip` (local paths or hub ids, any format holding that stage). The compressor
    (`net_2`, `net_3`, unless the SAM source has one), projector, newline and separator are initialised and
    reported; the compressor's widths default to (CLIP width / 2, CLIP width), 512 and 1024 for CLIP-L.
    `revision` and `filesystem` apply to both sources."""
    sam_part = read_converted(sam, formats=formats_providing("sam"), revision=revision, filesystem=filesystem)
    clip_part = read_converted(clip, formats=formats_providing("clip"), revision=revision, filesystem=filesystem)
    return assemble_model(
        sam_part,
        clip_part,
        source=f"SAM stage: {sam}; CLIP stage: {clip}",
        dtype=dtype,
        sam_config=sam_config,
        clip_config=clip_config,
        config_kwargs=config_kwargs,
    )


def load_composed_v2(
    sam: str,
    qwen2: str,
    *,
    revision: str | None = None,
    dtype: torch.dtype | None = None,
    config_kwargs: dict[str, Any] | None = None,
    filesystem: Any = None,
) -> tuple[PreTrainedModel, ConversionReport]:
    """A new DeepEncoder V2 from public parts, as DeepSeek-OCR-2's tower was initialised: the SAM trunk and neck from
    `sam` (segment-anything `.pth`, transformers SAM, a DeepSeek-OCR checkpoint ...), the encoder's decoder layers
    and final norm from `qwen2` (a Qwen2 causal LM such as Qwen2-0.5B; its config.json gives heads, eps and the RoPE
    base). The compressor (`net_2`, `net_3` to 896), the learned queries, the projector and the separator are
    initialised; the report lists them and what was dropped (a SAM source's own compressor, the token embedding)."""
    sam_part = read_converted(sam, formats=formats_providing("sam"), revision=revision, filesystem=filesystem)
    qwen2_part = read_converted(
        qwen2, formats=formats_providing("encoder", DEEPENCODER_V2), revision=revision, filesystem=filesystem
    )
    report = ConversionReport(source=f"SAM stage: {sam}; encoder: {qwen2}")
    for part, stage in ((sam_part, "sam"), (qwen2_part, "encoder")):
        tag = f"[{stage}: {part.report.source}] "
        report.dropped.update({tag + key: why for key, why in part.report.dropped.items()})
        report.licences += [entry for entry in part.report.licences if entry not in report.licences]
    sam_state = {}
    for key, tensor in sam_part.state_dict.items():
        if key.startswith("sam.net_"):
            report.dropped[f"[sam: {sam}] {key}"] = (
                "the source's compressor: V2's net_2 / net_3 (512, 896) are initialised"
            )
        elif key.startswith("sam."):
            sam_state[key] = tensor
    encoder_state = {k: v for k, v in qwen2_part.state_dict.items() if k.startswith("encoder.")}
    model = assemble_v2(
        sam_state,
        encoder_state,
        report,
        encoder_stated=qwen2_part.config.get("encoder_config"),
        config_kwargs=config_kwargs,
        dtype=dtype,
    )
    return model, report
