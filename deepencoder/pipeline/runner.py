"""The encode loop: documents -> pages (worker processes, bounded queue) -> batches through the tower -> parts,
manifest rows, document files. See `writer` for the on-disk protocol and `encode` for the API. `PageWork` is the
per-page work the local loop and the Ray engine (`pipeline.ray`) share: rows, page preparation, tower batches."""

from __future__ import annotations

import json
import os
import queue
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace

import torch
from PIL import Image

from ..dtypes import parse_dtype
from ..image_processing_auto_mode import ModeChoice
from ..image_processing_deepencoder import (
    AUTO,
    DeepEncoderImageProcessor,
    PagePlan,
    image_to_uint8,
    pixels_in_memory_order,
)
from . import writer
from .auto_mode import AutoModeReader, AutoModeSummary, concrete_mode
from .names import FEATURES
from .producer import START_METHODS, PageProducer, PageTask
from .sources import (
    Document,
    PaddedView,
    PageError,
    PageReader,
    RenderOptions,
    count_pages,
    default_long_side,
    discover,
    no_documents_warning,
    parse_page_ranges,
    select_pages,
    source_size,
)


@dataclass
class EncodeOptions:
    """What an `encode` run does besides the model.

    features: `projected` (the tokens the language model receives, (tokens, projector_dim)) or `pre-projector`
        (the 2048-d CLIP+SAM join, (tiles*t*t + h*w, 2048), no newline / separator tokens).
    dtype: dtype of the stored tensors (the model computes in its own dtype).
    batch_size: pages per forward; all their global views run as one batch, all their tiles as another.
    workers: processes decoding / rendering / preprocessing pages (`producer`; 0: a thread of this process);
        prefetch: pages handed to the workers ahead of the model (default 2 * batch_size; at most 8 a worker).
    page_timeout: seconds a page worker may take on one page (while the run waits for it) before it is killed and
        replaced, the page given an error row: a file that hangs its decoder never stalls the run (None or 0: no
        limit; with `workers=0` pages are prepared in this process and have none).
    worker_start: how worker processes start: auto (fork on Linux before any CUDA context, else forkserver /
        spawn), fork, forkserver, spawn.
    threads: intra-op threads of the forward on the CPU during the run, the previous setting restored afterwards
        (default: the process's setting, all cores: on 2 cores a real-size tower runs 1.9x faster on 2 threads than
        on 1, while the near-free tower is within 5% either way). Ignored on accelerators.
    pages: 0-based page ranges applied to every multi-page document, e.g. `0-2,5,9-` (a single image is encoded).
    dpi, max_image_pixels, max_aspect: see `RenderOptions` (dpi None: long side fitted to the mode).
    preview_dir: write `<document>/page.<i>.png` previews there.
    progress: progress bars; sleep_per_batch: seconds slept after each batch (to watch or interrupt a run).
    lock_stale_after: seconds without a heartbeat after which another run's lock on the output folder is stale.
    tokenizer: `mode="auto"`: a local transformers tokenizer directory counting text-layer pages exactly.
    warmup: before the first batch, run one batch of blank pages through the device path while the workers render
        the first pages (`PageWork.warm_up`); None (default): on accelerators, not on the CPU (where it would take
        cores from the workers and gains little).
    """

    features: str = "projected"
    dtype: torch.dtype = torch.float32
    batch_size: int = 8
    workers: int = 2
    prefetch: int | None = None
    page_timeout: float | None = 300.0
    worker_start: str = "auto"
    threads: int | None = None
    pages: str | None = None
    dpi: float | None = None
    max_image_pixels: int | None = Image.MAX_IMAGE_PIXELS
    max_aspect: float = 20.0
    preview_dir: str | os.PathLike | None = None
    progress: bool = True
    sleep_per_batch: float = 0.0
    lock_stale_after: float = 300.0
    tokenizer: str | os.PathLike | None = None
    warmup: bool | None = None

    def checked(self) -> EncodeOptions:
        """A copy with `dtype` as a torch dtype (`"bfloat16"`, `"bf16"` and `torch.bfloat16` alike); ValueError naming
        the field when a value cannot work (it failed late, after the tower had run, or was silently taken as
        another value)."""

        def whole(name: str, least: int, optional: bool = False) -> None:
            value = getattr(self, name)
            if optional and value is None:
                return
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"EncodeOptions.{name} must be a whole number of at least {least}, got {value!r}")

        def number(name: str, least: float, optional: bool = False, strict: bool = False) -> None:
            value = getattr(self, name)
            if optional and value is None:
                return
            ok = isinstance(value, int | float) and not isinstance(value, bool)
            if not ok or value < least or (strict and value == least):
                bound = f"above {least}" if strict else f"at least {least}"
                raise ValueError(f"EncodeOptions.{name} must be a number {bound}, got {value!r}")

        if self.features not in FEATURES:
            raise ValueError(f"EncodeOptions.features must be one of {FEATURES}, got {self.features!r}")
        if self.worker_start not in START_METHODS:
            raise ValueError(f"EncodeOptions.worker_start must be one of {START_METHODS}, got {self.worker_start!r}")
        whole("batch_size", 1)
        whole("workers", 0)
        whole("prefetch", 1, optional=True)
        whole("threads", 1, optional=True)
        whole("max_image_pixels", 0, optional=True)
        number("page_timeout", 0, optional=True)
        number("dpi", 0, optional=True, strict=True)
        number("max_aspect", 1)
        number("sleep_per_batch", 0)
        number("lock_stale_after", 0, strict=True)
        parse_page_ranges(self.pages)
        try:
            dtype = parse_dtype(self.dtype)
        except ValueError as error:
            raise ValueError(f"EncodeOptions.dtype: {error}") from None
        return replace(self, dtype=dtype)


@dataclass
class EncodeResult:
    """Counts of one process's run (all processes' after a multi-process run, on every rank). out_dir: the folder
    as given (a path or URL)."""

    out_dir: str
    documents: int = 0
    pages_ok: int = 0
    pages_error: int = 0
    pages_skipped: int = 0
    tokens: int = 0
    seconds: float = 0.0
    errors: list[dict] = field(default_factory=list)
    auto: AutoModeSummary | None = None  # `mode="auto"` runs: vision tokens by chosen mode

    def add_auto_row(self, row: dict) -> None:
        """Count an ok row of a `mode="auto"` run into `auto` (other rows carry no choice)."""
        if "estimate_source" in row:
            self.auto = self.auto or AutoModeSummary()
            self.auto.add(row)

    @property
    def ok(self) -> bool:
        return self.pages_error == 0

    @property
    def manifest(self) -> str:
        return f"{str(self.out_dir).rstrip('/')}/{writer.MANIFEST}"

    def summary(self) -> str:
        rate = self.pages_ok / self.seconds if self.seconds else 0.0
        token_rate = self.tokens / self.seconds if self.seconds else 0.0
        lines = [
            f"encoded {self.pages_ok} pages ({self.tokens} tokens) of {self.documents} documents in "
            f"{self.seconds:.1f} s: {rate:.2f} pages/s, {token_rate:.0f} tokens/s; {self.pages_skipped} pages "
            f"already done, {self.pages_error} errors",
            f"outputs: {str(self.out_dir).rstrip('/')}/<document>.safetensors, rows: {self.manifest}",
        ]
        for row in self.errors[:20]:
            page = "" if row.get("page") is None else f" page {row['page']}"
            lines.append(f"  error: {row['source']}{page}: {row['error']}")
        if len(self.errors) > 20:
            lines.append(f"  ... and {len(self.errors) - 20} more error rows in the manifest")
        if self.auto is not None:
            lines += self.auto.lines()
        return "\n".join(lines)


@dataclass
class DocStart:
    """A document at the start of a run: pages still to encode, pages already written (with the rows stored in
    their metadata, to restore rows a killed run lost), or the reason it cannot be opened at all."""

    document: Document
    todo: list[int]
    skipped: int
    done_rows: list[dict] = field(default_factory=list)
    error: str | None = None


@dataclass
class PageInput:
    document: Document
    index: int
    plan: PagePlan
    size: tuple[int, int]
    pixel_values: torch.Tensor  # (3, H, W) uint8 global view (normalised on the device, `PageWork.forward`)
    tiles: torch.Tensor | None  # (n, 3, t, t) uint8
    seconds: float
    choice: ModeChoice | None = None  # `mode="auto"`: the page's mode (`plan` is that mode's)


@dataclass
class PageFailure:
    document: Document
    index: int
    error: str
    seconds: float


_END = object()


def _distributed() -> tuple[int, int]:
    """(rank, world size) of the initialised process group; (0, 1) without one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _warn_unsharded_launch(world_size: int) -> None:
    """A launcher's `WORLD_SIZE` above 1 with no process group: every process would encode every document (and all
    but one find the output folder locked). `deepencoder encode` initialises the group itself; a script calls
    `torch.distributed.init_process_group()` first."""
    launched = os.environ.get("WORLD_SIZE", "1")
    if world_size == 1 and launched.isdigit() and int(launched) > 1:
        print(f"warning: WORLD_SIZE={launched} but torch.distributed is not initialised: this process encodes every "
              "document alone; call torch.distributed.init_process_group() before encode to shard them",
              file=sys.stderr)  # fmt: skip


def _barrier() -> None:
    if _distributed()[1] > 1:
        torch.distributed.barrier()


def shard(documents: Sequence[Document], rank: int, world_size: int) -> list[Document]:
    """Deterministic: document i (in output-name order) goes to rank i % world_size."""
    return list(documents[rank::world_size])


def pause(seconds: float) -> None:
    """Sleep in short slices, so a Ctrl-C (delivered to whichever thread the kernel picks) interrupts it promptly."""
    end = time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0:
        time.sleep(min(left, 0.1))


def tower_name(model: torch.nn.Module) -> str:
    """The tower a model is, as manifest rows name it: its config's `model_type` (`deepencoder`, ...)."""
    return getattr(getattr(model, "config", None), "model_type", None) or type(model).__name__


def _error_text(error: BaseException) -> str:
    return str(error) if isinstance(error, PageError) else f"{type(error).__name__}: {error}"


class PageWork:
    """What happens to one page, the same in every engine: its manifest row, its preparation (decode / render,
    plan, global view and tiles as tensors), and tower batches (a failing batch is retried page by page; a page
    that still fails, or whose token count differs from the processor's plan, becomes an error row). Generic over
    the tower: any module called as `model(pixel_values=, pixel_values_tiles=, tile_grids=, output_pre_projector=)`
    returning `image_embeds` / `pre_projector` lists."""

    def __init__(self, processor: DeepEncoderImageProcessor, options: EncodeOptions, tower: str | None = None):
        options = options.checked()  # the same checks as `encode`'s (a PageWork may be built without it)
        self.processor = processor
        self.options = options
        self.tower = tower
        self.render = RenderOptions(
            dpi=options.dpi,
            target_long_side=default_long_side(
                processor.resolution if processor.mode != AUTO else concrete_mode(processor)
            ),
            max_image_pixels=options.max_image_pixels,
            max_aspect=options.max_aspect,
        )
        self.ranges = parse_page_ranges(options.pages)
        self.batch_limit = max(1, options.batch_size)  # pages per forward; halved on out of memory
        self.preview_dir = os.fspath(options.preview_dir) if options.preview_dir else None

    # ------------------------------------------------------------------ rows
    def run_settings(self) -> dict:
        """What every row of this run states about how its pages were encoded (None: not known here)."""
        return {
            "tower": self.tower,
            "mode": self.processor.mode,
            "features": self.options.features,
            "dtype": str(self.options.dtype).removeprefix("torch."),
        }

    def row(self, document: Document, index: int | None, **values) -> dict:
        settings = self.run_settings()
        row = {
            "source": document.source,
            "document": document.name,
            "page": index,
            "status": "error",
            "tokens": None,
            "output": None,
            "key": None,
            "tower": settings["tower"],
            "mode": settings["mode"],
            "grid": None,
            "size": None,
            "features": settings["features"],
            "dim": None,
            "dtype": settings["dtype"],
            "seconds": None,
            "error": None,
            "source_bytes": document.source_bytes,
        }
        row.update(values)
        return row

    def mismatch(self, row: dict) -> str | None:
        """How a page already in the output folder (its ok row) was encoded otherwise than this run would: another
        tower, mode, features or dtype, or another token count for its size (other `base_size` / `tile_size`);
        None when it matches. A resumed run skips the pages it finds, so it must not find another run's."""
        differ = [
            f"{name} {row[name]} (this run: {value})"
            for name, value in self.run_settings().items()
            if value is not None and row.get(name) is not None and row[name] != value
        ]
        size, tokens = row.get("size"), row.get("tokens")
        if not differ and self.options.features == "projected" and self.processor.mode != AUTO and size and tokens:
            planned = self.processor.num_image_tokens(*size)
            if planned != tokens:
                differ.append(f"{tokens} tokens for a {size[0]}x{size[1]} page (this run's processor: {planned})")
        if not differ:
            return None
        return f"{row.get('document')} page {row.get('page')}: " + ", ".join(differ)

    def check_done(
        self, folder: writer.Folder, rows: Iterable[dict], documents: Iterable[Document] | None = None
    ) -> None:
        """Raise `OutputMismatch` when a page of `rows` (ok rows already in `folder`) was encoded otherwise; with
        `documents`, only the pages of those (this run's: other documents of the folder may have been encoded in
        another mode on purpose, as `mode="auto"` does page by page)."""
        names = None if documents is None else {document.name for document in documents}
        for row in rows:
            if names is not None and row.get("document") not in names:
                continue
            if row.get("status") == "ok" and (found := self.mismatch(row)) is not None:
                raise OutputMismatch(
                    f"{folder.display()} holds pages encoded otherwise than this run asks ({found}); a resumed run "
                    "would skip them and mix the two: encode into another folder, or delete the folder's outputs"
                )

    def error_row(self, document: Document, index: int | None, message: str, seconds: float | None = None) -> dict:
        return self.row(document, index, error=message, seconds=None if seconds is None else round(seconds, 4))

    # ------------------------------------------------------------------ documents and pages
    def page_reader(self) -> PageReader | AutoModeReader:
        """What reads this run's pages: `mode="auto"` reads each page at its chosen mode's size."""
        if self.processor.mode == AUTO:
            return AutoModeReader(self.processor, self.render, self.options.tokenizer)
        return PageReader(self.render)

    def start_document(self, folder: writer.Folder, document: Document) -> DocStart:
        """Merge parts a killed run left, read the rows stored with pages already written, decide which remain."""

        def unreadable(error: writer.UnreadableFile) -> None:  # removed by the merge: its pages are encoded again
            print(f"warning: {error}; its pages are encoded again", file=sys.stderr)

        # an I/O error here (a full disk, a network failure) stops the run and changes nothing: a rerun resumes
        keys, metadata = writer.merge_document_rows(folder, document.name, on_unreadable=unreadable)
        done_rows = [json.loads(metadata[key]) for key in keys if key in metadata]
        self.check_done(folder, done_rows)  # rows a killed run left only in its parts: not checked at the start
        try:
            size = source_size(document.source)
            count = count_pages(document, checked=True)
        except Exception as error:  # noqa: BLE001 - bad input never stops the run
            return DocStart(document, [], 0, done_rows, _error_text(error))
        document = replace(document, source_bytes=size)  # its rows carry the size
        other = next((row for row in done_rows if row.get("source_bytes") not in (None, size)), None)
        if other is not None:  # another file's pages under this name: never mixed with this one's
            message = (
                f"the output folder holds pages of another file under this name ({other.get('source')}, "
                f"{other['source_bytes']} bytes; this one has {size}): a changed or different document, not encoded; "
                f"encode it into another folder, or delete {document.output} to encode it again"
            )
            return DocStart(document, [], 0, [], message)
        done = {writer.key_index(key) for key in keys}
        wanted = select_pages(count, self.ranges, document.kind)
        todo = [i for i in wanted if i not in done]
        return DocStart(document, todo, len(wanted) - len(todo), done_rows)

    def prepare(self, reader: PageReader | AutoModeReader, document: Document, index: int) -> PageInput | PageFailure:
        start = time.perf_counter()
        try:
            processor, choice = self.processor, None
            if isinstance(reader, AutoModeReader):
                page = reader.read(document, index)
                image, processor, choice = page.image, page.processor, page.choice
            else:
                # a PDF page that fits its padded view as rendered is drawn straight into it (no preview wants the
                # page image): the view `_views` would make, pixel for pixel, without the image's copies
                place = None if self.preview_dir is not None else processor.pad_spot
                image = reader.read(document, index, place)
                if isinstance(image, PaddedView):
                    plan = processor.plan(*image.size)
                    pixels = torch.from_numpy(image.pixels).movedim(-1, -3)
                    seconds = time.perf_counter() - start
                    return PageInput(document, index, plan, image.size, pixels, None, seconds)
            plan, pixel_values, tile_tensor = _views(processor, image)
            if self.preview_dir is not None:
                from pathlib import Path

                from .preview import write_preview

                write_preview(Path(self.preview_dir) / document.name / f"page.{index}.png", image, plan, processor)
            seconds = time.perf_counter() - start
            return PageInput(document, index, plan, image.size, pixel_values, tile_tensor, seconds, choice)
        except Exception as error:  # noqa: BLE001 - bad input never stops the run
            return PageFailure(document, index, _error_text(error), time.perf_counter() - start)

    # ------------------------------------------------------------------ tower
    def in_worker(self) -> None:
        """Set up a page worker process: Pillow's process-wide decompression-bomb limit follows the run's (the CLI
        sets it in its own process; a spawned worker starts from Pillow's default)."""
        Image.MAX_IMAGE_PIXELS = self.options.max_image_pixels

    def upload(
        self, batch: list[PageInput], device: torch.device, dtype: torch.dtype
    ) -> tuple[torch.Tensor | list[torch.Tensor], torch.Tensor | None]:
        """The batch's uint8 views -> (global views, tiles) on the device, normalised there in float32 and cast to
        `dtype`: pages cross to the device as uint8 (from pinned memory, without blocking, on CUDA)."""
        copies = self._copies(device)
        empty = copies.empty if copies is not None else torch.empty

        def move(pixels: torch.Tensor) -> torch.Tensor:
            if pixels.is_floating_point():  # normalised already (`stage`)
                return pixels.to(device, dtype)
            if copies is None:
                return self.processor.normalize(pixels.to(device), dtype)
            in_memory, channels_last = pixels_in_memory_order(pixels)  # channels-last pixels cross as (..., H, W, 3)
            on_device = copies.to_device(in_memory)
            return self.processor.normalize(on_device.movedim(-1, -3) if channels_last else on_device, dtype)

        globals_ = [item.pixel_values for item in batch]
        if len({tuple(g.shape) for g in globals_}) == 1:
            slab = _consecutive(globals_)  # normalised in place in one batch tensor: no stacking copy
            joined = _join(globals_, stack=True, empty=empty) if slab is None else slab
            pixel_values: torch.Tensor | list[torch.Tensor] = move(joined)
        else:
            pixel_values = [move(g) for g in globals_]
        tiles = [item.tiles for item in batch if item.tiles is not None]
        return pixel_values, move(_join(tiles, stack=False, empty=empty)) if tiles else None

    def stager(self, device: torch.device, dtype: torch.dtype) -> _CpuStager | None:
        """What prepares pages for their batch in the thread feeding the loop: on the CPU, normalisation straight
        into the batch tensor; on an accelerator nothing (pages stay uint8 until `upload`)."""
        return _CpuStager(self, dtype) if device.type == "cpu" else None

    def runs_at_once(self, device: torch.device) -> bool:
        """Whether `launch` on `device` returns with the forward done (the CPU), so that the loop finishes each batch
        at once; on an accelerator the forward is queued and the loop queues the next batch before it waits."""
        return device.type == "cpu"

    def _copies(self, device: torch.device) -> _CudaCopies | None:
        """The device's asynchronous host copies (`device_copies`), made once per device; None: plain copies."""
        copies = self.__dict__.setdefault("_device_copies", {})
        if device not in copies:
            copies[device] = device_copies(device)
        return copies[device]

    def __getstate__(self) -> dict:  # CUDA streams stay in their process
        state = self.__dict__.copy()  # one C-level copy: the loop may add `_device_copies` while a worker starts
        state.pop("_device_copies", None)
        return state

    def fetch(self, features: list[torch.Tensor]) -> Callable[[], list[torch.Tensor]]:
        """Per-page outputs on the device -> on the CPU in the stored dtype, with one copy for the whole batch.
        Returns a callable giving the tensors: on CUDA the copy is queued behind the forward into pinned memory and
        the callable waits for it, so the next batch can be queued first."""
        if not features:
            return lambda: []
        lengths = [int(f.shape[0]) for f in features]
        flat = torch.cat(features).to(dtype=self.options.dtype)
        copies = self._copies(flat.device)
        if copies is None:
            tensors = list(flat.to("cpu").split(lengths))
            return lambda: tensors
        wait = copies.to_host(flat)
        return lambda: list(wait().split(lengths))

    def launch(self, model: torch.nn.Module, batch: list[PageInput]) -> Callable[[], list[torch.Tensor]]:
        """Upload the batch and queue its forward and the copy back (asynchronous on CUDA; at once elsewhere);
        the returned callable gives the per-page tensors on the CPU."""
        parameter = next(model.parameters())
        pixel_values, pixel_values_tiles = self.upload(batch, parameter.device, parameter.dtype)
        grids = [item.plan.tile_grid if item.plan.num_tiles else (1, 1) for item in batch]
        pre = self.options.features == "pre-projector"
        with torch.inference_mode():
            out = model(
                pixel_values=pixel_values,
                pixel_values_tiles=pixel_values_tiles,
                tile_grids=grids,
                output_pre_projector=pre,
            )
        return self.fetch(out.pre_projector if pre else out.image_embeds)

    def wants_warm_up(self, model: torch.nn.Module) -> bool:
        """`options.warmup`, or (None) whether the tower is on an accelerator."""
        if self.options.warmup is not None:
            return self.options.warmup
        return next(model.parameters()).device.type != "cpu"

    def warm_up(self, model: torch.nn.Module) -> None:
        """One batch (`batch_limit` pages) of a blank letter-sized page, at the size this run renders PDF pages,
        through the whole device path (upload, normalisation, forward, copy back), outputs discarded: libraries,
        kernels and compiled graphs (`--compile`: the global-view and tile graphs) are loaded while the workers
        render the first real pages. Out of memory here is left to the first real batch (the cache is freed); a
        device failure raises `DeviceFailed`. `mode="auto"`: the largest allowed mode's shapes."""
        processor = self.processor
        if processor.mode == AUTO:
            processor = processor.mode_processors()[concrete_mode(processor)]
        long_side = self.render.target_long_side if self.render.dpi is None else round(11 * self.render.dpi)
        size = (round(long_side * 8.5 / 11), long_side)
        plan, pixel_values, tiles = _views(processor, Image.new("RGB", size, "white"))
        page = PageInput(None, 0, plan, size, pixel_values, tiles, 0.0)
        out_of_memory = False
        try:
            self.launch(model, [page] * self.batch_limit)()
        except Exception as error:  # noqa: BLE001 - the real batches decide what an error means
            if is_device_failure(error):
                raise device_failed(error) from error
            out_of_memory = is_out_of_memory(error)
        if out_of_memory:  # out of the `except`: its traceback no longer holds the failed forward's tensors
            free_device_cache(model)

    def forward(self, model: torch.nn.Module, batch: list[PageInput]) -> list[torch.Tensor]:
        return self.launch(model, batch)()

    def start_batch(self, model: torch.nn.Module, batch: list[PageInput]) -> Callable[[], list[tuple]]:
        """`encode_batch` in two steps, so the loop queues batch k+1 on the device before it waits for batch k:
        the returned callable gives the batch's results. A batch whose asynchronous start or finish fails is run
        again through `encode_batch` (retries, out-of-memory halving, device failures)."""
        start = time.perf_counter()
        try:
            pending = self.launch(model, batch)
        except Exception as error:  # noqa: BLE001 - decided by encode_batch
            if is_device_failure(error):
                raise device_failed(error) from error
            return lambda: self.encode_batch(model, batch)

        def finish() -> list[tuple]:
            try:
                features = pending()
            except Exception:  # noqa: BLE001 - decided by encode_batch, out of the `except` (see there)
                features = None
            if features is None:
                return self.encode_batch(model, batch)
            return self._results(batch, features, start)

        return finish

    def encode_batch(
        self, model: torch.nn.Module, batch: list[PageInput]
    ) -> list[tuple[PageInput, torch.Tensor | None, dict]]:
        """(page, tensor, ok row) or (page, None, error row) for every page of the batch, in order.

        A failing batch is retried page by page. Out of memory: the device's cache is freed, the batch is run in
        halves and `batch_limit` (the size later batches get) halved, with a warning. A sticky device error (a
        CUDA context that no longer works) raises `DeviceFailed` at once."""
        start = time.perf_counter()
        try:
            features = self.forward(model, batch)
        except Exception as error:  # noqa: BLE001 - one bad batch must not stop the run
            if is_device_failure(error):
                raise device_failed(error) from error
            failure = (is_out_of_memory(error), _error_text(error))
        else:
            return self._results(batch, features, start)
        # retried only here, out of the `except`: the error's traceback holds the failed forward's frames, and with
        # them its activations, until the block is left (the freed cache and the halves would not get that memory)
        out_of_memory, message = failure
        if out_of_memory:
            free_device_cache(model)
            if len(batch) > 1:
                half = (len(batch) + 1) // 2
                if half < self.batch_limit:
                    self.batch_limit = half
                    shrink_views_per_call(model, half)
                    print(f"warning: out of memory on a batch of {len(batch)} pages; device cache freed, "
                          f"batches are now of {half} pages", file=sys.stderr)  # fmt: skip
                return self.encode_batch(model, batch[:half]) + self.encode_batch(model, batch[half:])
        if len(batch) > 1:
            return [result for item in batch for result in self.encode_batch(model, [item])]
        item = batch[0]
        return [(item, None, self.error_row(item.document, item.index, f"model failed: {message}", item.seconds))]

    def _results(self, batch: list[PageInput], features: list[torch.Tensor], start: float) -> list[tuple]:
        share = (time.perf_counter() - start) / len(batch)
        if len(features) != len(batch):  # no page may go without a row
            message = f"model returned {len(features)} outputs for a batch of {len(batch)} pages"
            return [(item, None, self.error_row(item.document, item.index, message)) for item in batch]
        results = []
        for item, tensor in zip(batch, features):
            expected = item.plan.num_tokens if self.options.features == "projected" else None
            if expected is not None and tensor.shape[0] != expected:
                message = f"model returned {tensor.shape[0]} tokens, processor planned {expected}"
                results.append((item, None, self.error_row(item.document, item.index, message)))
                continue
            row = self.row(
                item.document,
                item.index,
                status="ok",
                tokens=int(tensor.shape[0]),
                output=item.document.output,
                key=writer.page_key(item.index),
                grid=list(item.plan.tile_grid if item.plan.num_tiles else (1, 1)),
                size=list(item.size),
                dim=int(tensor.shape[1]),
                seconds=round(item.seconds + share, 4),
                **(item.choice.row_fields() if item.choice is not None else {}),
            )
            results.append((item, tensor, row))
        return results


class _CudaCopies:
    """Host <-> CUDA copies of the encode loop, asynchronous: pages go up from pinned host memory on a side stream,
    beside the forward of the batch before; results come back into pinned memory behind the forward, waited for by
    an event, so the loop can queue the next batch first."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device)

    def empty(self, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        """A host buffer the copy to the device reads without staging (pinned)."""
        return torch.empty(shape, dtype=dtype, pin_memory=True)

    def to_device(self, host: torch.Tensor) -> torch.Tensor:
        host = host.pin_memory()  # itself when it was made by `empty`
        with torch.cuda.stream(self.stream):  # beside the forward of the batch before, which is still running
            on_device = host.to(self.device, non_blocking=True)
        compute = torch.cuda.current_stream(self.device)
        compute.wait_stream(self.stream)  # the forward reads the pages after they arrived
        on_device.record_stream(compute)  # their memory is not reused before the forward is done with it
        return on_device

    def to_host(self, tensor: torch.Tensor) -> Callable[[], torch.Tensor]:
        host = self.empty(tensor.shape, tensor.dtype)
        host.copy_(tensor, non_blocking=True)  # queued behind the forward on the current stream
        done = torch.cuda.Event(blocking=True)  # the wait sleeps: the core goes to the page workers meanwhile
        done.record(torch.cuda.current_stream(tensor.device))

        def wait() -> torch.Tensor:
            done.synchronize()
            return host

        return wait


def device_copies(device: torch.device) -> _CudaCopies | None:
    """The asynchronous copies of a CUDA device; None elsewhere (plain `to()` copies)."""
    return _CudaCopies(device) if device.type == "cuda" else None


def _views(
    processor: DeepEncoderImageProcessor, image: Image.Image
) -> tuple[PagePlan, torch.Tensor, torch.Tensor | None]:
    """A page image -> its plan, its global view (3, H, W) and its tiles (n, 3, t, t) or None, as uint8."""
    plan = processor.plan(image.width, image.height)
    return plan, image_to_uint8(processor.global_view(image, plan)), processor.tile_pixels(image, plan)


def _join(pixels: list[torch.Tensor], stack: bool, empty: Callable[..., torch.Tensor] = torch.empty) -> torch.Tensor:
    """`torch.stack` (or `cat`) of pages' pixels into a tensor from `empty(shape, dtype=)` (on CUDA pinned host
    memory: the batch is written once, where the copy to the device reads it), in their memory order: channels-last
    views (what page workers send) are joined as (..., H, W, 3) with plain copies, not transposed, and returned as a
    channels-last view."""
    orders = [pixels_in_memory_order(p) for p in pixels]
    channels_last = all(last for _, last in orders)
    parts = [p for p, _ in orders] if channels_last else pixels
    first = parts[0]
    shape = (len(parts), *first.shape) if stack else (sum(int(p.shape[0]) for p in parts), *first.shape[1:])
    out = empty(shape, dtype=first.dtype)
    (torch.stack if stack else torch.cat)(parts, out=out)
    return out.movedim(-1, -3) if channels_last else out


def _consecutive(views: list[torch.Tensor]) -> torch.Tensor | None:
    """The batch tensor `views` are consecutive entries of, as one view, or None."""
    first = views[0]
    step = first.numel() * first.element_size()
    if not first.is_contiguous() or any(
        not v.is_contiguous() or v.untyped_storage().data_ptr() != first.untyped_storage().data_ptr()
        or v.data_ptr() != first.data_ptr() + i * step
        for i, v in enumerate(views)
    ):  # fmt: skip
        return None
    return first.as_strided((len(views), *first.shape), (first.numel(), *first.stride()))


class _CpuStager:
    """Pages normalised on the CPU in the feeding thread, while the loop runs the previous batch: global views
    straight into slots of a batch tensor (`batch_limit` of them, the next one taken when it is full or the view
    size changes), so the loop's `upload` takes consecutive slots as the batch without copying; tiles on their own.
    Bit-identical to normalising in `upload`. A batch tensor whose pages the loop has all finished (`release`) is
    used again (memory already touched: no page faults), else a new one is allocated (the feeder never waits); kept
    ones of another shape (the batch halved after out of memory, another view size) are dropped."""

    def __init__(self, work: PageWork, dtype: torch.dtype) -> None:
        self.work, self.dtype = work, dtype
        self.slab: list | None = None  # [tensor, pages staged, pages released]
        self.owner: dict[int, list] = {}  # id(staged page) -> its slab entry
        self.free: list[torch.Tensor] = []
        self.lock = threading.Lock()

    def __call__(self, page: PageInput | PageFailure) -> PageInput | PageFailure:
        if not isinstance(page, PageInput):
            return page
        normalize = self.work.processor.normalize
        shape = (self.work.batch_limit, *page.pixel_values.shape)
        with self.lock:
            slab = self.slab
            if slab is None or slab[1] == len(slab[0]) or tuple(slab[0].shape) != shape:
                self._retire(slab)
                self.free = [t for t in self.free if tuple(t.shape) == shape]  # not a past batch or view size's
                tensor = self.free.pop() if self.free else torch.empty(shape, dtype=self.dtype)
                slab = self.slab = [tensor, 0, 0]
            index = slab[1]
            slab[1] += 1
        view = normalize(page.pixel_values, out=slab[0][index])
        tiles = None if page.tiles is None else normalize(page.tiles, self.dtype)
        staged = replace(page, pixel_values=view, tiles=tiles)
        with self.lock:
            self.owner[id(staged)] = slab
        return staged

    def release(self, pages: list[PageInput]) -> None:
        """The loop is done with these pages (their batch is finished): their slots may be written again."""
        with self.lock:
            for page in pages:
                slab = self.owner.pop(id(page), None)
                if slab is not None:
                    slab[2] += 1
                    if slab is not self.slab:
                        self._retire(slab)

    def _retire(self, slab: list | None) -> None:
        """A slab no longer filled: free once every page staged into it is released."""
        if slab is not None and slab[2] == slab[1] and len(self.free) < 4:
            self.free.append(slab[0])


class OutputMismatch(ValueError):
    """The output folder holds pages encoded with other settings (tower, mode, features, dtype, view sizes) than
    this run's: resuming would skip them, leaving a folder whose pages do not go together. Nothing was written."""


class DeviceFailed(RuntimeError):
    """The accelerator hit an error that leaves its context unusable (device-side assert, illegal address, ...):
    the run stops with this message; what was written is whole and a rerun resumes."""


def device_failed(error: BaseException) -> DeviceFailed:
    return DeviceFailed(
        f"the device failed and cannot go on ({type(error).__name__}: {str(error).strip()}); the run stopped, "
        "every page written so far is kept: run the same command again to resume"
    )


# substrings of the errors after which a CUDA context is unusable (every later call fails the same way)
_STICKY_DEVICE_ERRORS = (
    "device-side assert",
    "illegal memory access",
    "illegal address",
    "illegal instruction",
    "misaligned address",
    "unspecified launch failure",
    "an uncorrectable ecc error",
    "cudaerrorlaunchfailure",
    "cuda error: unknown error",
)


def is_device_failure(error: BaseException) -> bool:
    text = str(error).lower()
    return isinstance(error, RuntimeError) and any(marker in text for marker in _STICKY_DEVICE_ERRORS)


def is_out_of_memory(error: BaseException) -> bool:
    if isinstance(error, torch.OutOfMemoryError):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def shrink_views_per_call(model: torch.nn.Module, pages: int) -> None:
    """After out of memory: a tower with views per call (`--compile`, `--views-per-call`) runs at most `pages` views
    per call from now on (padding a half batch up to the old size would need the same memory again)."""
    size = getattr(model, "views_per_call", None)
    if size is not None and size > pages:
        model.set_views_per_call(pages)


def free_device_cache(model: torch.nn.Module) -> None:
    """Return the caching allocator's free blocks of the model's device (CUDA / XPU / MPS; nothing on the CPU)."""
    device = next(model.parameters()).device
    backend = getattr(torch, device.type, None)
    empty_cache = getattr(backend, "empty_cache", None) if device.type != "cpu" else None
    if empty_cache is not None:
        empty_cache()


class _Writer:
    """Writes off the encode loop: the loop hands over one item per batch (a bounded queue, so a slow disk holds
    the loop back instead of filling memory) and this thread writes the batch's parts, appends its rows to the
    manifest (one fsync per file) and merges finished documents, in the order the items were handed over. An error
    here (a full disk) is raised in the loop at its next handoff, or at `close`."""

    def __init__(self, handle, depth: int = 2) -> None:
        self.handle = handle
        self.queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._loop, name="deepencoder-writer", daemon=True)
        self.thread.start()

    def put(self, kind: str, payload) -> None:
        if self.error is not None:
            raise self.error
        self.queue.put((kind, payload))

    def drain(self) -> None:
        """Wait until everything handed over is written."""
        self.queue.join()
        if self.error is not None:
            raise self.error

    def _loop(self) -> None:
        while True:
            kind, payload = self.queue.get()
            try:
                if kind == "stop":
                    return
                if self.error is None:
                    self.handle(kind, payload)
            except BaseException as error:  # noqa: BLE001 - surfaced in the loop
                self.error = error
            finally:
                self.queue.task_done()

    def close(self) -> None:
        """Write everything handed over, then stop; raises the writer's error if it had one."""
        self.queue.put(("stop", None))
        self.thread.join()
        if self.error is not None:
            raise self.error


class _Encoder:
    """The local engine: a feeder thread lists documents and streams their pages through page worker processes
    (`producer`; in the feeder thread itself with `workers=0`) into a bounded queue; the main thread batches the
    prepared pages through the tower; a writer thread writes the results."""

    def __init__(
        self, model: torch.nn.Module, work: PageWork, folder: writer.Folder, rank: int, world_size: int
    ) -> None:
        self.model = model
        self.work = work
        self.options = work.options
        self.folder = folder
        self.rank, self.world_size = rank, world_size
        self.reader = work.page_reader() if work.options.workers <= 0 else None
        self.manifest = writer.ManifestWriter(folder, None if world_size == 1 else rank)
        self.result = EncodeResult(out_dir=folder.display())
        self.remaining: dict[str, int] = {}
        self.ok_rows: set[tuple[str, str]] = set()
        self.crashes: list[str] = []
        self.pending: tuple[list[PageInput], Callable[[], list[tuple]]] | None = None  # queued, not finished
        parameter = next(model.parameters())
        self.stager = work.stager(parameter.device, parameter.dtype)
        self.at_once = work.runs_at_once(parameter.device)

    # ------------------------------------------------------------------ producer side (feeder thread)
    def _feed(self, documents: list[Document], items: queue.Queue, stop: threading.Event) -> None:
        def tasks():
            for document in documents:
                if stop.is_set():
                    return
                start = self.work.start_document(self.folder, document)
                yield start
                for index in start.todo:
                    yield PageTask(start.document, index)

        producer = None
        stager = self.stager or (lambda page: page)
        try:
            if self.reader is not None:
                for task in tasks():
                    if stop.is_set():
                        return
                    if isinstance(task, PageTask):
                        task = stager(self.work.prepare(self.reader, task.document, task.index))
                    items.put(task)
                return
            depth = max(1, (self.options.prefetch or 2 * self.options.batch_size) // self.options.workers)
            producer = PageProducer(
                self.work, self.options.workers, depth, self.options.worker_start, self.options.page_timeout
            )
            failure = lambda task, message: PageFailure(task.document, task.index, message, 0.0)  # noqa: E731
            for _, result in producer.run(tasks(), failure):
                if stop.is_set():
                    return
                items.put(stager(result))
        except BaseException as error:  # surfaced by the consumer
            items.put(error)
        finally:
            items.put(_END)  # first: the loop runs the last batch while the workers stop
            if producer is not None:
                self.crashes = producer.crashes
                producer.close(abort=stop.is_set())

    # ------------------------------------------------------------------ writer side (writer thread)
    def _write(self, kind: str, payload) -> None:
        if kind == "rows":
            self.manifest.append(payload)
        elif kind == "error":
            self.manifest.append([payload])
            self.result.pages_error += 1
            self.result.errors.append(payload)
            self.bar.update(1 if payload.get("page") is not None else 0)
        elif kind == "batch":
            self._write_batch(payload)
        elif kind == "finish":
            writer.merge_document(self.folder, payload.name)

    def _write_batch(self, results: list[tuple[PageInput, torch.Tensor | None, dict]]) -> None:
        by_document: dict[str, list] = {}
        for item, tensor, row in results:
            if tensor is not None:
                by_document.setdefault(item.document.name, []).append((row["key"], tensor, row))
        for name, pages in by_document.items():
            writer.write_pages(self.folder, name, pages)
        rows = [row for *_, row in results]
        self.manifest.append(rows)  # rows only after their parts exist under their final names
        for _, tensor, row in results:
            if tensor is None:
                self.result.pages_error += 1
                self.result.errors.append(row)
                continue
            self.result.pages_ok += 1
            self.result.tokens += row["tokens"]
            self.result.add_auto_row(row)
        self.bar.update(len(results))
        elapsed = time.perf_counter() - self.started
        self.bar.set_postfix_str(
            f"{self.result.pages_ok / elapsed:.2f} pages/s, {self.result.tokens / elapsed:.0f} tokens/s, "
            f"{self.result.pages_error} errors",
            refresh=False,
        )

    # ------------------------------------------------------------------ consumer side (main thread)
    def _finish_page(self, document: Document, out: _Writer) -> None:
        self.remaining[document.name] -= 1
        if self.remaining[document.name] == 0:
            self._finish_document(document, out)

    def _finish_document(self, document: Document, out: _Writer, merge: bool = True) -> None:
        if merge:
            out.put("finish", document)
        if self.reader is not None:
            self.reader.release(document)

    def _run_batch(self, batch: list[PageInput], out: _Writer) -> None:
        """Queue `batch` on the device, then finish the batch queued before it (the device works on this one while
        its predecessor's results go to the writer). A tower that runs as it is called (`runs_at_once`) finishes
        the batch at once instead: holding it until the next batch would only keep its pixels in memory."""
        try:
            pending = (batch, self.work.start_batch(self.model, batch))
        except DeviceFailed:
            try:  # the batch before may have finished on the device before the failure: written if it did
                self._complete(out)
            except DeviceFailed:
                pass
            raise
        self._complete(out)
        self.pending = pending
        if self.at_once:  # nothing to overlap: finished now, its batch tensor free for the pages staged next
            self._complete(out)

    def _complete(self, out: _Writer) -> None:
        if self.pending is None:
            return
        batch, finish = self.pending
        self.pending = None
        out.put("batch", finish())
        if self.stager is not None:
            self.stager.release(batch)
        for item in batch:
            self._finish_page(item.document, out)
        if self.options.sleep_per_batch:
            out.drain()  # the pause comes after the batch is on disk (tests act at that point)
            pause(self.options.sleep_per_batch)

    def _threads(self) -> int | None:
        """Intra-op threads of the forward on the CPU for this run: `options.threads` (None: unchanged)."""
        if next(self.model.parameters()).device.type != "cpu":
            return None
        return self.options.threads or None

    def run(self, documents: list[Document], done: list[dict]) -> EncodeResult:
        """Encode `documents`; `done`: the ok rows already in the folder."""
        from tqdm.auto import tqdm

        options = self.options
        self.result.documents = len(documents)
        self.ok_rows = {(row.get("output"), row.get("key")) for row in done}
        items: queue.Queue = queue.Queue(maxsize=max(1, options.batch_size - 1))
        stop = threading.Event()
        desc = "encode" if self.world_size == 1 else f"encode rank {self.rank}/{self.world_size}"
        self.bar = tqdm(total=0, unit="page", desc=desc, disable=not options.progress, dynamic_ncols=True)
        self.started = time.perf_counter()
        threads, saved_threads = self._threads(), torch.get_num_threads()
        if threads:
            torch.set_num_threads(threads)
        feeder = threading.Thread(target=self._feed, args=(documents, items, stop), daemon=True)
        feeder.start()
        out = _Writer(self._write)
        batch: list[PageInput] = []
        try:
            if documents and self.work.wants_warm_up(self.model):
                self.work.warm_up(self.model)  # while the workers render the first pages
            while True:
                item = items.get()
                if item is _END:
                    break
                if isinstance(item, BaseException):
                    raise item
                if isinstance(item, DocStart):
                    restored = [r for r in item.done_rows if (r.get("output"), r.get("key")) not in self.ok_rows]
                    out.put("rows", restored)
                    self.result.pages_skipped += item.skipped
                    if item.error is not None:
                        out.put("error", self.work.error_row(item.document, None, item.error))
                        continue
                    self.remaining[item.document.name] = len(item.todo)
                    self.bar.total += len(item.todo)
                    self.bar.refresh()
                    if not item.todo:  # its parts were merged as it started: nothing to fold in
                        self._finish_document(item.document, out, merge=False)
                    continue
                if isinstance(item, PageFailure):
                    out.put("error", self.work.error_row(item.document, item.index, item.error, item.seconds))
                    self._finish_page(item.document, out)
                    continue
                batch.append(item)
                if len(batch) >= self.work.batch_limit:
                    self._run_batch(batch, out)
                    batch = []
            if batch:
                self._run_batch(batch, out)
            self._complete(out)
        finally:
            stop.set()
            while feeder.is_alive():  # unblock a feeder waiting on a full queue
                try:
                    items.get_nowait()
                except queue.Empty:
                    feeder.join(0.05)
            try:
                out.close()  # everything handed over is written whole, even when the loop stopped on an error
            finally:
                if threads:
                    torch.set_num_threads(saved_threads)
                self.bar.close()
                if self.reader is not None:
                    self.reader.close()
                self.manifest.close()
        for crash in self.crashes:
            print(f"warning: {crash}", file=sys.stderr)
        self.result.seconds = time.perf_counter() - self.started
        return self.result


def _gather(result: EncodeResult, world_size: int) -> EncodeResult:
    """Sum counts over ranks (max of seconds) and collect error rows onto every rank."""
    if world_size == 1:
        return result
    counts = torch.tensor(
        [result.documents, result.pages_ok, result.pages_error, result.pages_skipped, result.tokens],
        dtype=torch.float64,
    )
    torch.distributed.all_reduce(counts)
    seconds = torch.tensor([result.seconds], dtype=torch.float64)
    torch.distributed.all_reduce(seconds, op=torch.distributed.ReduceOp.MAX)
    errors: list = [None] * world_size
    torch.distributed.all_gather_object(errors, result.errors)
    autos: list = [None] * world_size
    torch.distributed.all_gather_object(autos, result.auto)
    auto = None
    for part in autos:
        if part is not None:
            auto = auto or AutoModeSummary()
            auto.merge(part)
    documents, ok, error, skipped, tokens = (int(v) for v in counts.tolist())
    return EncodeResult(
        out_dir=result.out_dir,
        documents=documents,
        pages_ok=ok,
        pages_error=error,
        pages_skipped=skipped,
        tokens=tokens,
        seconds=float(seconds.item()),
        errors=[row for part in errors for row in part],
        auto=auto,
    )


def resolve_options(options: EncodeOptions | None, overrides: dict) -> EncodeOptions:
    """The run's options: `options` (never changed: a caller may reuse it) with `overrides` applied, checked."""
    unknown = [name for name in overrides if name not in EncodeOptions.__dataclass_fields__]
    if unknown:
        raise TypeError(f"unknown encode option {unknown[0]!r}")
    return replace(options or EncodeOptions(), **overrides).checked()


def _lock_all_ranks(folder: writer.Folder, options: EncodeOptions, rank: int, world_size: int):
    """Rank 0 takes the output folder's lock; every rank raises `OutputLocked` if it could not."""
    lock, failure = None, None
    if rank == 0:
        try:
            lock = writer.OutputLock(folder, stale_after_s=options.lock_stale_after).acquire()
        except writer.OutputLocked as error:
            failure = str(error)
        if lock is not None and lock.warning:
            print(f"warning: {lock.warning}", file=sys.stderr)
    if world_size > 1:
        message = [failure]
        torch.distributed.broadcast_object_list(message, src=0)
        failure = message[0]
    if failure is not None:
        raise writer.OutputLocked(failure)
    return lock


def encode(
    inputs: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    model: torch.nn.Module,
    processor: DeepEncoderImageProcessor | str = "gundam",
    options: EncodeOptions | None = None,
    **option_overrides,
) -> EncodeResult:
    """Encode every page of `inputs` (files, folders, globs, text files of paths; local paths or fsspec URLs) into
    `out_dir` (a local folder or an fsspec URL such as `s3://bucket/runs/x`).

    model: a tower already on its device and in its compute dtype (see `load_model`).
    processor: a DeepEncoderImageProcessor or a mode name. Options: `EncodeOptions` fields, as an object or keywords.
    Pages already in `out_dir` are skipped (resume); a page that fails gets an error row and the run goes on.
    The run holds `out_dir/.lock`: a second run into the same folder raises `OutputLocked` naming the holder.
    Under `torch.distributed` (torchrun / accelerate launch, the process group initialised: the CLI does it, a
    script calls `torch.distributed.init_process_group()` first), documents are sharded by rank and the manifest
    parts are merged by rank 0 at the end; every rank returns the totals.
    """
    options = resolve_options(options, option_overrides)
    if isinstance(processor, str):
        processor = DeepEncoderImageProcessor(mode=processor)
    folder = writer.as_folder(out_dir)
    folder.makedirs()
    rank, world_size = _distributed()
    _warn_unsharded_launch(world_size)
    lock = _lock_all_ranks(folder, options, rank, world_size)
    try:
        if rank == 0:  # before any rank writes: leftovers of a killed run
            writer.clean_temp_files(folder)
            writer.merge_manifests(folder)
        _barrier()
        documents = discover(inputs, on_empty=no_documents_warning if rank == 0 else None)
        work = PageWork(processor, options, tower_name(model))
        done = [row for row in writer.all_rows(folder) if row.get("status") == "ok"]
        work.check_done(folder, done, documents)  # every rank alike, before anything is written
        encoder = _Encoder(model.eval(), work, folder, rank, world_size)
        result = encoder.run(shard(documents, rank, world_size), done)
        result = _gather(result, world_size)
        result.documents = len(documents)
        _barrier()
        if rank == 0:
            writer.merge_manifests(folder)
            writer.remove_empty_part_folders(folder)
        _barrier()
    finally:
        if lock is not None:
            lock.release()
    return result
