"""Which layout a checkpoint is in, from its key names alone (timm's `checkpoint_filter_fn` habit)."""

from __future__ import annotations

from collections.abc import Iterable

from .io import CheckpointError
from .registry import FORMATS


def detect_format(keys: Iterable[str]) -> str:
    """The name of the registered format whose signature (a set of keys) is present in full, in registry order:
    `registry.FORMATS[name]` is its record (description, what it reads, its key map)."""
    present = set(keys)
    for record in FORMATS.values():
        if any(all(key in present for key in signature) for signature in record.signatures):
            return record.name
    sample = sorted(present)[:8]
    known = "; ".join(f"{record.name}: {record.description}" for record in FORMATS.values())
    raise CheckpointError(f"unrecognised checkpoint layout (first keys: {sample}); expected one of: {known}")
