"""Safe checkpoint reading: safetensors (whole, or only chosen tensors through any seekable file, local or remote by
HTTP range requests) and `.pth`/`.bin` through `torch.load(weights_only=True)` only. Nothing here unpickles code."""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import BinaryIO

import torch

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
MAX_HEADER_BYTES = 100 * 1024 * 1024


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and, where known, the key."""


def read_safetensors_header(handle: BinaryIO, name: str) -> tuple[dict, int]:
    """Parse a safetensors header from an open binary file. Returns (tensor entries, offset of the data section)."""
    raw = handle.read(8)
    if len(raw) != 8:
        raise CheckpointError(f"{name}: not a safetensors file (shorter than its 8-byte header length)")
    (length,) = struct.unpack("<Q", raw)
    if length > MAX_HEADER_BYTES:
        raise CheckpointError(f"{name}: not a safetensors file (header length {length} is implausible)")
    header_bytes = handle.read(length)
    if len(header_bytes) != length:
        raise CheckpointError(f"{name}: truncated safetensors header ({len(header_bytes)} of {length} bytes)")
    try:
        header = json.loads(header_bytes)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{name}: corrupted safetensors header ({error})") from error
    header.pop("__metadata__", None)
    return header, 8 + length


def read_safetensors(
    handle: BinaryIO, name: str, keys: Iterable[str] | None = None, size: int | None = None
) -> dict[str, torch.Tensor]:
    """Read the tensors `keys` (all when None) from an open safetensors file, seeking to each tensor's bytes only.

    Works on any seekable binary file object: a local file, or a remote one opened through an fsspec-style file
    system (`huggingface_hub.HfFileSystem().open(...)`), where each read becomes an HTTP range request.
    `size`: the file's length when known, to report truncation before reading.
    """
    header, data_start = read_safetensors_header(handle, name)
    wanted = list(header) if keys is None else list(keys)
    missing = [key for key in wanted if key not in header]
    if missing:
        raise CheckpointError(f"{name}: missing tensors {missing[:10]}{' ...' if len(missing) > 10 else ''}")
    tensors: dict[str, torch.Tensor] = {}
    # read in file order so a remote reader streams forward
    for key in sorted(wanted, key=lambda k: header[k]["data_offsets"][0]):
        entry = header[key]
        begin, end = entry["data_offsets"]
        dtype = SAFETENSORS_DTYPES.get(entry["dtype"])
        if dtype is None:
            raise CheckpointError(f"{name}: tensor {key!r} has unsupported dtype {entry['dtype']}")
        shape = entry["shape"]
        expected = dtype.itemsize * _numel(shape)
        if end - begin != expected:
            raise CheckpointError(f"{name}: tensor {key!r} spans {end - begin} bytes, its shape needs {expected}")
        if size is not None and data_start + end > size:
            raise CheckpointError(f"{name}: truncated file, tensor {key!r} ends past the end of the file")
        handle.seek(data_start + begin)
        blob = handle.read(end - begin)
        if len(blob) != end - begin:
            raise CheckpointError(f"{name}: truncated file, tensor {key!r} has {len(blob)} of {end - begin} bytes")
        tensor = torch.frombuffer(bytearray(blob), dtype=dtype) if blob else torch.empty(0, dtype=dtype)
        tensors[key] = tensor.reshape(shape)
    return tensors


def _numel(shape: list[int]) -> int:
    total = 1
    for dim in shape:
        total *= dim
    return total


def safetensors_keys(path: str | os.PathLike) -> list[str]:
    with open(path, "rb") as handle:
        header, _ = read_safetensors_header(handle, str(path))
    return list(header)


def load_safetensors(path: str | os.PathLike, keys: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """Read all or some tensors of a local safetensors file."""
    path = Path(path)
    with open(path, "rb") as handle:
        return read_safetensors(handle, str(path), keys, size=path.stat().st_size)


def load_pickle_weights(path: str | os.PathLike | BinaryIO, name: str | None = None) -> dict[str, torch.Tensor]:
    """`.pth` / `.pt` / `.bin` (a path, or an open binary file named `name`) through
    `torch.load(weights_only=True)`: tensors and plain containers only. A pickle that needs anything else (code,
    custom classes) is refused with a clear message and never executed."""
    name = name or str(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=False)
    except Exception as error:  # torch raises UnpicklingError / RuntimeError with its own wording
        raise CheckpointError(
            f"{name}: refused to load: it is not a plain tensor checkpoint that torch.load(weights_only=True) accepts "
            f"(it may carry code or custom objects, or be corrupted). Convert it to safetensors where you trust it. "
            f"Detail: {str(error).splitlines()[0] if str(error) else type(error).__name__}"
        ) from error
    for wrapper in ("state_dict", "model", "module"):
        if isinstance(state, dict) and wrapper in state and isinstance(state[wrapper], dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{name}: expected a dict of tensors, got {type(state).__name__}")
    return state


def load_state_dict(
    path: str | os.PathLike, key_filter: Callable[[str], bool] | None = None
) -> dict[str, torch.Tensor]:
    """Load a local checkpoint file or directory of safetensors shards (with or without an index); `.pth`, `.pt`
    and `.bin` go through `torch.load(weights_only=True)`. `key_filter` selects the tensors to read (safetensors
    reads only those bytes)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    if path.is_dir():
        files = safetensors_files(path)
        if not files:
            pickles = sorted(p for ext in ("*.bin", "*.pth", "*.pt") for p in path.glob(ext))
            if not pickles:
                raise CheckpointError(f"{path}: no *.safetensors, *.bin, *.pth or *.pt checkpoint in this directory")
            state: dict[str, torch.Tensor] = {}
            for file in pickles:
                state.update(load_pickle_weights(file))
            return {k: v for k, v in state.items() if key_filter is None or key_filter(k)}
        state = {}
        for file in files:
            keys = safetensors_keys(file)
            state.update(load_safetensors(file, [k for k in keys if key_filter is None or key_filter(k)]))
        return state
    if path.suffix == ".safetensors":
        keys = [k for k in safetensors_keys(path) if key_filter is None or key_filter(k)]
        return load_safetensors(path, keys)
    state = load_pickle_weights(path)
    return {k: v for k, v in state.items() if key_filter is None or key_filter(k)}


def shard_names(index: bytes | str, index_name: str) -> list[str]:
    """The shard files a `*.safetensors.index.json` names, each checked to lie inside the index's own folder
    before anything is opened: a name that is absolute, has a `..` component or a drive is refused, naming the
    entry (an index must not make the loader open `../../etc/passwd`)."""
    try:
        weight_map = json.loads(index)["weight_map"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as error:
        raise CheckpointError(f"{index_name}: not a safetensors index ({error})") from error
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index_name}: not a safetensors index (weight_map is not a mapping)")
    for key, name in weight_map.items():
        parts = str(name).replace("\\", "/").split("/")
        if (
            not isinstance(name, str)
            or not name
            or name.startswith(("/", "\\"))
            or ":" in parts[0]  # a Windows drive or a URL scheme
            or any(part in ("", ".", "..") for part in parts)
        ):
            raise CheckpointError(
                f"{index_name}: weight_map entry {key!r} -> {name!r} does not name a file inside the checkpoint's "
                "folder; refused"
            )
    return sorted(set(weight_map.values()))


def safetensors_files(directory: Path) -> list[Path]:
    """Shards of a directory: those named by `*.safetensors.index.json` when present, else every *.safetensors."""
    indexes = sorted(directory.glob("*.safetensors.index.json"))
    if indexes:
        files = [directory / name for name in shard_names(indexes[0].read_bytes(), str(indexes[0]))]
        absent = [str(f) for f in files if not f.exists()]
        if absent:
            raise CheckpointError(f"{indexes[0]}: names shards that are missing: {absent}")
        return files
    return sorted(directory.glob("*.safetensors"))
