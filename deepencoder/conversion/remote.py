"""One reading path for local and hub checkpoints: an fsspec-style file system (`open`, `glob`, `size`, `isdir`).

Local paths use fsspec's `LocalFileSystem`; hub ids use `hub.HubCacheFileSystem`, which turns each `seek` + `read`
into an HTTP range request (only the selected tensors' bytes are downloaded) and keeps the ranges it read in the hub
cache, so a second load reads nothing remote.
"""

from __future__ import annotations

import io
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch

from .hub import HubCacheFileSystem, HubOptions, Remote
from .io import (
    CheckpointError,
    load_pickle_weights,
    load_state_dict,
    read_safetensors,
    read_safetensors_header,
    shard_names,
)

# a hub repository, optionally followed by a file or folder inside it: owner/name[/path/in/repo]
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(/[\w.-]+)*$")
SHARD_NAME = re.compile(r".*-\d{5}-of-\d{5}\.safetensors$")
PICKLE_SUFFIXES = (".pth", ".pt", ".bin")
RANGE_BLOCK_SIZE = 1 << 20  # read-ahead of the remote file objects: small, so skipped tensors are not fetched


@dataclass
class CheckpointSource:
    """Where a checkpoint's shards are and how to open them."""

    name: str
    filesystem: Any
    files: list[str]
    local: bool
    directory: str | None = None  # the folder holding the shards (and config.json), when a folder was given


def open_checkpoint(
    path_or_repo_id: str,
    revision: str | None = None,
    filesystem: Any = None,
    hub: HubOptions | None = None,
    remote: Remote | None = None,
) -> CheckpointSource:
    """Resolve a local file / directory or a hub id to its safetensors shards (listed by the index when present).

    hub: `from_pretrained`'s hub arguments (`revision` here wins over `hub.revision`); a hub id is read through
    the hub cache (`HubCacheFileSystem`), `subfolder` also applies to a local directory. remote: where a hub id's
    bytes come from (default: the hub)."""
    name = str(path_or_repo_id)
    hub = hub or HubOptions()
    if revision is not None:
        hub = replace(hub, revision=revision)
    local_name = os.path.join(name, hub.subfolder) if hub.subfolder else name
    if filesystem is None and os.path.exists(local_name):
        from fsspec.implementations.local import LocalFileSystem

        filesystem, root, local = LocalFileSystem(), os.path.abspath(local_name), True
    elif filesystem is None:
        if not REPO_ID.match(name):
            raise CheckpointError(f"{name}: no such file or directory, and not a hub id of the form 'owner/name'")
        owner, repo, inner = (*name.split("/", 2), "")[:3]
        root, local = "/".join(part for part in (hub.subfolder.strip("/"), inner) if part), False
        try:
            filesystem = HubCacheFileSystem(f"{owner}/{repo}", hub, remote)
        except CheckpointError:
            raise
        except Exception as error:
            raise CheckpointError(
                f"cannot read checkpoint {name!r} ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}); "
                "without network access, download the checkpoint elsewhere and pass its local file or directory "
                "(e.g. --weights /path/to/DeepSeek-OCR), or load it once online: its ranges are kept in the hub cache"
            ) from error
    else:
        root, local = local_name, False
    try:
        if not filesystem.isdir(root):
            return CheckpointSource(name, filesystem, [root], local)
        indexes = sorted(filesystem.glob(f"{root}/*.safetensors.index.json"))
        if indexes:
            with filesystem.open(indexes[0], "rb") as handle:
                shards = shard_names(handle.read(), indexes[0])
            files = [f"{root}/{shard}" for shard in shards]
        else:
            files = sorted(filesystem.glob(f"{root}/*.safetensors"))
            if len(files) > 1 and not all(SHARD_NAME.match(f) for f in files):
                raise CheckpointError(
                    f"{name}: several checkpoints in this directory ({', '.join(os.path.basename(f) for f in files)}) "
                    "and no *.safetensors.index.json naming the shards; pass the file to convert"
                )
            if not files and not local:
                files = sorted(f for ext in PICKLE_SUFFIXES for f in filesystem.glob(f"{root}/*{ext}"))[:1]
    except CheckpointError:
        raise
    except Exception as error:
        raise CheckpointError(
            f"cannot read checkpoint {name!r} ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}); "
            "if it is a local path, check that it exists; without network access, download the checkpoint "
            "elsewhere and pass its local file or directory (e.g. --weights /path/to/DeepSeek-OCR)"
        ) from error
    if not files and not local:  # a local folder may hold pickled weights: read_tensors loads them safely
        raise CheckpointError(f"{name}: no *.safetensors files found")
    return CheckpointSource(name, filesystem, files, local, root)


def read_tensors(source: CheckpointSource, select: Callable[[str], bool]) -> dict[str, torch.Tensor]:
    """Read the tensors whose names `select` accepts, shard by shard, touching only their bytes."""
    if not source.files:
        return load_state_dict(source.name, key_filter=select)
    tensors: dict[str, torch.Tensor] = {}
    for file in source.files:
        if not file.endswith(".safetensors"):
            if source.local:
                tensors.update(load_state_dict(file, key_filter=select))
                continue
            tensors.update({k: v for k, v in read_remote_pickle(source, file).items() if select(k)})
            continue
        try:
            size = source.filesystem.size(file)
            with source.filesystem.open(
                file, "rb", **({} if source.local else {"block_size": RANGE_BLOCK_SIZE})
            ) as handle:
                header, _ = read_safetensors_header(handle, file)
                keys = [key for key in header if select(key)]
                if keys:
                    handle.seek(0)
                    tensors.update(read_safetensors(handle, file, keys, size=size))
        except CheckpointError:
            raise
        except Exception as error:
            raise CheckpointError(f"{file}: cannot read ({type(error).__name__}: {error})") from error
    return tensors


def read_remote_pickle(source: CheckpointSource, file: str) -> dict[str, torch.Tensor]:
    """A `.pth`/`.pt`/`.bin` file cannot be read by ranges: download it whole, then `torch.load(weights_only=True)`."""
    try:
        with source.filesystem.open(file, "rb") as handle:
            payload = handle.read()
    except Exception as error:
        raise CheckpointError(f"{file}: cannot read ({type(error).__name__}: {error})") from error
    return load_pickle_weights(io.BytesIO(payload), name=file)


def checkpoint_keys(source: CheckpointSource) -> list[str] | None:
    """The tensor names of a safetensors checkpoint, from its headers alone (a few KB per shard, also remotely);
    None when the checkpoint is pickled (its names are only known after loading it)."""
    if not source.files or not all(f.endswith(".safetensors") for f in source.files):
        return None
    keys: list[str] = []
    for file in source.files:
        try:
            with source.filesystem.open(
                file, "rb", **({} if source.local else {"block_size": RANGE_BLOCK_SIZE})
            ) as handle:
                header, _ = read_safetensors_header(handle, file)
        except CheckpointError:
            raise
        except Exception as error:
            raise CheckpointError(f"{file}: cannot read ({type(error).__name__}: {error})") from error
        keys.extend(header)
    return keys


def read_json_beside(source: CheckpointSource, filename: str) -> dict | None:
    """A JSON file (e.g. transformers' config.json) in the checkpoint's folder, parsed as data; None if absent."""
    if source.directory is None:
        return None
    path = f"{source.directory}/{filename}"
    try:
        if not source.filesystem.exists(path):
            return None
        with source.filesystem.open(path, "rb") as handle:
            return json.loads(handle.read())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path}: not valid JSON ({error})") from error
