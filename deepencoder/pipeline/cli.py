"""`deepencoder encode INPUT... --weights W --mode gundam --out DIR`.

Run under `torchrun` or `accelerate launch -m deepencoder encode ...` to shard documents across processes: each
process takes the GPU of its LOCAL_RANK (or the CPU) and joins a process group (nccl on GPUs, gloo on CPUs).
`--engine ray` runs the same work on a Ray cluster instead (`pipeline.ray`). Inputs and --out may be fsspec URLs."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from ..conversion.cli import add_hub_options, hub_options
from ..dtypes import DTYPE_NAMES, parse_dtype
from ..image_processing_modes import AUTO, RESOLUTION_MODES, V2_AUTO_MODES
from .names import DEFAULT_WEIGHTS, FEATURES, RANDOM
from .plan import add_auto_options, auto_processor

if TYPE_CHECKING:
    import torch

    from ..image_processing_deepencoder import DeepEncoderImageProcessor
    from .runner import EncodeOptions

# Parsing the command line imports none of torch, transformers or the pipeline's modules (`deepencoder encode
# --help` answers at once); each step below imports what it runs.
V2_MODEL_TYPE = "deepencoder_v2"  # DeepEncoderV2Config.model_type, read without importing the config (the Ray driver)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "encode",
        help="PDFs and images -> vision tokens (one safetensors file per document + manifest.jsonl)",
        description="Encode every page of the inputs into vision tokens. Re-running with the same --out resumes.",
    )
    parser.add_argument(
        "inputs",
        nargs="+",
        metavar="INPUT",
        help="files, folders, globs, or .txt files of paths (paths or fsspec URLs)",
    )
    parser.add_argument(
        "--out", required=True, help="output folder or fsspec URL (manifest.jsonl, <document>.safetensors)"
    )
    parser.add_argument(
        "--weights",
        default=DEFAULT_WEIGHTS,
        help=f"DeepSeek-OCR directory or hub id, a `deepencoder` save_pretrained directory, or `{RANDOM}` "
        f"(default: {DEFAULT_WEIGHTS})",
    )
    add_hub_options(parser.add_argument_group("hub (for a --weights hub id; as from_pretrained takes them)"))
    parser.add_argument("--config", help="config.json (or its directory) for --weights random; default: real size")
    parser.add_argument("--seed", type=int, default=0, help="seed of --weights random (the same in every process)")
    parser.add_argument(
        "--mode",
        default="gundam",
        choices=[*RESOLUTION_MODES, AUTO],
        help="resolution mode; auto: per page the cheapest mode that keeps its text readable (see --max-compression)",
    )
    parser.add_argument("--base-size", type=int, help="override the mode's global view size (multiple of 64)")
    parser.add_argument("--tile-size", type=int, help="override the mode's tile size (multiple of 64)")
    parser.add_argument(
        "--features", default="projected", choices=FEATURES, help="projected tokens (default) or the 2048-d join"
    )
    parser.add_argument("--dtype", default="float32", choices=DTYPE_NAMES, help="dtype of the stored tensors")
    parser.add_argument("--compute-dtype", default="float32", choices=DTYPE_NAMES, help="dtype the tower runs in")
    parser.add_argument("--device", default="auto", help="auto (GPU of LOCAL_RANK if any, else CPU), cpu, cuda:0 ...")
    parser.add_argument("--batch-size", type=int, default=8, help="pages per forward pass")
    parser.add_argument(
        "--compile", action="store_true", help="torch.compile the tower (model.compile()) on fixed shapes: views run "
        "in calls of --views-per-call (default --batch-size) views, padded and cut, so one graph per view size serves "
        "every batch (Gundam tile counts included); compile cache in $DEEPENCODER_COMPILE_CACHE when set, so later "
        "runs start in seconds"
    )  # fmt: skip
    parser.add_argument(
        "--views-per-call", type=int, metavar="N", help="at most N views (global views or tiles) per tower pass: "
        "bounds the activation memory of a batch whatever its pages' tile counts (default: a batch's views of one "
        "size in one pass; with --compile, --batch-size, padded to exactly N)"
    )  # fmt: skip
    parser.add_argument(
        "--threads", type=int, help="intra-op threads of the tower on the CPU during the run (default: all cores; "
        "with a small tower and page workers on every core, 1 can be faster)"
    )  # fmt: skip
    parser.add_argument(
        "--warmup", action=argparse.BooleanOptionalAction, default=None, help="run one batch of blank pages "
        "through the tower while the first pages render (default: on a GPU, not on the CPU)"
    )  # fmt: skip
    parser.add_argument(
        "--workers", type=int, default=2, help="processes decoding / rendering pages (0: a thread of this process)"
    )
    parser.add_argument(
        "--prefetch",
        type=int,
        help="pages handed to the workers ahead of the model (default 2*batch, at most 8 a worker)",
    )
    parser.add_argument(
        "--page-timeout",
        type=float,
        default=300.0,
        help="seconds a page worker may take on one page before it is stopped and the page gets an error row "
        "(default 300; 0: no limit)",
    )
    parser.add_argument(
        "--pages",
        help="0-based page ranges of multi-page documents, e.g. 0-2,5,9- (9 to the end; -3: pages 0 to 3); single "
        "images are always encoded",
    )
    parser.add_argument("--dpi", type=float, help="PDF render DPI (default: the page's long side fitted to the mode)")
    parser.add_argument(
        "--max-image-pixels",
        type=int,
        default=None,
        help="largest page in pixels (default: Pillow's decompression-bomb limit; 0: no limit)",
    )
    parser.add_argument("--max-aspect", type=float, default=20.0, help="largest long/short side ratio of a page")
    parser.add_argument("--preview", metavar="DIR", help="write a PNG per page with its global view and tile grid")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    ray = parser.add_argument_group("Ray engine (--engine ray; pip install 'deepencoder[ray]')")
    ray.add_argument(
        "--engine",
        default="local",
        choices=("local", "ray"),
        help="local: this process (or torchrun / accelerate ranks); ray: Ray Data on a Ray cluster",
    )
    ray.add_argument("--address", help="Ray cluster to join: auto, ray://head:10001 (default: a local Ray instance)")
    ray.add_argument(
        "--num-gpus-per-worker",
        type=float,
        default=None,
        help="GPUs per tower actor (default: 1 if the cluster has GPUs, else 0)",
    )
    ray.add_argument("--num-cpus-per-worker", type=float, default=1.0, help="CPUs per tower actor")
    ray.add_argument(
        "--concurrency",
        default="1",
        help="tower actors: N, or MIN-MAX to autoscale (default 1; one per GPU is the usual choice)",
    )
    add_auto_options(parser)
    parser.add_argument("--sleep-per-batch", type=float, default=0.0, help=argparse.SUPPRESS)
    parser.set_defaults(func=run_encode)


def _processor(args: argparse.Namespace, v2: bool) -> DeepEncoderImageProcessor:
    """The run's processor; `--mode auto` without `--auto-modes` allows the tower's modes (V2: ocr2-base, ocr2)."""
    from ..image_processing_deepencoder import DeepEncoderImageProcessor

    if args.mode == AUTO:
        if args.base_size is not None or args.tile_size is not None:
            raise ValueError("--mode auto takes no --base-size / --tile-size (each mode keeps its sizes)")
        return auto_processor(args, V2_AUTO_MODES) if v2 else auto_processor(args)
    if args.auto_modes or args.tokenizer:
        raise ValueError("--auto-modes and --tokenizer apply to --mode auto")
    return DeepEncoderImageProcessor(mode=args.mode, base_size=args.base_size, tile_size=args.tile_size)


def _tower_mode(args: argparse.Namespace) -> str:
    """The mode that tells `load_model` which tower `--weights random` builds (auto: its allowed modes')."""
    if args.mode != AUTO:
        return args.mode
    return args.auto_modes.split(",")[-1].strip() if args.auto_modes else "gundam"


def _weights_are_v2(args: argparse.Namespace) -> bool:
    """Whether --weights / --config name a DeepEncoder V2 tower, read without loading it (the Ray driver)."""
    from .weights import is_save_pretrained_dir

    for path in (args.config, args.weights):
        if path and path != RANDOM and is_save_pretrained_dir(path):
            return V2_MODEL_TYPE == json.loads((Path(path) / "config.json").read_text())["model_type"]
        if path and Path(path).is_file() and path.endswith(".json"):
            return V2_MODEL_TYPE == json.loads(Path(path).read_text()).get("model_type")
    return False


def _init_distributed() -> tuple[int, int, int]:
    import torch

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if world_size > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        torch.distributed.init_process_group(backend=backend)
    return rank, world_size, local_rank


def _device(name: str, local_rank: int) -> torch.device:
    """The run's device; ValueError naming the problem when `--device` is not a device this machine has."""
    import torch

    if name == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ValueError(f"--device {name}: not a device name ({str(error).splitlines()[0]})") from None
    if device.type == "cpu":
        return device
    backend = torch.backends.mps if device.type == "mps" else getattr(torch, device.type, None)
    available = getattr(backend, "is_available", None)
    if available is not None and not available():
        raise ValueError(f"--device {name}: this machine has no {device.type} device available (try --device cpu)")
    count = getattr(backend, "device_count", None)
    if device.index is not None and count is not None and device.index >= count():
        raise ValueError(f"--device {name}: this machine has {count()} {device.type} device(s)")
    return device


def _options(args: argparse.Namespace) -> EncodeOptions:
    from PIL import Image

    from .runner import EncodeOptions

    options = EncodeOptions(
        features=args.features,
        dtype=parse_dtype(args.dtype),
        batch_size=args.batch_size,
        workers=args.workers,
        prefetch=args.prefetch,
        page_timeout=args.page_timeout,
        pages=args.pages,
        dpi=args.dpi,
        max_aspect=args.max_aspect,
        preview_dir=args.preview,
        progress=not args.no_progress,
        sleep_per_batch=args.sleep_per_batch,
        tokenizer=args.tokenizer,
        warmup=args.warmup,
        threads=args.threads,
    )
    limit = args.max_image_pixels
    if limit is not None:  # also Pillow's own process-wide guard, which fires at open time above twice the limit
        options.max_image_pixels = limit or None
        Image.MAX_IMAGE_PIXELS = limit or None
    return options


def _concurrency(text: str) -> int | tuple[int, int]:
    low, _, high = str(text).partition("-")
    return (int(low), int(high)) if high else int(low)


def _weights_error(error: BaseException | None) -> str | None:
    """The WeightsError message behind an exception Ray raised on the driver: a worker's exception kept as `cause`,
    or (an actor that died in its constructor) only as text in Ray's message."""
    from .weights import WeightsError

    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, WeightsError) and not isinstance(getattr(error, "cause", None), BaseException):
            return str(error)
        marker = f"{WeightsError.__name__}: "
        lines = [line for line in str(error).splitlines() if marker in line]
        if lines:
            return lines[-1].split(marker, 1)[1].strip()
        cause = getattr(error, "cause", None)
        error = cause if isinstance(cause, BaseException) else error.__cause__
    return None


def run_ray(args: argparse.Namespace) -> int:
    from .ray import encode_dataset
    from .writer import OutputLocked

    say = lambda *a: print(*a, file=sys.stderr)  # noqa: E731
    try:
        processor = _checked_processor(args, _weights_are_v2(args))
    except ValueError as error:
        say(f"error: {error}")
        return 2
    options = _options(args)
    if args.weights == RANDOM:
        banner = "!" * 100
        say(
            f"{banner}\n!! RANDOM weights (seed {args.seed}): outputs are meaningless, for trying the pipeline only\n{banner}"
        )
    gpus = "1 if the cluster has GPUs" if args.num_gpus_per_worker is None else f"{args.num_gpus_per_worker:g}"
    say(f"mode {args.mode}, {args.features} features as {args.dtype}, Ray engine ({args.concurrency} tower actors, "
        f"{gpus} GPU each) -> {args.out}")  # fmt: skip
    try:
        result = encode_dataset(
            args.inputs,
            args.out,
            weights=args.weights,
            processor=processor,
            options=options,
            config=args.config,
            seed=args.seed,
            device=args.device,
            compute_dtype=args.compute_dtype,
            num_gpus_per_worker=args.num_gpus_per_worker,
            num_cpus_per_worker=args.num_cpus_per_worker,
            concurrency=_concurrency(args.concurrency),
            address=args.address,
            hub=hub_options(args),
        )
    except (OutputLocked, ValueError, ImportError) as error:
        say(f"error: {error}")
        return 2
    except Exception as error:
        cause = _weights_error(error)
        if cause is None:
            raise
        say(f"error: {cause}")  # an actor could not load --weights: one sentence, not Ray's traceback
        return 2
    say(result.summary())
    return 0 if result.ok else 1


def _flag_error(args: argparse.Namespace) -> str | None:
    """What is wrong with the command's values, found before the tower loads and the folder is locked; None: fine."""
    for flag, value, least in (("--views-per-call", args.views_per_call, 1), ("--threads", args.threads, 1),
                               ("--batch-size", args.batch_size, 1), ("--prefetch", args.prefetch, 1),
                               ("--workers", args.workers, 0), ("--page-timeout", args.page_timeout, 0),
                               ("--base-size", args.base_size, 1), ("--tile-size", args.tile_size, 0),
                               ("--max-image-pixels", args.max_image_pixels, 0),
                               ("--max-aspect", args.max_aspect, 1)):  # fmt: skip
        if value is not None and value < least:
            return f"{flag} must be at least {least}, got {value}"
    if args.dpi is not None and not args.dpi > 0:
        return f"--dpi must be positive, got {args.dpi}"
    for location in (args.out, *args.inputs):
        if str(location).startswith("memory://"):
            return (f"{location}: fsspec's memory:// lives inside this process and is gone when the command exits; "
                    "use a folder, file://, or an object store URL")  # fmt: skip
    return None


def _checked_processor(args: argparse.Namespace, v2: bool) -> DeepEncoderImageProcessor:
    """`_processor`, its view sizes checked (multiples of the tower's 64-pixel patch grid) by planning a page:
    ValueError before the tower loads, not a traceback from the first page after it."""
    processor = _processor(args, v2)
    if args.mode != AUTO:
        processor.plan(850, 1100)
    return processor


def run_encode(args: argparse.Namespace) -> int:
    problem = _flag_error(args)
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    if args.engine == "ray":
        local = [flag for flag, value in (("--compile", args.compile), ("--views-per-call", args.views_per_call),
                                          ("--threads", args.threads)) if value]  # fmt: skip
        if local:
            print(f"error: {', '.join(local)}: options of the local engine, not of --engine ray", file=sys.stderr)
            return 2
        return run_ray(args)

    from ..runtime import cuda_requested
    from .producer import prestart_workers

    # page workers of a CUDA run start from a forkserver: started before torch is imported, it imports what they
    # need beside this process's imports and the tower's loading
    prestart_workers("cuda" if cuda_requested(args.device) else "cpu", args.workers)

    import torch

    from .runner import DeviceFailed, OutputMismatch, encode, tower_name
    from .sources import parse_page_ranges
    from .weights import WeightsError, load_model
    from .writer import OutputLocked, UnreadableFile

    try:  # before the tower loads and the output folder is locked
        parse_page_ranges(args.pages)
        _checked_processor(args, _weights_are_v2(args))  # the tower's own kind decides below (a hub id's V2)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    rank, world_size, local_rank = _init_distributed()
    say = (lambda *a, **k: print(*a, **k, file=sys.stderr)) if rank == 0 else (lambda *a, **k: None)
    try:
        try:
            device = _device(args.device, local_rank)
        except ValueError as error:
            say(f"error: {error}")
            return 2
        try:  # built on the device, in the compute dtype
            model, description = load_model(
                args.weights,
                args.config,
                seed=args.seed,
                dtype=parse_dtype(args.compute_dtype),
                mode=_tower_mode(args),
                hub=hub_options(args),
                device=device,
            )
        except WeightsError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        if args.weights == RANDOM:
            banner = "!" * 100
            say(f"{banner}\n!! {description}\n{banner}")
        else:
            say(f"weights: {description}")
        if args.compile:  # one graph per view size, whatever a batch holds
            model.compile(views_per_call=args.views_per_call or args.batch_size)
        elif args.views_per_call:
            model.set_views_per_call(args.views_per_call)
        try:
            processor = _processor(args, tower_name(model) == V2_MODEL_TYPE)
        except ValueError as error:
            say(f"error: {error}")
            return 2
        options = _options(args)
        world = f", {world_size} processes" if world_size > 1 else ""
        say(f"mode {args.mode}, {args.features} features as {args.dtype}, device {device}{world} -> {args.out}")
        try:
            result = encode(args.inputs, args.out, model, processor, options)
        except (OutputLocked, OutputMismatch) as error:
            say(f"error: {error}")
            return 2
        except DeviceFailed as error:
            print(f"error: {error}", file=sys.stderr)
            return 3
        except (OSError, UnreadableFile) as error:  # writing the output failed (a full disk, a lost connection)
            print(f"error: writing the output failed ({error}); the run stopped, every page written so far is "
                  "kept: run the same command again to resume", file=sys.stderr)  # fmt: skip
            return 3
        say(result.summary())
        if args.weights == RANDOM:
            say("(random weights: the tokens above are meaningless; pass --weights with a real checkpoint)")
        return 0 if result.ok else 1
    finally:
        if world_size > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
