"""OCR fine-tuning recipe: build the tower + LM from an `OcrFinetuneConfig`, train, save everything.

Outputs under `train.output_dir`: `tower/` (plain `save_pretrained` tower + processor, LoRA merged in),
`tower_adapter/` (the LoRA adapter, when used), `language_model/`, `connector.safetensors` (when the widths
differ), `checkpoints/`,
`loss.jsonl`, `loss_curve.png`, `samples.txt` (greedy transcriptions of a few training pages), `config.yaml`.
"""

from __future__ import annotations

from pathlib import Path

import torch
import yaml
from torch import nn

from ..freezing import trainable_summary
from ..image_processing_deepencoder import DeepEncoderImageProcessor
from ..modeling_deepencoder import DeepEncoderModel
from .config import TOWER_PRESETS, LanguageModelSettings, OcrFinetuneConfig, TowerSettings, config_to_dict
from .data import dataset_from_settings, pixel_batch
from .lora import apply_lora
from .text import ByteTokenizer, text_batch
from .trainer import Trainer, save_loss_curve
from .vlm import OcrVisionLanguageModel, tiny_causal_lm


def build_tower(settings: TowerSettings) -> DeepEncoderModel:
    """The tower of a run: pretrained directory, `deepseek-ocr:<source>`, or random weights of a preset; then the
    `freeze` / `unfreeze` targets."""
    kwargs = {"attn_implementation": settings.attn_implementation} if settings.attn_implementation else {}
    if settings.pretrained and settings.pretrained.startswith("deepseek-ocr:"):
        tower = DeepEncoderModel.from_deepseek_ocr(settings.pretrained.split(":", 1)[1], **settings.config)
    elif settings.pretrained:
        tower = DeepEncoderModel.from_pretrained(settings.pretrained, **kwargs)
    else:
        from ..configuration_deepencoder import DeepEncoderConfig

        if settings.preset not in TOWER_PRESETS:
            raise ValueError(f"unknown tower preset {settings.preset!r}; choose one of {sorted(TOWER_PRESETS)}")
        values = {**TOWER_PRESETS[settings.preset]}
        for key, value in settings.config.items():
            values[key] = {**values.get(key, {}), **value} if isinstance(value, dict) else value
        config = DeepEncoderConfig(**values)
        if settings.attn_implementation:
            config._attn_implementation = settings.attn_implementation
        tower = DeepEncoderModel(config)
    if settings.freeze:
        tower.freeze(*settings.freeze)
    if settings.unfreeze:
        tower.unfreeze(*settings.unfreeze)
    return tower


def build_language_model(settings: LanguageModelSettings):
    """(causal LM, tokenizer): a pretrained `AutoModelForCausalLM` + its tokenizer, or a random `family` model
    with `ByteTokenizer`."""
    if settings.pretrained:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(settings.pretrained)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        model = AutoModelForCausalLM.from_pretrained(settings.pretrained)
    else:
        tokenizer = ByteTokenizer()
        model = tiny_causal_lm(
            tokenizer.vocab_size, settings.hidden_size, settings.num_layers, settings.num_heads, settings.family
        )
    if not settings.train:
        model.requires_grad_(False)
    return model, tokenizer


class OcrCollator:
    """Items `{"image" | "image_embeds", "text"}` -> the batch `OcrVisionLanguageModel.forward` takes."""

    def __init__(
        self, tokenizer, processor: DeepEncoderImageProcessor | None = None, max_text_tokens: int | None = 128
    ) -> None:
        self.tokenizer, self.processor, self.max_text_tokens = tokenizer, processor, max_text_tokens

    def __call__(self, items: list[dict], positions: list[int] | None = None) -> dict:
        batch = text_batch(self.tokenizer, [item["text"] for item in items], self.max_text_tokens)
        if "image_embeds" in items[0]:
            batch["image_embeds"] = [item["image_embeds"] for item in items]
        else:
            if self.processor is None:
                raise ValueError("page images need an image processor")
            batch.update(pixel_batch([item["image"] for item in items], self.processor))
        return batch


def ocr_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    """Mean next-token cross-entropy over the text tokens (the LM's own shifted loss)."""
    batch = dict(batch)
    if "image_embeds" in batch:
        batch["image_embeds"] = [tokens.to(batch["input_ids"].device) for tokens in batch["image_embeds"]]
    return model(**batch).loss


def build_ocr_run(config: OcrFinetuneConfig):
    """(OcrVisionLanguageModel, dataset, collate, tokenizer, processor) for a config."""
    data = config.data
    torch.manual_seed(config.train.seed)
    dataset = dataset_from_settings(data)
    language_model, tokenizer = build_language_model(config.language_model)
    processor = None
    if data.kind == "manifest":
        sample = dataset[0]["image_embeds"]
        vision, image_dim = None, sample.shape[-1]
    else:
        vision = build_tower(config.tower)
        if config.tower.lora.stages:
            lora = config.tower.lora
            vision = apply_lora(vision, lora.stages, r=lora.r, alpha=lora.alpha, dropout=lora.dropout)
        image_dim = None
        processor = DeepEncoderImageProcessor(mode=data.mode, base_size=data.base_size, tile_size=data.tile_size)
    model = OcrVisionLanguageModel(vision, language_model, image_dim=image_dim)
    collate = OcrCollator(tokenizer, processor, config.language_model.max_text_tokens)
    return model, dataset, collate, tokenizer, processor


def save_ocr_outputs(trainer: Trainer, config: OcrFinetuneConfig, tokenizer, processor) -> None:
    """Final artifacts (see module docstring); main process only."""
    from safetensors.torch import save_file

    if not trainer.accelerator.is_main_process:
        return
    out = Path(config.train.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    model: OcrVisionLanguageModel = trainer.unwrapped
    (out / "config.yaml").write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))
    save_loss_curve(trainer.history, out / "loss_curve.png", "OCR fine-tuning: text cross-entropy")
    model.language_model.save_pretrained(out / "language_model")
    connector = {k: v.contiguous() for k, v in model.connector.state_dict().items()}
    if connector:  # an identity connector has no weights
        save_file(connector, str(out / "connector.safetensors"))
    if model.vision is None:
        return
    vision = model.vision
    if hasattr(vision, "merge_and_unload"):  # PEFT
        vision.save_pretrained(out / "tower_adapter")
        import copy

        vision = copy.deepcopy(vision).merge_and_unload()
    vision.save_pretrained(out / "tower")
    processor.save_pretrained(out / "tower")
    if config.sample_transcriptions:
        model.eval()
        items = [trainer.dataset[i] for i in range(min(config.sample_transcriptions, len(trainer.dataset)))]
        inputs = pixel_batch([item["image"] for item in items], processor)
        inputs = {k: v.to(trainer.accelerator.device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
        texts = model.generate_text(tokenizer, max_new_tokens=config.language_model.max_text_tokens, **inputs)
        lines = [
            f"--- page {i}\ntarget: {item['text']!r}\noutput: {text!r}"
            for i, (item, text) in enumerate(zip(items, texts))
        ]
        (out / "samples.txt").write_text("\n".join(lines) + "\n")


def run_ocr_finetune(config: OcrFinetuneConfig, accelerator=None) -> Trainer:
    """Build, resume if asked, train, save. Returns the trainer (history in `trainer.history`)."""
    model, dataset, collate, tokenizer, processor = build_ocr_run(config)
    trainer = Trainer(model, config.train, dataset, collate, ocr_loss, accelerator)
    resumed = trainer.maybe_resume()
    if resumed is not None:
        trainer.accelerator.print(f"resumed from {resumed} at step {trainer.step}")
    if trainer.unwrapped.vision is not None:
        trainer.accelerator.print(f"tower parameters:\n{trainable_summary(trainer.unwrapped.vision)}")
    trainer.train()
    save_ocr_outputs(trainer, config, tokenizer, processor)
    return trainer
