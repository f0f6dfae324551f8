"""The local engine on fsspec URLs (`memory://`, `file://`) for inputs and --out, and the output-folder lock: two
runs into one folder never both write (the second is refused naming the holder), stale locks are taken over."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter

import fsspec
import pytest
import torch
from pipeline_support import (
    CLI_SIZE,
    cli,
    comparable,
    copy_tree_to,
    gated_cli,
    make_documents,
    processor,
    tiny_weights,
    wait_for,
)
from safetensors.torch import load_file

from deepencoder import DeepEncoderModel
from deepencoder.cli import main
from deepencoder.pipeline import EncodedPages, encode, load_manifest
from deepencoder.pipeline.writer import LOCK, Folder, OutputLock, OutputLocked, read_rows


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    weights = tiny_weights(tmp_path_factory.mktemp("tiny"))
    return weights, DeepEncoderModel.from_pretrained(weights).eval()


def _stored(fs, root: str) -> dict[tuple[str, str], torch.Tensor]:
    from safetensors.torch import load

    return {
        (path.rsplit("/", 1)[-1], key): tensor
        for path in fs.glob(f"{root}/*.safetensors")
        for key, tensor in load(fs.cat_file(path)).items()
    }


def test_memory_and_file_urls_match_local_paths(tmp_path, tiny):
    _, model = tiny
    make_documents(tmp_path / "in")
    local = encode([tmp_path / "in"], tmp_path / "local", model, processor(), batch_size=2, progress=False)
    assert local.ok and local.pages_ok == 7
    expected = _stored(fsspec.filesystem("file"), str(tmp_path / "local"))
    rows = comparable(read_rows(tmp_path / "local" / "manifest.jsonl"))

    memory = fsspec.filesystem("memory")
    copy_tree_to("memory://deepencoder-test/in", tmp_path / "in")
    try:
        result = encode(["memory://deepencoder-test/in"], "memory://deepencoder-test/out", model, processor(),
                        batch_size=2, progress=False)  # fmt: skip
        assert result.ok and result.pages_ok == 7
        assert not memory.exists("/deepencoder-test/out/.lock") and not memory.find("/deepencoder-test/out/.parts")
        stored = _stored(memory, "/deepencoder-test/out")
        assert stored.keys() == expected.keys() and all(torch.equal(stored[k], expected[k]) for k in expected)
        url_rows = load_manifest("memory://deepencoder-test/out")
        assert all(r["source"].startswith("memory://deepencoder-test/in/") for r in url_rows)
        assert comparable(url_rows, ("seconds", "source")) == {
            k: {f: v for f, v in r.items() if f != "source"} for k, r in rows.items()
        }
        pages = EncodedPages("memory://deepencoder-test/out/manifest.jsonl")
        assert len(pages) == 7 and torch.equal(pages[0]["image_embeds"], expected[("book.pdf.safetensors", "page.0")])

        # resume on the object store: nothing new is written
        before = {p: memory.cat_file(p) for p in memory.find("/deepencoder-test/out")}
        again = encode(["memory://deepencoder-test/in"], "memory://deepencoder-test/out", model, processor(),
                       batch_size=2, progress=False)  # fmt: skip
        assert again.pages_ok == 0 and again.pages_skipped == 7
        assert {p: memory.cat_file(p) for p in memory.find("/deepencoder-test/out")} == before
    finally:
        memory.rm("/deepencoder-test", recursive=True)

    out_url = f"file://{tmp_path / 'file-out'}"
    result = encode([f"file://{tmp_path / 'in'}"], out_url, model, processor(), batch_size=2, progress=False)
    assert result.ok and result.pages_ok == 7
    stored = _stored(fsspec.filesystem("file"), str(tmp_path / "file-out"))
    assert stored.keys() == expected.keys() and all(torch.equal(stored[k], expected[k]) for k in expected)
    assert len(load_manifest(out_url)) == 7 and len(EncodedPages(out_url)) == 7


def test_rows_name_the_tower_and_dtype_spellings(tmp_path, tiny):
    weights, model = tiny
    make_documents(tmp_path / "in")
    out = tmp_path / "out"
    status = main(["encode", str(tmp_path / "in" / "small.png"), "--weights", str(weights), "--out", str(out),
                   "--dtype", "bf16", "--compute-dtype", "fp32", *CLI_SIZE])  # fmt: skip
    assert status == 0
    (row,) = read_rows(out / "manifest.jsonl")
    assert row["tower"] == model.config.model_type == "deepencoder" and row["dtype"] == "bfloat16"
    assert load_file(str(out / "small.png.safetensors"))["page.0"].dtype == torch.bfloat16


def test_two_runs_into_one_folder(tmp_path, tiny):
    """The same command started twice: the second refuses at once naming the first (host, pid) and writes nothing;
    the first, interrupted (Ctrl-C), releases the folder; the command run again finishes; no page has two rows."""
    weights, _ = tiny
    make_documents(tmp_path / "in")
    out = tmp_path / "out"
    args = [str(tmp_path / "in" / "book.pdf"), "--weights", str(weights), "--out", str(out), "--batch-size", "1",
            *CLI_SIZE]  # fmt: skip
    first = gated_cli(tmp_path / "gate", args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:  # the first run holds the folder, stopped at the gate after its first page until told otherwise
        wait_for(lambda: (tmp_path / "gate" / "batch-1").exists(), first, "the first page")
        assert len(read_rows(out / "manifest.jsonl")) == 1
        second = cli(args)
        assert second.returncode == 2
        message = second.stderr.strip().splitlines()[-1]
        assert message.startswith("error:") and f"pid {first.pid}" in message and socket.gethostname() in message
        assert "being written by another" in message
        assert len(read_rows(out / "manifest.jsonl")) == 1  # the second run wrote nothing
        assert first.poll() is None  # and the first is still at its gate
        first.send_signal(signal.SIGINT)
        _, err = first.communicate(timeout=600)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert first.returncode == 130 and "interrupted" in err
    assert not (out / LOCK).exists()  # released on the way out
    again = cli(args)
    assert again.returncode == 0, again.stderr[-2000:]
    rows = read_rows(out / "manifest.jsonl")
    pages = Counter((r["document"], r["page"]) for r in rows)
    assert len(pages) == 3 and set(pages.values()) == {1}
    assert not (out / LOCK).exists()


def test_stale_locks_are_taken_over(tmp_path):
    folder = Folder(tmp_path / "out")
    folder.makedirs()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"])
    try:
        holder = {"host": socket.gethostname(), "pid": sleeper.pid, "started": time.time(), "heartbeat": time.time()}
        (tmp_path / "out" / LOCK).write_text(json.dumps(holder))
        with pytest.raises(OutputLocked, match=f"pid {sleeper.pid}"):
            OutputLock(folder).acquire()
    finally:
        sleeper.kill()
        sleeper.wait()
    # the same holder, its process now gone: stale
    lock = OutputLock(folder).acquire()
    assert "is gone" in lock.warning and json.loads((tmp_path / "out" / LOCK).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / "out" / LOCK).exists()
    # another host, heartbeat older than the timeout: stale; a fresh one: held
    holder = {"host": "elsewhere", "pid": 1, "started": time.time() - 900, "heartbeat": time.time() - 900}
    (tmp_path / "out" / LOCK).write_text(json.dumps(holder))
    lock = OutputLock(folder, stale_after_s=600).acquire()
    assert "no heartbeat" in lock.warning
    lock.release()
    holder["heartbeat"] = time.time() - 5
    (tmp_path / "out" / LOCK).write_text(json.dumps(holder))
    with pytest.raises(OutputLocked, match="host elsewhere, pid 1"):
        OutputLock(folder, stale_after_s=600).acquire()


def test_a_lock_still_being_written_is_read_once_written(tmp_path):
    """Two runs started together: the loser finds the winner's lock file created and still empty. It waits for the
    content and names the holder (it printed "host ?, pid ?, started 1970-01-01"); a lock that stays empty is
    described as a run starting."""
    folder = Folder(tmp_path / "out")
    folder.makedirs()
    (tmp_path / "out" / LOCK).write_bytes(b"")
    holder = {"host": "elsewhere", "pid": 7, "started": time.time(), "heartbeat": time.time()}
    writer = threading.Timer(0.2, lambda: (tmp_path / "out" / LOCK).write_text(json.dumps(holder)))
    writer.start()
    try:
        with pytest.raises(OutputLocked, match="host elsewhere, pid 7"):
            OutputLock(folder).acquire()
    finally:
        writer.join()
    (tmp_path / "out" / LOCK).write_bytes(b"")
    with pytest.raises(OutputLocked, match="a run starting just now"):
        OutputLock(folder).acquire()


def test_heartbeat_refreshes_the_lock(tmp_path):
    folder = Folder(tmp_path)
    lock = OutputLock(folder, heartbeat_s=0.05).acquire()
    try:
        first = json.loads((tmp_path / LOCK).read_text())["heartbeat"]
        wait_for(lambda: json.loads((tmp_path / LOCK).read_text())["heartbeat"] != first, what="a heartbeat")
        assert json.loads((tmp_path / LOCK).read_text())["heartbeat"] > first
    finally:
        lock.release()


class _UploadStore(fsspec.AbstractFileSystem):
    """An object store in miniature: a written object is published whole when its file closes (as S3's and GCS's
    buffered uploads are), never while it is written."""

    protocol = "uploadstore"
    objects: dict = {}

    def _open(self, path, mode="rb", block_size=None, autocommit=True, cache_options=None, **kwargs):
        if "r" in mode:
            return fsspec.implementations.memory.MemoryFile(None, path, self.objects[self._strip_protocol(path)])
        return _Upload(self, path, mode, block_size=5 << 20, autocommit=autocommit)

    def makedirs(self, path, exist_ok=False):
        pass

    def info(self, path, **kwargs):
        path = self._strip_protocol(path)
        if path not in self.objects:
            raise FileNotFoundError(path)
        return {"name": path, "size": len(self.objects[path]), "type": "file"}


class _Upload(fsspec.spec.AbstractBufferedFile):
    def _initiate_upload(self):
        self.sent = b""

    def _upload_chunk(self, final=False):
        self.sent += self.buffer.getvalue()
        if final:
            self.fs.objects[self.fs._strip_protocol(self.path)] = self.sent
        return True


@pytest.mark.parametrize("url", ["memory://deepencoder-cut/out", "uploadstore://bucket/out"])
def test_a_write_failing_midway_leaves_nothing_cut_short_on_an_object_store(url):
    """A write to an fsspec folder that fails midway (a full disk, a dropped connection) publishes nothing: a buffered
    upload keeps the object's previous content, a file system that writes in place (memory://) has the cut file
    removed. A tensor read past a file's end is an error, not uninitialised memory."""
    from deepencoder.pipeline import writer

    fsspec.register_implementation("uploadstore", _UploadStore, clobber=True)
    folder = writer.Folder(url)
    pages = [(writer.page_key(i), torch.full((3, 4), float(i)), {"page": i}) for i in range(2)]
    relative = writer.write_pages(folder, "doc.pdf", pages)
    before = folder.read_bytes(relative)

    def failing():
        yield before[:100]
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        folder.write(relative, failing())
    if url.startswith("memory"):
        assert not folder.exists(relative)
        folder.write(relative, before[:-8])  # cut short by something else
        with pytest.raises(writer.UnreadableFile, match="cut short"):
            writer.read_tensor(folder, relative, "page.1")
    else:
        assert folder.read_bytes(relative) == before
        assert torch.equal(writer.read_tensor(folder, relative, "page.1"), torch.full((3, 4), 1.0))
