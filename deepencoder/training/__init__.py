"""Training the tower: freezing, LoRA targets, a VLM wrapper for OCR fine-tuning, SAM masked-image pretraining,
data (synthetic pages, folders, the encode manifest), run configs and an `accelerate` training loop.

Needs the `train` extra (peft, matplotlib, pyyaml) for LoRA, plots and YAML configs.
"""

from ..freezing import TrainableSummary, freeze, trainable_summary, unfreeze
from .config import (
    TOWER_PRESETS,
    DataSettings,
    LanguageModelSettings,
    LoraSettings,
    MimSettings,
    OcrFinetuneConfig,
    OptimConfig,
    SamPretrainConfig,
    TowerSettings,
    TrainConfig,
    load_config,
)
from .data import ImageTextFolder, ManifestTokens, SyntheticPages, render_page
from .lora import LORA_TARGETS, apply_lora, lora_targets, merge_lora
from .mim import SamMaskedImageModeling, patchify, random_patch_mask, unpatchify
from .ocr import OcrCollator, build_language_model, build_ocr_run, build_tower, ocr_loss, run_ocr_finetune
from .pretrain import MimCollator, build_mim_run, mim_loss, run_sam_pretrain
from .text import ByteTokenizer, text_batch
from .trainer import Trainer, build_optimizer, build_scheduler, enable_gradient_checkpointing, save_loss_curve
from .vlm import OcrVisionLanguageModel, tiny_causal_lm

__all__ = [
    "LORA_TARGETS",
    "TOWER_PRESETS",
    "ByteTokenizer",
    "DataSettings",
    "ImageTextFolder",
    "LanguageModelSettings",
    "LoraSettings",
    "ManifestTokens",
    "MimCollator",
    "MimSettings",
    "OcrCollator",
    "OcrFinetuneConfig",
    "OcrVisionLanguageModel",
    "OptimConfig",
    "SamMaskedImageModeling",
    "SamPretrainConfig",
    "SyntheticPages",
    "TowerSettings",
    "TrainConfig",
    "Trainer",
    "TrainableSummary",
    "apply_lora",
    "build_language_model",
    "build_mim_run",
    "build_ocr_run",
    "build_optimizer",
    "build_scheduler",
    "build_tower",
    "enable_gradient_checkpointing",
    "freeze",
    "load_config",
    "lora_targets",
    "merge_lora",
    "mim_loss",
    "ocr_loss",
    "patchify",
    "random_patch_mask",
    "render_page",
    "run_ocr_finetune",
    "run_sam_pretrain",
    "save_loss_curve",
    "text_batch",
    "tiny_causal_lm",
    "trainable_summary",
    "unfreeze",
    "unpatchify",
]
