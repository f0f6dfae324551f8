"""One reading path for local and hub checkpoints: an fsspec-style file system (`open`, `glob`, `size`, `isdir`).

Local paths use fsspec's `LocalFileSystem`; hub ids use `huggingface_hub.HfFileSystem`, whose file objects turn
each `seek` + `read` into an HTTP range request, so only the selected tensors' bytes are downloaded.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .io import CheckpointError, load_state_dict, read_safetensors, read_safetensors_header

REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
RANGE_BLOCK_SIZE = 1 << 20  # read-ahead of the remote file objects: small, so skipped tensors are not fetched


@dataclass
class CheckpointSource:
    """Where a checkpoint's shards are and how to open them."""

    name: str
    filesystem: Any
    files: list[str]
    local: bool


def open_checkpoint(path_or_repo_id: str, revision: str | None = None, filesystem: Any = None) -> CheckpointSource:
    """Resolve a local file / directory or a hub id to its safetensors shards (listed by the index when present)."""
    name = str(path_or_repo_id)
    if filesystem is None and os.path.exists(name):
        from fsspec.implementations.local import LocalFileSystem

        filesystem, root, local = LocalFileSystem(), os.path.abspath(name), True
    elif filesystem is None:
        if not REPO_ID.match(name):
            raise CheckpointError(f"{name}: no such file or directory, and not a hub id of the form 'owner/name'")
        try:
            from huggingface_hub import HfFileSystem
        except ImportError as error:  # pragma: no cover - huggingface_hub ships with transformers
            raise CheckpointError(f"{name}: reading from the hub needs huggingface_hub") from error
        filesystem, root, local = HfFileSystem(), name + (f"@{revision}" if revision else ""), False
    else:
        root, local = name, False
    try:
        if not filesystem.isdir(root):
            return CheckpointSource(name, filesystem, [root], local)
        indexes = sorted(filesystem.glob(f"{root}/*.safetensors.index.json"))
        if indexes:
            with filesystem.open(indexes[0], "rb") as handle:
                weight_map = json.loads(handle.read())["weight_map"]
            files = [f"{root}/{shard}" for shard in sorted(set(weight_map.values()))]
        else:
            files = sorted(filesystem.glob(f"{root}/*.safetensors"))
    except CheckpointError:
        raise
    except Exception as error:
        raise CheckpointError(
            f"cannot read checkpoint {name!r} ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}); "
            "without network access download it elsewhere and pass its local directory "
            "(e.g. --weights /path/to/DeepSeek-OCR)"
        ) from error
    if not files and local:
        files = []  # may hold pickled weights; read_tensors falls back to the safe pickle loader
    elif not files:
        raise CheckpointError(f"{name}: no *.safetensors files found")
    return CheckpointSource(name, filesystem, files, local)


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
            raise CheckpointError(f"{file}: only safetensors can be read remotely")
        try:
            size = source.filesystem.size(file)
            with source.filesystem.open(file, "rb", **({} if source.local else {"block_size": RANGE_BLOCK_SIZE})) as handle:
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
