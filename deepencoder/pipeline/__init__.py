"""`deepencoder encode`: documents (PDF, PNG, JPEG, TIFF, WebP, BMP) -> vision tokens on disk, resumable, sharded
across processes, with a manifest that training code reads back.

    from deepencoder.pipeline import EncodeOptions, encode, load_model, EncodedPages
    model, _ = load_model("path/to/DeepSeek-OCR")          # or "random", or a save_pretrained directory
    result = encode(["scans/", "book.pdf"], "runs/x", model, "gundam", EncodeOptions(batch_size=8))
    pages = EncodedPages("runs/x/manifest.jsonl")          # torch Dataset: {"image_embeds", "source", "page", ...}

Inputs and output folders may be fsspec URLs (`s3://...`, `file://...`). On a Ray cluster (`pip install
'deepencoder[ray]'`): `from deepencoder.pipeline.ray import encode_dataset` (not imported here: Ray is optional).
"""

from .dataset import EncodedPages, load_manifest, manifest_generator, to_hf_dataset
from .runner import FEATURES, DeviceFailed, EncodeOptions, EncodeResult, encode, shard, tower_name
from .sources import Document, PageError, RenderOptions, default_long_side, discover, parse_page_ranges
from .weights import DEFAULT_WEIGHTS, WeightsError, load_model
from .writer import OutputLocked

__all__ = [
    "DEFAULT_WEIGHTS",
    "FEATURES",
    "DeviceFailed",
    "Document",
    "EncodeOptions",
    "EncodeResult",
    "EncodedPages",
    "OutputLocked",
    "PageError",
    "RenderOptions",
    "WeightsError",
    "default_long_side",
    "discover",
    "encode",
    "load_manifest",
    "load_model",
    "manifest_generator",
    "parse_page_ranges",
    "shard",
    "to_hf_dataset",
    "tower_name",
]
