"""Reading an `encode` output folder back: the manifest as rows, a PyTorch `Dataset` of page tokens, and a
generator for `datasets.Dataset.from_generator` (`datasets` is optional)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from . import writer


def load_manifest(path: str | os.PathLike, status: str | None = "ok") -> list[dict]:
    """Rows of `manifest.jsonl` (a folder is taken as its manifest), rank parts of an unfinished multi-process run
    included. A page that appears more than once (an error retried by a later run) keeps its last row. status:
    keep only rows of this status (`ok`, `error`), or None for all. Document-level error rows have `page: null`."""
    path = Path(path)
    out_dir = path if path.is_dir() else path.parent
    rows = writer.all_rows(out_dir) if path.is_dir() or path.name == writer.MANIFEST else writer.read_rows(path)
    latest: dict[tuple, dict] = {}
    for row in rows:
        page = row.get("page")
        ident = (row.get("source"), page) if page is not None else (row.get("source"), None, len(latest))
        latest.pop(ident, None)
        latest[ident] = row
    return [row for row in latest.values() if status is None or row.get("status") == status]


class EncodedPages(Dataset):
    """Page tokens of an encode run: item i is a dict with `image_embeds` ((tokens, dim) tensor as stored),
    `source`, `page`, `tokens`, `grid`, `size`, `mode` and any extra fields of the row (e.g. `text`).

    `output` paths in the manifest are relative to its folder. `dtype` converts on read (e.g. torch.float32)."""

    def __init__(self, manifest: str | os.PathLike, dtype: torch.dtype | None = None) -> None:
        path = Path(manifest)
        self.root = path if path.is_dir() else path.parent
        self.rows = load_manifest(path, status="ok")
        self.dtype = dtype

    def __len__(self) -> int:
        return len(self.rows)

    def path(self, index: int) -> Path:
        output = Path(self.rows[index]["output"])
        return output if output.is_absolute() else self.root / output

    def __getitem__(self, index: int) -> dict[str, Any]:
        from safetensors import safe_open

        row = self.rows[index]
        with safe_open(str(self.path(index)), framework="pt") as handle:
            tokens = handle.get_tensor(row["key"])
        if self.dtype is not None:
            tokens = tokens.to(self.dtype)
        item = {k: v for k, v in row.items() if k not in ("status", "error", "output", "key")}
        item["image_embeds"] = tokens
        return item


def manifest_generator(manifest: str | os.PathLike) -> Iterator[dict[str, Any]]:
    """Rows for `datasets.Dataset.from_generator(manifest_generator, gen_kwargs={"manifest": path})`: `source`
    (str), `page` (int), `tokens` (int), `grid` / `size` (lists of int), `mode` (str) and `image_embeds` as a float32
    numpy array (tokens, dim)."""
    pages = EncodedPages(manifest, dtype=torch.float32)
    for index in range(len(pages)):
        item = pages[index]
        yield {
            "source": str(item["source"]),
            "page": int(item["page"]),
            "tokens": int(item["tokens"]),
            "grid": [int(v) for v in item["grid"]],
            "size": [int(v) for v in item["size"]],
            "mode": str(item["mode"]),
            "image_embeds": item["image_embeds"].numpy(),
        }


def to_hf_dataset(manifest: str | os.PathLike):
    """A `datasets.Dataset` of the run's pages (needs `pip install datasets`)."""
    try:
        import datasets
    except ImportError as error:
        raise ImportError("to_hf_dataset needs the `datasets` package: pip install datasets") from error
    return datasets.Dataset.from_generator(manifest_generator, gen_kwargs={"manifest": str(manifest)})
