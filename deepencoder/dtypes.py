"""One dtype vocabulary for every command and config: `bf16` / `bfloat16`, `fp16` / `float16` / `half`,
`fp32` / `float32` / `float`, and torch dtypes themselves."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# spelling -> torch attribute (read when a dtype is parsed: this table imports nothing, command lines build on it)
DTYPE_SPELLINGS: dict[str, str] = {
    "float32": "float32",
    "fp32": "float32",
    "float": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
}
# spellings a command line offers (argparse `choices`), short and long
DTYPE_NAMES: tuple[str, ...] = ("fp32", "float32", "bf16", "bfloat16", "fp16", "float16")


def parse_dtype(value: str | torch.dtype) -> torch.dtype:
    """`"bf16"`, `"bfloat16"`, `"torch.bfloat16"` or `torch.bfloat16` -> torch.bfloat16 (case-insensitive)."""
    import torch

    supported = {getattr(torch, name) for name in DTYPE_SPELLINGS.values()}
    if isinstance(value, torch.dtype):
        if value not in supported:
            raise ValueError(f"unsupported dtype {value}; use one of {', '.join(DTYPE_NAMES)}")
        return value
    name = str(value).strip().lower().removeprefix("torch.")
    if name not in DTYPE_SPELLINGS:
        raise ValueError(f"unknown dtype {value!r}; use one of {', '.join(DTYPE_NAMES)}")
    return getattr(torch, DTYPE_SPELLINGS[name])


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> "bfloat16" (the long spelling, as manifests and configs store it)."""
    return str(parse_dtype(dtype)).removeprefix("torch.")
