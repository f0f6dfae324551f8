"""Write a converted model as a complete `save_pretrained` directory: config, safetensors weights, processor
config, the conversion report and a short model card."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..image_processing_deepencoder import DeepEncoderImageProcessor
from ..modeling_deepencoder import DeepEncoderModel
from .report import ConversionReport, summarise_keys


def save_converted(
    model: DeepEncoderModel,
    report: ConversionReport,
    output_dir: str | Path,
    *,
    dtype: torch.dtype | None = None,
    max_shard_size: str | int = "5GB",
    source_description: str = "",
    processor: DeepEncoderImageProcessor | None = None,
) -> Path:
    """Write `model` as a `save_pretrained` directory that `DeepEncoderModel.from_pretrained` and (after
    `import deepencoder`) `AutoModel.from_pretrained` load: config.json, model.safetensors (sharded with an index
    above `max_shard_size`), the image processor's config, conversion_report.json and a README.md model card.
    dtype: cast before saving (None keeps the model's)."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(output_dir, max_shard_size=max_shard_size, safe_serialization=True)
    (processor or DeepEncoderImageProcessor()).save_pretrained(output_dir)
    (output_dir / "conversion_report.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    (output_dir / "README.md").write_text(model_card(model, report, source_description))
    return output_dir


def model_card(model: DeepEncoderModel, report: ConversionReport, source: str) -> str:
    sam, clip = model.config.sam_config, getattr(model.config, "clip_config", None)
    encoder = getattr(model.config, "encoder_config", None)  # DeepEncoder V2
    dtype = next(model.parameters()).dtype
    lines = [
        "---",
        "library_name: deepencoder",
        "tags: [deepencoder, ocr, vision-encoder]",
        "---",
        "# DeepEncoder checkpoint",
        "",
        f"Converted by `deepencoder` from: {source or report.source}.",
        "Source weights licence: " + ("; ".join(report.licences) or "see the source weights' licence") + ".",
        "",
        f"- SAM stage: ViT {sam.hidden_size}-d, {sam.num_hidden_layers} blocks, global blocks {sam.global_attn_indexes}",
        f"- CLIP stage: {clip.hidden_size}-d, {clip.num_hidden_layers} layers"
        if clip is not None
        else f"- encoder: Qwen2 {encoder.hidden_size}-d, {encoder.num_hidden_layers} layers, "
        f"{encoder.num_attention_heads} / {encoder.num_key_value_heads} heads, queries {encoder.query_counts}",
        f"- projector: {model.projector.in_features} -> {model.config.projector_dim}",
        f"- dtype: {str(dtype).replace('torch.', '')}, {sum(p.numel() for p in model.parameters()):,} parameters",
        "",
        f"Converted tensors: {len(report.converted)}.",
    ]
    if report.dropped:
        lines += ["", "Dropped from the source (all names in conversion_report.json):"]
        by_reason: dict[str, list[str]] = {}
        for key, why in sorted(report.dropped.items()):
            by_reason.setdefault(why, []).append(key)
        for why, keys in by_reason.items():
            shown = keys if len(keys) <= 4 else summarise_keys(keys)
            lines.append(f"- {why}: " + ", ".join(f"`{entry}`" for entry in shown))
    if report.initialised:
        lines += ["", "Not in the source, initialised as a fresh model (train before use):"]
        lines += [f"- `{entry}`" for entry in summarise_keys(report.initialised)]
    lines += [
        "",
        "```python",
        f"from deepencoder import {type(model).__name__}, DeepEncoderImageProcessor",
        f"model = {type(model).__name__}.from_pretrained(PATH)",
        "processor = DeepEncoderImageProcessor.from_pretrained(PATH)",
        "```",
        "",
    ]
    return "\n".join(lines)
