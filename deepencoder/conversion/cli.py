"""`deepencoder convert {deepseek-ocr,unlimited-ocr,segment-anything,clip,compose,deepseek-ocr2,compose-v2} ...`:
checkpoints -> `save_pretrained` directories (config.json, model.safetensors, preprocessor config, conversion_report.json,
README.md)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..dtypes import DTYPE_NAMES, parse_dtype

if TYPE_CHECKING:
    from .hub import HubOptions

# parsing imports nothing heavy (`deepencoder encode` reuses the hub options below); the steps import what they run


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("convert", help="convert a checkpoint into a DeepEncoder directory")
    sources = parser.add_subparsers(dest="source", required=True)

    deepseek = sources.add_parser("deepseek-ocr", help="the released DeepSeek-OCR checkpoint (vision tensors only)")
    deepseek.add_argument("src", help="local directory / .safetensors file, or hub id (deepseek-ai/DeepSeek-OCR)")
    deepseek.add_argument("dst", help="output directory")
    add_common_options(deepseek)
    deepseek.set_defaults(func=run_tower, description="DeepSeek-OCR ({src}), vision tower only")

    unlimited = sources.add_parser(
        "unlimited-ocr",
        help="a transformers UnlimitedOcrForConditionalGeneration / UnlimitedOcrModel save_pretrained directory, "
        "in either naming (vision tensors only)",
    )
    unlimited.add_argument("src", help="local directory / .safetensors file, or hub id")
    unlimited.add_argument("dst", help="output directory")
    add_common_options(unlimited)
    unlimited.set_defaults(func=run_tower, description="transformers UnlimitedOcr ({src}), vision tower only")

    sam = sources.add_parser(
        "segment-anything",
        help="a segment-anything sam_vit_{b,l,h}_*.pth (or transformers SAM) -> SAM stage; the rest initialised",
    )
    sam.add_argument("src", help="sam_vit_b_01ec64.pth / sam_vit_l_0b3195.pth / sam_vit_h_4b8939.pth, or a hub id")
    sam.add_argument("dst", help="output directory")
    add_common_options(sam)
    sam.set_defaults(func=run_segment_anything)

    clip = sources.add_parser(
        "clip", help="an open_clip / OpenAI or transformers CLIP-L/14 -> CLIP stage; the rest initialised"
    )
    clip.add_argument("src", help="open_clip .safetensors/.bin/.pth, transformers CLIP directory, or a hub id")
    clip.add_argument("dst", help="output directory")
    add_common_options(clip)
    add_clip_options(clip)
    clip.set_defaults(func=run_clip)

    compose = sources.add_parser(
        "compose", help="SAM stage from one checkpoint, CLIP stage from another; compressor and projector initialised"
    )
    compose.add_argument("--sam", required=True, help="segment-anything .pth, transformers SAM, DeepSeek-OCR, ...")
    compose.add_argument("--clip", required=True, help="open_clip / OpenAI, transformers CLIP, DeepSeek-OCR, ...")
    compose.add_argument("dst", help="output directory")
    add_common_options(compose)
    add_clip_options(compose)
    compose.set_defaults(func=run_compose)

    deepseek2 = sources.add_parser(
        "deepseek-ocr2", help="the released DeepSeek-OCR-2 checkpoint (vision tensors only) -> DeepEncoder V2"
    )
    deepseek2.add_argument("src", help="local directory / .safetensors file, or hub id (deepseek-ai/DeepSeek-OCR-2)")
    deepseek2.add_argument("dst", help="output directory")
    add_common_options(deepseek2)
    deepseek2.set_defaults(func=run_deepseek_ocr2)

    compose2 = sources.add_parser(
        "compose-v2",
        help="DeepEncoder V2's initialisation: SAM stage from one checkpoint, encoder layers from a Qwen2 decoder; "
        "compressor, queries and projector initialised",
    )
    compose2.add_argument("--sam", required=True, help="segment-anything .pth, transformers SAM, ...")
    compose2.add_argument("--qwen2", required=True, help="a Qwen2 causal LM directory or hub id (Qwen/Qwen2-0.5B)")
    compose2.add_argument("dst", help="output directory")
    add_common_options(compose2)
    compose2.set_defaults(func=run_compose_v2)


def add_common_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dtype", choices=DTYPE_NAMES, default=None, help="output dtype (default: the source's)")
    parser.add_argument("--max-shard-size", default="5GB", help="shard size for save_pretrained (e.g. 2GB)")
    add_hub_options(parser)


def add_hub_options(parser: argparse.ArgumentParser) -> None:
    """`from_pretrained`'s hub arguments as flags (`hub_options` reads them back); the byte ranges read from the hub
    are kept in its cache, so a second run works offline (see `deepencoder.conversion.hub`)."""
    parser.add_argument("--revision", default=None, help="hub revision (branch, tag or commit) for hub ids")
    parser.add_argument("--cache-dir", default=None, help="hub cache folder (default: HF_HUB_CACHE)")
    parser.add_argument(
        "--local-files-only", action="store_true", help="read only the hub cache (as HF_HUB_OFFLINE=1 does)"
    )
    parser.add_argument("--token", default=None, help="hub token (default: the logged-in one, HF_TOKEN)")
    parser.add_argument("--subfolder", default="", help="folder of the checkpoint inside the repository or directory")
    parser.add_argument("--force-download", action="store_true", help="read from the hub again, ignoring the cache")


def hub_options(args: argparse.Namespace) -> HubOptions:
    from .hub import HubOptions

    return HubOptions(
        revision=args.revision,
        cache_dir=args.cache_dir,
        local_files_only=args.local_files_only,
        token=args.token,
        subfolder=args.subfolder,
        force_download=args.force_download,
    )


def add_clip_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--clip-hidden-act",
        choices=("quick_gelu", "gelu"),
        default=None,
        help="CLIP MLP activation when the source does not state it (open_clip files); default quick_gelu (OpenAI)",
    )
    parser.add_argument(
        "--clip-num-attention-heads",
        type=int,
        default=None,
        help="CLIP heads when the source does not state them (open_clip files); default width / 64",
    )


def clip_options(args: argparse.Namespace) -> dict[str, Any]:
    values: dict[str, Any] = {}
    if args.clip_hidden_act:
        values["hidden_act"] = args.clip_hidden_act
    if args.clip_num_attention_heads:
        values["num_attention_heads"] = args.clip_num_attention_heads
    return values


def _run(args: argparse.Namespace, load: Callable[[], tuple[Any, Any]], description: str, processor: Any = None) -> int:
    from .io import CheckpointError
    from .save import save_converted

    try:
        model, report = load()
    except CheckpointError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    save_converted(
        model,
        report,
        args.dst,
        dtype=parse_dtype(args.dtype) if args.dtype else None,
        max_shard_size=args.max_shard_size,
        source_description=description,
        processor=processor,
    )
    print(report.summary())
    print(f"saved to {args.dst}")
    return 0


def run_tower(args: argparse.Namespace) -> int:
    from .load import load_tower

    return _run(args, lambda: load_tower(args.src, hub=hub_options(args)), args.description.format(src=args.src))


def run_segment_anything(args: argparse.Namespace) -> int:
    from .load import load_segment_anything

    return _run(
        args,
        lambda: load_segment_anything(args.src, hub=hub_options(args)),
        f"segment-anything image encoder ({args.src}); compressor, CLIP stage and projector initialised",
    )


def run_clip(args: argparse.Namespace) -> int:
    from .load import load_clip

    return _run(
        args,
        lambda: load_clip(args.src, hub=hub_options(args), clip_config=clip_options(args)),
        f"CLIP vision transformer ({args.src}); SAM stage, compressor and projector initialised",
    )


def run_compose(args: argparse.Namespace) -> int:
    from .load import load_composed

    return _run(
        args,
        lambda: load_composed(args.sam, args.clip, hub=hub_options(args), clip_config=clip_options(args)),
        f"composed: SAM stage from {args.sam}, CLIP stage from {args.clip}; compressor and projector initialised",
    )


def run_deepseek_ocr2(args: argparse.Namespace) -> int:
    from ..image_processing_deepencoder import DeepEncoderImageProcessor
    from .deepseek_ocr2 import DEEPENCODER_V2
    from .load import load_tower

    return _run(
        args,
        lambda: load_tower(args.src, family=DEEPENCODER_V2, hub=hub_options(args)),
        f"DeepSeek-OCR-2 ({args.src}), vision tower only",
        processor=DeepEncoderImageProcessor(mode="ocr2"),
    )


def run_compose_v2(args: argparse.Namespace) -> int:
    from ..image_processing_deepencoder import DeepEncoderImageProcessor
    from .load import load_composed_v2

    return _run(
        args,
        lambda: load_composed_v2(args.sam, args.qwen2, hub=hub_options(args)),
        f"composed V2: SAM stage from {args.sam}, encoder layers from {args.qwen2}; compressor, queries and "
        "projector initialised",
        processor=DeepEncoderImageProcessor(mode="ocr2"),
    )
