"""deepencoder: DeepSeek-OCR's vision tower (SAM ViT-B + CLIP-L/14 + projector) as a transformers-native model."""

from transformers import AutoConfig, AutoImageProcessor, AutoModel

from .configuration_deepencoder import DeepEncoderClipConfig, DeepEncoderConfig, DeepEncoderSamConfig
from .configuration_deepencoder_v2 import DeepEncoderV2Config, DeepEncoderV2EncoderConfig
from .conversion.loaders import register_loaders
from .image_processing_deepencoder import RESOLUTION_MODES, DeepEncoderImageProcessor, ResolutionMode
from .modeling_deepencoder import DeepEncoderModel, DeepEncoderOutput, DeepEncoderPreTrainedModel
from .modeling_deepencoder_v2 import DeepEncoderV2Model, DeepEncoderV2Output, DeepEncoderV2PreTrainedModel

__version__ = "0.1.0"

# the model classes convert foreign checkpoints (from_pretrained, from_deepseek_ocr, ...) through loaders the
# conversion layer registers; the model layer itself imports nothing above it (its files load without this package)
register_loaders()

AutoConfig.register(DeepEncoderConfig.model_type, DeepEncoderConfig, exist_ok=True)
AutoModel.register(DeepEncoderConfig, DeepEncoderModel, exist_ok=True)
AutoImageProcessor.register(
    DeepEncoderConfig, image_processor_classes={"pil": DeepEncoderImageProcessor}, exist_ok=True
)
AutoConfig.register(DeepEncoderV2Config.model_type, DeepEncoderV2Config, exist_ok=True)
AutoModel.register(DeepEncoderV2Config, DeepEncoderV2Model, exist_ok=True)
AutoImageProcessor.register(
    DeepEncoderV2Config, image_processor_classes={"pil": DeepEncoderImageProcessor}, exist_ok=True
)

__all__ = [
    "RESOLUTION_MODES",
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
    "ResolutionMode",
]
