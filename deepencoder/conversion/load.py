"""The conversions users call: a checkpoint (local path or hub id) -> a model + report, each one `read_converted`
followed by `build_model` (a whole tower) or `assemble_model` (stages, the rest initialised)."""

from __future__ import annotations

import os
from typing import Any

import torch
from transformers import PreTrainedModel

from ..dtypes import parse_dtype
from ..modeling_deepencoder import DeepEncoderModel
from .common import DEEPENCODER
from .deepseek_ocr2 import DEEPENCODER_V2, assemble_v2
from .formats import ModelFamily
from .hub import HUB_KEYWORDS, HubOptions, Remote
from .io import CheckpointError
from .registry import FORMATS
from .remote import open_checkpoint, read_json_beside
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
    hub: HubOptions | None = None,
    remote: Remote | None = None,
    device: str | torch.device | None = None,
) -> tuple[PreTrainedModel, ConversionReport]:
    """Any checkpoint holding a whole tower of `family` (for v1: DeepSeek-OCR, transformers' UnlimitedOcr models
    in either naming, a deepencoder directory; for V2: DeepSeek-OCR-2; None: whichever tower the checkpoint holds,
    its family read from its layout) -> the model, loaded strictly, and the report. Only the vision tensors are
    read. device: where the model is built and the tensors copied to (default the CPU).

    hub: `from_pretrained`'s hub arguments (`HubOptions`: revision, cache_dir, local_files_only, token, subfolder,
    force_download; `revision` given here wins); the ranges read from the hub are kept in its cache
    (`deepencoder.conversion.hub`). remote: where a hub id's bytes come from (default: the hub). Every `load_*`
    here takes both."""
    part = read_converted(
        path_or_repo_id,
        formats=whole_tower_formats(family),
        revision=revision,
        filesystem=filesystem,
        hub=hub,
        remote=remote,
    )
    return build_model(part, dtype=dtype, config_kwargs=config_kwargs, device=device)


def load_deepseek_ocr(
    path_or_repo_id: str,
    *,
    revision: str | None = None,
    dtype: torch.dtype | None = None,
    config_kwargs: dict[str, Any] | None = None,
    filesystem: Any = None,
    hub: HubOptions | None = None,
    remote: Remote | None = None,
) -> DeepEncoderModel:
    """Local directory / file or hub id of DeepSeek-OCR (or of transformers' UnlimitedOcr port) -> DeepEncoderModel
    with the released vision weights.

    filesystem: an fsspec-style file system to read through (defaults: local files, or the hub through its cache
    for a hub id). hub / remote: as `load_tower`.
    """
    model, _ = load_tower(
        path_or_repo_id,
        revision=revision,
        dtype=dtype,
        config_kwargs=config_kwargs,
        filesystem=filesystem,
        hub=hub,
        remote=remote,
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
    hub: HubOptions | None = None,
    remote: Remote | None = None,
) -> tuple[DeepEncoderModel, ConversionReport]:
    """A checkpoint holding a SAM stage (segment-anything `sam_vit_*.pth`, transformers SAM, ...) -> DeepEncoderModel
    whose SAM trunk and neck hold its image encoder; the compressor (unless the source has one), the CLIP stage
    (released CLIP-L/14 config unless `clip_config` says otherwise), the projector, newline and separator are
    freshly initialised and listed in the report."""
    part = read_converted(
        path_or_repo_id,
        formats=formats_providing("sam"),
        revision=revision,
        filesystem=filesystem,
        hub=hub,
        remote=remote,
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


def load_clip(
    path_or_repo_id: str,
    *,
    revision: str | None = None,
    dtype: torch.dtype | None = None,
    sam_config: dict[str, Any] | None = None,
    clip_config: dict[str, Any] | None = None,
    config_kwargs: dict[str, Any] | None = None,
    filesystem: Any = None,
    hub: HubOptions | None = None,
    remote: Remote | None = None,
) -> tuple[DeepEncoderModel, ConversionReport]:
    """A checkpoint holding a CLIP stage (open_clip / OpenAI, transformers CLIP, ...) -> DeepEncoderModel whose CLIP
    stage holds its vision transformer; the SAM stage (released ViT-B config unless `sam_config` says otherwise),
    projector, newline and separator are freshly initialised and listed in the report. Only the vision tensors are
    read from safetensors.

    open_clip checkpoints do not state their activation: quick-GELU (OpenAI's weights) is assumed; pass
    `clip_config={"hidden_act": "gelu"}` for towers trained with exact GELU. transformers directories carry a
    config.json whose heads, activation and LayerNorm eps are used."""
    part = read_converted(
        path_or_repo_id,
        formats=formats_providing("clip"),
        revision=revision,
        filesystem=filesystem,
        hub=hub,
        remote=remote,
    )
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
    hub: HubOptions | None = None,
    remote: Remote | None = None,
) -> tuple[DeepEncoderModel, ConversionReport]:
    """A new DeepEncoder from public parts, the way DeepEncoder itself was initialised before training: SAM stage
    from `sam`, CLIP stage from `clip` (local paths or hub ids, any format holding that stage). The compressor
    (`net_2`, `net_3`, unless the SAM source has one), projector, newline and separator are initialised and
    reported; the compressor's widths default to (CLIP width / 2, CLIP width), 512 and 1024 for CLIP-L.
    `revision` and `filesystem` apply to both sources."""
    sam_part = read_converted(
        sam, formats=formats_providing("sam"), revision=revision, filesystem=filesystem, hub=hub, remote=remote
    )
    clip_part = read_converted(
        clip, formats=formats_providing("clip"), revision=revision, filesystem=filesystem, hub=hub, remote=remote
    )
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
    hub: HubOptions | None = None,
    remote: Remote | None = None,
) -> tuple[PreTrainedModel, ConversionReport]:
    """A new DeepEncoder V2 from public parts, as DeepSeek-OCR-2's tower was initialised: the SAM trunk and neck from
    `sam` (segment-anything `.pth`, transformers SAM, a DeepSeek-OCR checkpoint ...), the encoder's decoder layers
    and final norm from `qwen2` (a Qwen2 causal LM such as Qwen2-0.5B; its config.json gives heads, eps and the RoPE
    base). The compressor (`net_2`, `net_3` to 896), the learned queries, the projector and the separator are
    initialised; the report lists them and what was dropped (a SAM source's own compressor, the token embedding)."""
    sam_part = read_converted(
        sam, formats=formats_providing("sam"), revision=revision, filesystem=filesystem, hub=hub, remote=remote
    )
    qwen2_part = read_converted(
        qwen2,
        formats=formats_providing("encoder", DEEPENCODER_V2),
        revision=revision,
        filesystem=filesystem,
        hub=hub,
        remote=remote,
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


# ------------------------------------------------------------------------------------------------ from_pretrained
# what `from_pretrained` passes on when the checkpoint is converted on load; anything else is refused by name
CONVERTED_LOAD_KWARGS = ("dtype", "torch_dtype", "device_map", *HUB_KEYWORDS)


def _family_of(model_class: type[PreTrainedModel]) -> ModelFamily:
    families = {record.family for record in FORMATS.values()}
    found = [family for family in families if issubclass(model_class, family.model_class)]
    if not found:
        raise TypeError(f"{model_class.__name__} is not a tower the converters build")
    return found[0]


def _stated_model_type(path_or_repo_id: str, kwargs: dict[str, Any]) -> tuple[bool, str | None]:
    """(whether a config.json was found, its `model_type`) for a local folder or a hub id, through transformers'
    own config resolution (cache, revision, token, offline mode)."""
    from transformers import PretrainedConfig

    options = HubOptions.from_kwargs(kwargs)
    try:
        config_dict, _ = PretrainedConfig.get_config_dict(str(path_or_repo_id), **options.transformers_kwargs())
    except OSError:
        if os.path.exists(str(path_or_repo_id)):
            return False, None
        try:  # a hub checkpoint whose config.json was read by an earlier converted load: in the range cache
            config_dict = read_json_beside(open_checkpoint(str(path_or_repo_id), hub=options), "config.json")
        except CheckpointError:
            return False, None
        return config_dict is not None, (config_dict or {}).get("model_type")
    return True, config_dict.get("model_type")


def load_converted_pretrained(
    model_class: type[PreTrainedModel], path_or_repo_id: str, model_args: tuple, kwargs: dict[str, Any]
) -> PreTrainedModel | None:
    """What `DeepEncoderModel.from_pretrained` / `DeepEncoderV2Model.from_pretrained` do with a checkpoint that is not
    this library's own: None when it is (a config.json of `model_class`'s `model_type`, or a config object given:
    transformers' loading goes on), else the tower converted on load by `load_tower`, reading only the vision
    tensors (DeepSeek-OCR / DeepSeek-OCR-2 releases, transformers' `UnlimitedOcr*` / `DeepseekOcr2*`
    `save_pretrained` in either naming). A checkpoint that holds no tower of `model_class`'s family is a
    `CheckpointError` naming what it holds, never a randomly initialised model.

    Converted loading takes `dtype` (`torch_dtype`; "auto" or absent: the checkpoint's), `device_map` (one device),
    the hub's `revision`, `cache_dir`, `local_files_only`, `token`, `subfolder` and `force_download` (as
    `from_pretrained` takes them; the byte ranges read are kept in the hub cache, see `deepencoder.conversion.hub`;
    `subfolder` also applies to a local folder), and config values (`model_class.config_class` attributes, such as `projector_dim` or
    `sam_config`); any other keyword is a `TypeError`.
    """
    from transformers import PretrainedConfig

    if isinstance(kwargs.get("config"), PretrainedConfig):
        return None
    found, model_type = _stated_model_type(path_or_repo_id, kwargs)
    if model_type == model_class.config_class.model_type:
        return None
    local = os.path.exists(str(path_or_repo_id))
    if not found and not local:
        return None  # a hub id whose config.json cannot be had (offline, no such repo): transformers' error says so
    family = _family_of(model_class)
    config_keys = set(model_class.config_class().to_dict()) - set(CONVERTED_LOAD_KWARGS)
    unknown = sorted(set(kwargs) - set(CONVERTED_LOAD_KWARGS) - config_keys - {"config"})
    unknown += ["positional arguments"] if model_args else []
    unknown += (
        ["config (other than a dict of config values)"]
        if kwargs.get("config") is not None and not isinstance(kwargs["config"], dict)
        else []
    )
    if unknown:
        raise TypeError(
            f"{path_or_repo_id} is a {model_type or 'non-deepencoder'} checkpoint, converted on load; the conversion "
            f"takes {', '.join(CONVERTED_LOAD_KWARGS)} and {model_class.config_class.__name__} values, not: "
            f"{', '.join(unknown)}"
        )
    dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))
    dtype = None if dtype in (None, "auto") else parse_dtype(dtype)
    config_kwargs = {key: kwargs[key] for key in config_keys & set(kwargs)}
    if isinstance(kwargs.get("config"), dict):
        config_kwargs = {**kwargs["config"], **config_kwargs}
    device = kwargs.get("device_map")
    if isinstance(device, dict):
        raise TypeError("a converted checkpoint loads on one device: device_map='cuda', 'cpu', 0, ...")
    if device == "auto":
        accelerator = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
        device = accelerator or "cpu"
    model, _ = load_tower(  # built on the device, the tensors copied straight there
        str(path_or_repo_id),
        family=family,
        dtype=dtype,
        config_kwargs=config_kwargs,
        hub=HubOptions.from_kwargs(kwargs),
        device=device,
    )
    if not isinstance(model, model_class):
        raise TypeError(f"{path_or_repo_id} holds a {type(model).__name__}, not a {model_class.__name__}")
    return model
