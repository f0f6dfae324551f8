"""Any supported checkpoint -> DeepEncoder-named tensors, and DeepEncoder models assembled from them.

`read_converted` opens a local path or hub id through one fsspec-style reading path (`remote.open_checkpoint`),
detects the layout from the key names (safetensors: from the headers alone), reads only the tensors the tower
uses (by byte ranges for safetensors) and runs the layout's pure converter. `assemble_model` builds a tower
from the SAM stage of one converted checkpoint and the CLIP stage of another (either may be absent), initialising
what no source provides and listing it in the report.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any

import torch

from ..configuration_deepencoder import DeepEncoderClipConfig, DeepEncoderConfig, DeepEncoderSamConfig
from ..modeling_deepencoder import DeepEncoderModel
from . import clip, deepseek_ocr, segment_anything
from .common import build_model, clip_config_from_state_dict, map_keys, sam_config_from_state_dict
from .detect import SourceFormat, detect_format
from .io import CheckpointError
from .remote import checkpoint_keys, open_checkpoint, read_json_beside, read_tensors
from .report import ConversionReport

Converter = Callable[[dict[str, torch.Tensor], str], tuple[dict[str, torch.Tensor], ConversionReport]]

# this library's own names: identity, but strict
DEEPENCODER_MAP = (
    (r"((?:sam|clip|projector)\..+)", r"\1"),
    (r"(image_newline|view_separator)", r"\1"),
)

LICENCES: dict[str, str] = {
    "segment-anything": "Apache-2.0 (segment-anything model weights)",
    "hf-sam": "Apache-2.0 (segment-anything model weights)",
    "open-clip": "MIT (OpenAI CLIP weights; check the licence of other open_clip pretrained tags)",
    "hf-clip": "MIT (OpenAI CLIP weights; check the licence of the repository converted)",
    "deepseek-ocr": "MIT (DeepSeek-OCR model weights)",
    "deepencoder": "that of the directory converted",
}


def convert_deepencoder(
    state_dict: dict[str, torch.Tensor], source: str = "deepencoder"
) -> tuple[dict[str, torch.Tensor], ConversionReport]:
    """This library's own state dict: every key must be one of the tower's (`sam.*`, `clip.*`, `projector.*`,
    `image_newline`, `view_separator`)."""
    out, unmatched = map_keys(state_dict, DEEPENCODER_MAP)
    if unmatched:
        raise CheckpointError(f"{source}: keys that are not DeepEncoder parameters: {sorted(unmatched)}")
    return out, ConversionReport(source=source, converted=sorted(out))


def _convert_deepseek_ocr(
    state_dict: dict[str, torch.Tensor], source: str = "deepseek-ocr"
) -> tuple[dict[str, torch.Tensor], ConversionReport]:
    out, report = deepseek_ocr.convert_deepseek_ocr(state_dict)
    report.source = source
    report.converted = sorted(out)
    return out, report


CONVERTERS: dict[str, Converter] = {
    "segment-anything": segment_anything.convert_segment_anything,
    "hf-sam": segment_anything.convert_hf_sam,
    "open-clip": clip.convert_open_clip,
    "hf-clip": clip.convert_hf_clip,
    "deepseek-ocr": _convert_deepseek_ocr,
    "deepencoder": convert_deepencoder,
}


def needed(source_format: str, key: str) -> bool:
    """Whether the converter of `source_format` uses `key` (the rest is never read from a safetensors file)."""
    if source_format in ("segment-anything", "hf-sam"):
        return segment_anything.is_needed(key)
    if source_format in ("open-clip", "hf-clip"):
        return clip.drop_reason(key, source_format) is None
    if source_format == "deepseek-ocr":
        return deepseek_ocr.is_vision_key(key) and key not in deepseek_ocr.UNUSED
    return True


def canonical_names(source_format: str, keys: Collection[str]) -> Callable[[str], str]:
    """A CLIP vision tower saved on its own (`model.visual.state_dict()`, or transformers 5's `CLIPVisionModel`,
    which saves without `vision_model.`) has no prefix: decisions about its keys are made on the prefixed name."""
    prefix = clip.PREFIX.get(source_format)
    if prefix and not any(key.startswith(prefix) for key in keys):
        return lambda key: prefix + key
    return lambda key: key


def skipped_reason(source_format: str, key: str) -> str | None:
    """Reason recorded for a key that was not read; None for keys not worth listing (a language model's)."""
    if source_format in ("segment-anything", "hf-sam"):
        return segment_anything.drop_reason(key)
    if source_format in ("open-clip", "hf-clip"):
        return clip.drop_reason(key, source_format)
    if source_format == "deepseek-ocr":
        return deepseek_ocr.UNUSED.get(key)
    return None


def convert_state_dict(
    state_dict: dict[str, torch.Tensor], source_format: SourceFormat | None = None, source: str = ""
) -> tuple[dict[str, torch.Tensor], ConversionReport, SourceFormat]:
    """Pure: a state dict in any supported layout (detected when not given) -> DeepEncoder names + report."""
    state_dict = strip_wrapper_prefix(state_dict)
    source_format = source_format or detect_format(state_dict)
    out, report = CONVERTERS[source_format](state_dict, source or source_format)
    return out, report, source_format


def strip_wrapper_prefix(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Training checkpoints saved from a DistributedDataParallel wrapper prefix every key with `module.`."""
    if state_dict and all(key.startswith("module.") for key in state_dict):
        return {key[len("module.") :]: value for key, value in state_dict.items()}
    return state_dict


@dataclass
class ConvertedCheckpoint:
    """A checkpoint in DeepEncoder names, with what its own config files say about the stages."""

    state_dict: dict[str, torch.Tensor]
    report: ConversionReport
    source_format: SourceFormat
    sam_config: dict[str, Any] = field(default_factory=dict)
    clip_config: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)  # top-level DeepEncoderConfig values (own directories)


def read_converted(
    path_or_repo_id: str,
    *,
    formats: Collection[str] | None = None,
    revision: str | None = None,
    filesystem: Any = None,
) -> ConvertedCheckpoint:
    """Local file / directory or hub id (`owner/name` or `owner/name/file`) -> `ConvertedCheckpoint`.

    formats: the layouts accepted here (others raise an error naming the detected one).
    filesystem: an fsspec-style file system to read through (default: local files, or `HfFileSystem` for hub ids).
    Safetensors are read by ranges: only the headers and the tensors the tower uses are fetched.
    """
    name = str(path_or_repo_id)
    source = open_checkpoint(name, revision=revision, filesystem=filesystem)
    keys = checkpoint_keys(source)
    if keys is None:  # pickled: the names are known only once the (weights-only) unpickling is done
        raw = strip_wrapper_prefix(read_tensors(source, lambda key: True))
        source_format = detect_format(raw)
        canonical = canonical_names(source_format, raw)
        unread = [key for key in raw if not needed(source_format, canonical(key))]
        raw = {key: value for key, value in raw.items() if needed(source_format, canonical(key))}
    else:
        source_format = detect_format(strip_wrapper_prefix(dict.fromkeys(keys)))  # type: ignore[arg-type]
        wrapped = bool(keys) and all(key.startswith("module.") for key in keys)
        strip = (lambda key: key[len("module.") :]) if wrapped else (lambda key: key)
        canonical = canonical_names(source_format, [strip(key) for key in keys])
        raw = strip_wrapper_prefix(read_tensors(source, lambda key: needed(source_format, canonical(strip(key)))))
        unread = [strip(key) for key in keys if not needed(source_format, canonical(strip(key)))]
    if formats is not None and source_format not in formats:
        raise CheckpointError(f"{name}: a {source_format} checkpoint; this conversion takes {sorted(formats)}")
    state_dict, report = CONVERTERS[source_format](raw, name)
    for key in unread:
        reason = skipped_reason(source_format, canonical(key))
        if reason is not None:
            report.dropped[key] = reason
    converted = ConvertedCheckpoint(state_dict, report, source_format)
    config_json = read_json_beside(source, "config.json")
    if source_format == "hf-clip":
        converted.clip_config = clip.clip_config_from_hf(config_json)
    elif config_json and source_format == "deepencoder" and config_json.get("model_type") == "deepencoder":
        converted.sam_config = dict(config_json.get("sam_config") or {})
        converted.clip_config = dict(config_json.get("clip_config") or {})
        converted.config = {k: config_json[k] for k in ("projector_dim", "projector_bias") if k in config_json}
    return converted


ARCHITECTURE_KEYS = {
    "sam": ("rel_pos_attention", "layer_norm_eps", "window_size"),
    "clip": ("num_attention_heads", "hidden_act", "layer_norm_eps", "pre_layernorm_eps", "patch_size"),
}


def assemble_model(
    sam: ConvertedCheckpoint | None,
    clip_part: ConvertedCheckpoint | None,
    *,
    source: str,
    dtype: torch.dtype | None = None,
    sam_config: dict[str, Any] | None = None,
    clip_config: dict[str, Any] | None = None,
    config_kwargs: dict[str, Any] | None = None,
    take_rest_from: ConvertedCheckpoint | None = None,
) -> tuple[DeepEncoderModel, ConversionReport]:
    """Build a tower with the SAM stage (`sam.*`, its compressor `sam.net_*` when present) of `sam`, the CLIP stage
    (`clip.*`) of `clip_part`, and the projector / newline / separator of `take_rest_from` when given. Every stage
    given must be complete (a missing key is an error naming it); what no source provides keeps a fresh model's
    initialisation and is listed in `report.initialised`. Stages not given use the released tower's config."""
    report = ConversionReport(source=source)
    state: dict[str, torch.Tensor] = {}
    parts = [("sam", sam, lambda k: k.startswith("sam.")), ("clip", clip_part, lambda k: k.startswith("clip."))]
    if take_rest_from is not None:
        parts.append(("rest", take_rest_from, lambda k: not k.startswith(("sam.", "clip."))))
    for label, part, wanted in parts:
        if part is None:
            continue
        tag = f"[{label}: {part.report.source}] " if sum(p is not None for _, p, _ in parts) > 1 else ""
        for key, reason in part.report.dropped.items():
            report.dropped[tag + key] = reason
        for key, tensor in part.state_dict.items():
            if wanted(key):
                state[key] = tensor
            elif take_rest_from is not part:
                report.dropped[tag + key] = f"not taken from this source (its {label} stage is the one used)"
    # what the sources' own config files state (architecture only; shapes give the rest), then the caller's values
    sam_values = {k: v for k, v in (sam.sam_config if sam else {}).items() if k in ARCHITECTURE_KEYS["sam"]}
    sam_values.update(sam_config or {})
    clip_values = {
        k: v for k, v in (clip_part.clip_config if clip_part else {}).items() if k in ARCHITECTURE_KEYS["clip"]
    }
    clip_values.update(clip_config or {})
    extra = {**(take_rest_from.config if take_rest_from else {}), **(config_kwargs or {})}
    try:
        if clip_part is not None:
            clip_cfg = clip_config_from_state_dict(state, **clip_values)
        else:
            clip_cfg = DeepEncoderClipConfig(**clip_values)
        if sam is not None:
            if not any(key.startswith("sam.net_") for key in state):
                width = clip_cfg.hidden_size
                sam_values.setdefault("compressor_channels", [width // 2, width])
            sam_cfg = sam_config_from_state_dict(state, **sam_values)
        else:
            sam_values.setdefault("compressor_channels", [clip_cfg.hidden_size // 2, clip_cfg.hidden_size])
            sam_cfg = DeepEncoderSamConfig(**sam_values)
        projector = state.get("projector.weight")
        if projector is not None:
            extra.setdefault("projector_dim", projector.shape[0])
            extra.setdefault("projector_bias", "projector.bias" in state)
        config = DeepEncoderConfig(sam_config=sam_cfg, clip_config=clip_cfg, **extra)
    except KeyError as error:
        raise CheckpointError(f"{source}: missing key {error.args[0]} (needed to infer the architecture)") from error
    except ValueError as error:
        raise CheckpointError(f"{source}: {error}") from error

    def may_be_initialised(key: str) -> bool:
        if sam is not None and key.startswith("sam.") and not key.startswith("sam.net_"):
            return False
        if clip_part is not None and key.startswith("clip."):
            return False
        return take_rest_from is None or key.startswith(("sam.", "clip."))

    model = build_model(config, state, report, dtype=dtype, allow_missing=may_be_initialised)
    return model, report
