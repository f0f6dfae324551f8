"""Masked-image pretraining of the SAM stage (mask tokens in place, light pixel decoder, 75% masking).

    .venv/bin/python examples/pretrain_sam.py --config examples/configs/pretrain_sam_tiny.yaml
    .venv/bin/python examples/pretrain_sam.py --config examples/configs/pretrain_sam_tiny.yaml --set data.kind=folder \
        --set data.root=path/to/pages

Writes to `train.output_dir`: loss_curve.png, reconstructions.png, loss.jsonl, tower/ (the tower with the
pretrained SAM stage, `save_pretrained`), mim_head.safetensors, checkpoints/.
"""

from __future__ import annotations

import argparse

from deepencoder.runtime import configure_allocator
from deepencoder.training import SamPretrainConfig, load_config, run_sam_pretrain


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML or JSON run config (defaults when omitted)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set mim.mask_ratio=0.6 (repeatable)",
    )
    args = parser.parse_args()
    config = load_config(SamPretrainConfig, args.config, args.set)
    trainer = run_sam_pretrain(config)
    if trainer.accelerator.is_main_process:
        losses = [loss for _, loss in trainer.history]
        print(
            f"loss {losses[0]:.4f} -> {losses[-1]:.4f} over {len(losses)} steps; outputs in {config.train.output_dir}"
        )


if __name__ == "__main__":
    configure_allocator()  # tcmalloc when installed, else glibc without mmap churn (deepencoder.runtime)
    main()
