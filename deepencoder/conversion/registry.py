"""Every checkpoint format the converters read, in detection order (the first whose signature matches wins).

A new layout is one `CheckpointFormat` record in its own module, added to the list below; nothing else names it.
"""

from __future__ import annotations

from . import clip, deepseek_ocr, deepseek_ocr2, own, segment_anything, unlimited_ocr
from .formats import CheckpointFormat
from .io import CheckpointError

FORMATS: dict[str, CheckpointFormat] = {
    record.name: record
    for record in (
        *deepseek_ocr2.FORMATS,  # before deepseek-ocr: V2's SAM keys also match v1's signature
        *deepseek_ocr.FORMATS,
        *unlimited_ocr.FORMATS,
        *own.FORMATS,
        *segment_anything.FORMATS,
        *clip.FORMATS,
        *deepseek_ocr2.STAGE_FORMATS,
    )
}


def get_format(name: str | CheckpointFormat) -> CheckpointFormat:
    """A format record by name (a record is returned as is)."""
    if isinstance(name, CheckpointFormat):
        return name
    if name not in FORMATS:
        raise CheckpointError(f"unknown checkpoint format {name!r}; known: {sorted(FORMATS)}")
    return FORMATS[name]
