"""CLIP-L/14 vision towers -> the DeepEncoder CLIP stage.

Two layouts: open_clip / OpenAI (`visual.*`, fused `attn.in_proj_weight`, as open_clip stores OpenAI's ViT-L-14)
and transformers' `CLIPModel` / `CLIPVisionModel` (`vision_model.*`, separate q/k/v, fused here in q, k, v order).
The tower feeds SAM tokens instead of CLIP's conv patch embedding and has neither post-LayerNorm nor visual
projection: those, and the whole text tower, are dropped with their reason.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from ..modeling_deepencoder import DeepEncoderModel
from .common import KeyTable, map_stage_keys
from .io import CheckpointError
from .report import ConversionReport

# open_clip `VisionTransformer` names (after `visual.`) -> DeepEncoder names
OPEN_CLIP_MAP: KeyTable = (
    (r"class_embedding", "clip.embeddings.class_embedding"),
    (r"positional_embedding", "clip.embeddings.position_embedding.weight"),
    (r"ln_pre\.(weight|bias)", r"clip.pre_layrnorm.\1"),
    (r"transformer\.resblocks\.(\d+)\.ln_1\.(weight|bias)", r"clip.transformer.layers.\1.layer_norm1.\2"),
    (r"transformer\.resblocks\.(\d+)\.attn\.in_proj_weight", r"clip.transformer.layers.\1.self_attn.qkv_proj.weight"),
    (r"transformer\.resblocks\.(\d+)\.attn\.in_proj_bias", r"clip.transformer.layers.\1.self_attn.qkv_proj.bias"),
    (
        r"transformer\.resblocks\.(\d+)\.attn\.out_proj\.(weight|bias)",
        r"clip.transformer.layers.\1.self_attn.out_proj.\2",
    ),
    (r"transformer\.resblocks\.(\d+)\.ln_2\.(weight|bias)", r"clip.transformer.layers.\1.layer_norm2.\2"),
    (r"transformer\.resblocks\.(\d+)\.mlp\.c_fc\.(weight|bias)", r"clip.transformer.layers.\1.mlp.fc1.\2"),
    (r"transformer\.resblocks\.(\d+)\.mlp\.c_proj\.(weight|bias)", r"clip.transformer.layers.\1.mlp.fc2.\2"),
)
OPEN_CLIP_DROPPED: KeyTable = (
    (r"conv1\.(weight|bias)", "CLIP's conv patch embedding: the tower feeds SAM tokens"),
    (r"ln_post\.(weight|bias)", "post-LayerNorm: the tower uses the pre-ln_post tokens"),
    (r"proj", "visual projection into the joint image-text space: not part of the tower"),
)

# transformers `CLIPVisionTransformer` names (after `vision_model.`) -> DeepEncoder names
HF_CLIP_MAP: KeyTable = (
    (r"embeddings\.class_embedding", "clip.embeddings.class_embedding"),
    (r"embeddings\.position_embedding\.weight", "clip.embeddings.position_embedding.weight"),
    (r"pre_layrnorm\.(weight|bias)", r"clip.pre_layrnorm.\1"),
    (r"encoder\.layers\.(\d+)\.layer_norm1\.(weight|bias)", r"clip.transformer.layers.\1.layer_norm1.\2"),
    (
        r"encoder\.layers\.(\d+)\.self_attn\.out_proj\.(weight|bias)",
        r"clip.transformer.layers.\1.self_attn.out_proj.\2",
    ),
    (r"encoder\.layers\.(\d+)\.layer_norm2\.(weight|bias)", r"clip.transformer.layers.\1.layer_norm2.\2"),
    (r"encoder\.layers\.(\d+)\.mlp\.(fc1|fc2)\.(weight|bias)", r"clip.transformer.layers.\1.mlp.\2.\3"),
)
# separate projections fused into one: (source regex with a `{part}` slot, parts in output order, target template)
HF_CLIP_FUSED: tuple[tuple[str, tuple[str, ...], str], ...] = (
    (
        r"encoder\.layers\.(\d+)\.self_attn\.{part}\.(weight|bias)",
        ("q_proj", "k_proj", "v_proj"),
        r"clip.transformer.layers.\1.self_attn.qkv_proj.\2",
    ),
)
HF_CLIP_DROPPED: KeyTable = (
    (r"embeddings\.patch_embedding\.weight", "CLIP's conv patch embedding: the tower feeds SAM tokens"),
    (r"embeddings\.position_ids", "index buffer, recomputed"),
    (r"post_layernorm\.(weight|bias)", "post-LayerNorm: the tower uses the pre-post_layernorm tokens"),
)

TEXT_TOWER = "CLIP's text tower / contrastive head: not part of the vision tower"
PREFIX = {"open-clip": "visual.", "hf-clip": "vision_model."}


def _outside_reason(key: str, prefix: str) -> str | None:
    """Why a key outside the vision tower's prefix is dropped (text tower, projections, logit scale)."""
    return TEXT_TOWER if not key.startswith(prefix) else None


def drop_reason(key: str, source_format: str) -> str | None:
    """Why a CLIP checkpoint key (full key name) is not converted, or None for a key the tower uses."""
    prefix = PREFIX[source_format]
    table = OPEN_CLIP_DROPPED if source_format == "open-clip" else HF_CLIP_DROPPED
    for pattern, reason in table:
        if re.fullmatch(re.escape(prefix) + pattern, key):
            return reason
    return _outside_reason(key, prefix)


def _split(
    state_dict: dict[str, torch.Tensor], source_format: str, report: ConversionReport
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Drop what the tower does not use (recorded in the report); return the vision keys relative to the tower's
    prefix, and their original names. A bare visual-tower state dict (no prefix at all) is accepted as is."""
    prefix = PREFIX[source_format]
    bare = not any(key.startswith(prefix) for key in state_dict)
    vision: dict[str, torch.Tensor] = {}
    original: dict[str, str] = {}
    for key, tensor in state_dict.items():
        full = prefix + key if bare else key
        reason = drop_reason(full, source_format)
        if reason is not None:
            report.dropped[key] = reason
            continue
        vision[full[len(prefix) :]] = tensor
        original[full[len(prefix) :]] = key
    return vision, original


def convert_open_clip(
    state_dict: dict[str, torch.Tensor], source: str = "open-clip"
) -> tuple[dict[str, torch.Tensor], ConversionReport]:
    """open_clip / OpenAI CLIP state dict (full model with `visual.*`, or `model.visual.state_dict()`) ->
    DeepEncoder `clip.*` tensors. `attn.in_proj_weight` is already q, k, v stacked, as `qkv_proj` expects."""
    report = ConversionReport(source=source)
    vision, original = _split(state_dict, "open-clip", report)
    out = map_stage_keys(vision, OPEN_CLIP_MAP, source, "CLIP", original)
    report.converted = sorted(out)
    return out, report


def convert_hf_clip(
    state_dict: dict[str, torch.Tensor], source: str = "hf-clip"
) -> tuple[dict[str, torch.Tensor], ConversionReport]:
    """transformers `CLIPModel` / `CLIPVisionModel` state dict -> DeepEncoder `clip.*` tensors, with each layer's
    q_proj, k_proj, v_proj concatenated (q, k, v order) into `qkv_proj`. A layer lacking one of the three is an
    error naming the missing key."""
    report = ConversionReport(source=source)
    vision, original = _split(state_dict, "hf-clip", report)
    fused: dict[str, torch.Tensor] = {}
    for pattern, parts, target in HF_CLIP_FUSED:
        groups: dict[str, dict[str, str]] = {}  # target key -> part -> source key
        for part in parts:
            regex = re.compile(pattern.format(part=part))
            for key in list(vision):
                match = regex.fullmatch(key)
                if match:
                    groups.setdefault(match.expand(target), {})[part] = key
        for target_key, found in sorted(groups.items()):
            absent = [p for p in parts if p not in found]
            if absent:
                some = original[next(iter(found.values()))]
                raise CheckpointError(f"{source}: {some} has no {'/'.join(absent)} beside it to fuse into {target_key}")
            fused[target_key] = torch.cat([vision.pop(found[p]) for p in parts], dim=0)
    out = map_stage_keys(vision, HF_CLIP_MAP, source, "CLIP", original)
    out.update(fused)
    report.converted = sorted(out)
    return out, report


def clip_config_from_hf(config: dict[str, Any] | None) -> dict[str, Any]:
    """The CLIP-stage settings a transformers `config.json` states (a `CLIPConfig`'s `vision_config`, or a
    `CLIPVisionConfig`): heads, activation, LayerNorm eps, patch size. Empty for other configs."""
    if not config:
        return {}
    if config.get("model_type") == "clip" and isinstance(config.get("vision_config"), dict):
        config = config["vision_config"]
    elif config.get("model_type") not in ("clip_vision_model", None):
        return {}
    values: dict[str, Any] = {}
    for ours, theirs in (
        ("num_attention_heads", "num_attention_heads"),
        ("hidden_act", "hidden_act"),
        ("layer_norm_eps", "layer_norm_eps"),
        ("pre_layernorm_eps", "layer_norm_eps"),
        ("patch_size", "patch_size"),
    ):
        if theirs in config:
            values[ours] = config[theirs]
    if values.get("hidden_act") not in (None, "quick_gelu", "gelu"):
        raise CheckpointError(f"config.json: hidden_act {values['hidden_act']!r} is not supported (quick_gelu | gelu)")
    return values


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
    """An open_clip / OpenAI or transformers CLIP checkpoint -> DeepEncoderModel whose CLIP stage holds its vision
    transformer; the SAM stage (released ViT-B config unless `sam_config` says otherwise), projector, newline and
    separator are freshly initialised and listed in the report. Only the vision tensors are read from safetensors.

    open_clip checkpoints do not state their activation: quick-GELU (OpenAI's weights) is assumed; pass
    `clip_config={"hidden_act": "gelu"}` for towers trained with exact GELU. transformers directories carry a
    config.json whose heads, activation and LayerNorm eps are used."""
    from .sources import assemble_model, read_converted

    part = read_converted(path_or_repo_id, formats=("open-clip", "hf-clip"), revision=revision, filesystem=filesystem)
    return assemble_model(
        None,
        part,
        source=str(path_or_repo_id),
        dtype=dtype,
        sam_config=sam_config,
        clip_config=clip_config,
        config_kwargs=config_kwargs,
    )
