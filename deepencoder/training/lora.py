"""LoRA through PEFT: target-module patterns for each stage, and merging adapters back into a plain tower.

`LORA_TARGETS[stage]` is a regular expression PEFT matches (`re.fullmatch`) against full module names, so it
works on a bare `DeepEncoderModel` and on the tower nested in a larger model (e.g. `vision.sam.blocks.0.attn.qkv`):

| key | modules |
|---|---|
| `sam` | `sam.blocks.*.attn.qkv`, `attn.proj`, `mlp.lin1`, `mlp.lin2` |
| `clip` | `clip.transformer.layers.*.self_attn.qkv_proj`, `self_attn.out_proj`, `mlp.fc1`, `mlp.fc2` |
| `sam_attention`, `clip_attention` | the attention linears only |
| `all` | both stages' attention and MLP linears |
| `encoder` (DeepEncoder V2) | `encoder.layers.*.self_attn.q_proj`, `k_proj`, `v_proj`, `o_proj`, `mlp.gate_proj`, `up_proj`, `down_proj` |
| `encoder_attention` | the V2 encoder's attention linears only |

```python
from peft import LoraConfig, get_peft_model
peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=LORA_TARGETS["sam"]))
```
"""

from __future__ import annotations

import os

from torch import nn

_SAM_ATTN = r"sam\.blocks\.\d+\.attn\.(qkv|proj)"
_SAM_MLP = r"sam\.blocks\.\d+\.mlp\.(lin1|lin2)"
_CLIP_ATTN = r"clip\.transformer\.layers\.\d+\.self_attn\.(qkv_proj|out_proj)"
_CLIP_MLP = r"clip\.transformer\.layers\.\d+\.mlp\.(fc1|fc2)"
_ENCODER_ATTN = r"encoder\.layers\.\d+\.self_attn\.(q_proj|k_proj|v_proj|o_proj)"
_ENCODER_MLP = r"encoder\.layers\.\d+\.mlp\.(gate_proj|up_proj|down_proj)"


def _pattern(*parts: str) -> str:
    return r"(.*\.)?(" + "|".join(parts) + ")"


LORA_TARGETS: dict[str, str] = {
    "sam": _pattern(_SAM_ATTN, _SAM_MLP),
    "clip": _pattern(_CLIP_ATTN, _CLIP_MLP),
    "sam_attention": _pattern(_SAM_ATTN),
    "clip_attention": _pattern(_CLIP_ATTN),
    "all": _pattern(_SAM_ATTN, _SAM_MLP, _CLIP_ATTN, _CLIP_MLP),
    "encoder": _pattern(_ENCODER_ATTN, _ENCODER_MLP),
    "encoder_attention": _pattern(_ENCODER_ATTN),
}


def lora_targets(*stages: str) -> str:
    """Union of `LORA_TARGETS` entries, e.g. `lora_targets("sam_attention", "clip")`."""
    unknown = [s for s in stages if s not in LORA_TARGETS]
    if unknown or not stages:
        raise ValueError(f"unknown LoRA target set(s) {unknown}; choose from {sorted(LORA_TARGETS)}")
    return "|".join(f"({LORA_TARGETS[s]})" for s in stages)


def apply_lora(
    model: nn.Module, stages: str | list[str] = "sam", r: int = 8, alpha: int = 16, dropout: float = 0.0, **lora_kwargs
):
    """`peft.get_peft_model` on `model` with `LORA_TARGETS` for `stages`; everything else is frozen."""
    from peft import LoraConfig, get_peft_model

    stages = [stages] if isinstance(stages, str) else list(stages)
    config = LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=lora_targets(*stages), **lora_kwargs
    )
    return get_peft_model(model, config)


def merge_lora(
    base: str | os.PathLike | nn.Module, adapter_dir: str | os.PathLike, output_dir: str | os.PathLike | None = None
):
    """Load a LoRA adapter onto a tower (a `save_pretrained` directory of either tower, or a model), merge it into
    the weights and return the plain tower; with `output_dir`, also `save_pretrained` it there (a directory
    `AutoModel.from_pretrained` reads with no PEFT installed)."""
    from peft import PeftModel
    from transformers import AutoModel

    model = AutoModel.from_pretrained(base) if isinstance(base, (str, os.PathLike)) else base
    merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    if output_dir is not None:
        merged.save_pretrained(output_dir)
    return merged
