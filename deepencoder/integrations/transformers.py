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

DeepSeek-OCR-2's `DeepseekOcr2ForConditionalGeneration` (`DeepseekOcr2Model`: SAM + a Qwen2 encoder with learned
queries, no newlines) gets a `DeepEncoderV2Model` the same way; `get_image_features(pixel_values,
pixel_values_local, num_local_patches)` keeps its contract.

The tower is kept outside the model's module tree, so the model's `state_dict`, `parameters()` and
`save_pretrained` are exactly what they were; because the parameters are shared objects, `model.to(...)`, `.half()`,
`load_state_dict` and optimiser steps on the model reach the tower too. If the model's parameters are replaced by new
objects (`load_state_dict(..., assign=True)`, adapters swapping modules), the tower is rebuilt on the new ones at the
next call.

The tower on the model's parameters is built by the conversion layer (`deepencoder.conversion.shared_weights`,
also behind `DeepEncoderModel.from_transformers` / `DeepEncoderV2Model.from_transformers`).
"""

from __future__ import annotations

import types
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..conversion.shared_weights import (
    build_shared_tower,
    is_deepseek_ocr2,
    tower_from_transformers,
    transformers_base_model,
)
from ..image_processing_deepencoder import DeepEncoderImageProcessor
from ..layout import layout_page, layout_query_page
from ..modeling_deepencoder import DeepEncoderModel
from ..modeling_deepencoder_v2 import DeepEncoderV2Model

ATTACHMENT_ATTRIBUTE = "_deepencoder_attachment"


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


def tower_v2_image_features(
    tower: DeepEncoderV2Model,
    pixel_values: torch.Tensor,
    pixel_values_local: torch.Tensor | None = None,
    num_local_patches: Sequence[int] | torch.Tensor | None = None,
    output_hidden_states: bool = False,
):
    """`DeepseekOcr2Model.get_image_features`'s contract computed by the V2 tower: `pooler_output` one
    (num_tokens_i, D) tensor per page (every tile's queries, the global view's, the view separator),
    `last_hidden_state` the global views' query outputs before the projector, `local_last_hidden_state` the tiles'."""
    from transformers.models.deepseek_ocr2.modeling_deepseek_ocr2 import DeepseekOcr2ModelOutputWithPooling

    if isinstance(num_local_patches, torch.Tensor):  # transformers accepts a tensor here (and syncs on it)
        num_local_patches = num_local_patches.tolist()
    batch = pixel_values.shape[0]
    global_out = tower.encode_views(pixel_values, output_hidden_states=output_hidden_states, output_pre_projector=True)
    local_out = None
    per_page_tiles: list[torch.Tensor | None] = [None] * batch
    if pixel_values_local is not None:
        local_out = tower.encode_views(
            pixel_values_local, output_hidden_states=output_hidden_states, output_pre_projector=True
        )
        per_page_tiles = list(local_out.image_embeds.split([int(n) for n in num_local_patches]))
    pages = [
        layout_query_page(global_out.image_embeds[i], tower.view_separator, per_page_tiles[i]) for i in range(batch)
    ]

    def as_transformers(states: tuple[torch.Tensor, ...] | None) -> tuple[torch.Tensor, ...] | None:
        # transformers' last entry is the final norm's output over the whole sequence, ours the last layer's
        return None if states is None else (*states[:-1], tower.encoder.norm(states[-1]))

    local = {}
    if local_out is not None:
        local = {
            "local_last_hidden_state": local_out.pre_projector,
            "local_hidden_states": as_transformers(local_out.encoder_hidden_states),
            "local_attentions": None,
        }
    return DeepseekOcr2ModelOutputWithPooling(
        last_hidden_state=global_out.pre_projector,
        pooler_output=pages,
        hidden_states=as_transformers(global_out.encoder_hidden_states),
        attentions=None,
        **local,
    )


@dataclass
class Attachment:
    """What `attach` left on a model: the tower and the model parameters it was built on (to notice replacements)."""

    tower: DeepEncoderModel | DeepEncoderV2Model
    parameters: list[nn.Parameter] = field(default_factory=list)


def _vision_parameters(inner: nn.Module) -> list[nn.Parameter]:
    extra = [] if is_deepseek_ocr2(inner) else [inner.image_newline]
    return [
        *inner.vision_tower.parameters(),
        *inner.multi_modal_projector.parameters(),
        *extra,
        inner.view_separator,
    ]


def _current_tower(inner: nn.Module) -> DeepEncoderModel | DeepEncoderV2Model:
    """The attached tower, rebuilt first when the model's parameters were replaced by other objects since (adapters
    added or merged included); its train / eval mode and activation checkpointing follow the model's vision tower
    (`model.train()` and `model.activation_checkpointing_enable()` reach the tower, which is outside the module
    tree)."""
    attachment: Attachment = inner.__dict__[ATTACHMENT_ATTRIBUTE]
    current = _vision_parameters(inner)
    if len(current) != len(attachment.parameters) or any(a is not b for a, b in zip(current, attachment.parameters)):
        attachment.tower = build_shared_tower(inner)
        attachment.parameters = current
    tower = attachment.tower
    if tower.training != inner.vision_tower.training:
        tower.train(inner.vision_tower.training)
    checkpointing = any(getattr(module, "gradient_checkpointing", False) for module in inner.vision_tower.modules())
    if checkpointing != tower.is_activation_checkpointing:
        if checkpointing:
            tower.activation_checkpointing_enable()
        else:
            tower.activation_checkpointing_disable()
    return tower


def _serve(self: nn.Module, stock_inputs: dict[str, Any], kwargs: dict[str, Any]):
    """Run the attached tower for `get_image_features`; requests it cannot serve (`output_attentions=True`: SDPA
    keeps no attention weights) take the stock path."""
    if kwargs.get("output_attentions"):
        return type(self).get_image_features(self, **stock_inputs, **kwargs)
    return_dict = kwargs.pop("return_dict", True)
    output_hidden_states = bool(kwargs.pop("output_hidden_states", False))
    features = tower_v2_image_features if is_deepseek_ocr2(self) else tower_image_features
    output = features(_current_tower(self), output_hidden_states=output_hidden_states, **stock_inputs)
    return output if return_dict else output.to_tuple()


# explicit signatures: transformers' `generate` reads `get_image_features`' parameter names to pick its inputs
def _attached_get_image_features(
    self: nn.Module,
    pixel_values: torch.Tensor,
    pixel_values_local: torch.Tensor | None = None,
    num_local_patches: Sequence[int] | None = None,
    patches_grid: Sequence[Sequence[int]] | None = None,
    **kwargs: Any,
):
    """`UnlimitedOcrModel.get_image_features` on an attached model (see `tower_image_features`)."""
    inputs = dict(
        pixel_values=pixel_values,
        pixel_values_local=pixel_values_local,
        num_local_patches=num_local_patches,
        patches_grid=patches_grid,
    )
    return _serve(self, inputs, kwargs)


def _attached_get_image_features_v2(
    self: nn.Module,
    pixel_values: torch.Tensor,
    pixel_values_local: torch.Tensor | None = None,
    num_local_patches: Sequence[int] | torch.Tensor | None = None,
    **kwargs: Any,
):
    """`DeepseekOcr2Model.get_image_features` on an attached model (see `tower_v2_image_features`)."""
    inputs = dict(pixel_values=pixel_values, pixel_values_local=pixel_values_local, num_local_patches=num_local_patches)
    return _serve(self, inputs, kwargs)


# ------------------------------------------------------------------------------------------------ public API
def attach(model: nn.Module) -> DeepEncoderModel | DeepEncoderV2Model:
    """Make `model`'s image features come from this library's tower, built on `model`'s own parameters.

    model: transformers' `UnlimitedOcrForConditionalGeneration` / `UnlimitedOcrModel` (DeepSeek-OCR's architecture:
    returns a `DeepEncoderModel`) or `DeepseekOcr2ForConditionalGeneration` / `DeepseekOcr2Model` (returns a
    `DeepEncoderV2Model`); the tower shares every vision parameter with `model`. `forward` / `generate` then take
    the inputs of transformers' processor unchanged. Attaching twice returns the same tower; `detach(model)` undoes
    it.
    """
    inner = transformers_base_model(model)
    if ATTACHMENT_ATTRIBUTE in inner.__dict__:
        return _current_tower(inner)
    tower = build_shared_tower(inner)
    # outside the module tree: the model's state_dict, parameters() and save_pretrained stay as they were
    inner.__dict__[ATTACHMENT_ATTRIBUTE] = Attachment(tower, _vision_parameters(inner))
    method = _attached_get_image_features_v2 if is_deepseek_ocr2(inner) else _attached_get_image_features
    inner.__dict__["get_image_features"] = types.MethodType(method, inner)
    return tower


def detach(model: nn.Module) -> None:
    """Restore transformers' own vision path on a model `attach` was called on (no-op otherwise)."""
    inner = transformers_base_model(model)
    inner.__dict__.pop(ATTACHMENT_ATTRIBUTE, None)
    inner.__dict__.pop("get_image_features", None)


def is_attached(model: nn.Module) -> bool:
    return ATTACHMENT_ATTRIBUTE in transformers_base_model(model).__dict__


def from_transformers(model: nn.Module) -> DeepEncoderModel | DeepEncoderV2Model:
    """A standalone tower (`DeepEncoderModel`, or `DeepEncoderV2Model` for DeepSeek-OCR-2) on `model`'s own vision
    parameters (shared, not copied); `model` itself is left untouched. `tower(**DeepEncoderImageProcessor(...)(pages))`
    then works as for any tower, and `tower.save_pretrained(dir)` writes an ordinary DeepEncoder checkpoint. The same
    as `DeepEncoderModel.from_transformers(model)` / `DeepEncoderV2Model.from_transformers(model)` without naming the
    family."""
    return tower_from_transformers(model)


def image_processor_from_transformers(image_processor: Any) -> DeepEncoderImageProcessor:
    """The `DeepEncoderImageProcessor` that plans pages as a transformers image processor of these models does (same
    global view size, same tile grid, same token count), from that processor's settings: `UnlimitedOcrImageProcessor`
    -> a v1 mode, `DeepseekOcr2ImageProcessor` (either backend) -> `ocr2` / `ocr2-base`."""
    size = max(image_processor.size["height"], image_processor.size["width"])
    tile = image_processor.tile_size
    crop = image_processor.crop_to_patches
    bounds = dict(min_crops=image_processor.min_patches, max_crops=image_processor.max_patches)
    if type(image_processor).__name__.startswith("DeepseekOcr2"):
        if crop:
            return DeepEncoderImageProcessor(
                mode="ocr2", base_size=image_processor.size["height"], tile_size=tile, **bounds
            )
        # without tiles transformers makes the global view at the tile size
        return DeepEncoderImageProcessor(mode="ocr2-base", base_size=tile)
    if crop:
        modes = [name for name in ("gundam", "gundam-m") if _mode_sizes(name) == (size, tile)]
        return DeepEncoderImageProcessor(mode=modes[0] if modes else "gundam", base_size=size, tile_size=tile, **bounds)
    if size <= image_processor.maximum_pad_value:  # stretched to a square
        modes = [name for name in ("tiny", "small") if _mode_sizes(name)[0] == size]
        return DeepEncoderImageProcessor(mode=modes[0] if modes else "small", base_size=size)
    modes = [name for name in ("base", "large") if _mode_sizes(name)[0] == size]
    return DeepEncoderImageProcessor(mode=modes[0] if modes else "base", base_size=size)


def _mode_sizes(name: str) -> tuple[int, int | None]:
    from ..image_processing_deepencoder import RESOLUTION_MODES

    mode = RESOLUTION_MODES[name]
    return mode.base_size, mode.tile_size
