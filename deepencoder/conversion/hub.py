"""Hub checkpoints read by byte ranges, through the hub cache.

A converted load reads only a checkpoint's vision tensors: a few hundred MB of a multi-GB DeepSeek-OCR shard, by HTTP
range requests. `HubCacheFileSystem` is the fsspec-style view (`isdir`, `glob`, `exists`, `size`, `open`) of one
hub revision that `remote.open_checkpoint` reads through. It takes the arguments every `from_pretrained` takes
(`HubOptions`: `revision`, `cache_dir`, `local_files_only`, `token`, `subfolder`, `force_download`) and keeps what
it reads in the hub cache (`cache_dir`, default `HF_HUB_CACHE`), beside the hub's own folders:

    <cache_dir>/models--<owner>--<name>/
        refs/<revision>            the commit a branch or tag named when it was last resolved (as the hub writes it)
        snapshots/<commit>/...     whole files (written by `hf_hub_download` / transformers): read from there
        ranges/<commit>.json       the revision's files: {"files": {path: {"size": bytes, "blob": id}}}
        ranges/<blob>              a sparse copy of a file, holding the byte ranges read so far
        ranges/<blob>.json         which ranges it holds: {"size": bytes, "have": [[start, end], ...]}

(`blob`: the file's LFS sha256, or its git blob id, as the hub names `blobs/` entries.) A second load of the same
revision reads only from there: with `HF_HUB_OFFLINE=1` or `local_files_only=True` no request is made at all (a
branch or tag is resolved through `refs/`); online, one metadata request resolves the revision and no byte is
downloaded twice. `force_download=True` reads every range again. Deleting the repository's folder (e.g. `hf cache
delete`) deletes its ranges too.
"""

from __future__ import annotations

import fnmatch
import io
import json
import os
import re
import tempfile
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Protocol

from .io import CheckpointError

COMMIT = re.compile(r"^[0-9a-f]{40}$")
SAFE_NAME = re.compile(r"^[0-9A-Za-z_-]+$")  # blob ids name files in the cache
READ_AHEAD = 1 << 20  # bytes fetched past a missed read: small, so skipped tensors are not fetched
TRUE_VALUES = {"1", "ON", "YES", "TRUE"}


@dataclass(frozen=True)
class HubOptions:
    """What `from_pretrained` takes to find a hub checkpoint; the same names and meanings."""

    revision: str | None = None
    cache_dir: str | os.PathLike | None = None
    local_files_only: bool = False
    token: str | bool | None = None
    subfolder: str = ""
    force_download: bool = False

    @classmethod
    def from_kwargs(cls, kwargs: dict[str, Any]) -> HubOptions:
        """The hub keywords among `kwargs` (others are left to the caller); None values mean the default."""
        return cls(**{f.name: kwargs[f.name] for f in fields(cls) if kwargs.get(f.name) is not None})

    @property
    def offline(self) -> bool:
        """`local_files_only`, or the hub's offline mode (`HF_HUB_OFFLINE` / `TRANSFORMERS_OFFLINE`, read now)."""
        from huggingface_hub import constants

        environment = (
            os.environ.get(name, "").upper() in TRUE_VALUES for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
        )
        return self.local_files_only or constants.HF_HUB_OFFLINE or any(environment)

    def transformers_kwargs(self) -> dict[str, Any]:
        """These options as transformers' `get_config_dict` / `from_pretrained` keywords (offline mode included)."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values["local_files_only"] = self.offline
        return {key: value for key, value in values.items() if value not in (None, "", False)}


HUB_KEYWORDS = tuple(f.name for f in fields(HubOptions))


@dataclass(frozen=True)
class RemoteFile:
    size: int
    blob: str


class Remote(Protocol):
    """Where a hub revision's files come from: the hub itself (`HubRemote`), or, in tests, a recording stand-in."""

    def snapshot(self, repo_id: str, revision: str) -> tuple[str, dict[str, RemoteFile]]:
        """(commit the revision names, {path in the repository: file})."""

    def read_range(self, repo_id: str, commit: str, path: str, start: int, end: int) -> bytes:
        """Bytes [start, end) of a file at a commit."""


class HubRemote:
    """The Hugging Face hub: one `model_info` request resolves a revision and lists its files (sizes, blob ids);
    byte ranges come by HTTP range requests."""

    def __init__(self, token: str | bool | None = None) -> None:
        self.token = token

    def snapshot(self, repo_id: str, revision: str) -> tuple[str, dict[str, RemoteFile]]:
        from huggingface_hub import HfApi

        info = HfApi(token=self.token).model_info(repo_id, revision=revision, files_metadata=True)
        files = {}
        for sibling in info.siblings or []:
            lfs = sibling.lfs
            sha256 = (lfs.get("sha256") if isinstance(lfs, dict) else getattr(lfs, "sha256", None)) if lfs else None
            files[sibling.rfilename] = RemoteFile(int(sibling.size or 0), sha256 or sibling.blob_id or "")
        return info.sha, files

    def read_range(self, repo_id: str, commit: str, path: str, start: int, end: int) -> bytes:
        """One HTTP range request (as `HfFileSystem`'s files make, without their read-ahead)."""
        from huggingface_hub import constants, hf_hub_url
        from huggingface_hub.utils import build_hf_headers, hf_raise_for_status, http_backoff

        headers = {"range": f"bytes={start}-{end - 1}", **build_hf_headers(token=self.token)}
        response = http_backoff(
            "GET",
            hf_hub_url(repo_id, path, revision=commit),
            headers=headers,
            timeout=constants.HF_HUB_DOWNLOAD_TIMEOUT,
        )
        hf_raise_for_status(response)
        return response.content


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(handle, "w", encoding="utf-8") as file:
        file.write(text)
    os.replace(temporary, path)


def _merge(intervals: list[list[int]]) -> list[list[int]]:
    merged: list[list[int]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return merged


class RangeStore:
    """A sparse copy of one remote file (`ranges/<blob>`) and the ranges it holds (`ranges/<blob>.json`). Writers
    take a file lock; data is written before its range is listed, so a reader never sees a listed hole."""

    def __init__(self, directory: Path, blob: str, size: int) -> None:
        self.data, self.index, self.size = directory / blob, directory / f"{blob}.json", size
        self.lock = directory / f"{blob}.lock"

    def have(self) -> list[list[int]]:
        try:
            index = json.loads(self.index.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return []
        if index.get("size") != self.size or not self.data.is_file():
            return []
        return index["have"]

    def missing(self, start: int, end: int) -> list[tuple[int, int]]:
        gaps, position = [], start
        for low, high in self.have():
            if high <= position or low >= end:
                continue
            if low > position:
                gaps.append((position, low))
            position = max(position, high)
        if position < end:
            gaps.append((position, end))
        return gaps

    def write(self, start: int, data: bytes, reset: bool = False) -> None:
        from filelock import FileLock

        self.data.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.lock)):
            have = [] if reset else self.have()
            if not have:
                with open(self.data, "wb") as handle:
                    handle.truncate(self.size)
            with open(self.data, "r+b") as handle:
                handle.seek(start)
                handle.write(data)
            _write_atomic(
                self.index, json.dumps({"size": self.size, "have": _merge(have + [[start, start + len(data)]])})
            )

    def read(self, start: int, end: int) -> bytes:
        with open(self.data, "rb") as handle:
            handle.seek(start)
            return handle.read(end - start)


class RangeFile(io.RawIOBase):
    """A read-only, seekable file whose bytes come from a `RangeStore`, missing ranges fetched from the remote
    (with `READ_AHEAD`) and stored first."""

    def __init__(self, filesystem: HubCacheFileSystem, path: str, entry: RemoteFile) -> None:
        super().__init__()
        self.filesystem, self.path, self.entry, self.position = filesystem, path, entry, 0
        self.store = RangeStore(filesystem.ranges, entry.blob, entry.size)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.position, io.SEEK_END: self.entry.size}[whence]
        self.position = max(0, base + offset)
        return self.position

    def read(self, size: int | None = -1) -> bytes:
        """Up to `size` bytes (all the rest when negative) in one cached read."""
        end = self.entry.size if size is None or size < 0 else min(self.position + size, self.entry.size)
        if end <= self.position:
            return b""
        data = self.filesystem.read_range(self.path, self.entry, self.store, self.position, end)
        self.position += len(data)
        return data

    def readinto(self, buffer) -> int:
        end = min(self.position + len(buffer), self.entry.size)
        if end <= self.position:
            return 0
        data = self.filesystem.read_range(self.path, self.entry, self.store, self.position, end)
        buffer[: len(data)] = data
        self.position += len(data)
        return len(data)


class HubCacheFileSystem:
    """One revision of a hub model repository as an fsspec-style file system (paths inside the repository), reading
    through the hub cache (see the module docstring). Resolving the revision is the only request made online when
    everything needed is cached; offline, none is."""

    def __init__(self, repo_id: str, options: HubOptions, remote: Remote | None = None) -> None:
        from huggingface_hub import constants
        from huggingface_hub.file_download import repo_folder_name

        self.repo_id, self.options = repo_id, options
        self.remote = remote if remote is not None else HubRemote(options.token)
        cache = Path(options.cache_dir) if options.cache_dir is not None else Path(constants.HF_HUB_CACHE)
        self.folder = cache / repo_folder_name(repo_id=repo_id, repo_type="model")
        self.ranges = self.folder / "ranges"
        self.reset: set[str] = set()  # blobs already read again in this load (force_download)
        self.commit, self.files = self._resolve(options.revision or "main")

    # ------------------------------------------------------------------ resolution
    def _resolve(self, revision: str) -> tuple[str, dict[str, RemoteFile]]:
        if any(part in ("", ".", "..") for part in revision.split("/")):
            raise CheckpointError(f"{self.repo_id}: revision {revision!r} is not a branch, tag or commit name")
        if not self.options.offline:
            commit, files = self.remote.snapshot(self.repo_id, revision)
            if not COMMIT.match(commit) or not all(SAFE_NAME.match(entry.blob) for entry in files.values()):
                raise CheckpointError(f"{self.repo_id}@{revision}: the hub answered an unexpected commit or blob id")
            if revision != commit:
                _write_atomic(self.folder / "refs" / revision, commit)
            listing = {path: {"size": entry.size, "blob": entry.blob} for path, entry in files.items()}
            _write_atomic(self.ranges / f"{commit}.json", json.dumps({"files": listing}))
            return commit, files
        commit = revision if COMMIT.match(revision) else None
        if commit is None and (self.folder / "refs" / revision).is_file():
            commit = (self.folder / "refs" / revision).read_text(encoding="utf-8").strip()
        files: dict[str, RemoteFile] = {}
        if commit is not None and (self.ranges / f"{commit}.json").is_file():
            listing = json.loads((self.ranges / f"{commit}.json").read_text(encoding="utf-8"))["files"]
            files = {path: RemoteFile(int(entry["size"]), entry["blob"]) for path, entry in listing.items()}
        snapshot = self.folder / "snapshots" / (commit or "")
        if commit is not None and snapshot.is_dir():
            for file in snapshot.rglob("*"):
                if file.is_file():
                    path = file.relative_to(snapshot).as_posix()
                    files.setdefault(path, RemoteFile(file.stat().st_size, ""))
        if not files:
            raise CheckpointError(
                f"{self.repo_id} (revision {revision}): not in the hub cache {self.folder.parent} and offline "
                "(HF_HUB_OFFLINE / local_files_only); load it once online, or load a local copy"
            )
        return commit, files

    # ------------------------------------------------------------------ fsspec-style interface
    @staticmethod
    def _path(path: str) -> str:
        return str(path).strip("/")

    def _snapshot_file(self, path: str) -> Path | None:
        file = self.folder / "snapshots" / self.commit / self._path(path)
        return file if not self.options.force_download and file.is_file() else None

    def isdir(self, path: str) -> bool:
        prefix = self._path(path)
        return not prefix or any(name.startswith(prefix + "/") for name in self.files)

    def exists(self, path: str) -> bool:
        return self._path(path) in self.files or self.isdir(path)

    def glob(self, pattern: str) -> list[str]:
        folder, _, name = self._path(pattern).rpartition("/")
        return sorted(
            path
            for path in self.files
            if path.rpartition("/")[0] == folder and fnmatch.fnmatchcase(path.rpartition("/")[2], name)
        )

    def size(self, path: str) -> int:
        if (file := self._snapshot_file(path)) is not None:
            return file.stat().st_size
        return self._entry(path).size

    def _entry(self, path: str) -> RemoteFile:
        try:
            return self.files[self._path(path)]
        except KeyError:
            raise FileNotFoundError(f"{self.repo_id}@{self.commit}: no file {self._path(path)}") from None

    def open(self, path: str, mode: str = "rb", **_: Any):
        if mode != "rb":
            raise ValueError(f"{self.repo_id}: read-only ({mode!r})")
        if (file := self._snapshot_file(path)) is not None:
            return open(file, "rb")
        entry = self._entry(path)
        if not entry.blob:
            raise CheckpointError(f"{self.repo_id}@{self.commit}: {self._path(path)} is not in the hub cache")
        return RangeFile(self, self._path(path), entry)

    # ------------------------------------------------------------------ reading
    def read_range(self, path: str, entry: RemoteFile, store: RangeStore, start: int, end: int) -> bytes:
        """Bytes [start, end) of `path`: from the cache, the missing ranges fetched (and stored) first."""
        force = self.options.force_download and entry.blob not in self.reset
        gaps = [(start, end)] if force else store.missing(start, end)
        if gaps and self.options.offline:
            raise CheckpointError(
                f"{self.repo_id}@{self.commit}: bytes {gaps[0][0]}-{gaps[0][1]} of {path} are not in the hub cache "
                f"{self.folder.parent} and offline (HF_HUB_OFFLINE / local_files_only); load it once online"
            )
        for low, high in gaps:
            high = min(entry.size, max(high, low + READ_AHEAD))
            data = self.remote.read_range(self.repo_id, self.commit, path, low, high)
            if len(data) != high - low:
                raise CheckpointError(f"{self.repo_id}@{self.commit}: {path}: {len(data)} of {high - low} bytes read")
            store.write(low, data, reset=force)
            self.reset.add(entry.blob)
            force = False
        return store.read(start, end)
