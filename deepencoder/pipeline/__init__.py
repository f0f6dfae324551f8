"""`deepencoder encode`: documents (PDF, PNG, JPEG, TIFF, WebP, BMP) -> vision tokens on disk, resumable, sharded
across processes, with a manifest that training code reads back.

    from deepencoder.pipeline import EncodeOptions, encode, load_model, EncodedPages
    model, _ = load_model("path/to/DeepSeek-OCR")          # or "random", or a save_pretrained directory
    result = encode(["scans/", "book.pdf"], "runs/x", model, "gundam", EncodeOptions(batch_size=8))
    pages = EncodedPages("runs/x/manifest.jsonl")          # torch Dataset: {"image_embeds", "source", "page", ...}

Inputs and output folders may be fsspec URLs (`s3://...`, `file://...`). On a Ray cluster (`pip install
'deepencoder[ray]'`): `from deepencoder.pipeline.ray import encode_dataset` (not imported here: Ray is optional).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .dataset import EncodedPages, load_manifest, manifest_generator, manifest_state, to_hf_dataset
    from .names import DEFAULT_WEIGHTS, FEATURES
    from .producer import prestart_workers
    from .runner import DeviceFailed, EncodeOptions, EncodeResult, OutputMismatch, encode, shard, tower_name
    from .sources import Document, PageError, RenderOptions, default_long_side, discover, parse_page_ranges
    from .weights import WeightsError, load_model
    from .writer import OutputLocked

# public name -> the module defining it; loaded on first use (PEP 562), so that `deepencoder encode --help` and the
# command's argument parsing import none of them
_PUBLIC: dict[str, str] = {
    "DEFAULT_WEIGHTS": "names",
    "DeviceFailed": "runner",
    "Document": "sources",
    "EncodeOptions": "runner",
    "EncodeResult": "runner",
    "EncodedPages": "dataset",
    "FEATURES": "names",
    "OutputLocked": "writer",
    "OutputMismatch": "runner",
    "PageError": "sources",
    "RenderOptions": "sources",
    "WeightsError": "weights",
    "default_long_side": "sources",
    "discover": "sources",
    "encode": "runner",
    "load_manifest": "dataset",
    "load_model": "weights",
    "manifest_generator": "dataset",
    "manifest_state": "dataset",
    "parse_page_ranges": "sources",
    "prestart_workers": "producer",
    "shard": "runner",
    "to_hf_dataset": "dataset",
    "tower_name": "runner",
}
__all__ = [
    "DEFAULT_WEIGHTS",
    "DeviceFailed",
    "Document",
    "EncodeOptions",
    "EncodeResult",
    "EncodedPages",
    "FEATURES",
    "OutputLocked",
    "OutputMismatch",
    "PageError",
    "RenderOptions",
    "WeightsError",
    "default_long_side",
    "discover",
    "encode",
    "load_manifest",
    "load_model",
    "manifest_generator",
    "manifest_state",
    "parse_page_ranges",
    "prestart_workers",
    "shard",
    "to_hf_dataset",
    "tower_name",
]


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_PUBLIC})
