"""Reading an `encode` output folder back (a local path or an fsspec URL): the manifest as rows, a PyTorch `Dataset`
of page tokens, and a generator for `datasets.Dataset.from_generator` (`datasets` is optional)."""

from __future__ import annotations

import hashlib
import json
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
    keeps its last row, whatever spelling of its source that run was given (pages are told apart by their document's
    output name, as the files are). Document-level error rows have `page: null`; one is dropped once a later row of
    its document (a page, or another document-level row) supersedes it: a document fixed and encoded is no longer
    listed as failing. status: keep only rows of this status (`ok`, `error`), or None for all."""
    folder, name = _split(path)
    rows = writer.all_rows(folder) if name in (None, writer.MANIFEST) else writer.read_rows(name, folder)
    latest: dict[tuple, dict] = {}
    for row in rows:
        document = row.get("document") or row.get("source")
        latest.pop((document, None), None)  # the document's earlier document-level error, if any
        latest.pop((document, row.get("page")), None)
        latest[(document, row.get("page"))] = row
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
        tokens = self._read(folder, relative, row)
        if self.dtype is not None:
            tokens = tokens.to(self.dtype)
        item = {k: v for k, v in row.items() if k not in ("status", "error", "output", "key")}
        item["image_embeds"] = tokens
        return item

    @staticmethod
    def _read(folder: writer.Folder, relative: str, row: dict) -> torch.Tensor:
        """The page's tensor from its document file, or, while its document is not merged yet (a run in progress or
        killed: the rows are written as soon as the batch's part file is), from the part holding it."""
        try:
            return writer.read_tensor(folder, relative, row["key"])
        except (FileNotFoundError, KeyError):
            document = row.get("document")
            part = writer.part_holding(folder, document, row["key"]) if document else None
            if part is None:
                raise
        try:
            return writer.read_tensor(folder, part, row["key"])
        except FileNotFoundError:  # merged since it was found: the document file holds the page now
            return writer.read_tensor(folder, relative, row["key"])


def manifest_generator(manifest: str | os.PathLike, state: str | None = None) -> Iterator[dict[str, Any]]:
    """Rows for `datasets.Dataset.from_generator(manifest_generator, gen_kwargs={"manifest": path, "state": ...})`:
    `source` (str), `page` (int), `tokens` (int), `grid` / `size` (lists of int), `mode` (str) and `image_embeds` as
    a float32 numpy array (tokens, dim). state: unused here; `datasets` caches a generator's dataset by its arguments,
    so pass something that changes with the run (`manifest_state(path)`, what `to_hf_dataset` does) or a resumed run's
    new pages never show up."""
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


def manifest_state(manifest: str | os.PathLike) -> str:
    """A digest of the pages a manifest lists now (its rows, `load_manifest`): changes when a run adds or redoes
    pages, so a cache keyed by it never serves an older state of the folder."""
    rows = json.dumps(load_manifest(manifest, status=None), sort_keys=True, default=str)
    return hashlib.sha256(rows.encode()).hexdigest()


def to_hf_dataset(manifest: str | os.PathLike, cache_dir: str | os.PathLike | None = None):
    """A `datasets.Dataset` of the run's pages as they are now (needs `pip install datasets`): `datasets`' cache
    (`cache_dir`, default its own) is keyed by `manifest_state`, so a folder a later run added pages to is read
    again, not served from the cache."""
    try:
        import datasets
    except ImportError as error:
        raise ImportError("to_hf_dataset needs the `datasets` package: pip install datasets") from error
    kwargs = {"manifest": str(manifest), "state": manifest_state(manifest)}
    cache = None if cache_dir is None else os.fspath(cache_dir)
    return datasets.Dataset.from_generator(manifest_generator, gen_kwargs=kwargs, cache_dir=cache)
