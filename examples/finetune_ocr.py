"""OCR fine-tuning: the DeepEncoder tower's tokens feed a causal LM through `inputs_embeds`; loss on the text.

    .venv/bin/python examples/finetune_ocr.py --config examples/configs/finetune_ocr_reads.yaml
    .venv/bin/python examples/finetune_ocr.py --config examples/configs/finetune_ocr_reads.yaml --set train.output_dir=DIR
    .venv/bin/python examples/finetune_ocr.py --config examples/configs/finetune_ocr_tiny.yaml --set train.max_steps=20
    accelerate launch --num_processes 2 examples/finetune_ocr.py --config examples/configs/finetune_ocr_tiny.yaml

Writes to `train.output_dir`: loss_curve.png (with the held-out CER beside the loss), loss.jsonl, eval.jsonl
(held-out target / output / page-blind output per page), eval.json (CER, exact match, control CER, distinct
outputs), evals.jsonl (the rates every `eval.every` steps), samples.txt, tower/ (+ tower_adapter/ with LoRA),
language_model/, checkpoints/ (resumed automatically with `train.resume: auto`).
"""

from __future__ import annotations

import argparse

from deepencoder.runtime import configure_allocator
from deepencoder.training import OcrFinetuneConfig, load_config, run_ocr_finetune


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML or JSON run config (defaults when omitted)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set train.max_steps=50 (repeatable)",
    )
    args = parser.parse_args()
    config = load_config(OcrFinetuneConfig, args.config, args.set)
    trainer = run_ocr_finetune(config)
    if trainer.accelerator.is_main_process:
        losses = [loss for _, loss in trainer.history]
        print(
            f"loss {losses[0]:.4f} -> {losses[-1]:.4f} over {len(losses)} steps; outputs in {config.train.output_dir}"
        )


if __name__ == "__main__":
    configure_allocator()  # tcmalloc when installed, else glibc without mmap churn (deepencoder.runtime)
    main()
