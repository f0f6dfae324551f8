"""Any registered checkpoint format -> a tower: one read -> convert -> build path for every format.

`read_converted` opens a local path or hub id through one fsspec-style reading path (`remote.open_checkpoint`),
detects the layout from the key names (safetensors: from the headers alone), reads only the tensors the format
needs (by byte ranges for safetensors), runs the format's pure key map and reads what its config.json states.
`build_model` builds the format's model family from a checkpoint holding a whole tower; `assemble_model` builds a
v1 tower from the SAM stage of one converted checkpoint and the CLIP stage of another (either may be absent),
initialising what no source provides and listing it in the report. No function here names a format.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import PretrainedConfig, PreTrainedModel

from ..modeling_deepencoder import DeepEncoderModel
from .common import DEEPENCODER, STAGE_OF, instantiate
from .detect import detect_format
from .formats import CheckpointFormat, ModelFamily, StateDict
from .hub import HubOptions, Remote
from .io import CheckpointError
from .registry import get_format
from .remote import checkpoint_keys, open_checkpoint, read_json_beside, read_tensors
from .report import ConversionReport


@dataclass
class ConvertedCheckpoint:
    """A checkpoint in its family's names, with what its own config file states (in the family's config
    vocabulary: for v1, `sam_config` / `clip_config` / top-level `DeepEncoderConfig` values)."""

    state_dict: StateDict
    report: ConversionReport
    format: CheckpointFormat
    config: dict[str, Any] = field(default_factory=dict)


def strip_wrapper_prefix(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Training checkpoints saved from a DistributedDataParallel wrapper prefix every key with `module.`."""
    if state_dict and all(key.startswith("module.") for key in state_dict):
        return {key[len("module.") :]: value for key, value in state_dict.items()}
    return dict(state_dict)


def _convert(
    record: CheckpointFormat, needed: StateDict, report: ConversionReport, stated: dict[str, Any]
) -> ConvertedCheckpoint:
    state_dict = record.convert(needed, report.source)
    report.converted = sorted(state_dict)
    report.licences = [f"{report.source}: {record.licence}"]
    return ConvertedCheckpoint(state_dict, report, record, stated)


def convert_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    source_format: str | CheckpointFormat | None = None,
    source: str = "",
    config_json: Mapping[str, Any] | None = None,
) -> ConvertedCheckpoint:
    """Pure: a state dict in any registered layout (detected when not given) -> its family's names + report.
    config_json: what would be the checkpoint's config.json (e.g. a transformers model's `config.to_dict()`)."""
    state_dict = strip_wrapper_prefix(state_dict)
    record = get_format(source_format or detect_format(state_dict))
    canonical = record.canonical(list(state_dict))
    report = ConversionReport(source=source or record.name)
    needed: StateDict = {}
    for key, tensor in state_dict.items():
        name = canonical(key)
        if record.needed(name):
            needed[name] = tensor
        elif (reason := record.drop_reason(name)) is not None:
            report.dropped[key] = reason
    return _convert(record, needed, report, record.config_from_json(config_json) if config_json else {})


def read_converted(
    path_or_repo_id: str,
    *,
    formats: Collection[str] | None = None,
    revision: str | None = None,
    filesystem: Any = None,
    hub: HubOptions | None = None,
    remote: Remote | None = None,
) -> ConvertedCheckpoint:
    """Local file / directory or hub id (`owner/name` or `owner/name/file`) -> `ConvertedCheckpoint`.

    formats: the layouts accepted here (others raise an error naming the detected one, before any tensor is read).
    filesystem: an fsspec-style file system to read through (default: local files, or the hub through its cache).
    hub: `from_pretrained`'s hub arguments (`HubOptions`: cache_dir, local_files_only, token, subfolder,
    force_download; `revision` given here wins). remote: where a hub id's bytes come from (default: the hub).
    Safetensors are read by ranges: only the headers and the tensors the format needs are fetched; from the hub,
    the ranges read are kept in the hub cache (see `deepencoder.conversion.hub`).
    """
    name = str(path_or_repo_id)
    source = open_checkpoint(name, revision=revision, filesystem=filesystem, hub=hub, remote=remote)
    keys = checkpoint_keys(source)
    everything = None
    if keys is None:  # pickled: the names are known only once the (weights-only) unpickling is done
        everything = read_tensors(source, lambda key: True)
        keys = list(everything)
    wrapped = bool(keys) and all(key.startswith("module.") for key in keys)
    unwrapped = {key: key[len("module.") :] if wrapped else key for key in keys}
    record = get_format(detect_format(unwrapped.values()))
    if formats is not None and record.name not in formats:
        raise CheckpointError(f"{name}: a {record.name} checkpoint; this conversion takes {sorted(formats)}")
    canonical = record.canonical(list(unwrapped.values()))
    names = {key: canonical(plain) for key, plain in unwrapped.items()}
    if everything is None:
        raw = read_tensors(source, lambda key: record.needed(names[key]))
    else:
        raw = {key: value for key, value in everything.items() if record.needed(names[key])}
    report = ConversionReport(source=name)
    for key in keys:
        if not record.needed(names[key]) and (reason := record.drop_reason(names[key])) is not None:
            report.dropped[unwrapped[key]] = reason
    config_json = read_json_beside(source, "config.json")
    stated = record.config_from_json(config_json) if config_json else {}
    return _convert(record, {names[key]: value for key, value in raw.items()}, report, stated)


def infer_config(
    family: ModelFamily,
    state_dict: StateDict,
    stated: Mapping[str, Any],
    overrides: Mapping[str, Any],
    source: str,
) -> PretrainedConfig:
    """The family's config inference, its errors named after the source."""
    try:
        return family.config_from_state_dict(state_dict, stated, overrides)
    except KeyError as error:
        raise CheckpointError(f"{source}: missing key {error.args[0]} (needed to infer the architecture)") from error
    except ValueError as error:  # CheckpointError included
        raise CheckpointError(f"{source}: {error}") from error


def build_model(
    part: ConvertedCheckpoint,
    *,
    dtype: torch.dtype | None = None,
    config_kwargs: Mapping[str, Any] | None = None,
    device: str | torch.device | None = None,
) -> tuple[PreTrainedModel, ConversionReport]:
    """A checkpoint holding a whole tower -> its family's model, loaded strictly (every tensor present, none
    unexpected), built on `device` (default the CPU). `config_kwargs` override the inferred config (for v1:
    `DeepEncoderConfig` values, `sam_config` / `clip_config` dicts included)."""
    record, source = part.format, part.report.source
    if not record.whole_tower:
        held = ", ".join(sorted(record.provides))
        raise CheckpointError(
            f"{source}: a {record.name} checkpoint holds the {held} stage only; assemble a tower from stages "
            "(`deepencoder convert compose`, `assemble_model`)"
        )
    config = infer_config(record.family, part.state_dict, part.config, config_kwargs or {}, source)
    report = ConversionReport(source=source, dropped=dict(part.report.dropped), licences=list(part.report.licences))
    model = instantiate(record.family.model_class, config, part.state_dict, report, dtype=dtype, device=device)
    return model, report


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
    """A v1 tower with the SAM stage (`sam.*`, its compressor `sam.net_*` when present) of `sam`, the CLIP stage
    (`clip.*`) of `clip_part`, and the projector / newline / separator of `take_rest_from` when given. Every stage
    given must be complete (a missing key is an error naming it); what no source provides keeps a fresh model's
    initialisation and is listed in `report.initialised`. Stages not given use the released tower's config."""
    given = [(stage, part) for stage, part in (("sam", sam), ("clip", clip_part), ("projector", take_rest_from))]
    given = [(stage, part) for stage, part in given if part is not None]
    for stage, part in given:
        if part.format.family is not DEEPENCODER or stage not in part.format.provides:
            raise CheckpointError(f"{part.report.source}: a {part.format.name} checkpoint has no v1 {stage} stage")
    parts = list({id(part): part for _, part in given}.values())
    report = ConversionReport(source=source)
    state: StateDict = {}
    for part in parts:
        taken = [stage for stage, p in given if p is part]
        tag = f"[{', '.join(taken)}: {part.report.source}] " if len(parts) > 1 else ""
        report.licences += [entry for entry in part.report.licences if entry not in report.licences]
        for key, reason in part.report.dropped.items():
            report.dropped[tag + key] = reason
        for key, tensor in part.state_dict.items():
            if any(STAGE_OF[stage](key) for stage in taken):
                state[key] = tensor
            else:
                report.dropped[tag + key] = f"not taken from this source (only its {' and '.join(taken)} stage)"
    # what the sources' own config files state, each for its stage; then the caller's values
    stated: dict[str, Any] = dict(take_rest_from.config) if take_rest_from else {}
    stated["sam_config"] = (sam.config if sam else {}).get("sam_config") or {}
    stated["clip_config"] = (clip_part.config if clip_part else {}).get("clip_config") or {}
    overrides = dict(config_kwargs or {})
    for key, values in (("sam_config", sam_config), ("clip_config", clip_config)):
        if values:
            overrides[key] = {**(overrides.get(key) or {}), **values}
    config = infer_config(DEEPENCODER, state, stated, overrides, source)
    sam_has_compressor = any(key.startswith("sam.net_") for key in state)

    def may_be_initialised(key: str) -> bool:
        if key.startswith("sam.net_") and not sam_has_compressor:
            return True
        return not any(STAGE_OF[stage](key) for stage, _ in given)

    model = instantiate(DEEPENCODER.model_class, config, state, report, dtype=dtype, allow_missing=may_be_initialised)
    return model, report
