"""SIGKILL mid-run, then resume: every page present exactly once, in the manifest and in the document files, and
no file under its final name is corrupt."""

from __future__ import annotations

import signal
import subprocess
from collections import Counter

import torch
from pipeline_support import CLI_SIZE, cli, direct_outputs, gated_cli, make_documents, tiny_weights, wait_for
from safetensors.torch import load_file

from deepencoder import DeepEncoderModel
from deepencoder.pipeline.writer import read_rows


def test_kill_then_resume(tmp_path):
    make_documents(tmp_path / "in")
    weights = tiny_weights(tmp_path / "tiny")
    out = tmp_path / "out"
    args = [str(tmp_path / "in"), "--weights", str(weights), "--out", str(out), "--batch-size", "1", *CLI_SIZE]
    manifest = out / "manifest.jsonl"
    (tmp_path / "gate").mkdir()
    (tmp_path / "gate" / "go-1").touch()  # past the first batch; stopped at the gate after the second
    process = gated_cli(tmp_path / "gate", args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:  # killed mid-run at a known step, whatever the machine's speed
        wait_for(lambda: (tmp_path / "gate" / "batch-2").exists(), process, "the second batch")
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    killed_rows = read_rows(manifest)
    assert len(killed_rows) == 2  # batch size 1: one row per batch, the run stopped after two
    for path in out.glob("*.safetensors"):  # whatever exists under a final name loads
        load_file(str(path))

    finished = cli(args)
    assert finished.returncode == 0, finished.stderr
    rows = read_rows(manifest)
    assert rows[: len(killed_rows)] == killed_rows  # never truncated
    pages = Counter((row["document"], row["page"]) for row in rows if row["status"] == "ok")
    assert len(pages) == 7 and set(pages.values()) == {1}
    assert not list(out.rglob("*.tmp-*")) and not any(p.is_file() for p in (out / ".parts").rglob("*"))
    model = DeepEncoderModel.from_pretrained(weights).eval()
    expected = direct_outputs(rows, model, batch_size=1)
    stored = {}
    for path in out.glob("*.safetensors"):
        for key, tensor in load_file(str(path)).items():
            stored[(path.name.removesuffix(".safetensors"), int(key.split(".")[1]))] = tensor
    assert set(stored) == set(pages)
    for key, tensor in stored.items():
        assert torch.equal(tensor, expected[key])
