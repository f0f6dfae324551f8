"""Loading shared by both towers' model classes (`DeepEncoderModel`, `DeepEncoderV2Model`).

- `from_pretrained`: transformers' own for this library's checkpoints; any other checkpoint holding the tower
  (DeepSeek-OCR / DeepSeek-OCR-2 releases, transformers' `UnlimitedOcr*` / `DeepseekOcr2*` `save_pretrained` in
  either naming) is converted on load, reading only the vision tensors, and one that holds no such tower is an
  error, never a randomly initialised model.
- `from_transformers`: a standalone tower on the vision parameters of a loaded transformers OCR model.

Both defer to the conversion layer when called; nothing here is imported by it.
"""

from __future__ import annotations

from typing import Any

from torch import nn


class TowerLoadingMixin:
    """Put before the `PreTrainedModel` base: its `from_pretrained` is the one reached through `super()`."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args: Any, **kwargs: Any):
        """transformers' `from_pretrained` for this library's checkpoints (local folder or hub id); any other
        checkpoint holding this tower is converted on load (see the module docstring, and
        `deepencoder.conversion.load.load_converted_pretrained` for the keywords a converted load takes)."""
        from .conversion.load import load_converted_pretrained

        converted = load_converted_pretrained(cls, pretrained_model_name_or_path, model_args, kwargs)
        if converted is not None:
            return converted
        return super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)

    @classmethod
    def from_transformers(cls, model: nn.Module):
        """A standalone tower on the vision parameters of a loaded transformers OCR model: `DeepEncoderModel` from
        `UnlimitedOcrForConditionalGeneration` / `UnlimitedOcrModel`, `DeepEncoderV2Model` from
        `DeepseekOcr2ForConditionalGeneration` / `DeepseekOcr2Model` (the other family is a `TypeError`). Its
        parameters are the model's own `nn.Parameter` objects (no copy, no second load); `model` is left untouched.
        It runs on this library's processor and saves as an ordinary DeepEncoder checkpoint. To make the
        transformers model itself run on this tower, see `deepencoder.integrations.attach`."""
        from .conversion.shared_weights import tower_from_transformers

        return tower_from_transformers(model, cls)
