"""Page workers: processes that decode / render and preprocess pages, streaming them to the encode loop in order.

Each worker is a process with its own pdfium documents (pdfium is not thread-safe, so pages rendered by threads of one
process take turns; processes render side by side), its own page reader and no torch intra-op pool. The main process
hands out one page at a time (at most `depth` pages in flight per worker, never more than `MAX_TASKS_AHEAD`, so a
3,000-page PDF is never held whole and the task messages always fit in the pipe) and
gets back `PageInput` (uint8 pixels: a quarter of float32's bytes through the pipe) or `PageFailure`, which it yields
in the order the pages were asked for: batches are the same whatever worker finished first.

A worker that dies (a segfault in a decoder, the OOM killer) is replaced; the pages it held are asked again, one at a
time. A page that was being prepared when its worker died twice becomes a `PageFailure` naming the crash: no page is
lost and no bad page stops the run. Workers start with the `fork` method where the platform has it and no CUDA context
exists yet in this process; otherwise with `forkserver` (or `spawn`): they never touch the accelerator either way.
A forkserver imports the workers' modules once, and workers forked from it start with them loaded; started before
the tower loads (`prestart_workers`, as `deepencoder encode` does), its imports overlap the tower's loading.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.connection
import os
import pickle
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:  # imported where used: `prestart_workers` runs before torch is imported
    import numpy as np

    from .sources import Document

START_METHODS = ("auto", "fork", "forkserver", "spawn")
# pixels cross as raw bytes on the pipe's file descriptor (POSIX); elsewhere as framed messages (one more copy)
_RAW_PIPES = hasattr(os, "readv") and sys.platform != "win32"


# pages handed to one worker at a time, whatever the prefetch asks: a worker blocked sending a page back (megabytes,
# more than the pipe holds) reads no tasks, so the tasks sent ahead must fit in its pipe's buffer, or the encode
# process blocks sending them while the worker blocks sending to it (a deadlock: from about 160 tasks of 300 bytes on
# Linux's default socket buffers; macOS's hold 8 KiB). More ahead buys nothing: a worker prepares one page at a time.
MAX_TASKS_AHEAD = 8

# what a worker needs before its first page (`PageWork` and through it torch, transformers and the processor): a
# forkserver imports it once, so that the workers it forks start with it loaded instead of importing it each
WORKER_MODULES = ("deepencoder.pipeline.runner",)


def start_method(name: str = "auto", cuda: bool | None = None) -> str:
    """`auto`: `fork` on Linux while no CUDA context exists in this process (fast; children never use CUDA),
    else `forkserver` where available, else `spawn`. cuda: whether a CUDA context exists by the time the workers
    start (default: whether one exists now)."""
    if name not in START_METHODS:
        raise ValueError(f"worker start method must be one of {START_METHODS}, got {name!r}")
    if name != "auto":
        return name
    methods = multiprocessing.get_all_start_methods()
    if cuda is None:
        cuda = _cuda_initialized()
    if sys.platform.startswith("linux") and "fork" in methods and not cuda:
        return "fork"
    return "forkserver" if "forkserver" in methods else "spawn"


def preload_worker_modules(modules: Iterable[str] = WORKER_MODULES) -> None:
    """Have the forkserver import `modules` when this process starts it (no effect once it runs), keeping what was
    asked for before (`__main__` by default): every worker forked from it then starts with them imported."""
    from multiprocessing import forkserver

    current = list(getattr(forkserver._forkserver, "_preload_modules", None) or ["__main__"])
    multiprocessing.set_forkserver_preload(current + [name for name in modules if name not in current])


def prestart_workers(device, workers: int = 1, method: str = "auto") -> str:
    """Call first, before torch is imported and the tower loaded on `device` (a `torch.device` or its name): returns
    the start method the page workers of a run on that device will use, and when it is `forkserver` (a CUDA tower;
    platforms without fork) starts the server now with the workers' modules preloaded, so that its imports (seconds)
    overlap this process's own imports and the tower's loading instead of delaying the first batch, and the workers
    of every run in this process start in milliseconds. Nothing is started for `workers=0` or `fork`. Process-level:
    entry points call it (`deepencoder encode`, `benchmarks.pipeline`), model code never does."""
    chosen = start_method(method, cuda=_cuda_initialized() or str(device).startswith("cuda"))
    if workers > 0 and chosen == "forkserver":
        from multiprocessing import forkserver

        preload_worker_modules()
        with _no_missing_main_file():
            forkserver.ensure_running()
    return chosen


@contextlib.contextmanager
def _no_missing_main_file() -> Iterator[None]:
    """While workers (or the forkserver) start: a `__main__` whose `__file__` names no file (a script read from
    stdin, `python - <<EOF`, has "<stdin>") is started without it. `spawn` and `forkserver` children run the parent's
    main file first; a missing one killed every worker (all pages "worker died"). The workers need nothing of it."""
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if path is None or os.path.exists(path):
        yield
        return
    del main.__file__
    try:
        yield
    finally:
        main.__file__ = path


def _cuda_initialized() -> bool:
    torch = sys.modules.get("torch")
    return bool(torch is not None and torch.cuda.is_initialized())


@dataclass(frozen=True)
class PageTask:
    """One page to prepare."""

    document: Document
    index: int


def _send_result(conn, key: int, result) -> None:
    """`(key, PageInput | PageFailure)` to the encode process: the page pickled without its pixels (a framed message),
    then each pixel array's raw bytes written straight from its memory (no pickled copy on either side; the reader
    reads them straight into the arrays it allocates, `_receive_result`). Pixels travel in their memory order: a
    channels-last view (3, H, W) as its (H, W, 3) pixels (numpy would pickle a transposed copy), and come back as
    the same view."""
    from ..image_processing_deepencoder import pixels_in_memory_order

    arrays: list[np.ndarray] = []

    def described(pixels):
        in_memory, channels_last = pixels_in_memory_order(pixels)
        arrays.append(in_memory.numpy())
        return _Pixels(tuple(in_memory.shape), arrays[-1].dtype.str, channels_last)

    if getattr(result, "pixel_values", None) is not None:
        pixel_values = described(result.pixel_values)  # the global view's bytes first, then the tiles'
        tiles = None if result.tiles is None else described(result.tiles)
        result = replace(result, pixel_values=pixel_values, tiles=tiles)
    conn.send_bytes(pickle.dumps((key, result), protocol=pickle.HIGHEST_PROTOCOL))
    for array in arrays:
        view = memoryview(array).cast("B")
        if not _RAW_PIPES:
            conn.send_bytes(view)
            continue
        while view:
            view = view[os.write(conn.fileno(), view) :]


def _receive_result(conn) -> tuple[int, object]:
    """What `_send_result` sent: raises EOFError when the worker died before all of it arrived."""
    import numpy as np
    import torch

    key, result = pickle.loads(conn.recv_bytes())

    def read(pixels):
        array = np.empty(pixels.shape, dtype=np.dtype(pixels.dtype))
        view = memoryview(array).cast("B")
        if not _RAW_PIPES:
            if conn.recv_bytes_into(view) != view.nbytes:
                raise EOFError("page worker sent a short page")
        else:
            while view:
                count = os.readv(conn.fileno(), [view])
                if count == 0:
                    raise EOFError("page worker closed its pipe mid-page")
                view = view[count:]
        tensor = torch.from_numpy(array)
        return tensor.movedim(-1, -3) if pixels.channels_last else tensor

    if isinstance(getattr(result, "pixel_values", None), _Pixels):  # the order they were written in
        pixel_values = read(result.pixel_values)
        tiles = None if result.tiles is None else read(result.tiles)
        result = replace(result, pixel_values=pixel_values, tiles=tiles)
    return key, result


class _Pixels(NamedTuple):
    """A pixel array's place in a page message: its raw bytes follow the message."""

    shape: tuple[int, ...]
    dtype: str
    channels_last: bool


def _worker_main(conn, work_blob: bytes, parent_end=None) -> None:
    """A worker's loop: receive a task (None: stop), answer `(seq, PageInput | PageFailure)` pickled.
    parent_end: with `fork`, the parent's end of this worker's pipe, inherited: closed at once, so that a send to a
    parent that died fails instead of filling a pipe this process itself keeps open."""
    if parent_end is not None:
        parent_end.close()
    import torch

    torch.set_num_threads(1)  # pages are prepared one per process; the cores belong to the processes
    work = pickle.loads(work_blob)
    work.in_worker()
    reader = work.page_reader()
    open_documents: deque[Document] = deque()
    parent = os.getppid()
    try:
        while True:
            # a killed encode process never sends `None`, and with `fork` its end of the pipe may live on in
            # sibling workers (no EOF): a worker whose parent is gone (re-parented) stops by itself
            while not conn.poll(1.0):
                if os.getppid() != parent:
                    return
            message = conn.recv()
            if message is None:
                return
            key, task = message
            if task.document not in open_documents:  # pdfium handles of the two latest documents stay open
                open_documents.append(task.document)
                if len(open_documents) > 2:
                    reader.release(open_documents.popleft())
            _send_result(conn, key, work.prepare(reader, task.document, task.index))
    except (EOFError, KeyboardInterrupt, BrokenPipeError):
        return
    finally:
        reader.close()


class _Worker:
    def __init__(self, context, work_blob: bytes, number: int) -> None:
        self.conn, child = context.Pipe(duplex=True)
        inherited = self.conn if context.get_start_method() == "fork" else None
        self.process = context.Process(
            target=_worker_main, args=(child, work_blob, inherited), name=f"deepencoder-page-{number}", daemon=True
        )
        with _no_missing_main_file():
            self.process.start()
        child.close()
        self.tasks: deque[tuple[int, PageTask]] = deque()  # (key, task) sent, not yet answered, in the order sent
        self.waited = 0.0  # seconds the encode process has waited on this worker's current page

    def stop(self) -> None:
        try:
            self.conn.send(None)
        except (OSError, ValueError):
            pass

    def join(self, timeout: float) -> None:
        self.process.join(timeout)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self.conn.close()


class PageProducer:
    """`workers` page processes preparing pages for `work` (a `PageWork`; pickled to each worker).

    `run(items, failure)` yields `(item, result)` in the order of `items`: for a `PageTask` the prepared page, for
    anything else the item itself (markers such as a document's start travel in order with the pages).
    `failure(task, message)` builds the result of a page whose worker died on it twice, or that took longer than
    `page_timeout` seconds of the encode process's waiting (its worker is then killed and replaced: a page that hangs
    its decoder never stalls the run; time the encode process spends elsewhere, e.g. in a slow forward, does not
    count). Use as a context manager (workers stop on exit)."""

    def __init__(
        self, work, workers: int, depth: int = 2, method: str = "auto", page_timeout: float | None = None
    ) -> None:
        self.method = start_method(method)
        self.context = multiprocessing.get_context(self.method)
        if self.method == "forkserver":  # the workers' modules imported once, by the server (if it is not running)
            preload_worker_modules((*WORKER_MODULES, type(work).__module__))
        self.work_blob = pickle.dumps(work, protocol=pickle.HIGHEST_PROTOCOL)
        self.depth = max(1, min(depth, MAX_TASKS_AHEAD))
        self.page_timeout = page_timeout or None
        self._started = 0
        self.crashes: list[str] = []  # what happened, for the run's summary / warnings
        self.workers = [self._start() for _ in range(max(1, workers))]

    def _start(self) -> _Worker:
        self._started += 1
        return _Worker(self.context, self.work_blob, self._started)

    def __enter__(self) -> PageProducer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self, abort: bool = False) -> None:
        """Stop the workers: idle ones finish their loop; `abort` (the run stopped early) kills them at once."""
        for worker in self.workers:
            if abort:
                worker.process.kill()
            else:
                worker.stop()
        for worker in self.workers:
            worker.join(5.0)
        self.workers = []

    def run(self, items: Iterable, failure: Callable[[PageTask, str], object]) -> Iterator[tuple]:
        items = iter(items)
        order: deque[tuple[int, object]] = deque()  # (key, item) handed out and not yet yielded, in order
        done: dict[int, object] = {}
        retry: deque[tuple[int, PageTask]] = deque()  # pages of a dead worker, asked again one at a time
        suspects: dict[int, int] = {}  # key -> crashes while that page was the one being prepared
        keys = iter(range(1 << 62))
        exhausted = False
        while True:
            # hand out work: a retried page alone to an idle worker, else new pages up to `depth` per worker
            for worker in self.workers:
                if retry:
                    if not worker.tasks:
                        self._send(worker, retry.popleft())
                    continue
                while not exhausted and len(worker.tasks) < self.depth:
                    item = next(items, None)
                    if item is None:
                        exhausted = True
                        break
                    key = next(keys)
                    order.append((key, item))
                    if isinstance(item, PageTask):
                        self._send(worker, (key, item))
                    else:
                        done[key] = item
            while order and order[0][0] in done:
                key, item = order.popleft()
                yield item, done.pop(key)
            if not order and exhausted:
                return
            busy = [w for w in self.workers if w.tasks]
            if not busy:
                continue
            limit = None if self.page_timeout is None else max(0.0, self.page_timeout - max(w.waited for w in busy))
            start = time.monotonic()
            ready = multiprocessing.connection.wait([w.conn for w in busy] + [w.process.sentinel for w in busy], limit)
            waited = time.monotonic() - start
            for worker in busy:
                worker.waited += waited
                if worker.conn in ready:
                    try:
                        while worker.conn.poll():
                            key, result = _receive_result(worker.conn)
                            worker.tasks.popleft()
                            worker.waited = 0.0  # its next page starts now
                            done[key] = result
                    except (EOFError, OSError):
                        pass  # died mid-answer: handled below with its sentinel
                if worker.process.sentinel in ready or not worker.process.is_alive():
                    worker.process.join()
                    self._replace(worker, retry, suspects, done, failure)
                elif self.page_timeout is not None and worker.tasks and worker.waited >= self.page_timeout:
                    worker.process.kill()
                    worker.process.join()
                    self._replace(worker, retry, suspects, done, failure, timed_out=True)

    def _send(self, worker: _Worker, message: tuple[int, PageTask]) -> None:
        worker.tasks.append(message)
        try:
            worker.conn.send(message)
        except (OSError, ValueError):
            pass  # a dead worker: its sentinel is ready, its tasks are retried

    def _replace(
        self, worker: _Worker, retry: deque, suspects: dict, done: dict, failure, timed_out: bool = False
    ) -> None:
        code = worker.process.exitcode
        held = list(worker.tasks)
        worker.tasks.clear()
        worker.conn.close()
        self.workers[self.workers.index(worker)] = self._start()
        if not held:
            return
        (key, head), rest = held[0], held[1:]
        if timed_out:  # not asked again: a page that hangs its decoder hangs it the next time too
            what = f"{head.document.source} page {head.index}"
            done[key] = failure(head, f"page took longer than {self.page_timeout:g} s to prepare; its worker was "
                                      "stopped (--page-timeout)")  # fmt: skip
            self.crashes.append(f"{what}: no page after {self.page_timeout:g} s, its worker stopped")
            retry.extend(rest)
            return
        suspects[key] = suspects.get(key, 0) + 1
        what = f"page worker died (exit code {code}) while preparing {head.document.source} page {head.index}"
        if suspects[key] >= 2:
            done[key] = failure(head, f"{what}, twice; the page is skipped")
            self.crashes.append(f"{what} again: page reported as an error")
        else:
            retry.append((key, head))
            self.crashes.append(f"{what}: retried")
        retry.extend(rest)


def default_workers() -> int:
    """Page processes worth starting here: the cores this process may use, less one for the encode loop."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return max(1, cores - 1)
