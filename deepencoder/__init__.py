"""deepencoder: DeepSeek-OCR's vision tower (SAM ViT-B + CLIP-L/14 + projector) as a transformers-native model.

Importing the package is cheap (no torch, no transformers): the public names below load their modules on first use
(PEP 562), so `deepencoder encode --help` answers at once. What importing it guarantees is that

- the conversion layer's checkpoint loaders are registered with the model layer (`from_pretrained` converts a
  DeepSeek-OCR / DeepSeek-OCR-2 / transformers checkpoint on load, however the model class was imported), and
- both towers, their configs and the image processor are registered with transformers' `AutoConfig`, `AutoModel`
  and `AutoImageProcessor`: at once when transformers' auto classes are already imported, otherwise right after
  they are (`deepencoder.registration`).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .conversion.loaders import register_loaders
from .registration import install_auto_registration, run_due_registrations

if TYPE_CHECKING:
    from .configuration_deepencoder import DeepEncoderClipConfig, DeepEncoderConfig, DeepEncoderSamConfig
    from .configuration_deepencoder_v2 import DeepEncoderV2Config, DeepEncoderV2EncoderConfig
    from .image_processing_deepencoder import DeepEncoderImageProcessor
    from .image_processing_modes import RESOLUTION_MODES, ResolutionMode
    from .modeling_deepencoder import DeepEncoderModel, DeepEncoderOutput, DeepEncoderPreTrainedModel
    from .modeling_deepencoder_v2 import DeepEncoderV2Model, DeepEncoderV2Output, DeepEncoderV2PreTrainedModel

__version__ = "0.1.0"

# public name -> the module defining it
_PUBLIC: dict[str, str] = {
    "DeepEncoderClipConfig": "configuration_deepencoder",
    "DeepEncoderConfig": "configuration_deepencoder",
    "DeepEncoderSamConfig": "configuration_deepencoder",
    "DeepEncoderV2Config": "configuration_deepencoder_v2",
    "DeepEncoderV2EncoderConfig": "configuration_deepencoder_v2",
    "DeepEncoderImageProcessor": "image_processing_deepencoder",
    "RESOLUTION_MODES": "image_processing_modes",
    "ResolutionMode": "image_processing_modes",
    "DeepEncoderModel": "modeling_deepencoder",
    "DeepEncoderOutput": "modeling_deepencoder",
    "DeepEncoderPreTrainedModel": "modeling_deepencoder",
    "DeepEncoderV2Model": "modeling_deepencoder_v2",
    "DeepEncoderV2Output": "modeling_deepencoder_v2",
    "DeepEncoderV2PreTrainedModel": "modeling_deepencoder_v2",
}
__all__ = [
    "DeepEncoderClipConfig",
    "DeepEncoderConfig",
    "DeepEncoderImageProcessor",
    "DeepEncoderModel",
    "DeepEncoderOutput",
    "DeepEncoderPreTrainedModel",
    "DeepEncoderSamConfig",
    "DeepEncoderV2Config",
    "DeepEncoderV2EncoderConfig",
    "DeepEncoderV2Model",
    "DeepEncoderV2Output",
    "DeepEncoderV2PreTrainedModel",
    "RESOLUTION_MODES",
    "ResolutionMode",
]


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip __getattr__
    run_due_registrations()
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_PUBLIC})


# the model classes convert foreign checkpoints (from_pretrained, from_deepseek_ocr, ...) through loaders the
# conversion layer registers; the model layer itself imports nothing above it (its files load without this package)
register_loaders()
install_auto_registration()
