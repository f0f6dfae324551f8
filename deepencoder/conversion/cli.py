"""`deepencoder convert {deepseek-ocr,...} SRC DST`: checkpoints -> `save_pretrained` directories."""

from __future__ import annotations

import argparse
import sys

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("convert", help="convert a checkpoint into a DeepEncoder directory")
    sources = parser.add_subparsers(dest="source", required=True)
    deepseek = sources.add_parser("deepseek-ocr", help="the released DeepSeek-OCR checkpoint (vision tensors only)")
    deepseek.add_argument("src", help="local directory / .safetensors file, or hub id (deepseek-ai/DeepSeek-OCR)")
    deepseek.add_argument("dst", help="output directory")
    deepseek.add_argument("--revision", default=None)
    add_common_options(deepseek)
    deepseek.set_defaults(func=run_deepseek_ocr)


def add_common_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="output dtype (default: the source's)")
    parser.add_argument("--max-shard-size", default="5GB", help="shard size for save_pretrained (e.g. 2GB)")


def run_deepseek_ocr(args: argparse.Namespace) -> int:
    from .deepseek_ocr import load_deepseek_ocr_with_report
    from .io import CheckpointError
    from .save import save_converted

    try:
        model, report = load_deepseek_ocr_with_report(args.src, revision=args.revision)
    except CheckpointError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    save_converted(model, report, args.dst, dtype=DTYPES.get(args.dtype), max_shard_size=args.max_shard_size,
                   source_description="DeepSeek-OCR (deepseek-ai/DeepSeek-OCR), vision tower only",
                   license_name="MIT (DeepSeek-OCR model weights)")
    print(report.summary())
    print(f"saved to {args.dst}")
    return 0
