"""The one report type every conversion returns."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ConversionReport:
    """What a conversion did, key by key (target-side names unless stated).

    converted: keys written from the source. dropped: source keys deliberately not used, with the reason.
    initialised: target keys absent from the source, left as a freshly initialised model has them.
    licences: `source: licence` of the weights usually published in each source's format (for the model card).
    """

    source: str = ""
    converted: list[str] = field(default_factory=list)
    dropped: dict[str, str] = field(default_factory=dict)
    initialised: list[str] = field(default_factory=list)
    licences: list[str] = field(default_factory=list)

    def summary(self) -> str:
        lines = [
            f"source: {self.source or '?'}",
            f"converted: {len(self.converted)} tensors",
            f"dropped: {len(self.dropped)}",
        ]
        lines += [f"  - {key}: {why}" for key, why in sorted(self.dropped.items())]
        lines.append(f"initialised (not in the source): {len(self.initialised)}")
        lines += [f"  - {key}" for key in summarise_keys(self.initialised)]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "source": self.source,
            "converted": sorted(self.converted),
            "dropped": dict(sorted(self.dropped.items())),
            "initialised": sorted(self.initialised),
            "licences": list(self.licences),
        }


def summarise_keys(keys: list[str]) -> list[str]:
    """Group keys by their first two dotted components for a readable report (`clip.transformer.*: 388 keys`)."""
    groups: dict[str, int] = {}
    for key in sorted(keys):
        parts = key.split(".")
        head = ".".join(parts[:2]) + (".*" if len(parts) > 2 else "")
        groups[head] = groups.get(head, 0) + 1
    return [f"{head}: {n} key{'s' if n > 1 else ''}" if head.endswith("*") else head for head, n in groups.items()]
