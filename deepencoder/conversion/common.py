"""Pieces shared by the converters: config inference from tensor shapes, strict checking, model building."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import torch
from transformers import initialization as init

from ..configuration_deepencoder import DeepEncoderClipConfig, DeepEncoderConfig, DeepEncoderSamConfig
from ..modeling_deepencoder import DeepEncoderModel
from .io import CheckpointError
from .report import ConversionReport


def _count_layers(state_dict: dict[str, torch.Tensor], pattern: str) -> int:
    indices = {int(m.group(1)) for key in state_dict if (m := re.match(pattern, key))}
    return max(indices) + 1 if indices else 0


def sam_config_from_state_dict(
    state_dict: dict[str, torch.Tensor], prefix: str = "sam.", **overrides: Any
) -> DeepEncoderSamConfig:
    """Infer the SAM stage's architecture (width, depth, heads, global blocks, window) from tensor shapes."""
    proj = state_dict[f"{prefix}patch_embed.proj.weight"]  # (C, 3, p, p)
    hidden, channels, patch = proj.shape[0], proj.shape[1], proj.shape[2]
    depth = _count_layers(state_dict, rf"{re.escape(prefix)}blocks\.(\d+)\.")
    values: dict[str, Any] = {
        "hidden_size": hidden,
        "num_hidden_layers": depth,
        "patch_size": patch,
        "num_channels": channels,
    }
    pos = state_dict.get(f"{prefix}pos_embed")
    if pos is not None:
        values["image_size"] = pos.shape[1] * patch
    grid = values.get("image_size", 1024) // patch
    rel = [state_dict.get(f"{prefix}blocks.{i}.attn.rel_pos_h") for i in range(depth)]
    if all(r is not None for r in rel) and depth:
        head_dim = rel[0].shape[1]
        values["num_attention_heads"] = hidden // head_dim
        values["global_attn_indexes"] = [i for i, r in enumerate(rel) if r.shape[0] == 2 * grid - 1]
        windows = {(r.shape[0] + 1) // 2 for r in rel if r.shape[0] != 2 * grid - 1}
        if len(windows) == 1:
            values["window_size"] = windows.pop()
    else:
        values["use_rel_pos"] = False
    neck = state_dict.get(f"{prefix}neck.0.weight")
    if neck is not None:
        values["out_channels"] = neck.shape[0]
    mlp = state_dict.get(f"{prefix}blocks.0.mlp.lin1.weight")
    if mlp is not None:
        values["mlp_ratio"] = mlp.shape[0] / hidden
    compressor = []
    index = 2
    while f"{prefix}net_{index}.weight" in state_dict:
        compressor.append(state_dict[f"{prefix}net_{index}.weight"].shape[0])
        index += 1
    if compressor:
        values["compressor_channels"] = compressor
    values.update(overrides)
    return DeepEncoderSamConfig(**values)


def clip_config_from_state_dict(
    state_dict: dict[str, torch.Tensor], prefix: str = "clip.", **overrides: Any
) -> DeepEncoderClipConfig:
    """Infer the CLIP stage (width, depth, MLP width, position table) from tensor shapes. Heads cannot be read
    from a fused qkv: 64-wide heads are assumed (CLIP-L: 16) unless `num_attention_heads` is given."""
    hidden = state_dict[f"{prefix}embeddings.class_embedding"].shape[0]
    depth = _count_layers(state_dict, rf"{re.escape(prefix)}transformer\.layers\.(\d+)\.")
    values: dict[str, Any] = {
        "hidden_size": hidden,
        "num_hidden_layers": depth,
        "num_attention_heads": max(1, hidden // 64),
    }
    fc1 = state_dict.get(f"{prefix}transformer.layers.0.mlp.fc1.weight")
    if fc1 is not None:
        values["intermediate_size"] = fc1.shape[0]
    positions = state_dict[f"{prefix}embeddings.position_embedding.weight"].shape[0]
    grid = round((positions - 1) ** 0.5)
    if grid * grid + 1 != positions:
        raise CheckpointError(
            f"{prefix}embeddings.position_embedding.weight: {positions} rows is not 1 + a square grid"
        )
    patch = overrides.get("patch_size", 14)
    values["image_size"] = grid * patch
    values.update(overrides)
    return DeepEncoderClipConfig(**values)


KeyTable = Sequence[tuple[str, str]]


def map_keys(state_dict: dict[str, torch.Tensor], table: KeyTable) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Rename keys through an explicit table of (source regex, target template) pairs, matched in full (`\\1` in
    the template refers to the regex's groups). Returns the renamed tensors and the keys no row matched."""
    compiled = [(re.compile(pattern), target) for pattern, target in table]
    out: dict[str, torch.Tensor] = {}
    unmatched = []
    for key, tensor in state_dict.items():
        for pattern, target in compiled:
            match = pattern.fullmatch(key)
            if match:
                out[match.expand(target)] = tensor
                break
        else:
            unmatched.append(key)
    return out, unmatched


def map_stage_keys(
    state_dict: dict[str, torch.Tensor], table: KeyTable, source: str, stage: str, original: dict[str, str]
) -> dict[str, torch.Tensor]:
    """`map_keys` for one stage, strictly: any key no row matches is an error naming it as the source spelled it
    (`original`: mapped name -> source key)."""
    out, unmatched = map_keys(state_dict, table)
    if unmatched:
        raise CheckpointError(f"{source}: keys with no place in the {stage} stage: {[original[k] for k in unmatched]}")
    return out


def check_state_dict(
    model: torch.nn.Module,
    state_dict: dict[str, torch.Tensor],
    source: str,
    allow_missing: bool | Callable[[str], bool] = False,
) -> list[str]:
    """Strict key and shape check against the model. Returns the missing keys (allowed only with allow_missing:
    True for any key, or a predicate naming the keys that may be absent); raises CheckpointError naming the
    source and every offending key otherwise."""
    expected = model.state_dict()
    unexpected = sorted(set(state_dict) - set(expected))
    missing = sorted(set(expected) - set(state_dict))
    may_miss = allow_missing if callable(allow_missing) else (lambda key: bool(allow_missing))
    required = [key for key in missing if not may_miss(key)]
    mismatched = [
        f"{key}: {tuple(state_dict[key].shape)} in the checkpoint, model expects {tuple(expected[key].shape)}"
        for key in sorted(set(state_dict) & set(expected))
        if state_dict[key].shape != expected[key].shape
    ]
    problems = []
    if unexpected:
        problems.append(f"unexpected keys {unexpected}")
    if required:
        problems.append(f"missing keys {required}")
    if mismatched:
        problems.append("wrong shapes: " + "; ".join(mismatched))
    if problems:
        raise CheckpointError(f"{source}: " + " | ".join(problems))
    return missing


def build_model(
    config: DeepEncoderConfig,
    state_dict: dict[str, torch.Tensor],
    report: ConversionReport,
    dtype: torch.dtype | None = None,
    allow_missing: bool | Callable[[str], bool] = False,
) -> DeepEncoderModel:
    """Instantiate the model and load `state_dict` strictly. Keys the source lacks (allowed only where
    allow_missing says so: True, or a predicate on the key) keep a fresh model's initialisation and are listed in
    the report. dtype None keeps the checkpoint's dtype (fp32 when it mixes floating dtypes)."""
    if dtype is None:
        floating = {t.dtype for t in state_dict.values() if t.is_floating_point()}
        dtype = floating.pop() if len(floating) == 1 else torch.float32
    with init.no_init_weights():  # every parameter is then either loaded or initialised below, never both
        model = DeepEncoderModel(config)
    missing = check_state_dict(model, state_dict, report.source, allow_missing=allow_missing)
    if missing:
        # initialise the modules owning a missing key exactly as a fresh model's `post_init` would, then load the
        # checkpoint (again over any provided tensor that a parent module's initialisation touched)
        owners = {key.rpartition(".")[0] for key in missing}
        for owner in sorted(owners):
            model._init_weights(model.get_submodule(owner))
    model.load_state_dict(state_dict, strict=False)
    report.initialised = sorted(missing)
    report.converted = sorted(state_dict)
    return model.to(dtype).eval()
