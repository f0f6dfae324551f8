"""Freezing and unfreezing parts of the tower by name, and a summary of what trains.

Targets are dotted names resolved against `DeepEncoderModel`:

| target | parameters |
|---|---|
| `sam` | the whole SAM stage (patch embed, pos-embed, blocks, neck, compressor) |
| `sam.patch_embed`, `sam.pos_embed`, `sam.neck`, `sam.compressor` | those parts (`compressor` = `net_2`, `net_3`) |
| `sam.blocks`, `sam.blocks.3`, `sam.blocks.0-5` | all ViT blocks, one block, an inclusive range |
| `clip` | the whole CLIP stage |
| `clip.embeddings`, `clip.pre_layrnorm` | CLS + position table, the input LayerNorm |
| `clip.layers`, `clip.layers.7`, `clip.layers.12-23` | transformer layers, one, an inclusive range |
| `projector` | the 2048 -> D projector and the two layout embeddings (`image_newline`, `view_separator`) |
| any parameter-name prefix | e.g. `sam.blocks.2.attn.rel_pos_h` |

`blocks=range(0, 6)` restricts `sam` / `clip` to those block indices (`freeze("sam", blocks=range(6))` ==
`freeze("sam.blocks.0-5")`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from torch import nn

_RANGE = re.compile(r"^(?P<stage>sam\.blocks|clip\.layers)\.(?P<start>\d+)(?:-(?P<stop>\d+)?)?$")
_ALIASES = {
    "sam.compressor": ("sam.net_",),
    "clip.layers": ("clip.transformer.layers.",),
    "projector": ("projector.", "image_newline", "view_separator"),
    "layout": ("image_newline", "view_separator"),
}
_BLOCK_PREFIX = {
    "sam": "sam.blocks.",
    "clip": "clip.transformer.layers.",
    "sam.blocks": "sam.blocks.",
    "clip.layers": "clip.transformer.layers.",
}
# summary rows: label -> prefixes, in order
SUMMARY_GROUPS: dict[str, tuple[str, ...]] = {
    "sam.patch_embed+pos_embed": ("sam.patch_embed.", "sam.pos_embed"),
    "sam.blocks": ("sam.blocks.",),
    "sam.neck": ("sam.neck.",),
    "sam.compressor": ("sam.net_",),
    "clip.embeddings+pre_layrnorm": ("clip.embeddings.", "clip.pre_layrnorm."),
    "clip.layers": ("clip.transformer.layers.",),
    "projector+layout": ("projector.", "image_newline", "view_separator"),
}


def _strip(name: str) -> str:
    """Parameter name relative to the tower, also inside PEFT or VLM wrappers (`base_model.model.`, `vision.`)."""
    for marker in ("sam.", "clip.", "projector.", "image_newline", "view_separator"):
        index = name.find(marker)
        if index == 0 or (index > 0 and name[index - 1] == "."):
            return name[index:]
    return name


def _prefixes(target: str, blocks: Iterable[int] | None) -> list[str]:
    """A target (see module docstring) -> parameter-name prefixes relative to the tower."""
    target = target.strip().rstrip(".")
    if blocks is not None:
        if target not in _BLOCK_PREFIX:
            raise ValueError(f"blocks= applies to 'sam', 'clip', 'sam.blocks' or 'clip.layers', not {target!r}")
        return [f"{_BLOCK_PREFIX[target]}{int(i)}." for i in blocks]
    match = _RANGE.match(target)
    if match:
        start = int(match["start"])
        if match.group(0).endswith("-") or match["stop"] is not None:
            stop = int(match["stop"]) if match["stop"] is not None else 10**6
        else:
            stop = start
        if stop < start:
            raise ValueError(f"empty block range in {target!r}")
        return [f"{_BLOCK_PREFIX[match['stage']]}{i}." for i in range(start, min(stop, 10**4) + 1)]
    if target in _ALIASES:
        return list(_ALIASES[target])
    return [target]


def _matches(name: str, prefix: str) -> bool:
    """`prefix` names `name` itself, a module above it (dotted), or ends in `.`/`_` and starts it."""
    if prefix.endswith((".", "_")):
        return name.startswith(prefix)
    return name == prefix or name.startswith(prefix + ".")


def _select(model: nn.Module, targets: tuple[str, ...], blocks: Iterable[int] | None) -> list[tuple[str, nn.Parameter]]:
    if not targets:
        return list(model.named_parameters())
    blocks = list(blocks) if blocks is not None else None
    chosen: dict[str, nn.Parameter] = {}
    for target in targets:
        prefixes = _prefixes(target, blocks)
        hits = [
            (name, param)
            for name, param in model.named_parameters()
            if any(_matches(_strip(name), prefix) for prefix in prefixes)
        ]
        if not hits:
            raise ValueError(f"freeze/unfreeze target {target!r} (blocks={blocks}) matches no parameter")
        chosen.update(hits)
    return list(chosen.items())


def set_trainable(
    model: nn.Module, *targets: str, trainable: bool, blocks: Iterable[int] | None = None, include_lora: bool = False
) -> int:
    """Set `requires_grad` on the parameters named by `targets` (all parameters when none). Returns how many
    tensors changed. PEFT adapter weights (`lora_`) are left alone unless `include_lora`."""
    changed = 0
    for name, param in _select(model, targets, blocks):
        if "lora_" in name and not include_lora:
            continue
        if param.requires_grad != trainable:
            changed += 1
        param.requires_grad_(trainable)
    return changed


def freeze(model: nn.Module, *targets: str, blocks: Iterable[int] | None = None) -> int:
    """`freeze(model, "sam")`, `freeze(model, "sam.blocks.0-5", "clip.embeddings")`, `freeze(model)` (all)."""
    return set_trainable(model, *targets, trainable=False, blocks=blocks)


def unfreeze(model: nn.Module, *targets: str, blocks: Iterable[int] | None = None) -> int:
    """Inverse of `freeze` with the same targets."""
    return set_trainable(model, *targets, trainable=True, blocks=blocks)


@dataclass
class TrainableSummary:
    """Trainable / total parameter counts per part of the tower (`rows`), plus the totals."""

    rows: list[tuple[str, int, int]] = field(default_factory=list)
    trainable: int = 0
    total: int = 0

    def __str__(self) -> str:
        width = max([len(r[0]) for r in self.rows] + [5])
        lines = [f"{'part':<{width}}  {'trainable':>12}  {'total':>12}"]
        for label, trainable, total in self.rows:
            lines.append(f"{label:<{width}}  {trainable:>12,}  {total:>12,}")
        share = 100 * self.trainable / max(self.total, 1)
        lines.append(f"{'all':<{width}}  {self.trainable:>12,}  {self.total:>12,}  ({share:.2f}% trainable)")
        return "\n".join(lines)


def trainable_summary(model: nn.Module) -> TrainableSummary:
    """Count parameters per part (`SUMMARY_GROUPS`; adapter weights under `lora`, anything else under `other`)."""
    counts: dict[str, list[int]] = {label: [0, 0] for label in (*SUMMARY_GROUPS, "lora", "other")}
    for name, param in model.named_parameters():
        relative = _strip(name)
        if "lora_" in name:
            label = "lora"
        else:
            label = next((lab for lab, prefixes in SUMMARY_GROUPS.items() if relative.startswith(prefixes)), "other")
        counts[label][0] += param.numel() if param.requires_grad else 0
        counts[label][1] += param.numel()
    rows = [(label, t, n) for label, (t, n) in counts.items() if n]
    return TrainableSummary(rows, sum(r[1] for r in rows), sum(r[2] for r in rows))
