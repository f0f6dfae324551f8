"""Training the tower: freezing, LoRA targets, a VLM wrapper for OCR fine-tuning, held-out OCR evaluation (CER, exact
match, page-blind control), SAM masked-image pretraining, data (synthetic pages, folders, the encode manifest), run
configs and an `accelerate` training loop.

Needs the `train` extra (peft, matplotlib, pyyaml) for LoRA, plots and YAML configs.
"""

from ..freezing import TrainableSummary, freeze, trainable_summary, unfreeze
from .config import (
    TOWER_PRESETS,
    DataSettings,
    EvalSettings,
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
from .evaluation import (
    OcrEvaluation,
    character_error_rate,
    edit_distance,
    evaluate_ocr,
    ocr_metrics,
    shuffled_order,
    write_evaluation,
)
from .lora import LORA_TARGETS, apply_lora, lora_targets, merge_lora
from .mim import SamMaskedImageModeling, patchify, random_patch_mask, unpatchify
from .ocr import (
    HeldOutEvaluator,
    OcrCollator,
    build_held_out,
    build_language_model,
    build_ocr_run,
    build_tower,
    ocr_loss,
    run_ocr_finetune,
)
from .pretrain import MimCollator, build_mim_run, mim_loss, run_sam_pretrain
from .text import ByteTokenizer, text_batch
from .trainer import Trainer, build_optimizer, build_scheduler, enable_gradient_checkpointing, save_loss_curve
from .vlm import OcrVisionLanguageModel, tiny_causal_lm

__all__ = [
    "LORA_TARGETS",
    "TOWER_PRESETS",
    "ByteTokenizer",
    "DataSettings",
    "EvalSettings",
    "HeldOutEvaluator",
    "ImageTextFolder",
    "LanguageModelSettings",
    "LoraSettings",
    "ManifestTokens",
    "MimCollator",
    "MimSettings",
    "OcrCollator",
    "OcrEvaluation",
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
    "build_held_out",
    "build_language_model",
    "build_mim_run",
    "build_ocr_run",
    "build_optimizer",
    "build_scheduler",
    "build_tower",
    "character_error_rate",
    "edit_distance",
    "enable_gradient_checkpointing",
    "evaluate_ocr",
    "freeze",
    "load_config",
    "lora_targets",
    "merge_lora",
    "mim_loss",
    "ocr_loss",
    "ocr_metrics",
    "patchify",
    "random_patch_mask",
    "render_page",
    "run_ocr_finetune",
    "run_sam_pretrain",
    "save_loss_curve",
    "shuffled_order",
    "text_batch",
    "tiny_causal_lm",
    "trainable_summary",
    "unfreeze",
    "unpatchify",
    "write_evaluation",
]
