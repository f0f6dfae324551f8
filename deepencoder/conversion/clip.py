"""CLIP-L/14 vision towers -> the DeepEncoder CLIP stage.

Two layouts: open_clip / OpenAI (`visual.*`, fused `attn.in_proj_weight`, as open_clip stores OpenAI's ViT-L-14)
and transformers' `CLIPModel` / `CLIPVisionModel` (`vision_model.*`, separate q/k/v, fused here in q, k, v order).
The tower feeds SAM tokens instead of CLIP's conv patch embedding and has neither post-LayerNorm nor visual
projection: those, and the whole text tower, are dropped with their reason.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from .common import DEEPENCODER, FusedTable, KeyTable, fuse_keys, map_stage_keys
from .formats import CheckpointFormat, StateDict, bare_prefix
from .io import CheckpointError

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
# separate projections fused into one, in q, k, v order: (fused name, part names) templates
HF_CLIP_FUSED: FusedTable = (
    (
        "clip.transformer.layers.{i}.self_attn.qkv_proj.{w}",
        tuple(f"vision_model.encoder.layers.{{i}}.self_attn.{p}.{{w}}" for p in ("q_proj", "k_proj", "v_proj")),
    ),
)
HF_CLIP_DROPPED: KeyTable = (
    (r"embeddings\.patch_embedding\.weight", "CLIP's conv patch embedding: the tower feeds SAM tokens"),
    (r"embeddings\.position_ids", "index buffer, recomputed"),
    (r"post_layernorm\.(weight|bias)", "post-LayerNorm: the tower uses the pre-post_layernorm tokens"),
)

TEXT_TOWER = "CLIP's text tower / contrastive head: not part of the vision tower"


def _drop_reason(prefix: str, table: KeyTable):
    def drop_reason(key: str) -> str | None:
        """Why a CLIP checkpoint key is not converted, or None for a key the tower uses."""
        for pattern, reason in table:
            if re.fullmatch(re.escape(prefix) + pattern, key):
                return reason
        return TEXT_TOWER if not key.startswith(prefix) else None

    return drop_reason


open_clip_drop_reason = _drop_reason("visual.", OPEN_CLIP_DROPPED)
hf_clip_drop_reason = _drop_reason("vision_model.", HF_CLIP_DROPPED)


def convert_open_clip(state_dict: StateDict, source: str) -> StateDict:
    """open_clip / OpenAI visual-tower tensors (`visual.*`) -> DeepEncoder `clip.*` tensors. `attn.in_proj_weight`
    is already q, k, v stacked, as `qkv_proj` expects."""
    return map_stage_keys(state_dict, OPEN_CLIP_MAP, source, "CLIP", prefix="visual.")


def convert_hf_clip(state_dict: StateDict, source: str) -> StateDict:
    """transformers `CLIPVisionTransformer` tensors (`vision_model.*`) -> DeepEncoder `clip.*` tensors, with each
    layer's q_proj, k_proj, v_proj concatenated (q, k, v order) into `qkv_proj`. A layer lacking one of the three
    is an error naming the missing key."""
    rest = dict(state_dict)
    fused = fuse_keys(rest, HF_CLIP_FUSED, source)
    return {**map_stage_keys(rest, HF_CLIP_MAP, source, "CLIP", prefix="vision_model."), **fused}


def clip_config_from_hf(config: Mapping[str, Any]) -> dict[str, Any]:
    """The CLIP-stage settings a transformers `config.json` states (a `CLIPConfig`'s `vision_config`, or a
    `CLIPVisionConfig`), as `{"clip_config": {...}}`: heads, activation, LayerNorm eps, patch size. Empty for other
    configs."""
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
    return {"clip_config": values}


OPEN_CLIP = CheckpointFormat(
    name="open-clip",
    description="open_clip / OpenAI CLIP (visual.* beside the text tower, or a bare visual tower)",
    family=DEEPENCODER,
    provides=frozenset({"clip"}),
    signatures=(("visual.class_embedding",), ("class_embedding", "conv1.weight")),
    convert=convert_open_clip,
    needed=lambda key: open_clip_drop_reason(key) is None,
    drop_reason=open_clip_drop_reason,
    canonical=bare_prefix("visual."),
    licence="MIT (OpenAI CLIP weights; check the licence of other open_clip pretrained tags)",
)
HF_CLIP = CheckpointFormat(
    name="hf-clip",
    description="transformers' `CLIPModel` / `CLIPVisionModel` (vision_model.*)",
    family=DEEPENCODER,
    provides=frozenset({"clip"}),
    signatures=(("vision_model.embeddings.class_embedding",), ("embeddings.class_embedding", "pre_layrnorm.weight")),
    convert=convert_hf_clip,
    needed=lambda key: hf_clip_drop_reason(key) is None,
    drop_reason=hf_clip_drop_reason,
    canonical=bare_prefix("vision_model."),
    config_from_json=clip_config_from_hf,
    licence="MIT (OpenAI CLIP weights; check the licence of the repository converted)",
)
FORMATS = (OPEN_CLIP, HF_CLIP)
