"""Freezing and unfreezing parts of a tower by name, and a summary of what trains.

Each tower declares its parts as data (a `FreezeTargets` table on the model class, `_freeze_targets`); the
functions here resolve dotted targets against it. For DeepEncoder v1 (`DeepEncoderModel`):

| target | parameters |
|---|---|
| `sam` | the whole SAM stage (patch embed, pos-embed, blocks, neck, compressor) |
| `sam.patch_embed`, `sam.pos_embed`, `sam.neck`, `sam.compressor` | those parts (`compressor` = `net_2`, `net_3`) |
| `sam.blocks`, `sam.blocks.3`, `sam.blocks.0-5` | all ViT blocks, one block, an inclusive range (`5-`: to the end) |
| `clip` | the whole CLIP stage |
| `clip.embeddings`, `clip.pre_layrnorm` | CLS + position table, the input LayerNorm |
| `clip.layers`, `clip.layers.7`, `clip.layers.12-23` | transformer layers, one, an inclusive range |
| `projector` | the 2048 -> D projector and the two layout embeddings (`image_newline`, `view_separator`) |
| any parameter-name prefix | e.g. `sam.blocks.2.attn.rel_pos_h` |

`blocks=range(0, 6)` restricts a stage with numbered blocks to those indices (`freeze("sam", blocks=range(6))` ==
`freeze("sam.blocks.0-5")`). Targets resolve inside wrappers too (PEFT, a VLM holding the tower as `vision`).
Part of the model layer: importing it pulls in no training stack.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from torch import nn


@dataclass(frozen=True)
class FreezeTargets:
    """A tower's named parts.

    roots: top-level parameter-name roots of the tower (`sam.`, `clip.`, `projector.`, `image_newline` ...), used to
        find the tower's names inside wrappers. ranges: numbered-block targets -> parameter prefix before the index
        (`"sam.blocks": "sam.blocks."`); a stage name mapping to the same prefix makes `blocks=` apply to it.
    aliases: target -> parameter-name prefixes. summary: row label -> prefixes, in order, for `trainable_summary`.
    """

    roots: tuple[str, ...]
    ranges: dict[str, str]
    aliases: dict[str, tuple[str, ...]]
    summary: dict[str, tuple[str, ...]]

    def strip(self, name: str) -> str:
        """Parameter name relative to the tower, also inside wrappers (`base_model.model.`, `vision.`)."""
        for marker in self.roots:
            index = name.find(marker)
            if index == 0 or (index > 0 and name[index - 1] == "."):
                return name[index:]
        return name

    def prefixes(self, target: str, blocks: Iterable[int] | None) -> list[str]:
        """A target -> parameter-name prefixes relative to the tower."""
        target = target.strip().rstrip(".")
        if blocks is not None:
            if target not in self.ranges:
                raise ValueError(f"blocks= applies to {sorted(self.ranges)}, not {target!r}")
            return [f"{self.ranges[target]}{int(i)}." for i in blocks]
        stage, _, spec = target.rpartition(".")
        match = re.fullmatch(r"(?P<start>\d+)(?P<dash>-(?P<stop>\d+)?)?", spec)
        if stage in self.ranges and match:
            start = int(match["start"])
            stop = int(match["stop"]) if match["stop"] is not None else (10**4 if match["dash"] else start)
            if stop < start:
                raise ValueError(f"empty block range in {target!r}")
            return [f"{self.ranges[stage]}{i}." for i in range(start, stop + 1)]
        if target in self.aliases:
            return list(self.aliases[target])
        return [target]


def find_targets(model: nn.Module) -> FreezeTargets:
    """The target table of the tower `model` is or holds (a PEFT or VLM wrapper's tower)."""
    for module in model.modules():
        targets = getattr(type(module), "_freeze_targets", None)
        if targets is not None:
            return targets
    raise ValueError(f"{type(model).__name__} holds no DeepEncoder tower to freeze parts of")


def _matches(name: str, prefix: str) -> bool:
    """`prefix` names `name` itself, a module above it (dotted), or ends in `.`/`_` and starts it."""
    if prefix.endswith((".", "_")):
        return name.startswith(prefix)
    return name == prefix or name.startswith(prefix + ".")


def _select(model: nn.Module, targets: Sequence[str], blocks: Iterable[int] | None) -> list[tuple[str, nn.Parameter]]:
    if not targets:
        return list(model.named_parameters())
    table = find_targets(model)
    blocks = list(blocks) if blocks is not None else None
    chosen: dict[str, nn.Parameter] = {}
    for target in targets:
        prefixes = table.prefixes(target, blocks)
        hits = [
            (name, param)
            for name, param in model.named_parameters()
            if any(_matches(table.strip(name), prefix) for prefix in prefixes)
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
    """Count parameters per part (the tower's summary rows; adapter weights under `lora`, the rest under `other`)."""
    table = find_targets(model)
    counts: dict[str, list[int]] = {label: [0, 0] for label in (*table.summary, "lora", "other")}
    for name, param in model.named_parameters():
        relative = table.strip(name)
        if "lora_" in name:
            label = "lora"
        else:
            label = next((lab for lab, prefixes in table.summary.items() if relative.startswith(prefixes)), "other")
        counts[label][0] += param.numel() if param.requires_grad else 0
        counts[label][1] += param.numel()
    rows = [(label, t, n) for label, (t, n) in counts.items() if n]
    return TrainableSummary(rows, sum(r[1] for r in rows), sum(r[2] for r in rows))


class FreezingMixin:
    """`freeze` / `unfreeze` / `trainable_summary` methods for a tower class that sets `_freeze_targets`."""

    _freeze_targets: FreezeTargets

    def freeze(self, *targets: str, blocks: Sequence[int] | range | None = None) -> int:
        """Stop gradients for parts of the tower: `freeze("sam")`, `freeze("sam.blocks.0-5")`,
        `freeze("sam", blocks=range(6))`, `freeze()` (everything); targets in `deepencoder.freezing`. Returns the
        number of tensors changed."""
        return freeze(self, *targets, blocks=blocks)

    def unfreeze(self, *targets: str, blocks: Sequence[int] | range | None = None) -> int:
        """Inverse of `freeze`, same targets."""
        return unfreeze(self, *targets, blocks=blocks)

    def trainable_summary(self) -> TrainableSummary:
        """Trainable / total parameters per part (`print()` it for a table)."""
        return trainable_summary(self)
