"""OCR fine-tuning recipe: build the tower + LM from an `OcrFinetuneConfig`, train, save everything.

Outputs under `train.output_dir`: `tower/` (plain `save_pretrained` tower + processor, LoRA merged in),
`tower_adapter/` (the LoRA adapter, when used), `language_model/`, `connector.safetensors` (when the widths
differ), `checkpoints/`, `loss.jsonl`, `loss_curve.png` (with the held-out CER beside the loss when `eval` is on),
`samples.txt` (greedy transcriptions of a few training pages), `config.yaml`; with `eval.num_samples`:
`eval.jsonl` / `eval.json` (held-out transcriptions and rates, see `evaluation`) and `evals.jsonl` (the rates
every `eval.every` steps).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import yaml
from torch import nn
from torch.utils.data import Dataset

from ..freezing import trainable_summary
from ..image_processing_deepencoder import DeepEncoderImageProcessor
from ..modeling_deepencoder import DeepEncoderModel
from .config import TOWER_PRESETS, LanguageModelSettings, OcrFinetuneConfig, TowerSettings, config_to_dict
from .data import SyntheticPages, dataset_from_settings, pixel_batch
from .evaluation import OcrEvaluation, evaluate_ocr, write_evaluation
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
        overrides = {} if settings.initializer_range is None else {"initializer_range": settings.initializer_range}
        model = tiny_causal_lm(
            tokenizer.vocab_size,
            settings.hidden_size,
            settings.num_layers,
            settings.num_heads,
            settings.family,
            **overrides,
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


def held_out_settings(config: OcrFinetuneConfig):
    """The `DataSettings` of the held-out set: the run's data with `eval.data` applied (a synthetic set with no
    `seed` given takes the training seed + 1, and no curriculum)."""
    overrides = dict(config.eval.data)
    known = {f.name for f in dataclasses.fields(config.data)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"eval.data: unknown key(s) {unknown}; known: {sorted(known)}")
    if overrides.get("kind", config.data.kind) == "synthetic":
        overrides.setdefault("seed", config.data.seed + 1)
        overrides.setdefault("curriculum", 0)  # held-out pages span the full ranges
    for key, value in overrides.items():
        if isinstance(getattr(config.data, key), tuple) and value is not None:
            overrides[key] = tuple(value)
    return dataclasses.replace(config.data, **overrides)


def build_held_out(config: OcrFinetuneConfig) -> Dataset | None:
    """The held-out set of a run (None when `eval.num_samples` is 0). A run whose held-out set is the training
    set itself is refused: the evaluation would measure memorisation."""
    if not config.eval.num_samples:
        return None
    settings = held_out_settings(config)
    if settings == config.data:
        raise ValueError("eval.data describes the training set itself; give the held-out pages (e.g. {seed: 1})")
    if settings.kind == "synthetic":
        settings = dataclasses.replace(settings, num_samples=config.eval.num_samples)
    dataset = dataset_from_settings(settings)
    if len(dataset) < 2:
        raise ValueError("the held-out set needs at least 2 pages (the page-blind control shuffles them)")
    return dataset


def held_out_words(dataset: Dataset, count: int) -> set[str]:
    """Whitespace-separated words of the first `count` held-out texts (synthetic sets only: text without rendering)."""
    if not isinstance(dataset, SyntheticPages):
        return set()
    return {word for i in range(min(count, len(dataset))) for word in dataset.text(i).split()}


def build_ocr_run(config: OcrFinetuneConfig, exclude: set[str] | frozenset[str] = frozenset()):
    """(OcrVisionLanguageModel, dataset, collate, tokenizer, processor) for a config. `exclude`: words kept out of
    synthetic training pages (the held-out set's)."""
    data = config.data
    if data.kind == "synthetic" and data.curriculum and config.train.shuffle:
        raise ValueError("data.curriculum grows the pages in index order: set train.shuffle: false")
    torch.manual_seed(config.train.seed)
    dataset = dataset_from_settings(data, exclude=exclude)
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
        downsample = getattr(getattr(getattr(vision, "config", None), "sam_config", None), "downsample", 64)
        processor = DeepEncoderImageProcessor(
            mode=data.mode, base_size=data.base_size, tile_size=data.tile_size, downsample=downsample
        )
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
    save_loss_curve(trainer.history, out / "loss_curve.png", "OCR fine-tuning: text cross-entropy", trainer.evals)
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


class HeldOutEvaluator:
    """`trainer -> metrics` on the held-out set (the trainer's unwrapped model under its autocast); the last full
    result (rows included) stays in `self.last`."""

    def __init__(self, config: OcrFinetuneConfig, held_out: Dataset, collate: OcrCollator, tokenizer) -> None:
        self.config, self.held_out, self.collate, self.tokenizer = config, held_out, collate, tokenizer
        self.last: OcrEvaluation | None = None

    def __call__(self, trainer: Trainer) -> dict:
        settings = self.config.eval
        self.last = evaluate_ocr(
            trainer.unwrapped,
            self.held_out,
            self.collate,
            self.tokenizer,
            max_new_tokens=settings.max_new_tokens or self.config.language_model.max_text_tokens,
            num_samples=settings.num_samples,
            batch_size=settings.batch_size,
            seed=settings.seed,
            autocast=trainer.accelerator.autocast,
        )
        return self.last.metrics


def run_ocr_finetune(config: OcrFinetuneConfig, accelerator=None) -> Trainer:
    """Build, resume if asked, train (evaluating every `eval.every` steps), save, evaluate the held-out set.
    Returns the trainer (history in `trainer.history`, evaluations in `trainer.evals`, the final one also in
    `trainer.evaluation`)."""
    held_out = build_held_out(config)
    words = held_out_words(held_out, config.eval.num_samples) if held_out is not None else set()
    model, dataset, collate, tokenizer, processor = build_ocr_run(config, exclude=words)
    evaluator = HeldOutEvaluator(config, held_out, collate, tokenizer) if held_out is not None else None
    trainer = Trainer(
        model, config.train, dataset, collate, ocr_loss, accelerator, evaluate=evaluator, eval_every=config.eval.every
    )
    resumed = trainer.maybe_resume()
    if resumed is not None:
        trainer.accelerator.print(f"resumed from {resumed} at step {trainer.step}")
    if trainer.unwrapped.vision is not None:
        trainer.accelerator.print(f"tower parameters:\n{trainable_summary(trainer.unwrapped.vision)}")
    trainer.train()
    trainer.evaluation = None
    if evaluator is not None:
        trainer.run_evaluation()
        trainer.write_evals()
        trainer.evaluation = evaluator.last
    save_ocr_outputs(trainer, config, tokenizer, processor)
    if trainer.evaluation is not None:
        extra = {"step": trainer.step}
        if words:
            seen = training_words(dataset) & words
            extra.update(held_out_words=len(words), held_out_words_seen_in_training=len(seen))
        write_evaluation(trainer.evaluation, config.train.output_dir, extra)
        trainer.accelerator.print(trainer.evaluation.summary())
    return trainer


def training_words(dataset: Dataset) -> set[str]:
    """Every word of a synthetic training set's texts (text only, no rendering); empty for other datasets."""
    if not isinstance(dataset, SyntheticPages):
        return set()
    return {word for i in range(len(dataset)) for word in dataset.text(i).split()}
