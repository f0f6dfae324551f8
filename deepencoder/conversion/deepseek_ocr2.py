"""DeepEncoder V2 (DeepSeek-OCR-2's vision tower): its model family, the formats it is read from, and the assembly of
the published initialisation (SAM-B + a Qwen2-0.5B decoder's layers).

- `deepseek-ocr2`: DeepSeek-OCR-2's released checkpoint. Only the vision tensors are read (`model.sam_model.*`,
  `model.qwen2_model.*`, `model.projector.*`, `model.view_seperator`, spelled so); the language model's
  `model.layers.*`, `model.norm.weight`, `model.embed_tokens.*` and `lm_head.*` never are. transformers'
  `DeepseekOcr2` models save in the same names by default (without the leading `model.` for the bare
  `DeepseekOcr2Model`).
- `hf-deepseek-ocr2`: transformers' `DeepseekOcr2*` models in transformers' own names (`save_pretrained(...,
  save_original_format=False)`, and every in-memory state dict): `vision_tower.sam_encoder.*`,
  `vision_tower.vision_encoder.*`, `vision_tower.query_{768,1024}_resolution.weight`, `multi_modal_projector.*`,
  `view_separator` (under `model.` in the conditional-generation model).
- `qwen2`: a Qwen2 causal LM checkpoint (Qwen2-0.5B): its decoder layers and final norm are the encoder stage.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from ..configuration_deepencoder import DeepEncoderSamConfig
from ..configuration_deepencoder_v2 import V2_COMPRESSOR_CHANNELS, DeepEncoderV2Config, DeepEncoderV2EncoderConfig
from ..modeling_deepencoder_v2 import DeepEncoderV2Model
from .common import (
    SAM_KEYS,
    TRANSFORMERS_SAM_MAP,
    TRANSFORMERS_TOWER,
    KeyTable,
    TemplateTable,
    count_layers,
    instantiate,
    map_keys,
    sam_config_from_state_dict,
    template_table,
    transformers_canonical,
)
from .formats import CheckpointFormat, ModelFamily, StateDict, bare_prefix
from .io import CheckpointError
from .report import ConversionReport

# ------------------------------------------------------------------------------------------------ the family
ENCODER_KEYS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "intermediate_size",
    "hidden_act",
    "rms_norm_eps",
    "rope_theta",
    "attention_bias",
    "query_counts",
)
TOP_KEYS = ("projector_dim", "projector_bias")


def encoder_config_from_state_dict(
    state_dict: StateDict, stated: Mapping[str, Any] | None = None, **overrides: Any
) -> DeepEncoderV2EncoderConfig:
    """The encoder's width, depth, MLP width, K/V width, biases and query tables from tensor shapes. Head counts
    cannot be read from q/k/v shapes: from the stated (or given) head count, else 64-wide heads (Qwen2-0.5B: 14 / 2)."""
    hidden = state_dict["encoder.norm.weight"].shape[0]
    values: dict[str, Any] = {
        "hidden_size": hidden,
        "num_hidden_layers": count_layers(state_dict, r"encoder\.layers\.(\d+)\."),
    }
    q_proj = state_dict.get("encoder.layers.0.self_attn.q_proj.weight")
    if q_proj is not None:
        values["intermediate_size"] = state_dict["encoder.layers.0.mlp.gate_proj.weight"].shape[0]
        values["attention_bias"] = "encoder.layers.0.self_attn.q_proj.bias" in state_dict
    queries = sorted(int(key.rsplit(".", 1)[1]) for key in state_dict if key.startswith("encoder.queries."))
    if queries:
        values["query_counts"] = queries
    for key, value in (stated or {}).items():
        if key in ENCODER_KEYS:
            values.setdefault(key, value)
    values.update(overrides)
    if q_proj is not None:
        width, kv_width = q_proj.shape[0], state_dict["encoder.layers.0.self_attn.k_proj.weight"].shape[0]
        heads = values.get("num_attention_heads")
        head_dim = values.get("head_dim") or (width // heads if heads else 64)
        values.setdefault("num_attention_heads", width // head_dim)
        values.setdefault("num_key_value_heads", kv_width // head_dim)
        if values["num_attention_heads"] * head_dim != width or values["num_key_value_heads"] * head_dim != kv_width:
            raise ValueError(
                f"q_proj / k_proj are {width} / {kv_width} wide: not {values['num_attention_heads']} / "
                f"{values['num_key_value_heads']} heads of {head_dim}; state the head counts "
                "(encoder_config={'num_attention_heads': ..., 'num_key_value_heads': ...})"
            )
        if head_dim != hidden // values["num_attention_heads"]:
            values["head_dim"] = head_dim
    return DeepEncoderV2EncoderConfig(**values)


def v2_config_from_state_dict(
    state_dict: StateDict, stated: Mapping[str, Any], overrides: Mapping[str, Any]
) -> DeepEncoderV2Config:
    """`DeepEncoderV2Config`: each stage present in `state_dict` from its shapes (then `stated`, then `overrides`,
    both in `DeepEncoderV2Config`'s vocabulary: `sam_config` / `encoder_config` dicts and top-level values); a stage
    absent takes the released tower's config with `stated` and `overrides` applied."""
    overrides = dict(overrides)
    sam_stated, encoder_stated = stated.get("sam_config") or {}, stated.get("encoder_config") or {}
    sam_overrides = dict(overrides.pop("sam_config", None) or {})
    encoder_overrides = dict(overrides.pop("encoder_config", None) or {})
    if "encoder.norm.weight" in state_dict:
        encoder = encoder_config_from_state_dict(state_dict, stated=encoder_stated, **encoder_overrides)
    else:
        given = {k: v for k, v in encoder_stated.items() if k in ENCODER_KEYS}
        encoder = DeepEncoderV2EncoderConfig(**{**given, **encoder_overrides})
    # without a compressor in the tensors: net_2 to 512, net_3 to the encoder's width (896 for the released tower)
    compressor = [V2_COMPRESSOR_CHANNELS[0], encoder.hidden_size]
    if any(key.startswith("sam.") for key in state_dict):
        if not any(key.startswith("sam.net_") for key in state_dict):
            sam_overrides.setdefault("compressor_channels", compressor)
        sam = sam_config_from_state_dict(state_dict, stated=sam_stated, **sam_overrides)
    else:
        given = {k: v for k, v in sam_stated.items() if k in SAM_KEYS}
        sam = DeepEncoderSamConfig(**{"compressor_channels": compressor, **given, **sam_overrides})
    top = {k: v for k, v in stated.items() if k in TOP_KEYS}
    projector = state_dict.get("projector.weight")
    if projector is not None:
        top.update(projector_dim=projector.shape[0], projector_bias="projector.bias" in state_dict)
    return DeepEncoderV2Config(sam_config=sam, encoder_config=encoder, **{**top, **overrides})


DEEPENCODER_V2 = ModelFamily(
    name="deepencoder-v2",
    model_class=DeepEncoderV2Model,
    stages=frozenset({"sam", "encoder", "projector"}),
    config_from_state_dict=v2_config_from_state_dict,
)


# ------------------------------------------------------------------------------------------------ deepseek-ocr2
DEEPSEEK_OCR2_MAP: KeyTable = (
    (r"model\.sam_model\.(.+)", r"sam.\1"),
    (r"model\.qwen2_model\.model\.model\.layers\.(.+)", r"encoder.layers.\1"),
    (r"model\.qwen2_model\.model\.model\.norm\.weight", "encoder.norm.weight"),
    # the learned query tables, named by view size in DeepSeek's code and by query count here (side / 64, squared)
    (r"model\.qwen2_model\.query_768\.weight", "encoder.queries.144"),
    (r"model\.qwen2_model\.query_1024\.weight", "encoder.queries.256"),
    (r"model\.projector\.layers\.(weight|bias)", r"projector.\1"),
    (r"model\.view_seperator", "view_separator"),
)
VISION_PREFIXES = ("model.sam_model.", "model.qwen2_model.", "model.projector.", "model.view_seperator")
UNUSED: dict[str, str] = {}
UNUSED_PATTERNS = ((re.compile(r".*\.rotary_emb\.inv_freq"), "RoPE frequencies, recomputed from the config"),)


def _unused(key: str) -> str | None:
    if key in UNUSED:
        return UNUSED[key]
    return next((reason for pattern, reason in UNUSED_PATTERNS if pattern.fullmatch(key)), None)


def is_vision_key(key: str) -> bool:
    """A vision tensor of DeepSeek-OCR-2 (a key of the language model, `model.layers.*`, `model.norm.weight`,
    `model.embed_tokens.*`, `lm_head.*`, is not)."""
    return key.startswith(VISION_PREFIXES) and _unused(key) is None


def convert_deepseek_ocr2(state_dict: StateDict, source: str) -> StateDict:
    """Pure key map: DeepSeek-OCR-2 vision tensors -> DeepEncoderV2Model names; an unmapped key is an error."""
    out, unmatched = map_keys(state_dict, DEEPSEEK_OCR2_MAP)
    if unmatched:
        raise CheckpointError(f"{source}: keys that are not DeepSeek-OCR-2 vision tensors: {sorted(unmatched)}")
    return out


def values_from_config_json(config_json: Mapping[str, Any]) -> dict[str, Any]:
    """What a transformers `DeepseekOcr2` config.json states (`vision_config.sam_config` / `encoder_config`), in
    `DeepEncoderV2Config`'s vocabulary. DeepSeek's own config.json states nothing the shapes do not."""
    vision = config_json.get("vision_config") or {}
    sam, encoder = vision.get("sam_config") or {}, vision.get("encoder_config") or {}
    values: dict[str, Any] = {}
    if sam:
        renamed = {"output_channels": "out_channels", "downsample_channels": "compressor_channels"}
        values["sam_config"] = {renamed.get(k, k): v for k, v in sam.items() if renamed.get(k, k) in SAM_KEYS}
    if encoder:
        stated = {k: v for k, v in encoder.items() if k in ENCODER_KEYS}
        theta = (encoder.get("rope_parameters") or {}).get("rope_theta", encoder.get("rope_theta"))
        if theta is not None:
            stated["rope_theta"] = theta
        values["encoder_config"] = stated
    return values


DEEPSEEK_OCR2 = CheckpointFormat(
    name="deepseek-ocr2",
    description="DeepSeek-OCR-2's released checkpoint (model.sam_model.*, model.qwen2_model.*, model.projector.*, "
    "model.view_seperator), also what transformers' DeepseekOcr2 models save",
    family=DEEPENCODER_V2,
    provides=DEEPENCODER_V2.stages,
    signatures=(
        ("model.qwen2_model.model.model.norm.weight",),
        ("qwen2_model.model.model.norm.weight",),
    ),
    convert=convert_deepseek_ocr2,
    needed=is_vision_key,
    drop_reason=_unused,
    canonical=bare_prefix("model."),
    config_from_json=values_from_config_json,
    licence="Apache-2.0 (DeepSeek-OCR-2 model weights)",
)


# ------------------------------------------------------------------------------------------------ transformers' names
ENCODER = TRANSFORMERS_TOWER + "vision_encoder"
# (our name, `DeepseekOcr2Model`'s name); `{i}`: block / layer index, `{w}`: weight or bias
HF_DEEPSEEK_OCR2_MAP: TemplateTable = (
    *TRANSFORMERS_SAM_MAP,
    *(
        (f"encoder.layers.{{i}}.self_attn.{proj}.{{w}}", f"{ENCODER}.layers.{{i}}.self_attn.{proj}.{{w}}")
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj")
    ),
    *(
        (f"encoder.layers.{{i}}.mlp.{proj}.weight", f"{ENCODER}.layers.{{i}}.mlp.{proj}.weight")
        for proj in ("gate_proj", "up_proj", "down_proj")
    ),
    *(
        (f"encoder.layers.{{i}}.{norm}.weight", f"{ENCODER}.layers.{{i}}.{norm}.weight")
        for norm in ("input_layernorm", "post_attention_layernorm")
    ),
    ("encoder.norm.weight", f"{ENCODER}.norm.weight"),
    # the learned query tables, named by view size in transformers and by query count here (side / 64, squared)
    ("encoder.queries.144", f"{TRANSFORMERS_TOWER}query_768_resolution.weight"),
    ("encoder.queries.256", f"{TRANSFORMERS_TOWER}query_1024_resolution.weight"),
    ("projector.{w}", "multi_modal_projector.{w}"),
    ("view_separator", "view_separator"),
)
HF_VISION = re.compile(r"(vision_tower\..+|multi_modal_projector\.(weight|bias)|view_separator)")


def from_transformers_names(state_dict: StateDict, source: str = "hf-deepseek-ocr2") -> StateDict:
    """`DeepseekOcr2Model`-named vision tensors (`vision_tower.*`, `multi_modal_projector.*`, `view_separator`) ->
    `DeepEncoderV2Model`'s names. Pure (the tensors are the same objects); a key no row maps is an error naming it."""
    out, unmatched = map_keys(state_dict, template_table(HF_DEEPSEEK_OCR2_MAP, ours_to_theirs=False))
    if unmatched:
        raise CheckpointError(f"{source}: keys with no place in the V2 tower: {sorted(unmatched)}")
    return out


HF_DEEPSEEK_OCR2 = CheckpointFormat(
    name="hf-deepseek-ocr2",
    description="transformers' DeepseekOcr2ForConditionalGeneration / DeepseekOcr2Model / DeepseekOcr2VisionModel "
    "in transformers' names (model.vision_tower.sam_encoder.*, model.vision_tower.vision_encoder.*, ...)",
    family=DEEPENCODER_V2,
    provides=DEEPENCODER_V2.stages,
    signatures=(
        (f"model.{TRANSFORMERS_TOWER}query_768_resolution.weight",),
        (f"{TRANSFORMERS_TOWER}query_768_resolution.weight",),
        ("query_768_resolution.weight", "sam_encoder.patch_embed.projection.weight"),
    ),
    convert=from_transformers_names,
    needed=lambda key: HF_VISION.fullmatch(key) is not None and _unused(key) is None,
    drop_reason=_unused,
    canonical=transformers_canonical,
    config_from_json=values_from_config_json,
    licence="that of the checkpoint converted (DeepSeek-OCR-2's weights: Apache-2.0)",
)


# ------------------------------------------------------------------------------------------------ qwen2 (encoder stage)
QWEN2_MAP: KeyTable = (
    (r"model\.layers\.(\d+)\.(self_attn\.[qkvo]_proj\.(?:weight|bias))", r"encoder.layers.\1.\2"),
    (r"model\.layers\.(\d+)\.(mlp\.(?:gate|up|down)_proj\.weight)", r"encoder.layers.\1.\2"),
    (r"model\.layers\.(\d+)\.((?:input|post_attention)_layernorm\.weight)", r"encoder.layers.\1.\2"),
    (r"model\.norm\.weight", "encoder.norm.weight"),
)
QWEN2_UNUSED = {
    "model.embed_tokens.weight": "token embedding: the encoder reads SAM tokens and learned queries",
    "lm_head.weight": "language-model head: the encoder keeps hidden states",
}


def convert_qwen2(state_dict: StateDict, source: str) -> StateDict:
    """Pure key map: a Qwen2 causal LM's decoder layers and final norm -> the V2 encoder stage."""
    out, unmatched = map_keys(state_dict, QWEN2_MAP)
    if unmatched:
        raise CheckpointError(f"{source}: keys with no place in the encoder stage: {sorted(unmatched)}")
    return out


def qwen2_values_from_config_json(config_json: Mapping[str, Any]) -> dict[str, Any]:
    """A Qwen2 config.json (heads, eps, RoPE base) -> the encoder_config values it states."""
    stated = {k: v for k, v in config_json.items() if k in ENCODER_KEYS and k != "hidden_act"}
    if "hidden_act" in config_json:
        stated["hidden_act"] = config_json["hidden_act"]
    theta = (config_json.get("rope_parameters") or {}).get("rope_theta", config_json.get("rope_theta"))
    if theta is not None:
        stated["rope_theta"] = theta
    return {"encoder_config": stated}


QWEN2 = CheckpointFormat(
    name="qwen2",
    description="a Qwen2 causal LM checkpoint (model.layers.*, model.norm.weight): the V2 encoder stage",
    family=DEEPENCODER_V2,
    provides=frozenset({"encoder"}),
    signatures=(("model.layers.0.self_attn.q_proj.bias", "model.norm.weight", "model.embed_tokens.weight"),),
    convert=convert_qwen2,
    needed=lambda key: re.fullmatch(r"model\.(layers\.\d+\..+|norm\.weight)", key) is not None and not _unused(key),
    drop_reason=lambda key: QWEN2_UNUSED.get(key) or _unused(key),
    config_from_json=qwen2_values_from_config_json,
    licence="Apache-2.0 (Qwen2-0.5B weights)",
)
FORMATS = (DEEPSEEK_OCR2, HF_DEEPSEEK_OCR2)
# stage-only layouts whose signatures are generic (a language model's names): detected after every tower format
STAGE_FORMATS = (QWEN2,)


# ------------------------------------------------------------------------------------------------ assembly
def assemble_v2(
    sam_state: StateDict,
    encoder_state: StateDict,
    report: ConversionReport,
    *,
    encoder_stated: Mapping[str, Any] | None = None,
    config_kwargs: Mapping[str, Any] | None = None,
    dtype=None,
) -> DeepEncoderV2Model:
    """The published initialisation of DeepEncoder V2: the SAM trunk and neck from `sam_state` (names `sam.*`, a
    converted SAM stage) and the encoder layers and final norm from `encoder_state` (`encoder.*`, a converted Qwen2
    decoder); the compressor (`net_2`, `net_3`, unless the SAM source has them, widths (512, 896)), the learned
    queries, the projector and the separator are freshly initialised and listed in `report.initialised`."""
    state = {**sam_state, **encoder_state}
    stated = {"encoder_config": dict(encoder_stated or {})}
    config = v2_config_from_state_dict(state, stated, config_kwargs or {})
    fresh = ("sam.net_", "encoder.queries.", "projector.", "view_separator")
    return instantiate(
        DeepEncoderV2Model, config, state, report, dtype=dtype, allow_missing=lambda k: k.startswith(fresh)
    )
