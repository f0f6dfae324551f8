"""transformers' port of this tower, `transformers.models.unlimited_ocr` (`UnlimitedOcrForConditionalGeneration`,
`UnlimitedOcrModel`, `UnlimitedOcrVisionModel`), in both directions: key names and configs.

Names: transformers keeps the tower under `vision_tower.` (SAM `sam_encoder.*`, CLIP `vision_encoder.*` with
separate q/k/v), the projector as `multi_modal_projector`, and `image_newline` / `view_separator` beside them; the
conditional-generation model nests all of it under `model.`. `save_pretrained` writes DeepSeek-OCR's original names
by default (read by the `deepseek-ocr` format, with this module's config mapping); with
`save_original_format=False`, and in every in-memory state dict, the names are the ones tabled here (the
`hf-unlimited-ocr` format). Only vision tensors are read: the language model's are never fetched.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from transformers.models.unlimited_ocr.configuration_unlimited_ocr import UnlimitedOcrConfig, UnlimitedOcrVisionConfig

from ..configuration_deepencoder import DeepEncoderConfig
from .common import (
    DEEPENCODER,
    SAM_KEYS,
    TRANSFORMERS_SAM,
    TRANSFORMERS_SAM_MAP,
    TRANSFORMERS_TOWER,
    FusedTable,
    TemplateTable,
    fuse_keys,
    map_keys,
    split_keys,
    template_table,
    transformers_canonical,
)
from .formats import CheckpointFormat, StateDict
from .io import CheckpointError

SAM, CLIP = TRANSFORMERS_SAM, "vision_tower.vision_encoder"
# (our name, UnlimitedOcrModel's name); `{i}`: block / layer index, `{w}`: weight or bias
UNLIMITED_OCR_MAP: TemplateTable = (
    *TRANSFORMERS_SAM_MAP,
    ("clip.embeddings.class_embedding", f"{CLIP}.embeddings.class_embedding"),
    ("clip.embeddings.position_embedding.weight", f"{CLIP}.embeddings.position_embedding.weight"),
    ("clip.pre_layrnorm.{w}", f"{CLIP}.pre_layrnorm.{{w}}"),
    ("clip.transformer.layers.{i}.layer_norm1.{w}", f"{CLIP}.encoder.layers.{{i}}.layer_norm1.{{w}}"),
    ("clip.transformer.layers.{i}.layer_norm2.{w}", f"{CLIP}.encoder.layers.{{i}}.layer_norm2.{{w}}"),
    ("clip.transformer.layers.{i}.self_attn.out_proj.{w}", f"{CLIP}.encoder.layers.{{i}}.self_attn.out_proj.{{w}}"),
    ("clip.transformer.layers.{i}.mlp.fc1.{w}", f"{CLIP}.encoder.layers.{{i}}.mlp.fc1.{{w}}"),
    ("clip.transformer.layers.{i}.mlp.fc2.{w}", f"{CLIP}.encoder.layers.{{i}}.mlp.fc2.{{w}}"),
    ("projector.{w}", "multi_modal_projector.{w}"),
    ("image_newline", "image_newline"),
    ("view_separator", "view_separator"),
)
# our fused CLIP projection and transformers' separate ones, concatenated in q, k, v order
UNLIMITED_OCR_FUSED: FusedTable = (
    (
        "clip.transformer.layers.{i}.self_attn.qkv_proj.{w}",
        tuple(f"{CLIP}.encoder.layers.{{i}}.self_attn.{p}.{{w}}" for p in ("q_proj", "k_proj", "v_proj")),
    ),
)
UNUSED: dict[str, str] = {
    f"{CLIP}.embeddings.patch_embedding.weight": "CLIP's conv patch embedding: the tower feeds SAM tokens",
}
VISION = re.compile(r"(vision_tower\..+|multi_modal_projector\.(weight|bias)|image_newline|view_separator)")


# ------------------------------------------------------------------------------------------------ key names
def to_unlimited_ocr(state_dict: StateDict) -> StateDict:
    """Our tower's state dict -> `UnlimitedOcrModel`'s names (prefix them with `model.` for
    `UnlimitedOcrForConditionalGeneration`). Tensors are shared, the fused qkv split into views. A key with no
    place in transformers' model is an error naming it."""
    rest = dict(state_dict)
    parts = split_keys(rest, UNLIMITED_OCR_FUSED)
    out, unmatched = map_keys(rest, template_table(UNLIMITED_OCR_MAP, ours_to_theirs=True))
    if unmatched:
        raise CheckpointError(f"keys with no place in transformers' UnlimitedOcrModel: {sorted(unmatched)}")
    return {**out, **parts}


def to_unlimited_ocr_vision(state_dict: StateDict) -> StateDict:
    """Our tower's SAM and CLIP stages -> `UnlimitedOcrVisionModel`'s names (`sam_encoder.*`, `vision_encoder.*`)."""
    tower = {k: v for k, v in state_dict.items() if k.startswith(("sam.", "clip."))}
    return {key[len(TRANSFORMERS_TOWER) :]: value for key, value in to_unlimited_ocr(tower).items()}


def from_unlimited_ocr(state_dict: StateDict, source: str = "hf-unlimited-ocr") -> StateDict:
    """`UnlimitedOcrModel`-named vision tensors (`vision_tower.*`, `multi_modal_projector.*`, `image_newline`,
    `view_separator`) -> our names, q/k/v fused into `qkv_proj`. Pure; a key no row maps is an error naming it."""
    rest = dict(state_dict)
    fused = fuse_keys(rest, UNLIMITED_OCR_FUSED, source)
    out, unmatched = map_keys(rest, template_table(UNLIMITED_OCR_MAP, ours_to_theirs=False))
    if unmatched:
        raise CheckpointError(f"{source}: keys with no place in the tower: {sorted(unmatched)}")
    return {**out, **fused}


# ------------------------------------------------------------------------------------------------- configs
def _as_dict(config: Mapping[str, Any] | UnlimitedOcrConfig | UnlimitedOcrVisionConfig) -> dict[str, Any]:
    return config.to_dict() if hasattr(config, "to_dict") else dict(config)


def deepencoder_config_values(
    config: Mapping[str, Any] | UnlimitedOcrConfig | UnlimitedOcrVisionConfig,
) -> dict[str, Any]:
    """An `UnlimitedOcrConfig` / `UnlimitedOcrVisionConfig` (object or config.json dict) -> `DeepEncoderConfig`
    keyword values (`sam_config`, `clip_config`, and `projector_dim` from a full config's language model width).
    Empty for any other config."""
    config = _as_dict(config)
    projector: dict[str, Any] = {}
    if config.get("model_type") == "unlimited_ocr":
        projector["projector_dim"] = (config.get("text_config") or {}).get("hidden_size", 1280)
        projector["projector_bias"] = True  # an nn.Linear with its bias
        config = config.get("vision_config") or {}
    elif config.get("model_type") != "unlimited_ocr_vision":
        return {}
    defaults = {
        "sam_config": UnlimitedOcrVisionConfig().sam_config.to_dict(),
        "encoder_config": UnlimitedOcrVisionConfig().encoder_config.to_dict(),
    }
    sam = {**defaults["sam_config"], **(config.get("sam_config") or {})}
    clip = {**defaults["encoder_config"], **(config.get("encoder_config") or {})}
    if sam["hidden_act"] != "gelu":
        raise CheckpointError(f"config.json: SAM hidden_act {sam['hidden_act']!r} is not supported (gelu)")
    if clip["hidden_act"] not in ("quick_gelu", "gelu"):
        raise CheckpointError(f"config.json: hidden_act {clip['hidden_act']!r} is not supported (quick_gelu | gelu)")
    sam_values = {key: sam[key] for key in SAM_KEYS if key in sam}  # transformers' names where they are ours
    sam_values.update(
        global_attn_indexes=list(sam["global_attn_indexes"]),
        mlp_ratio=sam["mlp_dim"] / sam["hidden_size"],
        out_channels=sam["output_channels"],
        compressor_channels=list(sam["downsample_channels"]),
    )
    clip_values = {
        key: clip[key]
        for key in (
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "intermediate_size",
            "hidden_act",
            "layer_norm_eps",
            "image_size",
            "patch_size",
        )
    }
    clip_values["pre_layernorm_eps"] = clip["layer_norm_eps"]  # transformers' pre_layrnorm takes the layers' eps
    return {"sam_config": sam_values, "clip_config": clip_values, **projector}


def deepencoder_config_from_unlimited_ocr(
    config: Mapping[str, Any] | UnlimitedOcrConfig | UnlimitedOcrVisionConfig, **kwargs: Any
) -> DeepEncoderConfig:
    """transformers' config of the port -> our `DeepEncoderConfig` (extra keyword arguments go to it)."""
    values = deepencoder_config_values(config)
    if not values:
        raise ValueError(f"not an UnlimitedOcr config (model_type {_as_dict(config).get('model_type')!r})")
    return DeepEncoderConfig(**{**values, **kwargs})


def unlimited_ocr_vision_config(config: DeepEncoderConfig, **kwargs: Any) -> UnlimitedOcrVisionConfig:
    """Our config -> transformers' `UnlimitedOcrVisionConfig` of the same trunk (extra keyword arguments, such as
    `attn_implementation`, go to it). transformers' compressor has exactly two convs."""
    sam, clip = config.sam_config, config.clip_config
    if len(sam.compressor_channels) != 2 or not sam.use_abs_pos or not sam.use_rel_pos:
        raise ValueError("transformers' UnlimitedOcr SAM stage has two compressor convs, abs-pos and rel-pos")
    if clip.pre_layernorm_eps != clip.layer_norm_eps:
        raise ValueError("transformers' UnlimitedOcr CLIP stage uses one LayerNorm eps for pre_layrnorm and layers")
    return UnlimitedOcrVisionConfig(
        sam_config=dict(
            hidden_size=sam.hidden_size,
            output_channels=sam.out_channels,
            num_hidden_layers=sam.num_hidden_layers,
            num_attention_heads=sam.num_attention_heads,
            num_channels=sam.num_channels,
            image_size=sam.image_size,
            patch_size=sam.patch_size,
            layer_norm_eps=sam.layer_norm_eps,
            qkv_bias=sam.qkv_bias,
            window_size=sam.window_size,
            global_attn_indexes=list(sam.global_attn_indexes),
            mlp_dim=sam.mlp_dim,
            downsample_channels=list(sam.compressor_channels),
        ),
        encoder_config=dict(
            hidden_size=clip.hidden_size,
            intermediate_size=clip.intermediate_size,
            num_hidden_layers=clip.num_hidden_layers,
            num_attention_heads=clip.num_attention_heads,
            image_size=clip.image_size,
            patch_size=clip.patch_size,
            hidden_act=clip.hidden_act,
            layer_norm_eps=clip.layer_norm_eps,
        ),
        **kwargs,
    )


def unlimited_ocr_config(
    config: DeepEncoderConfig, text_config: Mapping[str, Any], **kwargs: Any
) -> UnlimitedOcrConfig:
    """Our config + a language model's `UnlimitedOcrTextConfig` values -> transformers' `UnlimitedOcrConfig`; the
    language model's width is the projector's output."""
    if not config.projector_bias:
        raise ValueError("transformers' UnlimitedOcr projector has a bias")
    text = {**text_config, "hidden_size": config.projector_dim}
    return UnlimitedOcrConfig(vision_config=unlimited_ocr_vision_config(config).to_dict(), text_config=text, **kwargs)


HF_UNLIMITED_OCR = CheckpointFormat(
    name="hf-unlimited-ocr",
    description="transformers' UnlimitedOcrForConditionalGeneration / UnlimitedOcrModel / UnlimitedOcrVisionModel "
    "in transformers' names (model.vision_tower.sam_encoder.*, ...)",
    family=DEEPENCODER,
    provides=DEEPENCODER.stages,
    signatures=(
        (f"model.{SAM}.patch_embed.projection.weight",),
        (f"{SAM}.patch_embed.projection.weight",),
        ("sam_encoder.patch_embed.projection.weight", "vision_encoder.embeddings.class_embedding"),
    ),
    convert=from_unlimited_ocr,
    needed=lambda key: VISION.fullmatch(key) is not None and key not in UNUSED,
    drop_reason=UNUSED.get,
    canonical=transformers_canonical,
    config_from_json=deepencoder_config_values,
    licence="that of the checkpoint converted (DeepSeek-OCR's weights: MIT)",
)
FORMATS = (HF_UNLIMITED_OCR,)
