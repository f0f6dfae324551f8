"""The record types of the conversion registry: what a model family is, and what a checkpoint format is.

A `ModelFamily` is a tower this library builds (v1 `DeepEncoderModel` today): its model class, the stages its state
dict is made of, and how its config is inferred from converted tensors. A `CheckpointFormat` is one source layout:
how to recognise it from key names, which keys it reads and why it drops the others, its pure key map into the
family's names, what its config files state, and the licence of the weights usually published in it.
`registry.FORMATS` lists the records; nothing in the reading and assembling path names a format.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PretrainedConfig, PreTrainedModel

StateDict = dict[str, torch.Tensor]


def _identity(key: str) -> str:
    return key


def _keep(key: str) -> bool:
    return True


def _no_reason(key: str) -> str | None:
    return None


def _nothing_stated(config_json: Mapping[str, Any]) -> dict[str, Any]:
    return {}


def same_names(keys: Collection[str]) -> Callable[[str], str]:
    """The default `canonical`: keys are used as the checkpoint spells them."""
    return _identity


def bare_prefix(prefix: str) -> Callable[[Collection[str]], Callable[[str], str]]:
    """`canonical` for a tower that may be saved on its own (no key under `prefix`): its keys are then read as if
    they carried the prefix, so the format's tables and reasons are written once, on the prefixed names."""

    def canonical(keys: Collection[str]) -> Callable[[str], str]:
        if any(key.startswith(prefix) for key in keys):
            return _identity
        return lambda key: prefix + key

    return canonical


@dataclass(frozen=True)
class ModelFamily:
    """A tower this library builds from converted tensors.

    stages: names of the parts its state dict is made of (a format says which of them it provides).
    config_from_state_dict(state_dict, stated, overrides): the model's config, from tensor shapes first, then from
        `stated` (what the source's config files say, in this family's config vocabulary) for what shapes cannot
        say, then `overrides` (the caller's values, which win). Stages absent from `state_dict` take defaults.
    """

    name: str
    model_class: type[PreTrainedModel]
    stages: frozenset[str]
    config_from_state_dict: Callable[[StateDict, Mapping[str, Any], Mapping[str, Any]], PretrainedConfig]


@dataclass(frozen=True)
class CheckpointFormat:
    """One source layout.

    signatures: key sets that identify the layout (any one of them present in full).
    canonical(keys) -> key -> name: how this checkpoint's keys are read (e.g. a prefix added to a tower saved on
        its own); `needed`, `drop_reason` and `convert` see the canonical names.
    needed(name): whether the tensor is read at all (safetensors: the others are never fetched).
    drop_reason(name): for a key not needed, the reason recorded in the report (None: not worth listing, such as a
        language model's weights).
    convert(state_dict, source): pure key map of the needed tensors into the family's names; a key it cannot map is
        a `CheckpointError` naming it.
    config_from_json(config_json): what the checkpoint's config.json states, in the family's config vocabulary.
    provides: the family's stages this layout holds; `family.stages` for a whole tower.
    """

    name: str
    description: str
    family: ModelFamily
    provides: frozenset[str]
    signatures: tuple[tuple[str, ...], ...]
    convert: Callable[[StateDict, str], StateDict]
    needed: Callable[[str], bool] = _keep
    drop_reason: Callable[[str], str | None] = _no_reason
    canonical: Callable[[Collection[str]], Callable[[str], str]] = same_names
    config_from_json: Callable[[Mapping[str, Any]], dict[str, Any]] = _nothing_stated
    licence: str = "see the source weights' licence"

    @property
    def whole_tower(self) -> bool:
        return self.provides == self.family.stages
