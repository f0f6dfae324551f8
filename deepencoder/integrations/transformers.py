"""This library's tower as the vision engine inside transformers' OCR models.

transformers ships DeepSeek-OCR's architecture as `UnlimitedOcrForConditionalGeneration` (`UnlimitedOcrModel`):
a SAM + CLIP `vision_tower`, a `multi_modal_projector`, `image_newline` and `view_separator`, and a language model.
`attach(model)` builds a `DeepEncoderModel` whose parameters ARE that model's parameters (the same `nn.Parameter`
objects: no copy, no second load) and routes the model's `get_image_features` through it, so `forward` and `generate`
take the inputs transformers' own processor makes (`pixel_values`, `pixel_values_local`, `num_local_patches`,
`patches_grid`) and return the same results. `detach(model)` restores the stock path.

```
UnlimitedOcrModel.get_image_features(pixel_values, pixel_values_local, num_local_patches, patches_grid)
  stock:    vision_tower (SAM -> CLIP) -> multi_modal_projector -> rows + image_newline -> view_separator
  attached: DeepEncoderModel.encode_views (same parameters) -> layout_page          (same tokens, same order)
```

The tower is kept outside the model's module tree, so the model's `state_dict`, `parameters()` and
`save_pretrained` are exactly what they were; because the parameters are shared objects, `model.to(...)`, `.half()`,
`load_state_dict` and optimiser steps on the model reach the tower too. If the model's parameters are replaced by new
objects (`load_state_dict(..., assign=True)`, adapters swapping modules), the tower is rebuilt on the new ones at the
next call.

transformers keeps CLIP's query, key and value projections as three `Linear` layers where this library has one fused
`qkv_proj`; `SplitQkvProjection` stands in for that Linear and computes the fused projection from the three
parameters (their outputs concatenated), so nothing is copied. Its `state_dict` still has the fused `weight` / `bias`
(built when saving), so a tower from `from_transformers(model)` saves as an ordinary `DeepEncoderModel` checkpoint.
"""

from __future__ import annotations

import types
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init

from ..conversion.common import map_keys, template_table
from ..conversion.unlimited_ocr import UNLIMITED_OCR_FUSED, UNLIMITED_OCR_MAP, deepencoder_config_from_unlimited_ocr
from ..image_processing_deepencoder import DeepEncoderImageProcessor
from ..layout import layout_page
from ..modeling_deepencoder import DeepEncoderModel

ATTACHMENT_ATTRIBUTE = "_deepencoder_attachment"


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
def _unlimited_ocr_model(model: nn.Module) -> nn.Module:
    """`UnlimitedOcrForConditionalGeneration` or `UnlimitedOcrModel` -> the `UnlimitedOcrModel` holding the vision
    parts."""
    from transformers.models.unlimited_ocr.modeling_unlimited_ocr import (
        UnlimitedOcrForConditionalGeneration,
        UnlimitedOcrModel,
    )

    if isinstance(model, UnlimitedOcrForConditionalGeneration):
        return model.model
    if isinstance(model, UnlimitedOcrModel):
        return model
    raise TypeError(
        f"expected transformers' UnlimitedOcrForConditionalGeneration or UnlimitedOcrModel, got {type(model).__name__}"
    )


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


def build_shared_tower(inner: nn.Module) -> DeepEncoderModel:
    """A `DeepEncoderModel` whose every parameter is the corresponding parameter object of transformers'
    `UnlimitedOcrModel` `inner` (vision tower, projector, newline, separator). Built on the meta device first, so no
    tensor of the tower's own is ever allocated."""
    config = deepencoder_config_from_unlimited_ocr(inner.config)
    with torch.device("meta"), init.no_init_weights():
        tower = DeepEncoderModel(config)
    theirs = dict(inner.named_parameters())
    for name, source in parameter_sources([name for name, _ in tower.named_parameters()]).items():
        if isinstance(source, str):
            _set_parameter(tower, name, theirs[source])
        elif name.endswith(".weight"):  # a fused q/k/v Linear: replaced whole, once (its bias comes with it)
            owner = name.rpartition(".")[0]
            parent, _, child = owner.rpartition(".")
            linears = [inner.get_submodule(part.rpartition(".")[0]) for part in source]
            setattr(tower.get_submodule(parent), child, SplitQkvProjection(*linears))
    left = [name for name, parameter in tower.named_parameters() if parameter.is_meta]
    if left:
        raise ValueError(f"tower parameters with no counterpart in transformers' UnlimitedOcrModel: {left}")
    dtypes = {parameter.dtype for parameter in tower.parameters()}
    if len(dtypes) == 1:
        tower.config.dtype = dtypes.pop()
    return tower.train(inner.vision_tower.training)


# ------------------------------------------------------------------------------------------------ image features
def tower_image_features(
    tower: DeepEncoderModel,
    pixel_values: torch.Tensor,
    pixel_values_local: torch.Tensor | None = None,
    num_local_patches: Sequence[int] | None = None,
    patches_grid: Sequence[Sequence[int]] | None = None,
    output_hidden_states: bool = False,
):
    """`UnlimitedOcrModel.get_image_features`'s contract computed by the tower.

    pixel_values: (B, 3, S, S) global views; pixel_values_local: (T, 3, t, t) all tiles of the batch; num_local_patches:
    tiles per page (Python ints); patches_grid: (cols, rows) per page. Returns transformers'
    `UnlimitedOcrModelOutputWithPooling`: `pooler_output` one (num_tokens_i, D) tensor per page (tiles with a newline
    per row, the global view with a newline per row, the view separator), `last_hidden_state` the global views'
    (B, h*w, 2048) join before the projector, `local_last_hidden_state` the same for the tiles.
    """
    from transformers.models.unlimited_ocr.modeling_unlimited_ocr import UnlimitedOcrModelOutputWithPooling

    batch = pixel_values.shape[0]
    global_out = tower.encode_views(pixel_values, output_hidden_states=output_hidden_states, output_pre_projector=True)
    local_out = None
    per_page_tiles: list[torch.Tensor | None] = [None] * batch
    if pixel_values_local is not None:
        counts = [int(n) for n in num_local_patches]
        local_out = tower.encode_views(
            pixel_values_local, output_hidden_states=output_hidden_states, output_pre_projector=True
        )
        per_page_tiles = list(local_out.image_embeds.split(counts))
    pages = [
        layout_page(
            global_out.image_embeds[i],
            global_out.grid,
            tower.image_newline,
            tower.view_separator,
            per_page_tiles[i],
            tuple(int(v) for v in patches_grid[i]) if patches_grid is not None else (1, 1),
        )
        for i in range(batch)
    ]
    local = {}
    if local_out is not None:
        local = {
            "local_last_hidden_state": local_out.pre_projector,
            "local_hidden_states": local_out.clip_hidden_states,
            "local_attentions": None,
        }
    return UnlimitedOcrModelOutputWithPooling(
        last_hidden_state=global_out.pre_projector,
        pooler_output=pages,
        hidden_states=global_out.clip_hidden_states,
        attentions=None,
        **local,
    )


@dataclass
class Attachment:
    """What `attach` left on a model: the tower and the model parameters it was built on (to notice replacements)."""

    tower: DeepEncoderModel
    parameters: list[nn.Parameter] = field(default_factory=list)


def _vision_parameters(inner: nn.Module) -> list[nn.Parameter]:
    return [
        *inner.vision_tower.parameters(),
        *inner.multi_modal_projector.parameters(),
        inner.image_newline,
        inner.view_separator,
    ]


def _current_tower(inner: nn.Module) -> DeepEncoderModel:
    """The attached tower, rebuilt first when the model's parameters were replaced by other objects since."""
    attachment: Attachment = inner.__dict__[ATTACHMENT_ATTRIBUTE]
    current = _vision_parameters(inner)
    if len(current) != len(attachment.parameters) or any(a is not b for a, b in zip(current, attachment.parameters)):
        attachment.tower = build_shared_tower(inner)
        attachment.parameters = current
    tower = attachment.tower
    if tower.training != inner.vision_tower.training:
        tower.train(inner.vision_tower.training)
    return tower


def _attached_get_image_features(
    self: nn.Module,
    pixel_values: torch.Tensor,
    pixel_values_local: torch.Tensor | None = None,
    num_local_patches: Sequence[int] | None = None,
    patches_grid: Sequence[Sequence[int]] | None = None,
    **kwargs: Any,
):
    """Replaces `UnlimitedOcrModel.get_image_features` on an attached instance (see `tower_image_features`).
    Requests the tower cannot serve (`output_attentions=True`: SDPA keeps no attention weights) take the stock path."""
    if kwargs.get("output_attentions"):
        return type(self).get_image_features(
            self, pixel_values, pixel_values_local, num_local_patches, patches_grid, **kwargs
        )
    return_dict = kwargs.pop("return_dict", True)
    output_hidden_states = bool(kwargs.pop("output_hidden_states", False))
    output = tower_image_features(
        _current_tower(self), pixel_values, pixel_values_local, num_local_patches, patches_grid, output_hidden_states
    )
    return output if return_dict else output.to_tuple()


# ------------------------------------------------------------------------------------------------ public API
def attach(model: nn.Module) -> DeepEncoderModel:
    """Make `model`'s image features come from this library's tower, built on `model`'s own parameters.

    model: transformers' `UnlimitedOcrForConditionalGeneration` or `UnlimitedOcrModel`. Returns the tower
    (a `DeepEncoderModel` sharing every vision parameter with `model`). `forward` / `generate` then take the inputs
    of transformers' processor unchanged. Attaching twice returns the same tower; `detach(model)` undoes it.
    """
    inner = _unlimited_ocr_model(model)
    if ATTACHMENT_ATTRIBUTE in inner.__dict__:
        return _current_tower(inner)
    tower = build_shared_tower(inner)
    # outside the module tree: the model's state_dict, parameters() and save_pretrained stay as they were
    inner.__dict__[ATTACHMENT_ATTRIBUTE] = Attachment(tower, _vision_parameters(inner))
    inner.__dict__["get_image_features"] = types.MethodType(_attached_get_image_features, inner)
    return tower


def detach(model: nn.Module) -> None:
    """Restore transformers' own vision path on a model `attach` was called on (no-op otherwise)."""
    inner = _unlimited_ocr_model(model)
    inner.__dict__.pop(ATTACHMENT_ATTRIBUTE, None)
    inner.__dict__.pop("get_image_features", None)


def is_attached(model: nn.Module) -> bool:
    return ATTACHMENT_ATTRIBUTE in _unlimited_ocr_model(model).__dict__


def from_transformers(model: nn.Module) -> DeepEncoderModel:
    """A standalone `DeepEncoderModel` on `model`'s own vision parameters (shared, not copied); `model` itself is
    left untouched. `tower(**DeepEncoderImageProcessor(...)(pages))` then works as for any tower, and
    `tower.save_pretrained(dir)` writes an ordinary DeepEncoder checkpoint."""
    return build_shared_tower(_unlimited_ocr_model(model))


def image_processor_from_transformers(image_processor: Any) -> DeepEncoderImageProcessor:
    """The `DeepEncoderImageProcessor` that plans pages as transformers' `UnlimitedOcrImageProcessor` does (same
    global view, same tile grid, same token count), from that processor's settings."""
    size = max(image_processor.size["height"], image_processor.size["width"])
    tile = image_processor.tile_size
    if image_processor.crop_to_patches:
        modes = [name for name in ("gundam", "gundam-m") if _mode_sizes(name) == (size, tile)]
        mode = modes[0] if modes else "gundam"
        return DeepEncoderImageProcessor(
            mode=mode,
            base_size=size,
            tile_size=tile,
            min_crops=image_processor.min_patches,
            max_crops=image_processor.max_patches,
        )
    if size <= image_processor.maximum_pad_value:  # stretched to a square
        modes = [name for name in ("tiny", "small") if _mode_sizes(name)[0] == size]
        return DeepEncoderImageProcessor(mode=modes[0] if modes else "small", base_size=size)
    modes = [name for name in ("base", "large") if _mode_sizes(name)[0] == size]
    return DeepEncoderImageProcessor(mode=modes[0] if modes else "base", base_size=size)


def _mode_sizes(name: str) -> tuple[int, int | None]:
    from ..image_processing_deepencoder import RESOLUTION_MODES

    mode = RESOLUTION_MODES[name]
    return mode.base_size, mode.tile_size
