"""Reading an `encode` output folder back (a local path or an fsspec URL): the manifest as rows, a PyTorch `Dataset`
of page tokens, and a generator for `datasets.Dataset.from_generator` (`datasets` is optional)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import Dataset

from . import writer


def _split(path: str | os.PathLike) -> tuple[writer.Folder, str | None]:
    """A folder, or a manifest file -> (its folder, the file's name); `None` for a folder."""
    location = os.fspath(path).rstrip("/")
    if location.endswith(".jsonl"):
        parent, _, name = location.rpartition("/")
        return writer.Folder(parent or "."), name
    return writer.Folder(location), None


def load_manifest(path: str | os.PathLike, status: str | None = "ok") -> list[dict]:
    """Rows of `manifest.jsonl` (a folder is taken as its manifest; paths and fsspec URLs alike), unmerged parts of
    an unfinished multi-process run included. A page that appears more than once (an error retried by a later run)
    keeps its last row. status: keep only rows of this status (`ok`, `error`), or None for all. Document-level error
    rows have `page: null`."""
    folder, name = _split(path)
    rows = writer.all_rows(folder) if name in (None, writer.MANIFEST) else writer.read_rows(name, folder)
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

    `output` paths in the manifest are relative to its folder (a local path or an fsspec URL). `dtype` converts on
    read (e.g. torch.float32)."""

    def __init__(self, manifest: str | os.PathLike, dtype: torch.dtype | None = None) -> None:
        self.folder = _split(manifest)[0]
        self.root = self.folder.display()
        self.rows = load_manifest(manifest, status="ok")
        self.dtype = dtype

    def __len__(self) -> int:
        return len(self.rows)

    def path(self, index: int) -> str:
        output = self.rows[index]["output"]
        return output if os.path.isabs(output) or "://" in output else self.folder.display(output)

    def __getitem__(self, index: int) -> dict[str, Any]:
        row = self.rows[index]
        output = row["output"]
        if os.path.isabs(output) or "://" in output:
            folder, relative = _split(output.rsplit("/", 1)[0])[0], output.rsplit("/", 1)[1]
        else:
            folder, relative = self.folder, output
        tokens = writer.read_tensor(folder, relative, row["key"])
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
