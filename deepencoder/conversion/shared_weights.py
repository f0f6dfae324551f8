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
from torch import nn
from transformers import initialization as init

from ..modeling_deepencoder import DeepEncoderModel
from ..modeling_deepencoder_v2 import DeepEncoderV2Model
from .common import map_keys, template_table
from .deepseek_ocr2 import HF_DEEPSEEK_OCR2, v2_config_from_state_dict, values_from_config_json
from .unlimited_ocr import UNLIMITED_OCR_FUSED, UNLIMITED_OCR_MAP, deepencoder_config_from_unlimited_ocr


class SplitQkvProjection(nn.Module):
    """A fused q/k/v Linear (x -> [q | k | v], (..., C) -> (..., 3C)) made of three separate projection modules.

    The modules are the given ones (shared, not copied: transformers' `q_proj` / `k_proj` / `v_proj`, or an adapter
    library's wrappers of them, whose adapters then act here too). `state_dict` shows plain projections fused as
    `weight` (3C, C) and `bias` (3C,), the layout of an `nn.Linear(C, 3C)`, and `load_state_dict` accepts that
    layout and writes it into the three modules' parameters in place.
    """

    parts = ("query", "key", "value")

    def __init__(self, query: nn.Module, key: nn.Module, value: nn.Module) -> None:
        super().__init__()
        self.query, self.key, self.value = query, key, value
        bases = [getattr(module, "base_layer", module) for module in (query, key, value)]
        self.in_features = bases[0].in_features
        self.out_features = sum(base.out_features for base in bases)
        self.register_state_dict_post_hook(_fuse_qkv_state)
        self.register_load_state_dict_pre_hook(_split_qkv_state)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """(..., C) -> (..., 3C)."""
        return torch.cat([self.query(hidden_states), self.key(hidden_states), self.value(hidden_states)], dim=-1)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, split q/k/v projections"


def _fuse_qkv_state(module: SplitQkvProjection, state_dict: dict, prefix: str, local_metadata: Any) -> None:
    for kind in ("weight", "bias"):
        names = [f"{prefix}{part}.{kind}" for part in module.parts]
        if all(name in state_dict for name in names):
            state_dict[f"{prefix}{kind}"] = torch.cat([state_dict.pop(name).detach() for name in names])


def _split_qkv_state(module: SplitQkvProjection, state_dict: dict, prefix: str, *args: Any) -> None:
    for kind in ("weight", "bias"):
        fused = state_dict.pop(f"{prefix}{kind}", None)
        if fused is None:
            continue
        sizes = [getattr(module, part).out_features for part in module.parts]
        for part, tensor in zip(module.parts, fused.split(sizes)):
            state_dict[f"{prefix}{part}.{kind}"] = tensor


# ------------------------------------------------------------------------------------------------ adapters
def adapter_wrapped_modules(root: nn.Module) -> dict[str, nn.Module]:
    """The modules of `root` an adapter library wrapped around an original it keeps as `base_layer` (PEFT's LoRA,
    IA3, ... layers), by name."""
    return {
        name: module
        for name, module in root.named_modules()
        if isinstance(getattr(module, "base_layer", None), nn.Module)
    }


def base_parameters(root: nn.Module) -> dict[str, nn.Parameter]:
    """`root`'s parameters named as if no adapter wrapped any module: a wrapped module's original parameters under the
    module's own name (`q_proj.base_layer.weight` -> `q_proj.weight`), the adapters' parameters left out."""
    wrappers = adapter_wrapped_modules(root).values()
    adapters = {id(p) for w in wrappers for p in w.parameters()} - {
        id(p) for w in wrappers for p in w.base_layer.parameters()
    }
    return {
        name.replace(".base_layer.", "."): parameter
        for name, parameter in root.named_parameters()
        if id(parameter) not in adapters
    }


def _adopt_wrapped_modules(tower: nn.Module, inner: nn.Module) -> None:
    """Where an adapter wrapped one of the model's vision modules, the tower calls that wrapper in place of its own
    module holding the same parameters (so the adapter acts on the attached path too)."""
    ours = {}
    for name, module in tower.named_modules():
        weight = module._parameters.get("weight") if "base_layer" not in name.split(".") else None
        if weight is not None:
            ours[id(weight)] = name
    adopted = {id(module) for module in tower.modules()}
    for name, wrapper in adapter_wrapped_modules(inner).items():
        if name.startswith("language_model.") or id(wrapper) in adopted:
            continue
        base = wrapper.base_layer
        target = ours.get(id(base._parameters.get("weight")))
        if target is None or type(tower.get_submodule(target)) is not type(base):
            raise ValueError(f"{name}: wrapped by an adapter, but no module of the tower is its {type(base).__name__}")
        parent, _, leaf = target.rpartition(".")
        setattr(tower.get_submodule(parent) if parent else tower, leaf, wrapper)


# ------------------------------------------------------------------------------------------------ the shared tower
def transformers_base_model(model: nn.Module) -> nn.Module:
    """transformers' conditional-generation model or its base model -> the base model holding the vision parts
    (`UnlimitedOcrModel` or `DeepseekOcr2Model`); a PEFT `PeftModel` around either is looked through."""
    from transformers.models.deepseek_ocr2.modeling_deepseek_ocr2 import (
        DeepseekOcr2ForConditionalGeneration,
        DeepseekOcr2Model,
    )
    from transformers.models.unlimited_ocr.modeling_unlimited_ocr import (
        UnlimitedOcrForConditionalGeneration,
        UnlimitedOcrModel,
    )

    get_base_model = getattr(model, "get_base_model", None)  # PEFT's PeftModel
    if callable(get_base_model):
        model = get_base_model()
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
    theirs = base_parameters(inner)
    for name, source in parameter_sources([name for name, _ in tower.named_parameters()]).items():
        if isinstance(source, str):
            _set_parameter(tower, name, theirs[source])
        elif name.endswith(".weight"):  # a fused q/k/v Linear: replaced whole, once (its bias comes with it)
            owner = name.rpartition(".")[0]
            parent, _, child = owner.rpartition(".")
            modules = [inner.get_submodule(part.rpartition(".")[0]) for part in source]  # adapter wrappers included
            setattr(tower.get_submodule(parent), child, SplitQkvProjection(*modules))
    return tower


def v2_shared_state(inner: nn.Module) -> dict[str, nn.Parameter]:
    """`DeepseekOcr2Model`'s vision parameters under `DeepEncoderV2Model`'s names (the same objects), through the
    `hf-deepseek-ocr2` format record's table."""
    vision = {name: p for name, p in base_parameters(inner).items() if HF_DEEPSEEK_OCR2.needed(name)}
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
    _adopt_wrapped_modules(tower, inner)
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
