"""Pieces shared by the converters: explicit key tables (regex rows, and two-way templates), q/k/v fusing and
splitting, strict checking and model building; the v1 family (`DeepEncoderModel`) with its config inference from
tensor shapes."""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

import torch
from transformers import PretrainedConfig, PreTrainedModel
from transformers import initialization as init

from ..configuration_deepencoder import DeepEncoderClipConfig, DeepEncoderConfig, DeepEncoderSamConfig
from ..modeling_deepencoder import DeepEncoderModel
from .formats import ModelFamily, StateDict
from .io import CheckpointError
from .report import ConversionReport

KeyTable = Sequence[tuple[str, str]]
# two-way tables: (our name, their name) templates; `{i}` is a layer index, `{w}` a Linear / norm parameter
TemplateTable = Sequence[tuple[str, str]]
# a fused tensor and its parts, concatenated along dim 0 in this order: (fused template, part templates)
FusedTable = Sequence[tuple[str, tuple[str, ...]]]
PLACEHOLDERS = {"i": r"\d+", "w": r"weight|bias"}

# transformers' SAM stage as both of its ports of these towers name it (`UnlimitedOcrModel`, `DeepseekOcr2Model`):
# (our name, theirs)
TRANSFORMERS_TOWER = "vision_tower."
TRANSFORMERS_SAM = TRANSFORMERS_TOWER + "sam_encoder"
TRANSFORMERS_SAM_MAP: TemplateTable = (
    ("sam.patch_embed.proj.{w}", f"{TRANSFORMERS_SAM}.patch_embed.projection.{{w}}"),
    ("sam.pos_embed", f"{TRANSFORMERS_SAM}.pos_embed"),
    ("sam.blocks.{i}.norm1.{w}", f"{TRANSFORMERS_SAM}.layers.{{i}}.layer_norm1.{{w}}"),
    ("sam.blocks.{i}.norm2.{w}", f"{TRANSFORMERS_SAM}.layers.{{i}}.layer_norm2.{{w}}"),
    ("sam.blocks.{i}.attn.qkv.{w}", f"{TRANSFORMERS_SAM}.layers.{{i}}.attn.qkv.{{w}}"),
    ("sam.blocks.{i}.attn.proj.{w}", f"{TRANSFORMERS_SAM}.layers.{{i}}.attn.proj.{{w}}"),
    ("sam.blocks.{i}.attn.rel_pos_h", f"{TRANSFORMERS_SAM}.layers.{{i}}.attn.rel_pos_h"),
    ("sam.blocks.{i}.attn.rel_pos_w", f"{TRANSFORMERS_SAM}.layers.{{i}}.attn.rel_pos_w"),
    ("sam.blocks.{i}.mlp.lin1.{w}", f"{TRANSFORMERS_SAM}.layers.{{i}}.mlp.lin1.{{w}}"),
    ("sam.blocks.{i}.mlp.lin2.{w}", f"{TRANSFORMERS_SAM}.layers.{{i}}.mlp.lin2.{{w}}"),
    ("sam.neck.0.weight", f"{TRANSFORMERS_SAM}.neck.conv1.weight"),
    ("sam.neck.1.{w}", f"{TRANSFORMERS_SAM}.neck.layer_norm1.{{w}}"),
    ("sam.neck.2.weight", f"{TRANSFORMERS_SAM}.neck.conv2.weight"),
    ("sam.neck.3.{w}", f"{TRANSFORMERS_SAM}.neck.layer_norm2.{{w}}"),
    ("sam.net_2.weight", f"{TRANSFORMERS_SAM}.proj.conv1.weight"),
    ("sam.net_3.weight", f"{TRANSFORMERS_SAM}.proj.conv2.weight"),
)


def _template_regex(template: str) -> str:
    parts = re.split(r"\{(\w+)\}", template)
    return "".join(f"(?P<{p}>{PLACEHOLDERS[p]})" if n % 2 else re.escape(p) for n, p in enumerate(parts))


def _template_expansion(template: str) -> str:
    parts = re.split(r"\{(\w+)\}", template)
    return "".join(rf"\g<{p}>" if n % 2 else p for n, p in enumerate(parts))


def transformers_canonical(keys: Collection[str]) -> Callable[[str], str]:
    """`canonical` for transformers' ports (`UnlimitedOcr*`, `DeepseekOcr2*`): any of the three classes' state dicts
    read as the base model's (`...Model`): `model.` dropped (conditional generation), `vision_tower.` added (a bare
    `...VisionModel`)."""
    if any(key.startswith("model." + TRANSFORMERS_TOWER) for key in keys):
        return lambda key: key[len("model.") :] if key.startswith("model.") else key
    if not any(key.startswith(TRANSFORMERS_TOWER) for key in keys):
        return lambda key: TRANSFORMERS_TOWER + key
    return lambda key: key


def template_table(table: TemplateTable, *, ours_to_theirs: bool) -> KeyTable:
    """A two-way template table as (regex, expansion) rows for `map_keys`, in the direction asked."""
    rows = []
    for ours, theirs in table:
        source, target = (ours, theirs) if ours_to_theirs else (theirs, ours)
        rows.append((_template_regex(source), _template_expansion(target)))
    return tuple(rows)


def map_keys(state_dict: StateDict, table: KeyTable) -> tuple[StateDict, list[str]]:
    """Rename keys through an explicit table of (source regex, target template) pairs, matched in full (`\\1` or
    `\\g<name>` in the template refer to the regex's groups). Returns the renamed tensors and the keys no row
    matched."""
    compiled = [(re.compile(pattern), target) for pattern, target in table]
    out: StateDict = {}
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


def map_stage_keys(state_dict: StateDict, table: KeyTable, source: str, stage: str, prefix: str = "") -> StateDict:
    """`map_keys` for one stage, strictly: any key no row matches is an error naming it. `prefix`: the tower's
    prefix in the checkpoint, in front of every row of `table`."""
    rows = [(re.escape(prefix) + pattern, target) for pattern, target in table]
    out, unmatched = map_keys(state_dict, rows)
    if unmatched:
        raise CheckpointError(f"{source}: keys with no place in the {stage} stage: {unmatched}")
    return out


def fuse_keys(state_dict: StateDict, table: FusedTable, source: str) -> StateDict:
    """Concatenate (dim 0, in the table's order) the separate tensors each row names into the fused one; the parts
    are removed from `state_dict`. A group lacking a part is an error naming the missing key."""
    fused: StateDict = {}
    for target, parts in table:
        groups: dict[str, dict[int, re.Match]] = {}
        for index, part in enumerate(parts):
            regex = re.compile(_template_regex(part))
            for key in state_dict:
                match = regex.fullmatch(key)
                if match:
                    groups.setdefault(match.expand(_template_expansion(target)), {})[index] = match
        for name, found in sorted(groups.items()):
            absent = [i for i in range(len(parts)) if i not in found]
            if absent:
                some = next(iter(found.values()))
                missing = [some.expand(_template_expansion(parts[i])) for i in absent]
                raise CheckpointError(f"{source}: {some.string} has no {missing} beside it to fuse into {name}")
            fused[name] = torch.cat([state_dict.pop(found[i].string) for i in range(len(parts))], dim=0)
    return fused


def split_keys(state_dict: StateDict, table: FusedTable) -> StateDict:
    """The inverse of `fuse_keys`: each fused tensor (removed from `state_dict`) -> its equal-sized parts."""
    parts_out: StateDict = {}
    for target, parts in table:
        regex = re.compile(_template_regex(target))
        for key in [k for k in state_dict if regex.fullmatch(k)]:
            match = regex.fullmatch(key)
            for part, tensor in zip(parts, state_dict.pop(key).chunk(len(parts), dim=0)):
                parts_out[match.expand(_template_expansion(part))] = tensor
    return parts_out


def check_state_dict(
    model: torch.nn.Module,
    state_dict: StateDict,
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


def instantiate(
    model_class: type[PreTrainedModel],
    config: PretrainedConfig,
    state_dict: StateDict,
    report: ConversionReport,
    dtype: torch.dtype | None = None,
    allow_missing: bool | Callable[[str], bool] = False,
    device: str | torch.device | None = None,
) -> PreTrainedModel:
    """Instantiate `model_class(config)` and load `state_dict` strictly. Keys the source lacks (allowed only where
    allow_missing says so: True, or a predicate on the key) keep a fresh model's initialisation and are listed in
    the report. dtype None keeps the checkpoint's dtype (fp32 when it mixes floating dtypes). device: where the
    model is built (default the CPU): the checkpoint's tensors are copied straight into it there, never into a host
    copy that is moved afterwards."""
    if dtype is None:
        floating = {t.dtype for t in state_dict.values() if t.is_floating_point()}
        dtype = floating.pop() if len(floating) == 1 else torch.float32
    # every parameter is then either loaded or initialised below, never both
    with init.no_init_weights(), torch.device(device if device is not None else "cpu"):
        model = model_class(config)
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


# ------------------------------------------------------------------------------------------ the v1 family
# what a source's config file may state about each stage, beyond what the tensor shapes show (a kernel choice such
# as the rel-pos attention variant is not architecture and is never taken from a source)
SAM_KEYS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "mlp_ratio",
    "patch_size",
    "num_channels",
    "image_size",
    "window_size",
    "global_attn_indexes",
    "layer_norm_eps",
    "qkv_bias",
    "use_rel_pos",
    "use_abs_pos",
    "out_channels",
    "compressor_channels",
)
CLIP_KEYS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "hidden_act",
    "layer_norm_eps",
    "pre_layernorm_eps",
    "image_size",
    "patch_size",
)
TOP_KEYS = ("projector_dim", "projector_bias")


def count_layers(state_dict: StateDict, pattern: str) -> int:
    """1 + the largest index captured by `pattern`'s first group over the keys (0 when none match)."""
    indices = {int(m.group(1)) for key in state_dict if (m := re.match(pattern, key))}
    return max(indices) + 1 if indices else 0


def _fill(values: dict[str, Any], stated: Mapping[str, Any] | None, keys: Sequence[str]) -> None:
    """Stated values for what the shapes did not determine."""
    for key, value in (stated or {}).items():
        if key in keys:
            values.setdefault(key, value)


def sam_config_from_state_dict(
    state_dict: StateDict, prefix: str = "sam.", stated: Mapping[str, Any] | None = None, **overrides: Any
) -> DeepEncoderSamConfig:
    """The SAM stage's architecture (width, depth, heads, global blocks, window, neck, compressor) from tensor
    shapes; `stated` (a config file's values) for what shapes leave open; `overrides` win."""
    proj = state_dict[f"{prefix}patch_embed.proj.weight"]  # (C, 3, p, p)
    hidden, channels, patch = proj.shape[0], proj.shape[1], proj.shape[2]
    depth = count_layers(state_dict, rf"{re.escape(prefix)}blocks\.(\d+)\.")
    values: dict[str, Any] = {
        "hidden_size": hidden,
        "num_hidden_layers": depth,
        "patch_size": patch,
        "num_channels": channels,
    }
    pos = state_dict.get(f"{prefix}pos_embed")
    if pos is not None:
        values["image_size"] = pos.shape[1] * patch
    grid = (values.get("image_size") or (stated or {}).get("image_size", 1024)) // patch
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
    _fill(values, stated, SAM_KEYS)
    values.update(overrides)
    return DeepEncoderSamConfig(**values)


def clip_config_from_state_dict(
    state_dict: StateDict, prefix: str = "clip.", stated: Mapping[str, Any] | None = None, **overrides: Any
) -> DeepEncoderClipConfig:
    """The CLIP stage (width, depth, MLP width, position table) from tensor shapes; `stated` for what shapes leave
    open. Heads cannot be read from a fused qkv: unless stated or given, 64-wide heads are assumed (CLIP-L: 16)."""
    hidden = state_dict[f"{prefix}embeddings.class_embedding"].shape[0]
    depth = count_layers(state_dict, rf"{re.escape(prefix)}transformer\.layers\.(\d+)\.")
    values: dict[str, Any] = {"hidden_size": hidden, "num_hidden_layers": depth}
    fc1 = state_dict.get(f"{prefix}transformer.layers.0.mlp.fc1.weight")
    if fc1 is not None:
        values["intermediate_size"] = fc1.shape[0]
    positions = state_dict[f"{prefix}embeddings.position_embedding.weight"].shape[0]
    grid = round((positions - 1) ** 0.5)
    if grid * grid + 1 != positions:
        raise CheckpointError(
            f"{prefix}embeddings.position_embedding.weight: {positions} rows is not 1 + a square grid"
        )
    _fill(values, stated, ("num_attention_heads", "hidden_act", "layer_norm_eps", "pre_layernorm_eps", "patch_size"))
    values.setdefault("num_attention_heads", max(1, hidden // 64))
    values["image_size"] = grid * overrides.get("patch_size", values.get("patch_size", 14))
    values.update(overrides)
    return DeepEncoderClipConfig(**values)


def deepencoder_config_from_state_dict(
    state_dict: StateDict, stated: Mapping[str, Any], overrides: Mapping[str, Any]
) -> DeepEncoderConfig:
    """`DeepEncoderConfig` for the v1 tower: each stage present in `state_dict` from its shapes (then `stated`, a
    config file's `sam_config` / `clip_config` / top-level values, then `overrides` in the same vocabulary); a stage
    absent takes the released tower's config with `stated` and `overrides` applied. Without a compressor in the
    tensors, its widths default to (CLIP width / 2, CLIP width), 512 and 1024 for CLIP-L, as in DeepEncoder."""
    overrides = dict(overrides)
    sam_stated, clip_stated = stated.get("sam_config") or {}, stated.get("clip_config") or {}
    sam_overrides = dict(overrides.pop("sam_config", None) or {})
    clip_overrides = dict(overrides.pop("clip_config", None) or {})
    if any(key.startswith("clip.") for key in state_dict):
        clip = clip_config_from_state_dict(state_dict, stated=clip_stated, **clip_overrides)
    else:
        clip = DeepEncoderClipConfig(**{**{k: v for k, v in clip_stated.items() if k in CLIP_KEYS}, **clip_overrides})
    if not any(key.startswith("sam.net_") for key in state_dict):
        sam_overrides.setdefault("compressor_channels", [clip.hidden_size // 2, clip.hidden_size])
    if any(key.startswith("sam.") for key in state_dict):
        sam = sam_config_from_state_dict(state_dict, stated=sam_stated, **sam_overrides)
    else:
        sam = DeepEncoderSamConfig(**{**{k: v for k, v in sam_stated.items() if k in SAM_KEYS}, **sam_overrides})
    top = {k: v for k, v in stated.items() if k in TOP_KEYS}
    projector = state_dict.get("projector.weight")
    if projector is not None:
        top.update(projector_dim=projector.shape[0], projector_bias="projector.bias" in state_dict)
    return DeepEncoderConfig(sam_config=sam, clip_config=clip, **{**top, **overrides})


DEEPENCODER = ModelFamily(
    name="deepencoder",
    model_class=DeepEncoderModel,
    stages=frozenset({"sam", "clip", "projector"}),
    config_from_state_dict=deepencoder_config_from_state_dict,
)
# the keys of each v1 stage (`projector`: the projector, the newline and the view separator)
STAGE_OF: dict[str, Callable[[str], bool]] = {
    "sam": lambda key: key.startswith("sam."),
    "clip": lambda key: key.startswith("clip."),
    "projector": lambda key: not key.startswith(("sam.", "clip.")),
}
