"""One dtype vocabulary for every command and config: `bf16` / `bfloat16`, `fp16` / `float16` / `half`,
`fp32` / `float32` / `float`, and torch dtypes themselves."""

from __future__ import annotations

import torch

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}
# spellings a command line offers (argparse `choices`), short and long
DTYPE_NAMES: tuple[str, ...] = ("fp32", "float32", "bf16", "bfloat16", "fp16", "float16")


def parse_dtype(value: str | torch.dtype) -> torch.dtype:
    """`"bf16"`, `"bfloat16"`, `"torch.bfloat16"` or `torch.bfloat16` -> torch.bfloat16 (case-insensitive)."""
    if isinstance(value, torch.dtype):
        if value not in DTYPES.values():
            raise ValueError(f"unsupported dtype {value}; use one of {', '.join(DTYPE_NAMES)}")
        return value
    name = str(value).strip().lower().removeprefix("torch.")
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {value!r}; use one of {', '.join(DTYPE_NAMES)}")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> "bfloat16" (the long spelling, as manifests and configs store it)."""
    return str(parse_dtype(dtype)).removeprefix("torch.")
