"""Crash-safe outputs of an `encode` run.

Layout of the output folder:

    manifest.jsonl                  one JSON row per page, appended as pages finish, never rewritten in place
    manifest.rank<r>.jsonl          per-rank manifest parts of a multi-process run (merged into manifest.jsonl)
    <document name>.safetensors     a document's pages, tensor `page.<index>`; written whole, by rename
    .parts/<document name>/page.<index>.safetensors    pages finished but not yet merged into their document

How a document grows across batches: every finished page is first written on its own as a *part* (temp file +
fsync + rename), then its manifest row is appended. When the last page of the document in this run has finished,
the document file is rebuilt as (its previous version, if any) + (all parts) into a temp file, fsynced, renamed
over the old one, and only then are the parts deleted. Every file that exists under its final name is therefore
complete; a kill at any moment leaves only whole parts, a whole document file, and temp files (`*.tmp-*`, ignored
and removed by the next run). Each tensor carries its manifest row in the file's metadata (`__metadata__[key]`), so
a page whose row was lost to a kill between the part's rename and the row's append gets the row back on resume.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

PARTS_DIR = ".parts"
MANIFEST = "manifest.jsonl"
TMP_MARK = ".tmp-"

DTYPE_CODES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64"}


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _tmp_path(path: Path) -> Path:
    return path.with_name(f"{path.name}{TMP_MARK}{os.getpid()}-{threading.get_ident()}")


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    tensor = tensor.detach().to("cpu").contiguous()
    return tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b""


def write_safetensors(path: Path, tensors: Iterable[tuple[str, Any]], metadata: dict[str, str]) -> None:
    """Stream tensors into a safetensors file atomically (temp file, fsync, rename). `tensors` yields
    (key, tensor-or-callable); a callable is called when its bytes are due, so a merge holds one tensor in memory.
    Entries must be given with their shape and dtype up front: pass `(key, (dtype, shape, loader))`."""
    entries = list(tensors)
    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for key, (dtype, shape, _) in entries:
        size = int(torch.Size(shape).numel()) * torch.empty((), dtype=dtype).element_size()
        header[key] = {"dtype": DTYPE_CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_path(path)
    try:
        with open(tmp, "wb") as handle:
            handle.write(struct.pack("<Q", len(blob)))
            handle.write(blob)
            for key, (dtype, shape, loader) in entries:
                tensor = loader() if callable(loader) else loader
                if tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
                    raise ValueError(f"{path}: tensor {key} changed while writing")
                handle.write(_tensor_bytes(tensor))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)


def page_key(index: int) -> str:
    return f"page.{index}"


def key_index(key: str) -> int:
    return int(key.split(".", 1)[1])


def write_part(out_dir: Path, document_name: str, key: str, tensor: torch.Tensor, row: dict) -> Path:
    """One finished page -> `.parts/<document>/<key>.safetensors`, its manifest row in the metadata."""
    path = out_dir / PARTS_DIR / document_name / f"{key}.safetensors"
    write_safetensors(path, [(key, (tensor.dtype, tuple(tensor.shape), tensor))], {key: json.dumps(row)})
    return path


def read_keys(path: Path) -> tuple[list[str], dict[str, str]]:
    """Keys and metadata of a safetensors file (header only)."""
    with safe_open(str(path), framework="pt") as handle:
        return list(handle.keys()), dict(handle.metadata() or {})


def _sources(path: Path) -> Iterator[tuple[str, tuple]]:
    with safe_open(str(path), framework="pt") as handle:
        for key in handle.keys():
            view = handle.get_slice(key)
            dtype = {v: k for k, v in DTYPE_CODES.items()}[view.get_dtype()]
            yield key, (dtype, tuple(view.get_shape()), lambda p=path, k=key: _load(p, k))


def _load(path: Path, key: str) -> torch.Tensor:
    with safe_open(str(path), framework="pt") as handle:
        return handle.get_tensor(key)


def merge_document(out_dir: Path, document_name: str) -> list[str]:
    """Fold the parts of a document into `<document>.safetensors` (previous content kept, a part replaces a page of
    the same key), atomically, then delete the parts. Returns the keys now in the document file."""
    parts_dir = out_dir / PARTS_DIR / document_name
    final = out_dir / f"{document_name}.safetensors"
    parts = sorted(p for p in parts_dir.glob("*.safetensors")) if parts_dir.is_dir() else []
    if not parts:
        return read_keys(final)[0] if final.exists() else []
    entries: dict[str, tuple] = {}
    metadata: dict[str, str] = {}
    if final.exists():
        entries.update(_sources(final))
        metadata.update(read_keys(final)[1])
    for part in parts:
        entries.update(_sources(part))
        metadata.update(read_keys(part)[1])
    ordered = sorted(entries.items(), key=lambda item: key_index(item[0]))
    write_safetensors(final, ordered, {k: v for k, v in metadata.items() if k in entries})
    for part in parts:
        part.unlink()
    shutil.rmtree(parts_dir, ignore_errors=True)
    return [key for key, _ in ordered]


def clean_temp_files(out_dir: Path) -> int:
    """Remove temp files a killed run left behind (never a file under its final name)."""
    removed = 0
    if out_dir.is_dir():
        for path in out_dir.rglob(f"*{TMP_MARK}*"):
            if path.is_file():
                path.unlink()
                removed += 1
    return removed


# ---------------------------------------------------------------------------------------------- manifest
class ManifestWriter:
    """Appends rows to a JSONL file: one `write` per row, flushed and fsynced, so a kill leaves at most one partial
    last line. A file not ending in a newline (a line cut by a kill) gets one first, so the cut line stays a
    separate, skippable line and the file is never truncated."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._handle = open(path, "ab")
        if path.stat().st_size:
            with open(path, "rb") as handle:
                handle.seek(-1, os.SEEK_END)
                if handle.read(1) != b"\n":
                    self._handle.write(b"\n")
        self._lock = threading.Lock()

    def append(self, rows: Iterable[dict]) -> None:
        data = b"".join(json.dumps(row, ensure_ascii=False).encode() + b"\n" for row in rows)
        if not data:
            return
        with self._lock:
            self._handle.write(data)
            self._handle.flush()
            os.fsync(self._handle.fileno())

    def close(self) -> None:
        self._handle.close()


def read_rows(path: Path) -> list[dict]:
    """Rows of a manifest (or manifest part); lines cut by a kill and non-JSON lines are skipped."""
    rows = []
    if not path.exists():
        return rows
    with open(path, encoding="utf-8", errors="replace") as handle:
        for line in handle:
            line = line.strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict):
                rows.append(row)
    return rows


def rank_manifest(out_dir: Path, rank: int) -> Path:
    return out_dir / f"manifest.rank{rank}.jsonl"


def all_rows(out_dir: Path) -> list[dict]:
    """manifest.jsonl followed by any rank parts not merged yet."""
    rows = read_rows(out_dir / MANIFEST)
    for part in sorted(out_dir.glob("manifest.rank*.jsonl")):
        rows.extend(read_rows(part))
    return rows


def merge_manifests(out_dir: Path) -> int:
    """Append the rank parts' rows to manifest.jsonl (rows already present are not added twice), atomically: the
    new manifest is the old one byte for byte plus the new lines, written to a temp file and renamed; then the parts
    are deleted. Returns the number of rows added."""
    parts = sorted(out_dir.glob("manifest.rank*.jsonl"))
    if not parts:
        return 0
    manifest = out_dir / MANIFEST
    old = manifest.read_bytes() if manifest.exists() else b""
    if old and not old.endswith(b"\n"):
        old += b"\n"
    present = set(old.decode("utf-8", errors="replace").splitlines())
    added = []
    for part in parts:
        for row in read_rows(part):
            line = json.dumps(row, ensure_ascii=False)
            if line not in present:
                present.add(line)
                added.append(line)
    tmp = _tmp_path(manifest)
    with open(tmp, "wb") as handle:
        handle.write(old + "".join(line + "\n" for line in added).encode())
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, manifest)
    _fsync_dir(out_dir)
    for part in parts:
        part.unlink()
    return len(added)
