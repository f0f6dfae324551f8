"""The encode loop: documents -> pages (worker threads, bounded queue) -> batches through the tower -> parts,
manifest rows, document files. See `writer` for the on-disk protocol and `encode` for the API. `PageWork` is the
per-page work the local loop and the Ray engine (`pipeline.ray`) share: rows, page preparation, tower batches."""

from __future__ import annotations

import json
import os
import queue
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from PIL import Image

from ..image_processing_auto_mode import ModeChoice
from ..image_processing_deepencoder import AUTO, DeepEncoderImageProcessor, PagePlan
from . import writer
from .auto_mode import AutoModeReader, AutoModeSummary, concrete_mode
from .names import FEATURES
from .sources import (
    Document,
    PageError,
    PageReader,
    RenderOptions,
    count_pages,
    default_long_side,
    discover,
    parse_page_ranges,
    select_pages,
)


@dataclass
class EncodeOptions:
    """What an `encode` run does besides the model.

    features: `projected` (the tokens the language model receives, (tokens, projector_dim)) or `pre-projector`
        (the 2048-d CLIP+SAM join, (tiles*t*t + h*w, 2048), no newline / separator tokens).
    dtype: dtype of the stored tensors (the model computes in its own dtype).
    batch_size: pages per forward; all their global views run as one batch, all their tiles as another.
    workers: threads decoding / rendering / preprocessing pages; prefetch: pages decoded ahead of the model
        (the bounded queue; default 2 * batch_size + workers).
    pages: 0-based page ranges applied to every multi-page document, e.g. `0-2,5,9-`.
    dpi, max_image_pixels, max_aspect: see `RenderOptions` (dpi None: long side fitted to the mode).
    preview_dir: write `<document>/page.<i>.png` previews there.
    progress: progress bars; sleep_per_batch: seconds slept after each batch (to watch or interrupt a run).
    lock_stale_after: seconds without a heartbeat after which another run's lock on the output folder is stale.
    tokenizer: `mode="auto"`: a local transformers tokenizer directory counting text-layer pages exactly.
    """

    features: str = "projected"
    dtype: torch.dtype = torch.float32
    batch_size: int = 8
    workers: int = 2
    prefetch: int | None = None
    pages: str | None = None
    dpi: float | None = None
    max_image_pixels: int | None = Image.MAX_IMAGE_PIXELS
    max_aspect: float = 20.0
    preview_dir: str | os.PathLike | None = None
    progress: bool = True
    sleep_per_batch: float = 0.0
    lock_stale_after: float = 300.0
    tokenizer: str | os.PathLike | None = None


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
    pixel_values: torch.Tensor  # (3, H, W) global view
    tiles: torch.Tensor | None  # (n, 3, t, t)
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
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


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
        if options.features not in FEATURES:
            raise ValueError(f"features must be one of {FEATURES}, got {options.features!r}")
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
        self.preview_dir = os.fspath(options.preview_dir) if options.preview_dir else None

    # ------------------------------------------------------------------ rows
    def row(self, document: Document, index: int | None, **values) -> dict:
        row = {
            "source": document.source,
            "document": document.name,
            "page": index,
            "status": "error",
            "tokens": None,
            "output": None,
            "key": None,
            "tower": self.tower,
            "mode": self.processor.mode,
            "grid": None,
            "size": None,
            "features": self.options.features,
            "dim": None,
            "dtype": str(self.options.dtype).removeprefix("torch."),
            "seconds": None,
            "error": None,
        }
        row.update(values)
        return row

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
        final = document.output
        keys: list[str] = []
        try:
            keys = writer.merge_document(folder, document.name)
            metadata = writer.read_keys(folder, final)[1] if keys else {}
        except Exception as error:  # a document file we cannot read is rebuilt from scratch
            metadata = {}
            print(
                f"warning: {folder.display(final)}: unreadable ({error}); its pages are encoded again", file=sys.stderr
            )
            keys = []
            folder.remove(final)
        done_rows = [json.loads(metadata[key]) for key in keys if key in metadata]
        try:
            count = count_pages(document)
        except Exception as error:  # noqa: BLE001 - bad input never stops the run
            return DocStart(document, [], 0, done_rows, _error_text(error))
        done = {writer.key_index(key) for key in keys}
        wanted = select_pages(count, self.ranges)
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
                image = reader.read(document, index)
            plan = processor.plan(image.width, image.height)
            pixel_values = processor.to_tensor(processor.global_view(image, plan))
            tiles = processor.tiles(image, plan)
            tile_tensor = torch.stack([processor.to_tensor(t) for t in tiles]) if tiles else None
            if self.preview_dir is not None:
                from pathlib import Path

                from .preview import write_preview

                write_preview(Path(self.preview_dir) / document.name / f"page.{index}.png", image, plan, processor)
            seconds = time.perf_counter() - start
            return PageInput(document, index, plan, image.size, pixel_values, tile_tensor, seconds, choice)
        except Exception as error:  # noqa: BLE001 - bad input never stops the run
            return PageFailure(document, index, _error_text(error), time.perf_counter() - start)

    # ------------------------------------------------------------------ tower
    def forward(self, model: torch.nn.Module, batch: list[PageInput]) -> list[torch.Tensor]:
        parameter = next(model.parameters())
        device, dtype = parameter.device, parameter.dtype
        globals_ = [item.pixel_values for item in batch]
        if len({tuple(g.shape) for g in globals_}) == 1:
            pixel_values = torch.stack(globals_).to(device, dtype)
        else:
            pixel_values = [g.to(device, dtype) for g in globals_]
        tiles = [item.tiles for item in batch if item.tiles is not None]
        pixel_values_tiles = torch.cat(tiles).to(device, dtype) if tiles else None
        grids = [item.plan.tile_grid if item.plan.num_tiles else (1, 1) for item in batch]
        pre = self.options.features == "pre-projector"
        with torch.inference_mode():
            out = model(
                pixel_values=pixel_values,
                pixel_values_tiles=pixel_values_tiles,
                tile_grids=grids,
                output_pre_projector=pre,
            )
        features = out.pre_projector if pre else out.image_embeds
        return [f.to("cpu", self.options.dtype) for f in features]

    def encode_batch(
        self, model: torch.nn.Module, batch: list[PageInput]
    ) -> list[tuple[PageInput, torch.Tensor | None, dict]]:
        """(page, tensor, ok row) or (page, None, error row) for every page of the batch, in order."""
        start = time.perf_counter()
        try:
            features = self.forward(model, batch)
        except Exception as error:  # noqa: BLE001 - one bad batch must not stop the run
            if len(batch) > 1:
                return [result for item in batch for result in self.encode_batch(model, [item])]
            item = batch[0]
            return [(item, None, self.error_row(item.document, item.index, f"model failed: {_error_text(error)}",
                                                item.seconds))]  # fmt: skip
        share = (time.perf_counter() - start) / len(batch)
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


class _Encoder:
    """The local engine: a feeder thread lists documents and submits pages to a thread pool through a bounded
    queue; the main thread batches prepared pages through the tower and writes."""

    def __init__(
        self, model: torch.nn.Module, work: PageWork, folder: writer.Folder, rank: int, world_size: int
    ) -> None:
        self.model = model
        self.work = work
        self.options = work.options
        self.folder = folder
        self.rank, self.world_size = rank, world_size
        self.reader = work.page_reader()
        self.manifest = writer.ManifestWriter(folder, None if world_size == 1 else rank)
        self.result = EncodeResult(out_dir=folder.display())
        self.remaining: dict[str, int] = {}
        self.ok_rows: set[tuple[str, str]] = set()

    def _error(self, row: dict) -> None:
        self.manifest.append([row])
        self.result.pages_error += 1
        self.result.errors.append(row)

    # ------------------------------------------------------------------ producer side (threads)
    def _feed(self, documents: list[Document], items: queue.Queue, pool: ThreadPoolExecutor, stop: threading.Event):
        try:
            for document in documents:
                if stop.is_set():
                    return
                start = self.work.start_document(self.folder, document)
                items.put(start)
                for index in start.todo:
                    if stop.is_set():
                        return
                    items.put(pool.submit(self.work.prepare, self.reader, document, index))
        except BaseException as error:  # surfaced by the consumer
            items.put(error)
        finally:
            items.put(_END)

    # ------------------------------------------------------------------ consumer side (main thread)
    def _finish_page(self, document: Document) -> None:
        self.remaining[document.name] -= 1
        if self.remaining[document.name] == 0:
            self._finish_document(document)

    def _finish_document(self, document: Document) -> None:
        writer.merge_document(self.folder, document.name)
        self.reader.release(document)

    def _run_batch(self, batch: list[PageInput], bar) -> None:
        rows = []
        for item, tensor, row in self.work.encode_batch(self.model, batch):
            if tensor is None:
                self._error(row)
                continue
            writer.write_part(self.folder, item.document.name, row["key"], tensor, row)
            rows.append(row)
        self.manifest.append(rows)  # rows only after their parts exist under their final names
        for row in rows:
            self.result.pages_ok += 1
            self.result.tokens += row["tokens"]
            self.result.add_auto_row(row)
        for item in batch:
            self._finish_page(item.document)
        bar.update(len(batch))
        elapsed = time.perf_counter() - self.started
        bar.set_postfix_str(
            f"{self.result.pages_ok / elapsed:.2f} pages/s, {self.result.tokens / elapsed:.0f} tokens/s, "
            f"{self.result.pages_error} errors",
            refresh=False,
        )
        if self.options.sleep_per_batch:
            pause(self.options.sleep_per_batch)

    def run(self, documents: list[Document]) -> EncodeResult:
        from tqdm.auto import tqdm

        options = self.options
        self.result.documents = len(documents)
        self.ok_rows = {
            (row.get("output"), row.get("key")) for row in writer.all_rows(self.folder) if row.get("status") == "ok"
        }
        prefetch = options.prefetch or 2 * options.batch_size + options.workers
        items: queue.Queue = queue.Queue(maxsize=max(1, prefetch))
        stop = threading.Event()
        desc = "encode" if self.world_size == 1 else f"encode rank {self.rank}/{self.world_size}"
        bar = tqdm(total=0, unit="page", desc=desc, disable=not options.progress, dynamic_ncols=True)
        self.started = time.perf_counter()
        pool = ThreadPoolExecutor(max_workers=max(1, options.workers), thread_name_prefix="deepencoder-page")
        feeder = threading.Thread(target=self._feed, args=(documents, items, pool, stop), daemon=True)
        feeder.start()
        batch: list[PageInput] = []
        try:
            while True:
                item = items.get()
                if item is _END:
                    break
                if isinstance(item, BaseException):
                    raise item
                if isinstance(item, DocStart):
                    restored = [r for r in item.done_rows if (r.get("output"), r.get("key")) not in self.ok_rows]
                    self.manifest.append(restored)
                    self.result.pages_skipped += item.skipped
                    if item.error is not None:
                        self._error(self.work.error_row(item.document, None, item.error))
                        continue
                    self.remaining[item.document.name] = len(item.todo)
                    bar.total += len(item.todo)
                    bar.refresh()
                    if not item.todo:
                        self._finish_document(item.document)
                    continue
                page = item.result() if isinstance(item, Future) else item
                if isinstance(page, PageFailure):
                    self._error(self.work.error_row(page.document, page.index, page.error, page.seconds))
                    self._finish_page(page.document)
                    bar.update(1)
                    continue
                batch.append(page)
                if len(batch) >= options.batch_size:
                    self._run_batch(batch, bar)
                    batch = []
            if batch:
                self._run_batch(batch, bar)
        finally:
            stop.set()
            while feeder.is_alive():  # unblock a feeder waiting on a full queue
                try:
                    items.get_nowait()
                except queue.Empty:
                    feeder.join(0.05)
            pool.shutdown(wait=True, cancel_futures=True)
            bar.close()
            self.reader.close()
            self.manifest.close()
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
    options = options or EncodeOptions()
    for name, value in overrides.items():
        if not hasattr(options, name):
            raise TypeError(f"unknown encode option {name!r}")
        setattr(options, name, value)
    return options


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
    Under `torch.distributed` (torchrun / accelerate launch), documents are sharded by rank and the manifest
    parts are merged by rank 0 at the end; every rank returns the totals.
    """
    options = resolve_options(options, option_overrides)
    if isinstance(processor, str):
        processor = DeepEncoderImageProcessor(mode=processor)
    folder = writer.as_folder(out_dir)
    folder.makedirs()
    rank, world_size = _distributed()
    lock = _lock_all_ranks(folder, options, rank, world_size)
    try:
        if rank == 0:  # before any rank writes: leftovers of a killed run
            writer.clean_temp_files(folder)
            writer.merge_manifests(folder)
        _barrier()
        documents = discover(inputs)
        work = PageWork(processor, options, tower_name(model))
        encoder = _Encoder(model.eval(), work, folder, rank, world_size)
        result = encoder.run(shard(documents, rank, world_size))
        result = _gather(result, world_size)
        result.documents = len(documents)
        _barrier()
        if rank == 0:
            writer.merge_manifests(folder)
        _barrier()
    finally:
        if lock is not None:
            lock.release()
    return result
