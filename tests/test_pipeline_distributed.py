"""Two processes (torchrun, gloo on the CPU) shard the documents and write the same outputs as one process, page for
page; the manifest parts are merged into one manifest.jsonl."""

from __future__ import annotations

import os
import subprocess
import sys

import torch
from pipeline_support import CLI_SIZE, REPO, make_documents, make_pdf, processor, tiny_weights
from safetensors.torch import load_file

from deepencoder import DeepEncoderModel
from deepencoder.pipeline import encode, load_manifest
from deepencoder.pipeline.writer import read_rows

VOLATILE = ("seconds",)


def test_two_processes_equal_one(tmp_path):
    make_documents(tmp_path / "in")
    make_pdf(tmp_path / "in" / "extra.pdf", 2, label="extra")
    weights = tiny_weights(tmp_path / "tiny")
    model = DeepEncoderModel.from_pretrained(weights).eval()
    single = encode([tmp_path / "in"], tmp_path / "one", model, processor(), batch_size=1, progress=False)
    assert single.ok and single.pages_ok == 9

    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "deepencoder", "encode", str(tmp_path / "in"), "--weights", str(weights),
               "--out", str(tmp_path / "two"), "--batch-size", "1", *CLI_SIZE]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "encoded 9 pages" in run.stderr and "2 processes" in run.stderr

    two = tmp_path / "two"
    assert not list(two.glob("manifest.rank*.jsonl"))  # merged
    rows_one = {(r["document"], r["page"]): r for r in read_rows(tmp_path / "one" / "manifest.jsonl")}
    rows_two = {(r["document"], r["page"]): r for r in read_rows(two / "manifest.jsonl")}
    assert len(read_rows(two / "manifest.jsonl")) == 9 and rows_one.keys() == rows_two.keys()
    for key, row in rows_one.items():
        other = rows_two[key]
        assert {k: v for k, v in row.items() if k not in VOLATILE} == {
            k: v for k, v in other.items() if k not in VOLATILE
        }
    files = sorted(p.name for p in (tmp_path / "one").glob("*.safetensors"))
    assert files == sorted(p.name for p in two.glob("*.safetensors")) and len(files) == 5
    for name in files:
        a, b = load_file(str(tmp_path / "one" / name)), load_file(str(two / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert len(load_manifest(two)) == 9


def test_a_launch_without_a_process_group_is_warned_about(tmp_path, monkeypatch, capsys):
    """A script launched by torchrun (WORLD_SIZE=2) that calls `encode` without `init_process_group`: each process
    encodes every document alone (they race for the folder's lock): it is now told so, and how to shard."""
    make_pdf(tmp_path / "one.pdf", 1)
    model = DeepEncoderModel.from_pretrained(tiny_weights(tmp_path / "tiny")).eval()
    monkeypatch.setenv("WORLD_SIZE", "2")
    result = encode([tmp_path / "one.pdf"], tmp_path / "out", model, processor(), workers=0, progress=False)
    assert result.pages_ok == 1
    assert "WORLD_SIZE=2 but torch.distributed is not initialised" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "1")
    encode([tmp_path / "one.pdf"], tmp_path / "out", model, processor(), workers=0, progress=False)
    assert "WORLD_SIZE" not in capsys.readouterr().err
