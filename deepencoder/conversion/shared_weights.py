"""Towers on a transformers OCR model's own parameters: `UnlimitedOcrModel` (DeepSeek-OCR's architecture in
transformers) -> `DeepEncoderModel`, `DeepseekOcr2Model` -> `DeepEncoderV2Model`.

Every parameter of the tower built here IS the corresponding `nn.Parameter` object of the transformers model (no
copy, no second load): the names go through the conversion tables of the `hf-unlimited-ocr` and `hf-deepseek-ocr2`
formats, and the tower is built on the meta device first so it never allocates tensors of its own.

transformers keeps CLIP's query, key and value projections as three `Linear` layers where this library has one fused
`qkv_proj`; `SplitQkvProjection` stands in for that Linear and computes the fused projection from the three
parameters (their outputs concatenated), so nothing is copied. Its `state_dict` still has the fused `weight` / `bias`
(built when saving), so such a tower saves as an ordinary `DeepEncoderModel` checkpoint.

Used by `DeepEncoderModel.from_transformers` / `DeepEncoderV2Model.from_transformers` and by
`deepencoder.integrations.attach`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init

from ..modeling_deepencoder import DeepEncoderModel
from ..modeling_deepencoder_v2 import DeepEncoderV2Model
from .common import map_keys, template_table
from .deepseek_ocr2 import HF_DEEPSEEK_OCR2, v2_config_from_state_dict, values_from_config_json
from .unlimited_ocr import UNLIMITED_OCR_FUSED, UNLIMITED_OCR_MAP, deepencoder_config_from_unlimited_ocr


class SplitQkvProjection(nn.Module):
    """A fused q/k/v Linear (x -> [q | k | v], (..., C) -> (..., 3C)) over three separate projections' parameters.

    The parameters are the given ones (shared, not copied). `state_dict` shows them fused as `weight` (3C, C) and
    `bias` (3C,), the layout of an `nn.Linear(C, 3C)`, and `load_state_dict` accepts that layout and writes it into
    the three parameters in place.
    """

    def __init__(self, query: nn.Linear, key: nn.Linear, value: nn.Linear) -> None:
        super().__init__()
        self.in_features = query.in_features
        self.out_features = query.out_features + key.out_features + value.out_features
        self.q_weight, self.k_weight, self.v_weight = query.weight, key.weight, value.weight
        self.q_bias, self.k_bias, self.v_bias = query.bias, key.bias, value.bias
        self.register_state_dict_post_hook(_fuse_qkv_state)
        self.register_load_state_dict_pre_hook(_split_qkv_state)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """(..., C) -> (..., 3C)."""
        return torch.cat(
            [
                F.linear(hidden_states, self.q_weight, self.q_bias),
                F.linear(hidden_states, self.k_weight, self.k_bias),
                F.linear(hidden_states, self.v_weight, self.v_bias),
            ],
            dim=-1,
        )

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, split q/k/v parameters"


def _fuse_qkv_state(module: SplitQkvProjection, state_dict: dict, prefix: str, local_metadata: Any) -> None:
    for kind in ("weight", "bias"):
        parts = [state_dict.pop(f"{prefix}{name}_{kind}", None) for name in ("q", "k", "v")]
        if all(part is not None for part in parts):
            state_dict[f"{prefix}{kind}"] = torch.cat([part.detach() for part in parts])


def _split_qkv_state(module: SplitQkvProjection, state_dict: dict, prefix: str, *args: Any) -> None:
    for kind in ("weight", "bias"):
        fused = state_dict.pop(f"{prefix}{kind}", None)
        if fused is None:
            continue
        sizes = [getattr(module, f"{name}_{kind}").shape[0] for name in ("q", "k", "v")]
        for name, part in zip(("q", "k", "v"), fused.split(sizes)):
            state_dict[f"{prefix}{name}_{kind}"] = part


# ------------------------------------------------------------------------------------------------ the shared tower
def transformers_base_model(model: nn.Module) -> nn.Module:
    """transformers' conditional-generation model or its base model -> the base model holding the vision parts
    (`UnlimitedOcrModel` or `DeepseekOcr2Model`)."""
    from transformers.models.deepseek_ocr2.modeling_deepseek_ocr2 import (
        DeepseekOcr2ForConditionalGeneration,
        DeepseekOcr2Model,
    )
    from transformers.models.unlimited_ocr.modeling_unlimited_ocr import (
        UnlimitedOcrForConditionalGeneration,
        UnlimitedOcrModel,
    )

    if isinstance(model, (UnlimitedOcrForConditionalGeneration, DeepseekOcr2ForConditionalGeneration)):
        return model.model
    if isinstance(model, (UnlimitedOcrModel, DeepseekOcr2Model)):
        return model
    raise TypeError(
        "expected transformers' UnlimitedOcrForConditionalGeneration / UnlimitedOcrModel or "
        f"DeepseekOcr2ForConditionalGeneration / DeepseekOcr2Model, got {type(model).__name__}"
    )


def is_deepseek_ocr2(inner: nn.Module) -> bool:
    return inner.config.model_type == "deepseek_ocr2"


def _set_parameter(root: nn.Module, name: str, parameter: nn.Parameter) -> None:
    owner_name, _, leaf = name.rpartition(".")
    owner = root.get_submodule(owner_name) if owner_name else root
    current = owner._parameters.get(leaf)
    if current is None or current.shape != parameter.shape:
        shape = None if current is None else tuple(current.shape)
        raise ValueError(f"{name}: the tower expects {shape}, transformers' model has {tuple(parameter.shape)}")
    owner._parameters[leaf] = parameter


def parameter_sources(names: list[str]) -> dict[str, str | tuple[str, ...]]:
    """Our parameter names -> the `UnlimitedOcrModel` parameter each one is (a tuple of the q, k, v names for a fused
    projection), read off the conversion layer's `hf-unlimited-ocr` tables. A name with no counterpart is an error."""
    plain, unmatched = map_keys({name: name for name in names}, template_table(UNLIMITED_OCR_MAP, ours_to_theirs=True))
    sources: dict[str, str | tuple[str, ...]] = {ours: theirs for theirs, ours in plain.items()}
    for fused, parts in UNLIMITED_OCR_FUSED:
        # one (ours -> theirs) map per part: the fused name to the q, the k and the v name in turn
        per_part = [
            {
                ours: theirs
                for theirs, ours in map_keys(
                    {name: name for name in unmatched}, template_table(((fused, part),), ours_to_theirs=True)
                )[0].items()
            }
            for part in parts
        ]
        for ours in per_part[0]:
            sources[ours] = tuple(found[ours] for found in per_part)
    missing = sorted(set(names) - set(sources))
    if missing:
        raise ValueError(f"tower parameters with no counterpart in transformers' UnlimitedOcrModel: {missing}")
    return sources


def _shared_v1_tower(inner: nn.Module, tower_class: type[DeepEncoderModel]) -> DeepEncoderModel:
    config = deepencoder_config_from_unlimited_ocr(inner.config)
    with torch.device("meta"), init.no_init_weights():
        tower = tower_class(config)
    theirs = dict(inner.named_parameters())
    for name, source in parameter_sources([name for name, _ in tower.named_parameters()]).items():
        if isinstance(source, str):
            _set_parameter(tower, name, theirs[source])
        elif name.endswith(".weight"):  # a fused q/k/v Linear: replaced whole, once (its bias comes with it)
            owner = name.rpartition(".")[0]
            parent, _, child = owner.rpartition(".")
            linears = [inner.get_submodule(part.rpartition(".")[0]) for part in source]
            setattr(tower.get_submodule(parent), child, SplitQkvProjection(*linears))
    return tower


def v2_shared_state(inner: nn.Module) -> dict[str, nn.Parameter]:
    """`DeepseekOcr2Model`'s vision parameters under `DeepEncoderV2Model`'s names (the same objects), through the
    `hf-deepseek-ocr2` format record's table."""
    vision = {name: p for name, p in inner.named_parameters() if HF_DEEPSEEK_OCR2.needed(name)}
    return HF_DEEPSEEK_OCR2.convert(vision, f"transformers' {type(inner).__name__}")


def _shared_v2_tower(inner: nn.Module, tower_class: type[DeepEncoderV2Model]) -> DeepEncoderV2Model:
    state = v2_shared_state(inner)
    config = v2_config_from_state_dict(state, values_from_config_json(inner.config.to_dict()), {})
    with torch.device("meta"), init.no_init_weights():
        tower = tower_class(config)
    missing = sorted(set(name for name, _ in tower.named_parameters()) - set(state))
    if missing:
        raise ValueError(f"tower parameters with no counterpart in transformers' DeepseekOcr2Model: {missing}")
    for name, parameter in state.items():
        _set_parameter(tower, name, parameter)
    return tower


def build_shared_tower(
    inner: nn.Module, tower_class: type[DeepEncoderModel] | type[DeepEncoderV2Model] | None = None
) -> DeepEncoderModel | DeepEncoderV2Model:
    """The tower whose every parameter is the corresponding parameter object of transformers' base model `inner`
    (`UnlimitedOcrModel` -> `DeepEncoderModel`, `DeepseekOcr2Model` -> `DeepEncoderV2Model`, or `tower_class`, a
    subclass of that one): vision tower, projector, separator (and v1's newline). Built on the meta device first, so
    no tensor of the tower's own is ever allocated."""
    family = DeepEncoderV2Model if is_deepseek_ocr2(inner) else DeepEncoderModel
    tower_class = tower_class or family
    if not issubclass(tower_class, family):
        raise TypeError(
            f"transformers' {type(inner).__name__} holds a {family.__name__}, not a {tower_class.__name__}: use "
            f"{family.__name__}.from_transformers"
        )
    tower = (_shared_v2_tower if family is DeepEncoderV2Model else _shared_v1_tower)(inner, tower_class)
    left = [name for name, parameter in tower.named_parameters() if parameter.is_meta]
    if left:
        raise ValueError(f"tower parameters with no counterpart in transformers' {type(inner).__name__}: {left}")
    dtypes = {parameter.dtype for parameter in tower.parameters()}
    if len(dtypes) == 1:
        tower.config.dtype = dtypes.pop()
    return tower.train(inner.vision_tower.training)


def tower_from_transformers(
    model: nn.Module, tower_class: type[DeepEncoderModel] | type[DeepEncoderV2Model] | None = None
) -> DeepEncoderModel | DeepEncoderV2Model:
    """A standalone tower on `model`'s own vision parameters (shared, not copied); `model` is left untouched.

    model: transformers' `UnlimitedOcrForConditionalGeneration` / `UnlimitedOcrModel` (gives a `DeepEncoderModel`)
    or `DeepseekOcr2ForConditionalGeneration` / `DeepseekOcr2Model` (gives a `DeepEncoderV2Model`). tower_class: the
    class asked for (`DeepEncoderModel.from_transformers` passes its own); one of the other family is a `TypeError`.
    """
    return build_shared_tower(transformers_base_model(model), tower_class)
