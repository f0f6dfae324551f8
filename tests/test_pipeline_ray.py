"""The Ray engine on a local Ray instance (2 CPUs, one session for the module): same outputs and manifests as the
local runner (bit-identical at batch size 1, within 1e-6 at another batching), the bad-input zoo's error rows, a
worker process killed mid-batch, resume, and a run refused while another holds the folder."""

from __future__ import annotations

import os
import socket
import threading
from collections import Counter
from pathlib import Path

import pytest
import ray
import torch
from helpers import rel_err
from pipeline_support import (
    REPO,
    CrashOnceLoader,
    comparable,
    make_documents,
    make_zoo,
    processor,
    tiny_weights,
)
from safetensors.torch import load_file

from deepencoder import DeepEncoderModel
from deepencoder.pipeline import EncodedPages, OutputMismatch, encode, load_manifest, runner
from deepencoder.pipeline.ray import encode_dataset
from deepencoder.pipeline.writer import LOCK, OutputLocked, read_rows

TESTS = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def ray_session():
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        runtime_env={"env_vars": {"PYTHONPATH": f"{TESTS}{os.pathsep}{REPO}", "OMP_NUM_THREADS": "1"}},
    )
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("ray")
    make_documents(root / "docs")
    zoo_inputs, good = make_zoo(root / "zoo")
    weights = tiny_weights(root / "tiny")
    return root, weights, zoo_inputs, good


def _tensors(folder: Path) -> dict[tuple[str, str], torch.Tensor]:
    return {(p.name, k): t for p in sorted(folder.glob("*.safetensors")) for k, t in load_file(str(p)).items()}


def test_same_outputs_and_error_rows_as_local(ray_session, data):
    root, weights, zoo_inputs, good = data
    inputs = [str(root / "docs"), *zoo_inputs]
    model = DeepEncoderModel.from_pretrained(weights).eval()
    local = encode(inputs, root / "local", model, processor(), batch_size=1, progress=False)
    result = encode_dataset(inputs, f"file://{root / 'ray'}", str(weights), processor(), batch_size=1, progress=False)
    assert (result.pages_ok, result.pages_error, result.tokens) == (local.pages_ok, local.pages_error, local.tokens)
    assert result.pages_ok == 7 + sum(good.values()) and result.pages_error == 8
    assert "8 errors" in result.summary()

    local_rows, ray_rows = read_rows(root / "local" / "manifest.jsonl"), read_rows(root / "ray" / "manifest.jsonl")
    assert len(ray_rows) == len(local_rows)  # one row per page or unreadable document
    assert comparable(ray_rows) == comparable(local_rows)  # every field but timing, error texts included
    assert {row["tower"] for row in ray_rows} == {"deepencoder"}
    expected, stored = _tensors(root / "local"), _tensors(root / "ray")
    assert stored.keys() == expected.keys() and len(stored) == result.pages_ok
    assert all(torch.equal(stored[key], expected[key]) for key in expected)  # bit-identical
    pages = EncodedPages(root / "ray")
    assert len(pages) == result.pages_ok and pages[0]["tower"] == "deepencoder"


def test_killed_worker_loses_nothing_then_resume_writes_nothing(ray_session, data, tmp_path):
    """The tower's first forward kills its actor's process (as a segfault or the OOM killer would); Ray restarts the
    actor and retries the batch: every page is in the output once. A second run writes nothing."""
    root, weights, _, _ = data
    model = DeepEncoderModel.from_pretrained(weights).eval()
    local = encode([root / "docs"], tmp_path / "local", model, processor(), batch_size=1, progress=False)
    marker = tmp_path / "crashed"
    out = tmp_path / "ray"
    result = encode_dataset([str(root / "docs")], out, CrashOnceLoader(weights, marker), processor(), batch_size=3,
                            progress=False)  # fmt: skip
    assert marker.exists()  # a worker did die mid-batch
    assert result.ok and result.pages_ok == 7
    rows = read_rows(out / "manifest.jsonl")
    assert Counter((r["document"], r["page"]) for r in rows) == Counter(
        (r["document"], r["page"]) for r in read_rows(tmp_path / "local" / "manifest.jsonl")
    )  # every page once
    assert not any(p.is_file() for p in (out / ".parts").rglob("*")) and not list(out.rglob("*.tmp-*"))
    expected, stored = _tensors(tmp_path / "local"), _tensors(out)
    assert stored.keys() == expected.keys() and local.pages_ok == 7
    assert max(rel_err(stored[k], expected[k]) for k in expected) < 1e-6  # batches of 3 vs 1: float reductions

    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.rglob("*") if p.is_file()}
    again = encode_dataset([str(root / "docs")], out, str(weights), processor(), batch_size=3, progress=False)
    assert again.pages_ok == 0 and again.pages_skipped == 7 and again.ok
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.rglob("*") if p.is_file()} == before
    with pytest.raises(OutputMismatch, match=r"mode gundam \(this run: tiny\)"):  # another mode: refused, as locally
        encode_dataset([str(root / "docs")], out, str(weights), "tiny", batch_size=3, progress=False)
    after = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.rglob("*") if p.is_file() and p.name != ".lock"}
    assert after == {p: v for p, v in before.items() if p.name != ".lock"}


def test_refused_while_another_run_holds_the_folder(ray_session, data, tmp_path, monkeypatch):
    """A local run holds the folder (in a thread of this process, stopped after its first page until the Ray run has
    been refused): the Ray run is refused naming it; once it is done, the Ray run into the same folder adds no row twice."""
    root, weights, _, _ = data
    out = tmp_path / "out"
    model = DeepEncoderModel.from_pretrained(weights).eval()
    stopped, go = threading.Event(), threading.Event()

    def gate(seconds: float) -> None:  # the pause after each batch: the first run waits after its first page
        stopped.set()
        go.wait()

    monkeypatch.setattr(runner, "pause", gate)
    first: dict = {}
    thread = threading.Thread(
        target=lambda: first.update(
            result=encode(
                [root / "docs" / "memo.pdf"], out, model, processor(), batch_size=1, progress=False, sleep_per_batch=1.0
            )
        )
    )
    thread.start()  # fmt: skip
    try:
        assert stopped.wait(timeout=1200), "the first run never finished its first batch"
        assert (out / LOCK).exists() and thread.is_alive()
        with pytest.raises(OutputLocked, match=f"{socket.gethostname()}, pid {os.getpid()}"):
            encode_dataset([str(root / "docs")], out, str(weights), processor(), progress=False)
    finally:
        go.set()
        thread.join()
    assert first["result"].pages_ok == 2
    result = encode_dataset([str(root / "docs")], out, str(weights), processor(), batch_size=2, progress=False)
    assert result.pages_skipped == 2 and result.pages_ok == 5
    pages = Counter((r["document"], r["page"]) for r in read_rows(out / "manifest.jsonl"))
    assert len(pages) == 7 and set(pages.values()) == {1}
    assert len(load_manifest(out)) == 7


def test_memory_urls_are_refused_with_a_reason(ray_session, data):
    _, weights, _, _ = data
    with pytest.raises(ValueError, match="inside one process"):
        encode_dataset(["memory://x/in"], "memory://x/out", str(weights), processor(), progress=False)
