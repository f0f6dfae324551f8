"""deepencoder inside other stacks. `deepencoder.integrations.transformers`: this library's tower as the vision
engine of transformers' OCR models (`attach` / `detach`), and standalone towers on their weights
(`from_transformers`).

This package imports the model and conversion layers; nothing below it imports it.
"""

from ..conversion.shared_weights import SplitQkvProjection
from .transformers import (
    attach,
    detach,
    from_transformers,
    image_processor_from_transformers,
    is_attached,
)

__all__ = [
    "SplitQkvProjection",
    "attach",
    "detach",
    "from_transformers",
    "image_processor_from_transformers",
    "is_attached",
]
