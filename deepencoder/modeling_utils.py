"""Loading shared by both towers' model classes (`DeepEncoderModel`, `DeepEncoderV2Model`).

- `from_pretrained`: transformers' own for this library's checkpoints; any other checkpoint holding the tower
  (DeepSeek-OCR / DeepSeek-OCR-2 releases, transformers' `UnlimitedOcr*` / `DeepseekOcr2*` `save_pretrained` in
  either naming) is converted on load, reading only the vision tensors, and one that holds no such tower is an
  error, never a randomly initialised model.
- `from_transformers`: a standalone tower on the vision parameters of a loaded transformers OCR model.

The model layer imports nothing above it: this file (with the rest of the model layer) is what `save_pretrained`
copies beside a checkpoint for `trust_remote_code=True` loading where `deepencoder` is not installed. Foreign
checkpoints come in through `CHECKPOINT_LOADERS`, which the conversion layer fills when the `deepencoder` package is
imported (`deepencoder.conversion.loaders`). Without it (the copied files alone), `from_pretrained` is transformers'
own and the converting loaders say that they need the package.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

# name -> loader, registered by the conversion layer:
#   "pretrained": (model_class, path_or_repo_id, model_args, kwargs) -> model, or None for a checkpoint of this
#                 library (transformers' loading goes on)
#   "deepseek-ocr", "deepseek-ocr2": (model_class, path_or_repo_id, **keywords) -> model
#   "transformers": (model_class, transformers_model) -> model sharing its parameters
CHECKPOINT_LOADERS: dict[str, Callable[..., Any]] = {}


def register_checkpoint_loader(name: str, loader: Callable[..., Any]) -> None:
    """Make `loader` the one `name` refers to (see `CHECKPOINT_LOADERS`); a later registration replaces it."""
    CHECKPOINT_LOADERS[name] = loader


def checkpoint_loader(name: str) -> Callable[..., Any]:
    """The registered loader `name`; an ImportError saying what to install when none is (the model files copied
    beside a checkpoint run without the `deepencoder` package, whose conversion layer provides the loaders)."""
    try:
        return CHECKPOINT_LOADERS[name]
    except KeyError:
        raise ImportError(
            f"converting a checkpoint ({name}) needs the `deepencoder` package (pip install deepencoder, then "
            "`import deepencoder`); the model files saved beside a checkpoint load this library's own checkpoints only"
        ) from None


class TowerLoadingMixin:
    """Put before the `PreTrainedModel` base: its `from_pretrained` is the one reached through `super()`."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args: Any, **kwargs: Any):
        """transformers' `from_pretrained` for this library's checkpoints (local folder or hub id); any other
        checkpoint holding this tower is converted on load when the `deepencoder` package is imported (see the
        module docstring, and `deepencoder.conversion.load.load_converted_pretrained` for the keywords a converted
        load takes: the hub's `revision`, `cache_dir`, `local_files_only`, `token`, `subfolder`, `force_download`
        included)."""
        loader = CHECKPOINT_LOADERS.get("pretrained")
        if loader is not None:
            converted = loader(cls, pretrained_model_name_or_path, model_args, kwargs)
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
        return checkpoint_loader("transformers")(cls, model)
