"""The conversion layer's way into the model classes: `register_loaders` fills the model layer's
`CHECKPOINT_LOADERS` (deepencoder/modeling_utils.py), so that `from_pretrained` converts foreign checkpoints and
`from_deepseek_ocr` / `from_deepseek_ocr2` / `from_transformers` work, while the model layer imports nothing from
here. `deepencoder/__init__.py` calls it: importing the package is enough. Registering imports nothing heavy (the
package import stays cheap); each loader imports the converters when it first runs."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..modeling_utils import register_checkpoint_loader

if TYPE_CHECKING:
    import torch
    from torch import nn
    from transformers import PreTrainedModel


def _tower_loader(family_name: str):
    """A loader of the tower `family_name` names (`deepencoder` | `deepencoder-v2`, the formats' family records)."""

    def load(
        model_class: type[PreTrainedModel],
        path_or_repo_id: str,
        *,
        dtype: torch.dtype | None = None,
        config_kwargs: dict[str, Any] | None = None,
        **hub: Any,
    ) -> PreTrainedModel:
        from .common import DEEPENCODER
        from .deepseek_ocr2 import DEEPENCODER_V2
        from .hub import HubOptions
        from .load import load_tower

        family = {"deepencoder": DEEPENCODER, "deepencoder-v2": DEEPENCODER_V2}[family_name]
        model, _ = load_tower(
            path_or_repo_id, family=family, dtype=dtype, config_kwargs=config_kwargs, hub=HubOptions.from_kwargs(hub)
        )
        if not isinstance(model, model_class):
            raise TypeError(f"{path_or_repo_id} holds a {type(model).__name__}, not a {model_class.__name__}")
        return model

    return load


def _load_converted_pretrained(*args: Any, **kwargs: Any) -> Any:
    from .load import load_converted_pretrained

    return load_converted_pretrained(*args, **kwargs)


def _from_transformers(model_class: type[PreTrainedModel], model: nn.Module) -> PreTrainedModel:
    from .shared_weights import tower_from_transformers

    return tower_from_transformers(model, model_class)


def register_loaders() -> None:
    """Register the converting loaders with the model layer (idempotent)."""
    register_checkpoint_loader("pretrained", _load_converted_pretrained)
    register_checkpoint_loader("deepseek-ocr", _tower_loader("deepencoder"))
    register_checkpoint_loader("deepseek-ocr2", _tower_loader("deepencoder-v2"))
    register_checkpoint_loader("transformers", _from_transformers)
