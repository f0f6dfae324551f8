"""This library's own `save_pretrained` layout (`sam.*`, `clip.*`, `projector.*`, `image_newline`,
`view_separator`): identity names, checked strictly, with the directory's config.json as the stated config."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..configuration_deepencoder import DeepEncoderConfig
from .common import DEEPENCODER, KeyTable, map_keys
from .formats import CheckpointFormat, StateDict
from .io import CheckpointError

DEEPENCODER_MAP: KeyTable = (
    (r"((?:sam|clip|projector)\..+)", r"\1"),
    (r"(image_newline|view_separator)", r"\1"),
)


def convert_deepencoder(state_dict: StateDict, source: str) -> StateDict:
    """Every key must be one of the tower's."""
    out, unmatched = map_keys(state_dict, DEEPENCODER_MAP)
    if unmatched:
        raise CheckpointError(f"{source}: keys that are not DeepEncoder parameters: {sorted(unmatched)}")
    return out


def stated_config(config_json: Mapping[str, Any]) -> dict[str, Any]:
    """A deepencoder config.json is our config vocabulary already."""
    if config_json.get("model_type") != DeepEncoderConfig.model_type:
        return {}
    return {
        key: config_json[key]
        for key in ("sam_config", "clip_config", "projector_dim", "projector_bias")
        if key in config_json
    }


DEEPENCODER_FORMAT = CheckpointFormat(
    name="deepencoder",
    description="this library's own names (sam.*, clip.*, projector.*)",
    family=DEEPENCODER,
    provides=DEEPENCODER.stages,
    signatures=(("sam.patch_embed.proj.weight",), ("clip.embeddings.class_embedding",)),
    convert=convert_deepencoder,
    config_from_json=stated_config,
    licence="that of the directory converted (see its model card)",
)
FORMATS = (DEEPENCODER_FORMAT,)
