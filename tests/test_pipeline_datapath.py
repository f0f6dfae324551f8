"""The encode data path: uint8 pages normalised on the device (bit-identical to the float path), page worker
processes (a crashed worker's page retried, then reported; spawn-safe), out-of-memory halving, a sticky device error
stopping the run with everything written whole, and one part file per batch and document.

Every test that starts processes runs the encode under `guarded`: a hang fails the test instead of stalling CI."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import threading
import time
import weakref
from collections import Counter

import numpy as np
import pytest
import torch
from helpers import random_model
from pipeline_support import REPO, make_documents, make_pdf, processor, text_page, tiny_weights
from safetensors.torch import load_file

from deepencoder import DeepEncoderImageProcessor
from deepencoder.image_processing_deepencoder import image_to_uint8, images_to_uint8
from deepencoder.pipeline import encode, runner, writer
from deepencoder.pipeline.runner import DeviceFailed, PageWork
from deepencoder.pipeline.writer import read_rows


@pytest.fixture(scope="module")
def model():
    return random_model()


def guarded(function, timeout: float = 600.0):
    """Run `function()` in a thread; fail (never hang) if it has not returned after `timeout` seconds."""
    outcome: dict = {}

    def target():
        try:
            outcome["value"] = function()
        except BaseException as error:  # noqa: BLE001 - re-raised in the test
            outcome["error"] = error

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), f"the run did not finish within {timeout:.0f} s (a hang)"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def stored(out) -> dict[tuple[str, int], torch.Tensor]:
    tensors = {}
    for path in out.glob("*.safetensors"):
        for key, tensor in load_file(str(path)).items():
            tensors[(path.name.removesuffix(".safetensors"), writer.key_index(key))] = tensor
    return tensors


# ---------------------------------------------------------------------------------------------- uint8 transport
def test_normalize_is_the_float_path_bit_for_bit():
    """uint8 normalised after the copy equals (x / 255 - mean) / std computed in float32 (numpy, elementwise)."""
    proc = processor()
    pixels = torch.randint(0, 256, (2, 3, 17, 23), dtype=torch.uint8)
    x = pixels.numpy().astype(np.float32)
    reference = torch.from_numpy((x / np.float32(255.0) - np.float32(0.5)) / np.float32(0.5))
    assert torch.equal(proc.normalize(pixels), reference)
    assert torch.equal(proc.normalize(pixels, torch.bfloat16), reference.to(torch.bfloat16))
    page = text_page((40, 30), "uint8")
    assert torch.equal(proc.to_tensor(page), proc.normalize(image_to_uint8(page)))
    pixels = image_to_uint8(page)  # channels first, viewing the (H, W, 3) pixels: no transposing copy
    assert pixels.shape == (3, 30, 40) and pixels.dtype == torch.uint8 and pixels.movedim(0, -1).is_contiguous()
    assert torch.equal(pixels, torch.from_numpy(np.asarray(page).transpose(2, 0, 1).copy()))
    tiles = images_to_uint8([page, page.rotate(180)])
    assert tiles.shape == (2, 3, 30, 40) and torch.equal(tiles[1], image_to_uint8(page.rotate(180)))


@pytest.mark.parametrize("size", [(300, 400), (400, 250), (700, 130), (129, 900), (256, 256)])
def test_tile_pixels_are_the_tiles_cut_out_of_one_array(size):
    """`tile_pixels` (one resize, one copy) equals the processor's PIL tiles converted and stacked, tile for tile."""
    proc = processor()
    page = text_page(size, "t")
    plan = proc.plan(*size)
    tiles = proc.tiles(page, plan)
    assert plan.num_tiles == len(tiles) > 1
    pixels = proc.tile_pixels(page, plan)
    assert pixels.shape == (len(tiles), 3, 128, 128) and torch.equal(pixels, images_to_uint8(tiles))
    assert proc.tile_pixels(page, proc.plan(100, 80)) is None  # a page within one tile has none


@pytest.mark.parametrize(
    "size", [(80, 60), (96, 128), (128, 128), (127, 128), (128, 43), (5, 128), (128, 127), (160, 128), (129, 2)]
)
def test_pad_spot_is_where_imageops_pad_puts_the_page(size):
    """Where `pad_spot` says a page lands unresampled, the view made by pasting it there is `global_view`'s, bit for
    bit; where it says None, the view is not the page pasted anywhere (resampled), or the mode tiles the page."""
    proc = DeepEncoderImageProcessor(mode="base", base_size=128)
    page = text_page(size, "p")
    view = np.asarray(proc.global_view(page, proc.plan(*size)))
    spot = proc.pad_spot(*size)
    fits = max(size) == 128  # a page rendered to the view's side, the other side then as it is
    assert (spot is not None) == fits
    if spot is not None:
        (x, y), (w, h) = spot.offset, size
        made = np.empty_like(view)
        made[...] = np.asarray(spot.color, dtype=np.uint8)
        made[y : y + h, x : x + w] = np.asarray(page)
        assert spot.size == (128, 128) and np.array_equal(made, view)
    else:  # resampled: no placement of the page itself makes the view
        assert not any(np.array_equal(view[y : y + size[1], x : x + size[0]], np.asarray(page))
                       for x in range(129 - size[0]) for y in range(129 - size[1]))  # fmt: skip
    assert DeepEncoderImageProcessor(mode="gundam", base_size=128, tile_size=64).pad_spot(*size) is None
    assert DeepEncoderImageProcessor(mode="tiny", base_size=128).pad_spot(*size) is None  # stretched, not padded


@pytest.mark.parametrize("size", [(300, 400), (400, 250), (333, 333), (97, 401)])
def test_pdf_pages_rendered_into_their_view_equal_the_image_path(tmp_path, size):
    """pdfium drawing a page straight into its padded global view gives the uint8 view `global_view` makes from the
    rendered image, pixel for pixel, and the same plan and page size; the page workers send it channels-last."""
    from deepencoder.pipeline.sources import PaddedView

    make_pdf(tmp_path / "a.pdf", 2, size=size)
    proc = DeepEncoderImageProcessor(mode="base", base_size=256)
    work = PageWork(proc, runner.EncodeOptions())
    document = runner.discover([str(tmp_path / "a.pdf")])[0]
    reader = work.page_reader()
    try:
        for index in range(2):
            image = reader.read(document, index)  # the image path
            drawn = reader.read(document, index, proc.pad_spot)
            assert isinstance(drawn, PaddedView) and drawn.size == image.size and max(image.size) == 256
            expected = np.array(proc.global_view(image, proc.plan(*image.size)))
            assert np.array_equal(drawn.pixels, expected)
            page = work.prepare(reader, document, index)
            assert page.tiles is None and page.size == image.size and page.plan == proc.plan(*image.size)
            assert torch.equal(page.pixel_values, torch.from_numpy(expected).movedim(-1, 0))
    finally:
        reader.close()


@pytest.mark.parametrize("raw", [True, False])
def test_pages_cross_the_worker_pipe_as_their_pixels(monkeypatch, raw):
    """A page goes through a worker pipe as a pickled message without pixels, then each pixel array's bytes (raw on
    the descriptor, or as framed messages where there is none): it comes back equal, a channels-last view still
    channels-last (no transposed copy); contiguous pixels come back contiguous; a page cut off by its worker's death
    raises EOFError (the producer's sign of a dead worker), never a short page."""
    import multiprocessing

    from deepencoder.pipeline import producer

    monkeypatch.setattr(producer, "_RAW_PIPES", raw)
    page = runner.PageInput(None, 0, None, (640, 480), image_to_uint8(text_page((640, 480), "a")),
                            images_to_uint8([text_page((96, 96), "t")] * 3), 0.0)  # fmt: skip
    plain = runner.replace(page, pixel_values=page.pixel_values.contiguous(), tiles=None)
    failure = runner.PageFailure(None, 2, "bad page", 0.0)
    receiving, sending = multiprocessing.Pipe(duplex=True)
    # a page (~1 MB) is larger than the pipe's buffer: the sender runs beside the reader, as a worker does
    sender = threading.Thread(target=lambda: [producer._send_result(sending, k, r)
                                              for k, r in enumerate((page, plain, failure))])  # fmt: skip
    sender.start()
    received = [producer._receive_result(receiving) for _ in range(3)]
    sender.join()
    assert [key for key, _ in received] == [0, 1, 2] and received[2][1] == failure
    back = received[0][1]
    for before, after in ((page.pixel_values, back.pixel_values), (page.tiles, back.tiles)):
        assert torch.equal(before, after) and after.movedim(-3, -1).is_contiguous()
    assert torch.equal(received[1][1].pixel_values, plain.pixel_values) and received[1][1].pixel_values.is_contiguous()
    assert received[1][1].tiles is None
    # the worker dies after the message, before all the pixels: EOF, not a page
    cut = runner.replace(page, pixel_values=producer._Pixels((480, 640, 3), "|u1", True), tiles=None)
    sending.send_bytes(pickle.dumps((3, cut)))
    if raw:
        os.write(sending.fileno(), b"x" * 100)
    else:
        sending.send_bytes(b"x" * 100)
    sending.close()
    with pytest.raises(EOFError):
        producer._receive_result(receiving)


def test_channels_last_pages_join_without_transposing():
    """A batch of channels-last pages is joined channels-last (plain copies), equal to stacking them."""
    views = [image_to_uint8(text_page((40, 30), "a")), image_to_uint8(text_page((40, 30), "b"))]
    joined = runner._join(views, stack=True)
    assert torch.equal(joined, torch.stack([v.contiguous() for v in views])) and joined.movedim(1, -1).is_contiguous()
    tiles = images_to_uint8([text_page((16, 16), "t")] * 2)
    both = runner._join([tiles, tiles], stack=False)
    assert torch.equal(both, torch.cat([tiles.contiguous()] * 2)) and both.movedim(1, -1).is_contiguous()
    mixed = runner._join([views[0], views[1].contiguous()], stack=True)
    assert torch.equal(mixed, joined)
    # the batch is written into memory from `empty` (pinned host memory on CUDA), once: no stacked copy to pin after
    made = []
    recording = lambda shape, dtype: made.append(torch.empty(shape, dtype=dtype)) or made[-1]  # noqa: E731
    into = runner._join(views, stack=True, empty=recording)
    assert [tuple(t.shape) for t in made] == [(2, 30, 40, 3)] and into.data_ptr() == made[0].data_ptr()
    assert torch.equal(into, joined)


def test_pages_cross_as_uint8(tmp_path):
    make_pdf(tmp_path / "a.pdf", 1)
    work = PageWork(processor(), runner.EncodeOptions())
    document = runner.discover([str(tmp_path / "a.pdf")])[0]
    page = work.prepare(work.page_reader(), document, 0)
    assert page.pixel_values.dtype == torch.uint8 and page.tiles is not None and page.tiles.dtype == torch.uint8


def prepared_pages(tmp_path, count: int, batch_size: int) -> tuple[PageWork, list]:
    """A `PageWork` of the test processor and the prepared pages (uint8) of a `count`-page PDF."""
    make_pdf(tmp_path / "a.pdf", count)
    work = PageWork(processor(), runner.EncodeOptions(batch_size=batch_size))
    document = runner.discover([str(tmp_path / "a.pdf")])[0]
    reader = work.page_reader()
    try:
        return work, [work.prepare(reader, document, i) for i in range(count)]
    finally:
        reader.close()


def test_cpu_staging_fills_the_batch_tensor_in_place(tmp_path):
    """On the CPU pages are normalised into consecutive slots of one batch tensor, which `upload` takes as the batch
    without a copy; the values are those of normalising the stacked uint8 pages."""
    work, pages = prepared_pages(tmp_path, 3, batch_size=2)
    stage = work.stager(torch.device("cpu"), torch.float32)
    staged = [stage(page) for page in pages]
    expected = work.processor.normalize(torch.stack([p.pixel_values for p in pages[:2]]))
    batch, tiles = work.upload(staged[:2], torch.device("cpu"), torch.float32)
    assert torch.equal(batch, expected) and batch.data_ptr() == staged[0].pixel_values.data_ptr()
    assert torch.equal(tiles, work.processor.normalize(torch.cat([p.tiles for p in pages[:2]])))
    # the third page starts a new batch tensor; a batch across two of them is stacked (same values)
    mixed, _ = work.upload(staged[1:], torch.device("cpu"), torch.float32)
    assert torch.equal(mixed, work.processor.normalize(torch.stack([p.pixel_values for p in pages[1:]])))


def test_cpu_staging_reuses_a_batch_tensor_only_once_released(tmp_path):
    work, pages = prepared_pages(tmp_path, 6, batch_size=2)
    stage = work.stager(torch.device("cpu"), torch.float32)
    first = [stage(page) for page in pages[:2]]
    second = [stage(page) for page in pages[2:4]]  # the first batch is not released: a new batch tensor
    assert second[0].pixel_values.data_ptr() != first[0].pixel_values.data_ptr()
    stage.release(first)
    third = [stage(page) for page in pages[4:]]  # reuses the first one's memory
    assert third[0].pixel_values.data_ptr() == first[0].pixel_values.data_ptr()
    for staged, page in zip(second + third, pages[2:]):
        assert torch.equal(staged.pixel_values, work.processor.normalize(page.pixel_values))
    stage.release(second + third)
    work.batch_limit = 1  # halved after out of memory: batch tensors of 2 pages are never used again, nor kept
    fourth = stage(pages[0])
    assert fourth.pixel_values.data_ptr() not in {second[0].pixel_values.data_ptr(), third[0].pixel_values.data_ptr()}
    assert [tuple(t.shape)[0] for t in stage.free] == []


# ---------------------------------------------------------------------------------------------- worker processes
class CrashingWork(PageWork):
    """Page preparation that kills its worker process on page 1 of every document: once (the marker file records
    it) or every time. Settings are class attributes the test sets, copied into the instance (pickled to workers)."""

    settings: dict = {}

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.__dict__.update(self.settings)

    def prepare(self, reader, document, index):
        if index == 1 and os.getpid() != self.main_pid:
            if self.always or not os.path.exists(self.marker):
                open(self.marker, "w").close()
                os._exit(7)
        return super().prepare(reader, document, index)


def _crashing(tmp_path, monkeypatch, always: bool) -> None:
    settings = {"marker": str(tmp_path / "crashed"), "always": always, "main_pid": os.getpid()}
    monkeypatch.setattr(CrashingWork, "settings", settings)
    monkeypatch.setattr(runner, "PageWork", CrashingWork)


def test_crashed_worker_page_is_retried(tmp_path, model, monkeypatch, capsys):
    (tmp_path / "in").mkdir()
    make_pdf(tmp_path / "in" / "book.pdf", 4)
    plain = encode([str(tmp_path / "in")], tmp_path / "plain", model, processor(), batch_size=2, workers=0,
                   progress=False)  # fmt: skip
    _crashing(tmp_path, monkeypatch, always=False)
    result = guarded(lambda: encode([str(tmp_path / "in")], tmp_path / "out", model, processor(), batch_size=2,
                                    workers=2, progress=False))  # fmt: skip
    assert (tmp_path / "crashed").exists()  # a worker did die
    assert result.ok and result.pages_ok == plain.pages_ok == 4
    assert "page worker died (exit code 7)" in capsys.readouterr().err
    expected, got = stored(tmp_path / "plain"), stored(tmp_path / "out")
    assert set(got) == set(expected) and all(torch.equal(got[k], expected[k]) for k in expected)


def test_page_that_kills_its_worker_twice_is_reported(tmp_path, model, monkeypatch):
    (tmp_path / "in").mkdir()
    make_pdf(tmp_path / "in" / "book.pdf", 3)
    _crashing(tmp_path, monkeypatch, always=True)
    result = guarded(lambda: encode([str(tmp_path / "in")], tmp_path / "out", model, processor(), batch_size=2,
                                    workers=1, progress=False))  # fmt: skip
    rows = read_rows(tmp_path / "out" / "manifest.jsonl")
    status = {row["page"]: row["status"] for row in rows}
    assert status == {0: "ok", 1: "error", 2: "ok"} and result.pages_error == 1
    error = next(row["error"] for row in rows if row["status"] == "error")
    assert "page worker died" in error and "twice" in error
    assert set(stored(tmp_path / "out")) == {("book.pdf", 0), ("book.pdf", 2)}


class HangingWork(PageWork):
    """Page preparation that never returns on page 1 of every document in a worker process (a decoder stuck in a
    loop)."""

    main_pid = os.getpid()

    def prepare(self, reader, document, index):
        if index == 1 and os.getpid() != self.main_pid:
            time.sleep(3600)
        return super().prepare(reader, document, index)


def test_a_page_that_hangs_its_worker_gets_an_error_row_after_the_page_timeout(tmp_path, model, monkeypatch, capsys):
    (tmp_path / "in").mkdir()
    make_pdf(tmp_path / "in" / "book.pdf", 4)
    monkeypatch.setattr(runner, "PageWork", HangingWork)
    result = guarded(lambda: encode([str(tmp_path / "in")], tmp_path / "out", model, processor(), batch_size=2,
                                    workers=2, page_timeout=4.0, progress=False), timeout=120)  # fmt: skip
    rows = read_rows(tmp_path / "out" / "manifest.jsonl")
    assert {row["page"]: row["status"] for row in rows} == {0: "ok", 1: "error", 2: "ok", 3: "ok"}
    assert result.pages_error == 1 and "longer than 4 s" in next(r["error"] for r in rows if r["page"] == 1)
    assert "no page after 4 s, its worker stopped" in capsys.readouterr().err


def test_time_the_run_spends_elsewhere_does_not_count_against_a_page(tmp_path, model, monkeypatch):
    """The page timeout counts only the time the run waits for a worker: a forward slower than the timeout (the
    workers' pages ready long before the run reads them) times nothing out."""
    (tmp_path / "in").mkdir()
    make_pdf(tmp_path / "in" / "book.pdf", 4)
    launch = PageWork.launch
    monkeypatch.setattr(PageWork, "launch", lambda self, *a: time.sleep(1.5) or launch(self, *a))
    result = guarded(lambda: encode([str(tmp_path / "in")], tmp_path / "out", model, processor(), batch_size=1,
                                    workers=1, page_timeout=1.0, progress=False), timeout=120)  # fmt: skip
    assert result.ok and result.pages_ok == 4


def test_spawned_workers_give_the_same_outputs(tmp_path, model):
    make_documents(tmp_path / "in")
    encode([str(tmp_path / "in")], tmp_path / "thread", model, processor(), batch_size=3, workers=0, progress=False)
    result = guarded(lambda: encode([str(tmp_path / "in")], tmp_path / "spawn", model, processor(), batch_size=3,
                                    workers=1, worker_start="spawn", progress=False))  # fmt: skip
    assert result.ok and result.pages_ok == 7
    expected, got = stored(tmp_path / "thread"), stored(tmp_path / "spawn")
    assert set(got) == set(expected) and all(torch.equal(got[k], expected[k]) for k in expected)
    strip = lambda rows: sorted((r["document"], r["page"], r["tokens"], r["status"]) for r in rows)  # noqa: E731
    assert strip(read_rows(tmp_path / "spawn" / "manifest.jsonl")) == strip(
        read_rows(tmp_path / "thread" / "manifest.jsonl")
    )


STDIN_SCRIPT = """
import sys
from deepencoder import DeepEncoderModel
from deepencoder.pipeline import encode, prestart_workers
from pipeline_support import processor

folder, method = sys.argv[1], sys.argv[2]
prestart_workers("cpu", 1, method)
model = DeepEncoderModel.from_pretrained(folder + "/tiny").eval()
result = encode([folder + "/in"], folder + "/out-" + method, model, processor(), batch_size=2, workers=1,
                worker_start=method, progress=False)
print(result.pages_ok, result.pages_error)
"""


@pytest.mark.parametrize("method", ["spawn", "forkserver"])
def test_workers_start_from_a_script_read_from_stdin(tmp_path, method):
    """`python - <<EOF` (`__main__.__file__` is "<stdin>"): spawn and forkserver workers used to run that missing
    file first and die, every page an error row; they now start without it and every page is encoded."""
    (tmp_path / "in").mkdir()
    make_pdf(tmp_path / "in" / "book.pdf", 3)
    tiny_weights(tmp_path / "tiny")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")]), "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-", str(tmp_path), method], input=STDIN_SCRIPT, env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split() == ["3", "0"], run.stderr[-3000:]


# ---------------------------------------------------------------------------------------------- device faults
class FailingTower(torch.nn.Module):
    """The tiny tower, failing as `fail(call, pixel_values)` says (an exception to raise, or None)."""

    def __init__(self, model, fail) -> None:
        super().__init__()
        self.model, self.config, self.fail, self.calls = model, model.config, fail, 0

    def forward(self, **kwargs):
        self.calls += 1
        error = self.fail(self.calls, kwargs["pixel_values"])
        if error is not None:
            raise error
        return self.model(**kwargs)


@pytest.mark.parametrize("at_once", [True, False])
def test_out_of_memory_halves_the_batch(tmp_path, model, monkeypatch, capsys, at_once):
    """Out of memory on a batch of 4: halved, every page written equal to a batch-2 run's; `at_once=False` is an
    accelerator's order (the failing batch's launch raises while the batch before it is still queued)."""
    monkeypatch.setattr(PageWork, "runs_at_once", lambda self, device: at_once)
    (tmp_path / "in").mkdir()
    make_pdf(tmp_path / "in" / "book.pdf", 5)
    oom = lambda call, pixels: torch.OutOfMemoryError("CUDA out of memory.") if len(pixels) > 2 else None  # noqa: E731
    tower = FailingTower(model, oom)
    result = encode([str(tmp_path / "in")], tmp_path / "out", tower, processor(), batch_size=4, workers=0,
                    progress=False)  # fmt: skip
    assert result.ok and result.pages_ok == 5
    assert "out of memory on a batch of 4 pages" in capsys.readouterr().err
    encode([str(tmp_path / "in")], tmp_path / "plain", model, processor(), batch_size=2, workers=0, progress=False)
    expected, got = stored(tmp_path / "plain"), stored(tmp_path / "out")  # halves: (0, 1), (2, 3), then (4)
    assert set(got) == set(expected) and all(torch.equal(got[k], expected[k]) for k in expected)


class HoardingTower(torch.nn.Module):
    """The tiny tower, whose forward makes an "activation" (a local, as a real forward's intermediates are) and runs
    out of memory on more than `fits` views and, with `fail_first`, on its first call; notes, at each call and each
    freeing of the device cache, which of the failed calls' activations are still alive."""

    def __init__(self, model, fits: int, fail_first: bool = False) -> None:
        super().__init__()
        self.model, self.config, self.fits, self.fail_first = model, model.config, fits, fail_first
        self.failed: list = []  # weak references to the activations of the calls that ran out of memory
        self.alive: list[list[bool]] = []

    def note(self) -> None:
        self.alive.append([ref() is not None for ref in self.failed])

    def forward(self, **kwargs):
        self.note()
        activation = torch.ones(1000)
        if len(kwargs["pixel_values"]) > self.fits or (self.fail_first and len(self.alive) == 1):
            self.failed.append(weakref.ref(activation))
            raise torch.OutOfMemoryError("CUDA out of memory.")
        return self.model(**kwargs)


@pytest.mark.parametrize("warmup", [False, True])
def test_out_of_memory_frees_the_failed_forward_before_retrying(tmp_path, model, monkeypatch, warmup):
    """The failed forward's tensors are gone by the time the device cache is freed and the halves run: the retries
    no longer happen inside the `except` block, whose traceback held the failed forward's frames (on a GPU, its
    activations stayed allocated through every half-size retry, which could run out of memory in turn)."""
    (tmp_path / "in").mkdir()
    make_pdf(tmp_path / "in" / "book.pdf", 4)
    tower = HoardingTower(model, fits=4 if warmup else 1, fail_first=warmup)  # warm-up: it fails, the pages fit
    freeing = runner.free_device_cache
    monkeypatch.setattr(runner, "free_device_cache", lambda m: tower.note() or freeing(m))
    result = encode([str(tmp_path / "in")], tmp_path / "out", tower, processor(), batch_size=4, workers=0,
                    warmup=warmup, progress=False)  # fmt: skip
    assert result.ok and result.pages_ok == 4 and tower.failed
    assert len(tower.alive) > len(tower.failed) + 1
    assert not any(any(alive) for alive in tower.alive)


def test_out_of_memory_lowers_a_compiled_towers_views_per_call(tmp_path, model, capsys):
    """A tower compiled on fixed shapes (`--compile`: views_per_call = batch size) whose 4-view graph runs out of
    memory: the run halves its batches and the views per compiled call with them (padding a half batch back up to
    4 views would need the same memory), and the pages equal a plain run's."""
    (tmp_path / "in").mkdir()
    make_pdf(tmp_path / "in" / "book.pdf", 5)

    def backend(graph, example_inputs):
        def run(*inputs):
            if any(x.dim() == 4 and x.shape[:2] == (4, 3) for x in inputs if isinstance(x, torch.Tensor)):
                raise torch.OutOfMemoryError("CUDA out of memory.")
            return graph.forward(*inputs)

        return run

    compiled = random_model()
    torch._dynamo.reset()
    compiled.compile(backend=backend, views_per_call=4)
    try:
        result = encode([str(tmp_path / "in")], tmp_path / "out", compiled, processor(), batch_size=4, workers=0,
                        progress=False)  # fmt: skip
        assert compiled.views_per_call == 2
    finally:
        compiled.uncompile()
    assert result.ok and result.pages_ok == 5
    assert "batches are now of 2 pages" in capsys.readouterr().err
    encode([str(tmp_path / "in")], tmp_path / "plain", model, processor(), batch_size=2, workers=0, progress=False)
    expected, got = stored(tmp_path / "plain"), stored(tmp_path / "out")
    assert set(got) == set(expected)
    assert all(torch.allclose(got[k], expected[k], rtol=1e-5, atol=1e-6) for k in expected)


def test_out_of_memory_lowers_an_eager_towers_views_per_call(tmp_path, model, monkeypatch, capsys):
    """An eager tower bounded to 4 views per pass (`--views-per-call 4`) whose 4-view passes run out of memory: the
    run halves its batches and the bound with them, and the pages equal a plain run's."""
    (tmp_path / "in").mkdir()
    make_pdf(tmp_path / "in" / "book.pdf", 5)
    bounded = random_model()
    original = type(bounded).encode_views

    def encode_views(self, pixel_values, *args, **kwargs):
        if self is bounded and pixel_values.shape[0] == 4:
            raise torch.OutOfMemoryError("CUDA out of memory.")
        return original(self, pixel_values, *args, **kwargs)

    monkeypatch.setattr(type(bounded), "encode_views", encode_views)
    bounded.set_views_per_call(4)
    result = encode([str(tmp_path / "in")], tmp_path / "out", bounded, processor(), batch_size=4, workers=0,
                    progress=False)  # fmt: skip
    assert result.ok and result.pages_ok == 5 and bounded.views_per_call == 2
    assert "batches are now of 2 pages" in capsys.readouterr().err
    encode([str(tmp_path / "in")], tmp_path / "plain", model, processor(), batch_size=2, workers=0, progress=False)
    expected, got = stored(tmp_path / "plain"), stored(tmp_path / "out")
    assert set(got) == set(expected)
    assert all(torch.allclose(got[k], expected[k], rtol=1e-5, atol=1e-6) for k in expected)


def test_warm_up_runs_one_blank_batch_before_the_pages_and_changes_no_output(tmp_path, model):
    """`warmup=True`: the tower's first call is a batch of `batch_size` blank letter-sized pages at this run's render
    size (global views and tiles, as a GPU run gets by default), then the pages' batches; every page's tokens equal
    a run without warm-up (the CPU default), which calls the tower only for the pages."""
    (tmp_path / "in").mkdir()
    make_pdf(tmp_path / "in" / "book.pdf", 5)
    seen = []
    record = lambda call, pixels: seen.append(pixels.clone()) or None  # noqa: E731
    warm = FailingTower(model, record)
    encode([str(tmp_path / "in")], tmp_path / "warm", warm, processor(), batch_size=3, workers=0, warmup=True,
           progress=False)  # fmt: skip
    assert warm.calls == 1 + 2  # the warm-up, then pages (0, 1, 2) and (3, 4)
    blank = seen[0]
    assert blank.shape[0] == 3 and all(torch.equal(view, blank[0]) for view in blank)
    white = processor().normalize(torch.full((3, 1, 1), 255, dtype=torch.uint8))
    middle = blank[0][:, blank.shape[2] // 2 :, blank.shape[3] // 2 :][:, :1, :1]
    assert torch.equal(middle, white)  # a white page in the middle (padding lies at the sides)
    plain = FailingTower(model, lambda call, pixels: None)
    encode([str(tmp_path / "in")], tmp_path / "plain", plain, processor(), batch_size=3, workers=0, progress=False)
    assert plain.calls == 2
    expected, got = stored(tmp_path / "plain"), stored(tmp_path / "warm")
    assert set(got) == set(expected) and all(torch.equal(got[k], expected[k]) for k in expected)


def test_warm_up_out_of_memory_is_left_to_the_pages(tmp_path, model, capsys):
    """A warm-up that runs out of memory frees the cache and the run goes on at full batch size; a sticky device
    error in the warm-up stops the run before any page (`DeviceFailed`)."""
    (tmp_path / "in").mkdir()
    make_pdf(tmp_path / "in" / "book.pdf", 4)
    oom_first = lambda call, pixels: torch.OutOfMemoryError("CUDA out of memory.") if call == 1 else None  # noqa: E731
    tower = FailingTower(model, oom_first)
    result = encode([str(tmp_path / "in")], tmp_path / "out", tower, processor(), batch_size=4, workers=0,
                    warmup=True, progress=False)  # fmt: skip
    assert result.ok and result.pages_ok == 4 and tower.calls == 2
    assert "out of memory" not in capsys.readouterr().err
    sticky = lambda call, pixels: RuntimeError("CUDA error: an illegal memory access was encountered")  # noqa: E731
    with pytest.raises(DeviceFailed):
        encode([str(tmp_path / "in")], tmp_path / "sticky", FailingTower(model, sticky), processor(), batch_size=4,
               workers=0, warmup=True, progress=False)  # fmt: skip
    manifest = tmp_path / "sticky" / "manifest.jsonl"
    assert not manifest.exists() or not read_rows(manifest)  # stopped before any page


def test_sticky_device_error_stops_the_run_and_resume_completes(tmp_path, model):
    (tmp_path / "in").mkdir()
    make_pdf(tmp_path / "in" / "book.pdf", 4)
    make_pdf(tmp_path / "in" / "memo.pdf", 2, size=(400, 250))
    sticky = RuntimeError("CUDA error: device-side assert triggered\nCompile with `TORCH_USE_CUDA_DSA`")
    tower = FailingTower(model, lambda call, pixels: sticky if call == 2 else None)
    out = tmp_path / "out"
    with pytest.raises(DeviceFailed, match="device-side assert"):
        encode([str(tmp_path / "in")], out, tower, processor(), batch_size=2, workers=0, progress=False)
    assert tower.calls == 2  # stopped at once: no page-by-page retry on a dead context
    rows = read_rows(out / "manifest.jsonl")
    assert [(r["document"], r["page"], r["status"]) for r in rows] == [("book.pdf", 0, "ok"), ("book.pdf", 1, "ok")]
    assert not list(out.rglob("*.tmp-*")) and not (out / ".lock").exists()
    on_disk = [key for part in (out / ".parts").rglob("*.safetensors") for key in load_file(str(part))]
    assert sorted(on_disk) == ["page.0", "page.1"]  # the finished batch is on disk, whole

    result = encode([str(tmp_path / "in")], out, model, processor(), batch_size=2, workers=0, progress=False)
    assert result.ok and result.pages_skipped == 2 and result.pages_ok == 4
    pages = Counter((r["document"], r["page"]) for r in read_rows(out / "manifest.jsonl") if r["status"] == "ok")
    assert len(pages) == 6 and set(pages.values()) == {1}
    encode([str(tmp_path / "in")], tmp_path / "plain", model, processor(), batch_size=2, workers=0, progress=False)
    expected, got = stored(tmp_path / "plain"), stored(out)
    assert set(got) == set(expected) and all(torch.equal(got[k], expected[k]) for k in expected)


def test_a_tower_returning_fewer_outputs_than_pages_gives_every_page_an_error_row(tmp_path, model, monkeypatch):
    (tmp_path / "in").mkdir()
    make_pdf(tmp_path / "in" / "book.pdf", 3)
    launch = PageWork.launch

    def short_launch(self, tower, batch):
        wait = launch(self, tower, batch)
        return lambda: wait()[:-1]  # one page's output missing

    monkeypatch.setattr(PageWork, "launch", short_launch)
    result = encode([str(tmp_path / "in")], tmp_path / "out", model, processor(), batch_size=3, workers=0,
                    progress=False)  # fmt: skip
    rows = read_rows(tmp_path / "out" / "manifest.jsonl")
    assert not result.ok and result.pages_ok == 0 and result.pages_error == 3
    assert [(r["page"], r["status"]) for r in rows] == [(0, "error"), (1, "error"), (2, "error")]
    assert all("2 outputs for a batch of 3 pages" in r["error"] for r in rows)


def test_other_model_errors_are_not_device_failures():
    assert runner.is_device_failure(RuntimeError("CUDA error: an illegal memory access was encountered"))
    assert not runner.is_device_failure(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not runner.is_device_failure(ValueError("device-side assert"))  # not raised by the runtime
    assert runner.is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory."))
    assert not runner.is_out_of_memory(RuntimeError("index out of range"))


@pytest.mark.parametrize("at_once", [False, True], ids=["accelerator", "cpu"])
def test_batches_are_queued_and_waited_for_in_the_devices_order(tmp_path, model, monkeypatch, at_once):
    """On an accelerator the loop queues batch k+1 before it waits for batch k's results (the forward and the copies
    are asynchronous there; decided on the CPU by `runs_at_once`); on the CPU, where the forward is done when it
    returns, each batch is finished at once and its batch tensor handed back to the staging before the next one."""
    (tmp_path / "in").mkdir()
    make_pdf(tmp_path / "in" / "book.pdf", 5)
    events = []
    launch, release = PageWork.launch, runner._CpuStager.release

    def recording_launch(self, tower, batch):
        pages = [item.index for item in batch]
        events.append(("queued", pages))
        wait = launch(self, tower, batch)
        return lambda: events.append(("waited", pages)) or wait()

    def recording_release(self, batch):
        events.append(("released", [item.index for item in batch]))
        release(self, batch)

    monkeypatch.setattr(PageWork, "launch", recording_launch)
    monkeypatch.setattr(runner._CpuStager, "release", recording_release)
    assert PageWork.runs_at_once(None, torch.device("cpu")) and not PageWork.runs_at_once(None, torch.device("cuda"))
    monkeypatch.setattr(PageWork, "runs_at_once", lambda self, device: at_once)
    result = encode([str(tmp_path / "in")], tmp_path / "out", model, processor(), batch_size=2, workers=0,
                    progress=False)  # fmt: skip
    assert result.ok and result.pages_ok == 5
    if at_once:
        assert events == [("queued", [0, 1]), ("waited", [0, 1]), ("released", [0, 1]), ("queued", [2, 3]),
                          ("waited", [2, 3]), ("released", [2, 3]), ("queued", [4]), ("waited", [4]),
                          ("released", [4])]  # fmt: skip
    else:
        assert events == [("queued", [0, 1]), ("queued", [2, 3]), ("waited", [0, 1]), ("released", [0, 1]),
                          ("queued", [4]), ("waited", [2, 3]), ("released", [2, 3]), ("waited", [4]),
                          ("released", [4])]  # fmt: skip


class BigPageWork:
    """Page preparation without a document: every page a blank 1024 x 1024 uint8 view, 3 MiB (more than a pipe
    holds, so a worker blocks sending each page until the encode process reads it)."""

    class Reader:
        def release(self, document):
            pass

        def close(self):
            pass

    def in_worker(self):
        pass

    def page_reader(self):
        return self.Reader()

    def prepare(self, reader, document, index):
        pixels = torch.full((3, 1024, 1024), index % 256, dtype=torch.uint8)
        return runner.PageInput(document, index, None, (1024, 1024), pixels, None, 0.0)


def test_a_deep_prefetch_never_deadlocks_the_worker_pipes():
    """However many pages the prefetch asks for per worker (here 2,000: `--prefetch 2000 --workers 1`), the tasks sent
    ahead of a worker stay few enough to fit in its pipe, so the encode process never blocks sending tasks while the
    worker blocks sending a page back: every page arrives, in order (without the cap: a hang from about 160)."""
    from deepencoder.pipeline.producer import PageProducer, PageTask
    from deepencoder.pipeline.sources import Document

    document = Document(source="/nowhere/book.pdf", name="book.pdf", kind="pdf")
    producer = PageProducer(BigPageWork(), workers=1, depth=2000)

    def run():
        with producer:
            tasks = (PageTask(document, i) for i in range(240))
            return [(task.index, int(page.pixel_values[0, 0, 0])) for task, page in producer.run(tasks, None)]

    try:
        got = guarded(run, timeout=120)
    finally:
        for worker in producer.workers:
            worker.process.kill()
    assert got == [(i, i % 256) for i in range(240)]


# ---------------------------------------------------------------------------------------------- writer
def test_one_part_file_per_batch_and_document(tmp_path, model, monkeypatch):
    (tmp_path / "in").mkdir()
    make_pdf(tmp_path / "in" / "book.pdf", 3)
    make_pdf(tmp_path / "in" / "memo.pdf", 2, size=(400, 250))
    written = []
    write_pages = writer.write_pages
    monkeypatch.setattr(writer, "write_pages", lambda *a: written.append(write_pages(*a)))
    merged = []
    merge = writer.merge_document_rows  # what `merge_document` calls too
    monkeypatch.setattr(
        writer, "merge_document_rows", lambda f, name, *a, **kw: merged.append(name) or merge(f, name, *a, **kw)
    )
    result = encode([str(tmp_path / "in")], tmp_path / "out", model, processor(), batch_size=4, workers=0,
                    progress=False)  # fmt: skip
    assert result.ok
    # batches (book 0-2, memo 0), (memo 1): three part files, each document merged once at its end
    assert written == [".parts/book.pdf/pages.0-2.safetensors", ".parts/memo.pdf/pages.0-0.safetensors",
                       ".parts/memo.pdf/pages.1-1.safetensors"]  # fmt: skip
    assert merged.count("book.pdf") == 2 and merged.count("memo.pdf") == 2  # at its start (leftovers) and its end
    assert not any(p.is_file() for p in (tmp_path / "out" / ".parts").rglob("*"))
    assert set(stored(tmp_path / "out")) == {("book.pdf", i) for i in range(3)} | {("memo.pdf", i) for i in range(2)}


@pytest.mark.parametrize("kernel_copy", [True, False])
def test_merge_copies_stored_bytes_file_to_file(tmp_path, monkeypatch, kernel_copy):
    """Merging parts into a document copies each page's stored bytes file to file (`copy_file_range`, or read and
    written where the kernel cannot), pages that lie one after the other in a part in one copy: the document holds
    every page of the old file and the parts, a part's page replacing the old one of the same key, byte for byte,
    with its metadata; the parts are gone."""
    copies = []
    if kernel_copy:
        copy_file_range = os.copy_file_range
        monkeypatch.setattr(os, "copy_file_range", lambda *a: copies.append(a[2]) or copy_file_range(*a))
    else:
        monkeypatch.delattr(os, "copy_file_range", raising=False)
    folder = writer.Folder(tmp_path / "out")
    pages = {i: torch.randn(5 + i, 7).to(torch.bfloat16) for i in range(4)}
    old = {1: torch.zeros(6, 7, dtype=torch.bfloat16)}
    rows = lambda items: [(writer.page_key(i), t, {"page": i, "n": t.shape[0]}) for i, t in items]  # noqa: E731
    writer.write_pages(folder, "doc.pdf", rows(old.items()))
    writer.merge_document(folder, "doc.pdf")  # an earlier run's document file: page 1 (zeros)
    writer.write_pages(folder, "doc.pdf", rows([(0, pages[0]), (1, pages[1])]))
    writer.write_pages(folder, "doc.pdf", rows([(3, pages[3]), (2, pages[2])]))
    copies.clear()
    keys = writer.merge_document(folder, "doc.pdf")
    assert keys == [writer.page_key(i) for i in range(4)]
    # bf16, 2 bytes a value: pages 0 and 1 follow one another in their part (one copy); 2 and 3 were written as 3, 2
    assert copies == ([(5 + 6) * 7 * 2, 7 * 7 * 2, 8 * 7 * 2] if kernel_copy else [])
    merged = load_file(str(tmp_path / "out" / "doc.pdf.safetensors"))
    assert all(torch.equal(merged[writer.page_key(i)], pages[i]) for i in range(4))
    metadata = writer.read_keys(folder, "doc.pdf.safetensors")[1]
    assert {key: json.loads(row)["n"] for key, row in metadata.items()} == {writer.page_key(i): 5 + i for i in range(4)}
    assert not any(p.is_file() for p in (tmp_path / "out" / ".parts").rglob("*"))


def test_resume_reads_each_document_header_once(tmp_path, model, monkeypatch):
    """A rerun over finished documents learns their done pages from the one header read its merge makes (it read the
    header twice: once merging, once more for the rows), skips every page, and reads no tensor bytes."""
    (tmp_path / "in").mkdir()
    make_pdf(tmp_path / "in" / "book.pdf", 3)
    make_pdf(tmp_path / "in" / "memo.pdf", 2, size=(400, 250))
    run = lambda: encode([str(tmp_path / "in")], tmp_path / "out", model, processor(), batch_size=4,  # noqa: E731
                         workers=0, progress=False)  # fmt: skip
    assert run().pages_ok == 5
    reads = []
    read_range = writer.Folder.read_range
    monkeypatch.setattr(
        writer.Folder, "read_range", lambda self, rel, a, b: reads.append((rel, a)) or read_range(self, rel, a, b)
    )
    again = run()
    assert again.ok and again.pages_ok == 0 and again.pages_skipped == 5
    assert Counter(rel for rel, start in reads if start == 0) == {"book.pdf.safetensors": 1, "memo.pdf.safetensors": 1}
    assert len(reads) == 4  # each file: its header's length, then the header


def _leftover_part(out, page: int, tensor: torch.Tensor, row: dict, cut: bool = False) -> None:
    """A part file a killed run left for `page` of book.pdf; `cut`: its last bytes missing."""
    relative = writer.write_pages(writer.Folder(out), "book.pdf", [(writer.page_key(page), tensor, row)])
    if cut:
        path = out / relative
        path.write_bytes(path.read_bytes()[:-10])


def test_resume_removes_only_unreadable_files_and_encodes_their_pages_again(tmp_path, model, capsys):
    """A resumed run meets a document file or a part that does not read back (cut short): that file alone is removed,
    with a warning naming it, and its pages are encoded again; the good ones are kept. Outputs equal a clean run's
    (batch size 1: a page's tokens do not depend on its batch)."""
    (tmp_path / "in").mkdir()
    make_pdf(tmp_path / "in" / "book.pdf", 4)
    run = lambda out, **kw: encode([str(tmp_path / "in")], out, model, processor(), batch_size=1, workers=0,  # noqa: E731
                                   progress=False, **kw)  # fmt: skip
    run(tmp_path / "plain")
    expected = stored(tmp_path / "plain")
    rows = {r["page"]: r for r in read_rows(tmp_path / "plain" / "manifest.jsonl")}
    out = tmp_path / "out"
    run(out, pages="0-1")  # the document file holds pages 0 and 1
    _leftover_part(out, 2, expected[("book.pdf", 2)], rows[2], cut=True)
    _leftover_part(out, 3, expected[("book.pdf", 3)], rows[3])
    capsys.readouterr()
    result = run(out)
    warning = capsys.readouterr().err
    assert ".parts/book.pdf/pages.2-2.safetensors: unreadable" in warning and "encoded again" in warning
    assert result.ok and result.pages_skipped == 3 and result.pages_ok == 1  # page 2 only
    got = stored(out)
    assert set(got) == set(expected) and all(torch.equal(got[k], expected[k]) for k in expected)

    document = out / "book.pdf.safetensors"
    document.write_bytes(document.read_bytes()[:-10])  # now the document file itself is cut short
    result = run(out)
    assert "book.pdf.safetensors: unreadable" in capsys.readouterr().err
    assert result.ok and result.pages_skipped == 0 and result.pages_ok == 4
    got = stored(out)
    assert set(got) == set(expected) and all(torch.equal(got[k], expected[k]) for k in expected)


def test_a_full_disk_while_resuming_stops_the_run_and_keeps_the_document(tmp_path, model, monkeypatch):
    """Merging a killed run's part at the start of a resumed run fails for want of disk space: the run stops with that
    error and nothing is removed (the document file used to be deleted, its pages all encoded again)."""
    (tmp_path / "in").mkdir()
    make_pdf(tmp_path / "in" / "book.pdf", 3)
    out = tmp_path / "out"
    encode([str(tmp_path / "in")], out, model, processor(), batch_size=2, workers=0, progress=False, pages="0-1")
    before = (out / "book.pdf.safetensors").read_bytes()
    _leftover_part(out, 2, torch.zeros(4, 5), {"page": 2, "status": "ok"})
    write_safetensors = writer.write_safetensors

    def full_disk(folder, relative, *args):
        if relative == "book.pdf.safetensors":
            raise OSError(28, "No space left on device")
        return write_safetensors(folder, relative, *args)

    monkeypatch.setattr(writer, "write_safetensors", full_disk)
    with pytest.raises(OSError, match="No space left"):
        encode([str(tmp_path / "in")], out, model, processor(), batch_size=2, workers=0, progress=False)
    assert (out / "book.pdf.safetensors").read_bytes() == before
    assert (out / ".parts" / "book.pdf" / "pages.2-2.safetensors").exists()


def test_device_decisions_of_the_cuda_path_without_cuda(monkeypatch):
    """The CUDA-only choices, decided on the CPU: workers start by fork until a CUDA context exists in the encode
    process, then by forkserver (a forked child of a CUDA process cannot use it, and must not inherit it); a tower on
    an accelerator gets a warm-up batch by default and no CPU staging (its pages stay uint8 until the device);
    a tower on the CPU gets neither."""
    from deepencoder.pipeline import producer

    monkeypatch.setattr(producer.sys, "platform", "linux")
    monkeypatch.setattr(producer, "_cuda_initialized", lambda: False)
    assert producer.start_method("auto") == "fork"
    monkeypatch.setattr(producer, "_cuda_initialized", lambda: True)
    assert producer.start_method("auto") == "forkserver"
    assert producer.start_method("spawn") == "spawn"
    with pytest.raises(ValueError, match="worker start method"):
        producer.start_method("thread")
    work = PageWork(processor(), runner.EncodeOptions())
    on_device = torch.nn.Linear(2, 2, device="meta")  # any device that is not the CPU
    assert work.wants_warm_up(on_device) and not work.wants_warm_up(torch.nn.Linear(2, 2))
    assert work.stager(torch.device("cuda"), torch.bfloat16) is None
    assert runner.device_copies(torch.device("cpu")) is None and runner.device_copies(torch.device("meta")) is None
    assert isinstance(work.stager(torch.device("cpu"), torch.float32), runner._CpuStager)
    explicit = PageWork(processor(), runner.EncodeOptions(warmup=False))
    assert not explicit.wants_warm_up(on_device)


class FakeCopies:
    """`_CudaCopies`' contract on the CPU: notes every host buffer made, every tensor sent up or brought back, and
    hands back copies in other memory (as a device would)."""

    def __init__(self):
        self.made, self.up, self.down = [], [], []

    def empty(self, shape, dtype):
        self.made.append(torch.empty(shape, dtype=dtype))
        return self.made[-1]

    def to_device(self, host):
        self.up.append(host)
        return host.clone()

    def to_host(self, tensor):
        self.down.append(tensor)
        out = tensor.clone()
        return lambda: out


def test_the_asynchronous_copy_path_on_the_cpu(tmp_path, model, monkeypatch):
    """The CUDA path's logic with `_CudaCopies` replaced by a CPU fake: a batch's global views and its tiles are each
    written once into one host buffer from the copies (pinned memory on CUDA) and sent up from there in their memory
    order (channels-last pixels as (..., H, W, 3)), normalised after the copy bit for bit as on the CPU; the results
    come back as one tensor per batch; the pages' tokens equal the tower's on the CPU-normalised batch."""
    fake = FakeCopies()
    monkeypatch.setattr(runner, "device_copies", lambda device: fake)
    work, pages = prepared_pages(tmp_path, 3, batch_size=3)
    assert all(p.tiles is not None for p in pages)
    normalize = work.processor.normalize
    views = normalize(torch.stack([p.pixel_values for p in pages]))
    tiles = normalize(torch.cat([p.tiles for p in pages]))
    got_views, got_tiles = work.upload(pages, torch.device("cpu"), torch.float32)
    assert torch.equal(got_views, views) and torch.equal(got_tiles, tiles)
    assert len(fake.made) == 2 and len(fake.up) == 2
    for made, up in zip(fake.made, fake.up):
        assert up.data_ptr() == made.data_ptr() and up.is_contiguous() and up.shape[-1] == 3
    fake.made.clear()
    fake.up.clear()
    tokens = work.forward(model, pages)
    assert len(fake.up) == 2 and len(fake.down) == 1
    assert fake.down[0].shape[0] == sum(p.plan.num_tokens for p in pages)
    grids = [p.plan.tile_grid for p in pages]
    with torch.inference_mode():
        expected = model(pixel_values=views, pixel_values_tiles=tiles, tile_grids=grids).image_embeds
    assert all(torch.equal(t, e) for t, e in zip(tokens, expected, strict=True))


class FailingCopyBack(FakeCopies):
    """`FakeCopies` whose first copy back fails when it is waited for (as a CUDA error surfaces at the event's wait,
    after the next batch was queued)."""

    def __init__(self, error):
        super().__init__()
        self.error = error

    def to_host(self, tensor):
        wait = super().to_host(tensor)
        if self.error is None:
            return wait
        error, self.error = self.error, None

        def fail():
            raise error

        return fail


@pytest.mark.parametrize("error", [torch.OutOfMemoryError("CUDA out of memory."), RuntimeError("copy failed")])
def test_a_copy_back_failing_at_its_wait_is_run_again(tmp_path, model, monkeypatch, error):
    """A batch whose results fail to come back (the error raised at the wait, after the loop queued the next batch)
    goes through `encode_batch` again: every page is written, equal to a plain run's, none lost or doubled."""
    fake = FailingCopyBack(error)
    monkeypatch.setattr(runner, "device_copies", lambda device: fake)
    monkeypatch.setattr(PageWork, "runs_at_once", lambda self, device: False)  # the accelerator's order
    (tmp_path / "in").mkdir()
    make_pdf(tmp_path / "in" / "book.pdf", 5)
    result = encode([str(tmp_path / "in")], tmp_path / "out", model, processor(), batch_size=4, workers=0,
                    progress=False)  # fmt: skip
    assert result.ok and result.pages_ok == 5 and fake.error is None
    # copied back: pages 0-3 (failing at the wait), page 4 (queued meanwhile), then pages 0-3 again
    tokens = [t.shape[0] for t in fake.down]
    assert len(tokens) == 3 and tokens[0] == tokens[2] == 4 * tokens[1]
    monkeypatch.undo()
    encode([str(tmp_path / "in")], tmp_path / "plain", model, processor(), batch_size=4, workers=0, progress=False)
    expected, got = stored(tmp_path / "plain"), stored(tmp_path / "out")
    assert set(got) == set(expected) and all(torch.equal(got[k], expected[k]) for k in expected)
    rows = read_rows(tmp_path / "out" / "manifest.jsonl")
    assert sorted(r["page"] for r in rows) == list(range(5)) and all(r["status"] == "ok" for r in rows)


def test_normalize_makes_its_constants_once_per_device(monkeypatch):
    """After its first call on a device, `normalize` makes no tensor from Python numbers (on CUDA each is a blocking
    copy, which would hold every batch's upload back until the forward before it is done), and its values stay
    `(x / 255 - mean) / std`."""
    processor = DeepEncoderImageProcessor(mode="base", image_mean=(0.25, 0.5, 0.75), image_std=(0.5, 0.25, 0.125))
    pixels = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    processor.normalize(pixels)
    forbidden = lambda *a, **k: pytest.fail("normalize made a tensor from Python numbers")  # noqa: E731
    monkeypatch.setattr(torch, "tensor", forbidden)
    monkeypatch.setattr(torch, "full", forbidden)
    got = processor.normalize(pixels)
    monkeypatch.undo()
    mean, std = torch.tensor([0.25, 0.5, 0.75]).view(3, 1, 1), torch.tensor([0.5, 0.25, 0.125]).view(3, 1, 1)
    assert torch.equal(got, (pixels.float() / torch.tensor(255.0) - mean) / std)


def test_page_work_pickles_without_its_device_copies(tmp_path, monkeypatch):
    """A `PageWork` goes to the page workers without the loop's device copies (CUDA streams stay in their process)."""
    monkeypatch.setattr(runner, "device_copies", lambda device: FakeCopies())
    work, pages = prepared_pages(tmp_path, 1, batch_size=1)
    work.upload(pages, torch.device("cpu"), torch.float32)
    assert "_device_copies" in work.__dict__
    copy = pickle.loads(pickle.dumps(work))
    assert "_device_copies" not in copy.__dict__ and "_device_copies" in work.__dict__
    assert copy.options == work.options


PRESTART_SCRIPT = r"""
import json, multiprocessing, os, sys


def child(conn):  # runs in a worker forked from the forkserver: what it holds before importing anything itself
    conn.send(sorted(name for name in ("torch", "deepencoder.pipeline.runner") if name in sys.modules))


def forkservers():  # this process's children running a forkserver
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as stat, open(f"/proc/{pid}/cmdline", "rb") as cmdline:
                parent = int(stat.read().rsplit(")", 1)[1].split()[1])
                if parent == os.getpid() and b"forkserver" in cmdline.read():
                    found.append(pid)
        except OSError:
            pass
    return found


if __name__ == "__main__":
    from deepencoder.pipeline.producer import prestart_workers

    report = {"cpu": prestart_workers("cpu", 2), "no workers": prestart_workers("cuda", 0)}
    report["servers before"] = len(forkservers())
    report["cuda"] = prestart_workers("cuda:0", 2)
    report["torch in this process"] = "torch" in sys.modules
    report["servers after"] = len(forkservers())
    ours, theirs = multiprocessing.get_context("forkserver").Pipe()
    worker = multiprocessing.get_context("forkserver").Process(target=child, args=(theirs,))
    worker.start()
    report["in the worker"] = ours.recv()
    worker.join()
    print(json.dumps(report))
"""


def test_prestart_workers_starts_a_preloaded_forkserver_before_torch(tmp_path):
    """`prestart_workers` (what `deepencoder encode` calls first): a CPU run's workers will fork, and nothing starts;
    a CUDA run's will come from a forkserver, started at once without importing torch here, that has imported the
    workers' modules itself: a worker forked from it starts with torch and the pipeline loaded (seconds per worker
    otherwise). No GPU is needed: only the choice depends on the device."""
    import subprocess
    import sys

    script = tmp_path / "prestart.py"
    script.write_text(PRESTART_SCRIPT)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report == {
        "cpu": "fork",
        "no workers": "forkserver",
        "servers before": 0,
        "cuda": "forkserver",
        "torch in this process": False,
        "servers after": 1,
        "in the worker": ["deepencoder.pipeline.runner", "torch"],
    }
