"""`deepencoder encode --engine ray`: the same work as the local runner on a Ray cluster, with Ray Data.

    from deepencoder.pipeline.ray import encode_dataset
    encode_dataset(["s3://bucket/pdfs/"], "s3://bucket/runs/pdfs", weights="/models/DeepSeek-OCR",
                   processor="gundam", num_gpus_per_worker=1, concurrency=8, batch_size=16, compute_dtype="bf16")

The stages (a Ray Data streaming pipeline; every stage overlaps with the others, memory is bounded by Ray Data's
backpressure, failed tasks are retried by Ray):

    documents (listed on the driver)
      -> `_expand`   CPU tasks, one document at a time: merge parts a killed run left, count pages, skip pages done
      -> `_prepare`  CPU tasks: decode / render pages, plan, global view and tiles as uint8 tensors (normalised on
                     the tower's device, as in the local runner; bad page -> error row); open PDFs kept per process
      -> `_Tower`    an actor pool (`map_batches` with a class: one model load per actor, `num_gpus` each): tower
                     batches; rows get the tower's name
      -> `_write`    CPU tasks: a batch's finished pages written as one part per document (atomic; a retried task
                     rewrites it whole)
      -> driver      appends the rows to the manifest (exactly once per page), and when a document's last page is
                     in, a Ray task merges its parts into `<document>.safetensors`

The output folder is the local runner's: same files, same manifest fields (`writer`), read back by `EncodedPages` /
`load_manifest` / `ManifestTokens`. A killed actor is restarted by Ray and its batch retried; a page that crashes
the worker process is retried the same way. The driver holds the folder's `.lock` for the whole run.
"""

from __future__ import annotations

import os
import pickle
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..conversion.hub import HubOptions
from ..dtypes import parse_dtype
from ..image_processing_deepencoder import DeepEncoderImageProcessor
from . import writer
from .auto_mode import concrete_mode
from .runner import (
    EncodeOptions,
    EncodeResult,
    PageFailure,
    PageInput,
    PageWork,
    pause,
    resolve_options,
    tower_name,
)
from .sources import Document, discover, no_documents_warning


def _require_ray():
    try:
        import ray
        import ray.data
    except ImportError as error:
        raise ImportError("the Ray engine needs Ray Data: pip install 'deepencoder[ray]'") from error
    return ray


@dataclass
class _Item:
    """What flows between the stages (pickled into the `item` column). kind `start`: a document's start (pages
    already done, their stored rows, or a document-level error row); kind `page`: one page to encode, carrying
    `page` after `_prepare`, `tensor` and `row` after `_Tower`, only `row` after `_write`."""

    kind: str
    document: Document
    todo: int = 0  # pages of the document encoded in this run
    index: int | None = None
    skipped: int = 0
    done_rows: list[dict] | None = None
    page: PageInput | None = None
    tensor: torch.Tensor | None = None
    row: dict | None = None


def _pack(items: list[_Item]) -> dict[str, np.ndarray]:
    column = np.empty(len(items), dtype=object)
    column[:] = [pickle.dumps(item, protocol=pickle.HIGHEST_PROTOCOL) for item in items]
    return {"item": column}


def _unpack(batch: dict[str, np.ndarray]) -> list[_Item]:
    return [pickle.loads(blob) for blob in batch["item"]]


def _pillow_limit(work: PageWork) -> None:
    """Pillow's process-wide decompression-bomb limit in this worker follows the run's `max_image_pixels`, as the
    CLI sets it in its own process (Pillow refuses twice the limit at open time, before `check_size` sees it)."""
    Image.MAX_IMAGE_PIXELS = work.options.max_image_pixels


def _expand(record: dict[str, Any], work: PageWork, folder: writer.Folder) -> list[dict[str, Any]]:
    """One document -> its start item and one item per page still to encode."""
    _pillow_limit(work)
    document = Document(record["source"], record["name"], record["kind"])
    start = work.start_document(folder, document)
    head = _Item("start", document, len(start.todo), skipped=start.skipped, done_rows=start.done_rows)
    if start.error is not None:
        head.row = work.error_row(document, None, start.error)
    items = [head] + [_Item("page", start.document, len(start.todo), index=i) for i in start.todo]
    return [{"item": pickle.dumps(item, protocol=pickle.HIGHEST_PROTOCOL)} for item in items]


class _Readers:
    """Page readers of this worker process, kept across batches (a PDF is opened, or fetched, once per process, not
    once per batch), one per run's settings; the handles of the two documents read last stay open."""

    def __init__(self) -> None:
        self.readers: dict[bytes, tuple[Any, list[Document]]] = {}

    def read(self, work: PageWork, document: Document, index: int):
        key = pickle.dumps((work.render, work.processor.to_dict(), work.options.tokenizer))
        if key not in self.readers:
            self.readers[key] = (work.page_reader(), [])
        reader, recent = self.readers[key]
        if document not in recent:
            recent.append(document)
            if len(recent) > 2:
                reader.release(recent.pop(0))
        return work.prepare(reader, document, index)


_READERS = _Readers()  # per worker process: a cache of open documents, no setting


def _prepare(batch: dict[str, np.ndarray], work: PageWork) -> dict[str, np.ndarray]:
    """Pages -> uint8 views and tiles (or error rows), read by this process's page reader (`_Readers`)."""
    _pillow_limit(work)
    items = _unpack(batch)
    for item in items:
        if item.kind != "page":
            continue
        prepared = _READERS.read(work, item.document, item.index)
        if isinstance(prepared, PageFailure):
            item.row = work.error_row(item.document, item.index, prepared.error, prepared.seconds)
        else:
            item.page = prepared
    return _pack(items)


class _ModelLoader:
    """`load_model(weights, config, seed, mode=...)` inside the actor (the checkpoint is read once per actor)."""

    def __init__(self, weights: str, config: str | None, seed: int, mode: str | None = None, hub=None) -> None:
        self.weights, self.config, self.seed, self.mode, self.hub = weights, config, seed, mode, hub

    def __call__(self) -> torch.nn.Module:
        from .weights import load_model

        return load_model(self.weights, self.config, seed=self.seed, mode=self.mode, hub=self.hub)[0]


class _Tower:
    """An actor of the pool: loads the tower once, runs batches of prepared pages."""

    def __init__(self, work: PageWork, loader: Callable[[], torch.nn.Module], device: str, dtype: str) -> None:
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"  # Ray sets CUDA_VISIBLE_DEVICES per actor
        self.model = loader().to(device=torch.device(device), dtype=parse_dtype(dtype)).eval()
        self.work = PageWork(work.processor, work.options, tower_name(self.model))
        if self.work.wants_warm_up(self.model):  # while the CPU stages prepare the first pages
            self.work.warm_up(self.model)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        items = _unpack(batch)
        pages = [item for item in items if item.page is not None]
        results = self.work.encode_batch(self.model, [item.page for item in pages]) if pages else []
        for item, (_, tensor, row) in zip(pages, results):
            item.page, item.tensor, item.row = None, tensor, row
        for item in items:
            if item.row is not None and item.row.get("tower") is None:
                item.row["tower"] = self.work.tower
        return _pack(items)


def _write(batch: dict[str, np.ndarray], folder: writer.Folder) -> dict[str, np.ndarray]:
    """Finished pages -> parts in the output folder; the items go on without their tensors."""
    items = _unpack(batch)
    by_document: dict[str, list] = {}
    for item in items:  # one part file per document of the batch (a retried task rewrites the same file whole)
        if item.tensor is not None:
            by_document.setdefault(item.document.name, []).append((item.row["key"], item.tensor, item.row))
            item.tensor = None
    for name, pages in by_document.items():
        writer.write_pages(folder, name, pages)
    return _pack(items)


def _compute(concurrency: int | tuple[int, int]):
    import ray.data

    if isinstance(concurrency, tuple):
        return ray.data.ActorPoolStrategy(min_size=concurrency[0], max_size=concurrency[1])
    return ray.data.ActorPoolStrategy(size=int(concurrency))


class _Driver:
    """The driver's share: manifest rows (exactly once per page), counts, document merges as Ray tasks."""

    def __init__(
        self, folder: writer.Folder, result: EncodeResult, max_merges: int, work: PageWork, documents: list[Document]
    ) -> None:
        import ray

        self.folder, self.result = folder, result
        self.manifest = writer.ManifestWriter(folder)
        rows = [row for row in writer.all_rows(folder) if row.get("status") == "ok"]
        work.check_done(folder, rows, documents)  # before anything is written
        self.ok_rows = {(row.get("output"), row.get("key")) for row in rows}
        self.remaining: dict[str, int] = {}
        self.seen: set[tuple[str, int]] = set()
        self.merges: list = []
        self.max_merges = max_merges
        self._merge = ray.remote(num_cpus=1)(writer.merge_document)

    def _merge_document(self, name: str) -> None:
        import ray

        if len(self.merges) >= self.max_merges:
            done, self.merges = ray.wait(self.merges, num_returns=1)
            ray.get(done)
        self.merges.append(self._merge.remote(self.folder, name))

    def take(self, items: list[_Item]) -> None:
        rows = []
        for item in items:
            name = item.document.name
            if item.kind == "start":
                for row in item.done_rows or []:
                    if (row.get("output"), row.get("key")) not in self.ok_rows:
                        self.ok_rows.add((row.get("output"), row.get("key")))
                        rows.append(row)  # a row a killed run lost, restored from the file's metadata
                self.result.pages_skipped += item.skipped
                if item.row is not None:
                    rows.append(item.row)
                    self.result.pages_error += 1
                    self.result.errors.append(item.row)
                self.remaining.setdefault(name, item.todo)
                continue
            if (name, item.index) in self.seen:  # never two rows for one page, whatever Ray re-delivers
                continue
            self.seen.add((name, item.index))
            row = item.row
            rows.append(row)
            if row["status"] == "ok":
                self.result.pages_ok += 1
                self.result.tokens += row["tokens"]
                self.result.add_auto_row(row)
                self.ok_rows.add((row["output"], row["key"]))
            else:
                self.result.pages_error += 1
                self.result.errors.append(row)
            self.remaining[name] = self.remaining.get(name, item.todo) - 1
            if self.remaining[name] == 0:
                self._merge_document(name)
        self.manifest.append(rows)  # after `_write`: every ok row's part exists under its final name

    def finish(self) -> None:
        import ray

        ray.get(self.merges)
        self.manifest.close()


def encode_dataset(
    inputs: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    weights: str | os.PathLike | Callable[[], torch.nn.Module] = "deepseek-ai/DeepSeek-OCR",
    processor: DeepEncoderImageProcessor | str = "gundam",
    options: EncodeOptions | None = None,
    *,
    config: str | os.PathLike | None = None,
    seed: int = 0,
    device: str = "auto",
    compute_dtype: str | torch.dtype = "float32",
    num_gpus_per_worker: float | None = None,
    num_cpus_per_worker: float = 1.0,
    concurrency: int | tuple[int, int] = 1,
    address: str | None = None,
    max_merges_in_flight: int = 16,
    hub: HubOptions | None = None,
    **option_overrides,
) -> EncodeResult:
    """Encode every page of `inputs` into `out_dir` on a Ray cluster; same outputs as `runner.encode`.

    weights: what `load_model` takes (a DeepSeek-OCR directory or hub id, a `save_pretrained` directory, `random`
        with `config` / `seed`), or a picklable callable returning a tower; every actor loads it once.
    hub: `from_pretrained`'s hub arguments for a `weights` hub id (`load_model`'s).
    processor: a DeepEncoderImageProcessor or a mode name. options / option_overrides: `EncodeOptions` fields
        (`batch_size` is the tower batch; `workers`, `prefetch` and `page_timeout` are the local runner's, unused here).
    device / compute_dtype: where and in which dtype each actor runs the tower (`auto`: its GPU if it has one).
    num_gpus_per_worker, num_cpus_per_worker: resources of each tower actor (GPUs: None = 1 if the cluster has
        GPUs, else 0); concurrency: actors in the pool, or (min, max) to autoscale.
    address: the cluster to join (`auto`, `ray://head:10001`); None joins a running `ray.init()` session or
        starts a local one. `inputs` / `out_dir` must be reachable from every node: shared disk or object store.
    """
    ray = _require_ray()
    options = resolve_options(options, option_overrides)
    if isinstance(processor, str):
        processor = DeepEncoderImageProcessor(mode=processor)
    folder = writer.as_folder(out_dir)
    for location in [folder.url, *map(os.fspath, inputs)]:
        if location.startswith("memory://"):
            raise ValueError(
                f"{location}: fsspec's memory:// lives inside one process and Ray's workers are other processes; "
                "use a shared folder, file://, or an object store URL"
            )
    loader = (
        weights
        if callable(weights)
        else _ModelLoader(
            os.fspath(weights), config and os.fspath(config), seed, mode=concrete_mode(processor), hub=hub
        )
    )
    dtype = str(parse_dtype(compute_dtype)).removeprefix("torch.")
    started_ray = False
    if not ray.is_initialized():
        ray.init(address=address)
        started_ray = True
    context = ray.data.DataContext.get_current()
    progress_bars = context.enable_progress_bars
    context.enable_progress_bars = options.progress
    try:
        if num_gpus_per_worker is None:
            num_gpus_per_worker = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
        folder.makedirs()
        with writer.OutputLock(folder, stale_after_s=options.lock_stale_after) as lock:
            if lock.warning:
                print(f"warning: {lock.warning}", flush=True)
            writer.clean_temp_files(folder)
            writer.merge_manifests(folder)
            documents = discover(inputs, on_empty=no_documents_warning)
            result = EncodeResult(out_dir=folder.display(), documents=len(documents))
            work = PageWork(processor, options)
            driver = _Driver(folder, result, max_merges_in_flight, work, documents)
            started = time.perf_counter()
            try:
                if documents:
                    records = [{"source": d.source, "name": d.name, "kind": d.kind} for d in documents]
                    dataset = (
                        ray.data.from_items(records, override_num_blocks=min(len(records), 200))
                        .flat_map(_expand, fn_kwargs={"work": work, "folder": folder})
                        .map_batches(_prepare, fn_kwargs={"work": work}, batch_size=options.batch_size)
                        .map_batches(_Tower, fn_constructor_kwargs={"work": work, "loader": loader, "device": device,
                                                                    "dtype": dtype},
                                     batch_size=options.batch_size, compute=_compute(concurrency),
                                     num_gpus=num_gpus_per_worker, num_cpus=num_cpus_per_worker)
                        .map_batches(_write, fn_kwargs={"folder": folder}, batch_size=None)
                    )  # fmt: skip
                    for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
                        driver.take(_unpack(batch))
                        if options.sleep_per_batch:
                            pause(options.sleep_per_batch)
            finally:
                driver.finish()
            writer.merge_manifests(folder)
            writer.remove_empty_part_folders(folder)
            result.seconds = time.perf_counter() - started
    finally:
        context.enable_progress_bars = progress_bars
        if started_ray:
            ray.shutdown()
    return result
