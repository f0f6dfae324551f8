"""`deepencoder plan INPUT... [--max-compression 10] [--auto-modes ...] [--tokenizer DIR] [--json]`: what
`encode --mode auto` would choose for every page, and the total, without loading a model (the cost of a
collection before encoding it)."""

from __future__ import annotations

import argparse
import json
import sys

from ..image_processing_modes import AUTO, DEFAULT_AUTO_MODES, DEFAULT_MAX_COMPRESSION, V2_AUTO_MODES

# parsing imports nothing heavy (see pipeline/cli.py); the steps import what they run
__all__ = ["V2_AUTO_MODES", "add_auto_options", "add_parser", "auto_processor", "run_plan"]


def add_auto_options(parser: argparse.ArgumentParser) -> None:
    """The options `encode --mode auto` and `plan` share."""
    group = parser.add_argument_group("automatic mode (--mode auto; `deepencoder plan` always)")
    group.add_argument(
        "--max-compression",
        type=float,
        default=DEFAULT_MAX_COMPRESSION,
        help="most estimated text tokens per vision token a page may have in its mode (default 10: ~97%% decoding "
        "precision in DeepSeek-OCR's paper)",
    )
    group.add_argument(
        "--auto-modes",
        help=f"allowed modes, comma-separated (default {','.join(DEFAULT_AUTO_MODES)}; DeepEncoder V2: "
        "ocr2-base,ocr2, the default when the weights are V2)",
    )
    group.add_argument(
        "--tokenizer",
        metavar="DIR",
        help="local transformers tokenizer directory: count text-layer pages exactly (loaded offline)",
    )


def auto_processor(args: argparse.Namespace, default_modes: tuple[str, ...] = DEFAULT_AUTO_MODES):
    from ..image_processing_deepencoder import DeepEncoderImageProcessor

    modes = args.auto_modes.split(",") if args.auto_modes else list(default_modes)
    return DeepEncoderImageProcessor(mode=AUTO, max_compression=args.max_compression, auto_modes=modes)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "plan",
        help="the mode `encode --mode auto` picks for each page and the total vision tokens, no model",
        description="Estimate every page's text tokens (PDF text layer, --tokenizer, or the pixels) and choose its "
        "cheapest readable mode, as `encode --mode auto` would; prints a table per page and the totals.",
    )
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="files, folders, globs, or .txt files of paths")
    add_auto_options(parser)
    parser.add_argument(
        "--pages", help="0-based page ranges of multi-page documents, e.g. 0-2,5,9- (single images are always encoded)"
    )
    parser.add_argument("--dpi", type=float, help="PDF render DPI (default: the page's long side fitted to the mode)")
    parser.add_argument("--json", action="store_true", help='one JSON object: {"pages": [...], "summary": {...}}')
    parser.set_defaults(func=run_plan)


def run_plan(args: argparse.Namespace) -> int:
    from .auto_mode import AutoModeSummary, plan_pages
    from .sources import RenderOptions

    try:
        processor = auto_processor(args)
        result = plan_pages(args.inputs, processor, RenderOptions(dpi=args.dpi), args.pages, args.tokenizer)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result))
        return 0 if not result["summary"]["errors"] else 1
    width = max([len(f"{row['source']}") for row in result["pages"]] + [6])
    print(f"{'source':<{width}}  {'page':>4}  {'mode':<9} {'text':>6} {'from':<10} {'vision':>6} {'ratio':>6}")
    for row in result["pages"]:
        page = "" if row["page"] is None else row["page"]
        if "error" in row:
            print(f"{row['source']:<{width}}  {page:>4}  error: {row['error']}")
            continue
        flag = "" if row["fits"] else "  (over target in every mode)"
        print(f"{row['source']:<{width}}  {page:>4}  {row['mode']:<9} {row['text_tokens_estimate']:>6} "
              f"{row['estimate_source']:<10} {row['vision_tokens']:>6} {row['compression']:>6.2f}{flag}")  # fmt: skip
    summary = AutoModeSummary(
        by_mode={name: [v["pages"], v["vision_tokens"]] for name, v in result["summary"]["by_mode"].items()},
        fixed=result["summary"]["fixed_mode_vision_tokens"],
        over_target=result["summary"]["over_target"],
        text_tokens=result["summary"]["text_tokens_estimate"],
    )
    print("\n".join(summary.lines()))
    return 0 if not result["summary"]["errors"] else 1
