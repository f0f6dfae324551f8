"""Crash-safe outputs of an `encode` run, on a local disk or any fsspec URL (`s3://`, `gs://`, `file://`, ...).

Layout of the output folder:

    manifest.jsonl                  one JSON row per page, appended as pages finish, never rewritten in place
    manifest.rank<r>[.<seq>].jsonl  manifest parts (per rank of a multi-process run; per batch on object stores),
                                    merged into manifest.jsonl at the end of the run
    <document name>.safetensors     a document's pages, tensor `page.<index>`; written whole, by rename / single put
    .parts/<document name>/pages.<first>-<last>.safetensors   pages of a batch not yet merged into their document
    .lock                           the run writing into the folder (host, pid, start, heartbeat); see `OutputLock`

How a document grows across batches: the finished pages of a batch are first written as one *part* per document,
then their manifest rows are appended (one fsync each). When the last page of the document in this run has finished, the document file is rebuilt as (its
previous version, if any) + (all parts), written whole under its final name, and only then are the parts deleted.

Atomic writes: on a local disk every file is written to a temp file, fsynced and renamed; on an object store it is
one object put (an object appears whole or not at all). Every file under its final name is therefore complete; a kill
at any moment leaves only whole parts, a whole document file, and temp files (`*.tmp-*`, ignored and removed by the
next run). Object stores cannot append, so there each batch's rows go into a new manifest part object. Each tensor
carries its manifest row in the file's metadata (`__metadata__[key]`), so a page whose row was lost to a kill between
the part's write and the row's append gets the row back on resume.
"""

from __future__ import annotations

import json
import os
import re
import socket
import struct
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import fsspec
import torch
from fsspec.implementations.local import LocalFileSystem

PARTS_DIR = ".parts"
MANIFEST = "manifest.jsonl"
LOCK = ".lock"
TMP_MARK = ".tmp-"
# the names this module (and the preview writer) give temp files: `<name>.tmp-<pid>-<thread>`, `<name>.tmp-preview`,
# `.lock.tmp-stale-<token>`; a document merely named `scan.tmp-2.pdf` is not one
_TEMP_NAME = re.compile(re.escape(TMP_MARK) + r"(?:\d+-\d+|preview|stale-[0-9a-f]+)$")
_MANIFEST_PART = re.compile(r"^manifest\.rank(\d+)(?:\.(\d+))?\.jsonl$")

DTYPE_CODES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64"}
_CODE_DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}


def is_url(value: str | os.PathLike) -> bool:
    return "://" in os.fspath(value)


class Folder:
    """An output folder: a local directory (`Path` semantics, fsync + rename) or a prefix on an fsspec filesystem
    (single puts). Picklable, so Ray tasks receive it. `file://` URLs are local folders."""

    def __init__(self, location: str | os.PathLike) -> None:
        location = os.fspath(location)
        self.url = location
        if is_url(location):
            self.fs, root = fsspec.core.url_to_fs(location)
        else:
            self.fs, root = LocalFileSystem(), location
        self.local = isinstance(self.fs, LocalFileSystem)
        if self.local:
            root = str(Path(root).absolute())
        self.root = root.rstrip("/") or "/"

    def __repr__(self) -> str:
        return f"Folder({self.url!r})"

    def __str__(self) -> str:
        return self.url

    @property
    def protocol(self) -> str:
        protocol = self.fs.protocol
        return protocol[0] if isinstance(protocol, (tuple, list)) else protocol

    def path(self, relative: str) -> str:
        return f"{self.root}/{relative}" if relative else self.root

    def local_path(self, relative: str = "") -> Path:
        return Path(self.path(relative))

    def display(self, relative: str = "") -> str:
        """The location as a user wrote it (a URL stays a URL)."""
        if not relative:
            return self.url
        return f"{self.url.rstrip('/')}/{relative}"

    # ---------------------------------------------------------------- reading
    def exists(self, relative: str) -> bool:
        return self.local_path(relative).exists() if self.local else self.fs.exists(self.path(relative))

    def size(self, relative: str) -> int:
        return self.local_path(relative).stat().st_size if self.local else int(self.fs.size(self.path(relative)))

    def read_bytes(self, relative: str) -> bytes:
        return self.local_path(relative).read_bytes() if self.local else self.fs.cat_file(self.path(relative))

    def file_range(self, relative: str, start: int, end: int) -> FileRange | bytes:
        """Bytes start:end of a file for `write` to copy: a `FileRange` in a local folder (copied by the kernel, no
        pass through this process), else the bytes."""
        if self.local:
            return FileRange(self.path(relative), start, end)
        return self.read_range(relative, start, end)

    def read_range(self, relative: str, start: int, end: int) -> bytes:
        if self.local:
            with open(self.path(relative), "rb") as handle:
                handle.seek(start)
                return handle.read(end - start)
        return self.fs.cat_file(self.path(relative), start=start, end=end)

    def list(self, relative: str, suffix: str = "") -> list[str]:
        """Files directly inside `relative` (names only), sorted."""
        if self.local:
            folder = self.local_path(relative)
            names = [p.name for p in folder.iterdir() if p.is_file()] if folder.is_dir() else []
        else:
            try:
                entries = self.fs.ls(self.path(relative), detail=True)
            except FileNotFoundError:
                entries = []
            names = [e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries if e.get("type") == "file"]
        return sorted(n for n in names if n.endswith(suffix))

    def walk_files(self) -> list[str]:
        """Every file below the folder, relative paths."""
        if self.local:
            root = self.local_path()
            return [p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()] if root.is_dir() else []
        prefix = self.root + "/"
        return [p[len(prefix) :] for p in self.fs.find(self.root) if p.startswith(prefix)]

    # ---------------------------------------------------------------- writing
    def makedirs(self, relative: str = "") -> None:
        if self.local:
            self.local_path(relative).mkdir(parents=True, exist_ok=True)
        else:
            self.fs.makedirs(self.path(relative), exist_ok=True)

    def remove(self, relative: str) -> None:
        if self.local:
            self.local_path(relative).unlink(missing_ok=True)
        else:
            try:
                self.fs.rm_file(self.path(relative))
            except FileNotFoundError:
                pass

    def remove_dir(self, relative: str) -> None:
        if self.local:
            folder = self.local_path(relative)
            try:
                folder.rmdir()
            except OSError:
                pass
        else:
            try:
                self.fs.rm(self.path(relative), recursive=True)
            except FileNotFoundError:
                pass

    def write(self, relative: str, chunks: Iterable[bytes] | bytes) -> None:
        """Write a whole file atomically: local temp file + fsync + rename (then the folder fsynced), or one object
        put (the object store publishes it on close)."""
        if isinstance(chunks, (bytes, bytearray)):
            chunks = [bytes(chunks)]
        if not self.local:
            parent = self.path(relative).rsplit("/", 1)[0]
            self.fs.makedirs(parent, exist_ok=True)
            handle = self.fs.open(self.path(relative), "wb")
            try:
                for chunk in chunks:
                    handle.write(chunk)  # no `FileRange` here: `file_range` gives one for local folders only
            except BaseException:
                self._abandon(handle, relative)
                raise
            handle.close()
            return
        path = self.local_path(relative)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}{TMP_MARK}{os.getpid()}-{threading.get_ident()}")
        try:
            with open(tmp, "wb") as handle:
                for chunk in _coalesced(chunks):
                    if isinstance(chunk, FileRange):
                        handle.flush()
                        _copy_range(chunk, handle)
                    else:
                        handle.write(chunk)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()
        _fsync_dir(path.parent)

    def _abandon(self, handle, relative: str) -> None:
        """A write to an fsspec file system that failed midway: nothing cut short may stay under the final name.
        A buffered object-store file (S3, GCS, Azure: published on close) is discarded (a multipart upload aborted)
        and never closed, so the object keeps its previous content; a file system that writes in place (memory, SFTP)
        has its cut file removed."""
        if isinstance(handle, fsspec.spec.AbstractBufferedFile):
            try:
                handle.discard()
            finally:
                handle.closed = True  # `close` (or the garbage collector's) would publish what was written
            return
        try:
            handle.close()
        finally:
            try:
                self.fs.rm(self.path(relative))
            except FileNotFoundError:
                pass


class FileRange(NamedTuple):
    """Bytes start:end of a local file, a chunk `Folder.write` copies file to file (`os.copy_file_range`)."""

    path: str
    start: int
    end: int


def _coalesced(chunks: Iterable[bytes | FileRange]) -> Iterator[bytes | FileRange]:
    """`chunks` with each run of file ranges that continue one another in one file joined into one range: a merge
    copies a part file's consecutive pages with one call, not one per page."""
    pending: FileRange | None = None
    for chunk in chunks:
        if isinstance(chunk, FileRange):
            if pending is not None and chunk.path == pending.path and chunk.start == pending.end:
                pending = pending._replace(end=chunk.end)
                continue
            if pending is not None:
                yield pending
            pending = chunk
            continue
        if pending is not None:
            yield pending
            pending = None
        yield chunk
    if pending is not None:
        yield pending


def _copy_range(chunk: FileRange, handle) -> None:
    """Append `chunk` to the open file `handle` at its end: in the kernel where it can (`copy_file_range`; reflinked
    on file systems that share extents), else read and written in 8 MiB pieces."""
    with open(chunk.path, "rb") as source:
        offset, left = chunk.start, chunk.end - chunk.start
        if hasattr(os, "copy_file_range"):
            try:
                while left:
                    copied = os.copy_file_range(source.fileno(), handle.fileno(), left, offset)
                    if copied == 0:
                        raise ValueError(f"{chunk.path}: file ended before byte {chunk.end}")
                    offset, left = offset + copied, left - copied
                return
            except OSError:  # not across these file systems: the bytes go through this process instead
                pass
        source.seek(offset)
        while left:
            piece = source.read(min(left, 8 << 20))
            if not piece:
                raise ValueError(f"{chunk.path}: file ended before byte {chunk.end}")
            handle.write(piece)
            left -= len(piece)


def as_folder(location: Folder | str | os.PathLike) -> Folder:
    return location if isinstance(location, Folder) else Folder(location)


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


# ---------------------------------------------------------------------------------------------- safetensors
def _tensor_bytes(tensor: torch.Tensor) -> bytes | memoryview:
    """The tensor's bytes, without a copy when it is a contiguous CPU tensor (a view kept alive by the buffer)."""
    tensor = tensor.detach().to("cpu").contiguous()
    return memoryview(tensor.view(torch.uint8).numpy()) if tensor.numel() else b""


def write_safetensors(
    folder: Folder, relative: str, tensors: Iterable[tuple[str, Any]], metadata: dict[str, str]
) -> None:
    """Stream tensors into a safetensors file atomically. `tensors` yields `(key, (dtype, shape, loader))`, the
    loader a tensor or a callable called when its bytes are due (returning a tensor, the raw bytes of one, or the
    `FileRange` holding them), so a merge holds at most one tensor in memory."""
    entries = list(tensors)
    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for key, (dtype, shape, _) in entries:
        size = int(torch.Size(shape).numel()) * torch.empty((), dtype=dtype).element_size()
        header[key] = {"dtype": DTYPE_CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)

    def chunks():
        yield struct.pack("<Q", len(blob)) + blob
        for key, (dtype, shape, loader) in entries:
            tensor = loader() if callable(loader) else loader
            if isinstance(tensor, (bytes, bytearray, memoryview, FileRange)):
                size = int(torch.Size(shape).numel()) * torch.empty((), dtype=dtype).element_size()
                length = tensor.end - tensor.start if isinstance(tensor, FileRange) else len(tensor)
                if length != size:
                    raise ValueError(f"{folder.display(relative)}: tensor {key} changed while writing")
                yield tensor
                continue
            if tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
                raise ValueError(f"{folder.display(relative)}: tensor {key} changed while writing")
            yield _tensor_bytes(tensor)

    folder.write(relative, chunks())


def read_header(folder: Folder, relative: str) -> dict[str, Any]:
    """The JSON header of a safetensors file (two ranged reads on an object store, never the tensor bytes)."""
    (length,) = struct.unpack("<Q", folder.read_range(relative, 0, 8))
    return json.loads(folder.read_range(relative, 8, 8 + length))


def read_keys(folder: Folder, relative: str) -> tuple[list[str], dict[str, str]]:
    """Keys and metadata of a safetensors file (header only)."""
    header = read_header(folder, relative)
    metadata = header.pop("__metadata__", None) or {}
    return list(header), dict(metadata)


def read_tensor(folder: Folder, relative: str, key: str, header: dict[str, Any] | None = None) -> torch.Tensor:
    """One tensor of a safetensors file by a ranged read."""
    header = header or read_header(folder, relative)
    (length,) = struct.unpack("<Q", folder.read_range(relative, 0, 8))
    entry = header[key]
    start, end = entry["data_offsets"]
    data = folder.read_range(relative, 8 + length + start, 8 + length + end)
    if len(data) != end - start:
        raise UnreadableFile(folder, relative, f"tensor {key} has {len(data)} of its {end - start} bytes (cut short)")
    dtype = _CODE_DTYPES[entry["dtype"]]
    if not data:
        return torch.empty(entry["shape"], dtype=dtype)
    return torch.frombuffer(bytearray(data), dtype=dtype).reshape(entry["shape"])


class UnreadableFile(ValueError):
    """A safetensors file of the output folder that is not what this module writes: its header cut short or not JSON,
    or its tensors' bytes past the end of the file (a disk that filled up under another tool, a copy cut short)."""

    def __init__(self, folder: Folder, relative: str, reason: str) -> None:
        super().__init__(f"{folder.display(relative)}: unreadable ({reason})")
        self.relative = relative


def _sources(folder: Folder, relative: str) -> tuple[list[tuple[str, tuple]], dict[str, str]]:
    """`(key, (dtype, shape, loader))` of a safetensors file and its metadata, from one read of its header; the
    loaders give each tensor's bytes as stored (a merge copies bytes: no tensor is rebuilt). Raises `UnreadableFile`
    when the header does not parse or a tensor's bytes lie past the file's end."""
    size = folder.size(relative)
    try:
        (length,) = struct.unpack("<Q", folder.read_range(relative, 0, 8))
        if 8 + length > size:
            raise ValueError(f"a header of {length} bytes in a file of {size}")
        header = json.loads(folder.read_range(relative, 8, 8 + length))
        metadata = header.pop("__metadata__", None) or {}
        sources = []
        for key, entry in header.items():
            start, end = (8 + length + offset for offset in entry["data_offsets"])
            if not 8 + length <= start <= end <= size:
                raise ValueError(f"tensor {key} at bytes {start}-{end} of a file of {size}")
            loader = lambda f=folder, r=relative, a=start, b=end: f.file_range(r, a, b)  # noqa: E731
            sources.append((key, (_CODE_DTYPES[entry["dtype"]], tuple(entry["shape"]), loader)))
        return sources, {str(k): str(v) for k, v in metadata.items()}
    except (struct.error, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise UnreadableFile(folder, relative, f"{type(error).__name__}: {error}") from error


def page_key(index: int) -> str:
    return f"page.{index}"


def key_index(key: str) -> int:
    return int(key.split(".", 1)[1])


def document_file(document_name: str) -> str:
    return f"{document_name}.safetensors"


def _parts_dir(document_name: str) -> str:
    return f"{PARTS_DIR}/{document_name}"


def write_part(folder: Folder, document_name: str, key: str, tensor: torch.Tensor, row: dict) -> str:
    """One finished page -> `.parts/<document>/<key>.safetensors`, its manifest row in the metadata. Writing the
    same page again (a retried task) replaces the part whole."""
    relative = f"{_parts_dir(document_name)}/{key}.safetensors"
    write_safetensors(folder, relative, [(key, (tensor.dtype, tuple(tensor.shape), tensor))], {key: json.dumps(row)})
    return relative


def write_pages(folder: Folder, document_name: str, pages: list[tuple[str, torch.Tensor, dict]]) -> str:
    """Finished pages of one document (`(key, tensor, row)`, e.g. those of one batch) -> one part file
    `.parts/<document>/pages.<first>-<last>.safetensors` (one write, one fsync), each row in the metadata."""
    indices = [key_index(key) for key, *_ in pages]
    relative = f"{_parts_dir(document_name)}/pages.{min(indices)}-{max(indices)}.safetensors"
    tensors = [(key, (tensor.dtype, tuple(tensor.shape), tensor)) for key, tensor, _ in pages]
    write_safetensors(folder, relative, tensors, {key: json.dumps(row) for key, _, row in pages})
    return relative


def part_holding(folder: Folder, document_name: str, key: str) -> str | None:
    """The part file (relative to the folder) holding page `key` of a document not merged yet (a run in progress, or
    killed): the last one in name order if several do; None when none does."""
    parts_dir = _parts_dir(document_name)
    found = None
    for name in folder.list(parts_dir, ".safetensors"):
        if not is_temp_name(name) and key in read_keys(folder, f"{parts_dir}/{name}")[0]:
            found = f"{parts_dir}/{name}"
    return found


def merge_document(
    folder: Folder, document_name: str, on_unreadable: Callable[[UnreadableFile], None] | None = None
) -> list[str]:
    """Fold the parts of a document into `<document>.safetensors` (previous content kept, a part replaces a page of
    the same key), atomically, then delete the parts. Returns the keys now in the document file.

    An unreadable document file or part (`UnreadableFile`) raises, or with `on_unreadable` (a resumed run) is told
    to it and removed: the merge goes on with the others, and the pages it held are not among the keys returned
    (encoded again). Any other error (a full disk, a network failure) raises and changes nothing."""
    return merge_document_rows(folder, document_name, on_unreadable)[0]


def merge_document_rows(
    folder: Folder, document_name: str, on_unreadable: Callable[[UnreadableFile], None] | None = None
) -> tuple[list[str], dict[str, str]]:
    """`merge_document`, also returning the metadata now stored with those keys (each page's row), read from the
    headers the merge read anyway: a resumed run learns its done pages without reading the document file again."""
    parts_dir = _parts_dir(document_name)
    final = document_file(document_name)
    parts = [f"{parts_dir}/{name}" for name in folder.list(parts_dir, ".safetensors") if not is_temp_name(name)]
    entries: dict[str, tuple] = {}
    metadata: dict[str, str] = {}
    unreadable: list[str] = []
    for relative in ([final] if folder.exists(final) else []) + parts:
        try:
            sources, stored = _sources(folder, relative)
        except UnreadableFile as error:
            if on_unreadable is None:
                raise
            on_unreadable(error)
            unreadable.append(relative)
            continue
        entries.update(sources)
        metadata.update(stored)
    merged = [relative for relative in parts if relative not in unreadable]
    ordered = sorted(entries.items(), key=lambda item: key_index(item[0]))
    metadata = {key: value for key, value in metadata.items() if key in entries}
    if merged:
        write_safetensors(folder, final, ordered, metadata)
    for relative in unreadable:  # after the write (a failed one leaves everything as it was), which replaced `final`
        if relative != final or not merged:
            folder.remove(relative)
    for part in merged:
        folder.remove(part)
    if parts:
        folder.remove_dir(parts_dir)
    return [key for key, _ in ordered], metadata


def is_temp_name(name: str) -> bool:
    """Whether a file name is one a write of this module gives its temp file (never a document's own name)."""
    return _TEMP_NAME.search(name) is not None


def remove_empty_part_folders(folder: Folder) -> None:
    """At the end of a run: the part folders merges left empty (`.parts/` and the folders of documents in
    subfolders); a folder still holding a part (another run's, a failed merge's) stays. Object stores have none."""
    if not folder.local:
        return
    top = folder.local_path(PARTS_DIR)
    for directory, _, _ in sorted(os.walk(top), key=lambda entry: -len(Path(entry[0]).parts)):
        try:
            os.rmdir(directory)
        except OSError:  # not empty, or gone
            pass


def clean_temp_files(folder: Folder) -> int:
    """Remove temp files a killed run left behind (never a file under its final name)."""
    removed = 0
    for relative in folder.walk_files():
        if is_temp_name(relative.rsplit("/", 1)[-1]):
            folder.remove(relative)
            removed += 1
    return removed


# ---------------------------------------------------------------------------------------------- manifest
def _dumps(rows: Iterable[dict]) -> bytes:
    return b"".join(json.dumps(row, ensure_ascii=False).encode() + b"\n" for row in rows)


class ManifestWriter:
    """Appends rows to `manifest.jsonl` (or the rank's part) of a folder.

    Local disk: one `write` per call, flushed and fsynced, so a kill leaves at most one partial last line. A file
    not ending in a newline (a line cut by a kill) gets one first, so the cut line stays a separate, skippable line
    and the file is never truncated. Object store (no append): every call puts a new part object
    `manifest.rank<r>.<seq>.jsonl`; `merge_manifests` folds them into manifest.jsonl."""

    def __init__(self, folder: Folder, rank: int | None = None) -> None:
        self.folder = folder
        self.rank = rank
        self._lock = threading.Lock()
        self._handle = None
        self._seq = 0
        self._run = uuid.uuid4().hex[:8]
        if folder.local:
            relative = MANIFEST if rank is None else rank_manifest(rank)
            path = folder.local_path(relative)
            path.parent.mkdir(parents=True, exist_ok=True)
            self._handle = open(path, "ab")
            if path.stat().st_size:
                with open(path, "rb") as handle:
                    handle.seek(-1, os.SEEK_END)
                    if handle.read(1) != b"\n":
                        self._handle.write(b"\n")

    def append(self, rows: Iterable[dict]) -> None:
        data = _dumps(rows)
        if not data:
            return
        with self._lock:
            if self._handle is not None:
                self._handle.write(data)
                self._handle.flush()
                os.fsync(self._handle.fileno())
                return
            self._seq += 1
            rank = self.rank or 0
            # time-ordered sequence, unique per writer: parts of later runs sort after earlier ones
            seq = f"{time.time_ns():020d}{self._seq:06d}"
            self.folder.write(f"manifest.rank{rank}.{seq}.jsonl", data)

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()


def parse_rows(data: bytes) -> list[dict]:
    """Rows of manifest text; lines cut by a kill and non-JSON lines are skipped."""
    rows = []
    for line in data.decode("utf-8", errors="replace").splitlines():
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


def read_rows(path: str | os.PathLike, folder: Folder | None = None) -> list[dict]:
    """Rows of a manifest (or manifest part): a path or URL, or a name inside `folder`."""
    if folder is None:
        location = os.fspath(path)
        parent, _, name = location.rstrip("/").rpartition("/")
        folder, path = Folder(parent or "."), name
    path = os.fspath(path)
    if not folder.exists(path):
        return []
    return parse_rows(folder.read_bytes(path))


def rank_manifest(rank: int) -> str:
    return f"manifest.rank{rank}.jsonl"


def manifest_parts(folder: Folder) -> list[str]:
    """Unmerged manifest parts, in (rank, sequence) order."""
    found = []
    for name in folder.list("", ".jsonl"):
        match = _MANIFEST_PART.match(name)
        if match:
            found.append((int(match.group(1)), int(match.group(2) or 0), name))
    return [name for *_, name in sorted(found)]


def all_rows(folder: Folder) -> list[dict]:
    """manifest.jsonl followed by any parts not merged yet."""
    rows = read_rows(MANIFEST, folder)
    for part in manifest_parts(folder):
        rows.extend(read_rows(part, folder))
    return rows


def merge_manifests(folder: Folder) -> int:
    """Append the parts' rows to manifest.jsonl (rows already present are not added twice), atomically: the new
    manifest is the old one byte for byte plus the new lines, written whole (temp + rename, or one put); then the
    parts are deleted. Returns the number of rows added."""
    parts = manifest_parts(folder)
    if not parts:
        return 0
    old = folder.read_bytes(MANIFEST) if folder.exists(MANIFEST) else b""
    if old and not old.endswith(b"\n"):
        old += b"\n"
    present = set(old.decode("utf-8", errors="replace").splitlines())
    added = []
    for part in parts:
        for row in read_rows(part, folder):
            line = json.dumps(row, ensure_ascii=False)
            if line not in present:
                present.add(line)
                added.append(line)
    folder.write(MANIFEST, old + "".join(line + "\n" for line in added).encode())
    for part in parts:
        folder.remove(part)
    return len(added)


# ---------------------------------------------------------------------------------------------- lock
class OutputLocked(RuntimeError):
    """Another run holds the output folder; the message names it (host, pid, start, last heartbeat)."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # a process of another user
        return True
    return True


class OutputLock:
    """`.lock` in the output folder: one run writes into a folder at a time.

    The lock holds host, pid, start time and a heartbeat time, refreshed every `heartbeat_s` by a daemon thread.
    A lock is stale (taken over, with a warning) when its process is gone (same host, pid not alive) or its heartbeat
    is older than `stale_after_s` (a run on another machine that died). Otherwise `acquire` raises `OutputLocked`
    naming the holder. Local disk: created with O_EXCL, a stale lock taken over by an atomic rename, so of two
    runs started together exactly one wins. Object stores: put, then read back to confirm (last writer wins; the
    loser sees another holder and stops)."""

    def __init__(self, folder: Folder, heartbeat_s: float = 30.0, stale_after_s: float = 300.0) -> None:
        self.folder = folder
        self.heartbeat_s = heartbeat_s
        self.stale_after_s = max(stale_after_s, 2 * heartbeat_s)
        self.token = uuid.uuid4().hex
        now = time.time()
        self.info = {"host": socket.gethostname(), "pid": os.getpid(), "started": now, "heartbeat": now,
                     "token": self.token}  # fmt: skip
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.warning: str | None = None

    def _payload(self) -> bytes:
        return json.dumps(self.info).encode()

    def _read(self) -> dict | None:
        try:
            data = self.folder.read_bytes(LOCK)
        except FileNotFoundError:
            return None
        try:
            holder = json.loads(data)
        except json.JSONDecodeError:
            return {}  # being written: treat as held (fresh)
        return holder if isinstance(holder, dict) else {}

    def describe(self, holder: dict) -> str:
        if not holder:
            return "a run starting just now: its lock file is still being written"
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
        age = time.time() - float(holder.get("heartbeat", time.time()))
        return f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, started {started}, heartbeat {age:.0f} s ago"

    def stale_reason(self, holder: dict) -> str | None:
        if not holder:
            return None
        if holder.get("host") == self.info["host"] and isinstance(holder.get("pid"), int):
            if not _pid_alive(holder["pid"]):
                return f"process {holder['pid']} on this host is gone"
        age = time.time() - float(holder.get("heartbeat", 0))
        if age > self.stale_after_s:
            return f"no heartbeat for {age:.0f} s (more than {self.stale_after_s:.0f} s)"
        return None

    def _create_local(self) -> bool:
        path = self.folder.local_path(LOCK)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as handle:
            handle.write(self._payload())
            handle.flush()
            os.fsync(handle.fileno())
        return True

    def acquire(self) -> OutputLock:
        self.folder.makedirs()
        for _ in range(5):
            if self.folder.local:
                if self._create_local():
                    break
            elif not self.folder.exists(LOCK):
                self.folder.write(LOCK, self._payload())
                if (self._read() or {}).get("token") == self.token:
                    break
                continue
            holder = self._read()
            for _ in range(20):  # a run starting this instant has created the file and not yet written it: 1 s
                if holder != {}:
                    break
                time.sleep(0.05)
                holder = self._read()
            if holder is None:
                continue
            reason = self.stale_reason(holder)
            if reason is None:
                raise OutputLocked(
                    f"{self.folder.display()} is being written by another `deepencoder encode` run "
                    f"({self.describe(holder)}); wait for it to finish, use another --out, or delete "
                    f"{self.folder.display(LOCK)} if that run is gone"
                )
            self.warning = f"took over a stale lock on {self.folder.display()} ({self.describe(holder)}: {reason})"
            if self.folder.local:  # only one of several runs taking over the same stale lock wins the rename
                aside = self.folder.local_path(f"{LOCK}{TMP_MARK}stale-{self.token}")
                try:
                    os.rename(self.folder.local_path(LOCK), aside)
                except FileNotFoundError:
                    continue
                aside.unlink(missing_ok=True)
            else:
                self.folder.remove(LOCK)
        else:
            raise OutputLocked(f"could not take the lock {self.folder.display(LOCK)}; another run keeps taking it")
        self._thread = threading.Thread(target=self._beat, name="deepencoder-lock", daemon=True)
        self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            holder = self._read()
            if holder is not None and holder.get("token") not in (None, self.token):
                return  # taken over (we were declared stale): do not fight
            self.info["heartbeat"] = time.time()
            try:
                self.folder.write(LOCK, self._payload())
            except OSError:
                pass

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
            if (self._read() or {}).get("token") == self.token:
                self.folder.remove(LOCK)

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
