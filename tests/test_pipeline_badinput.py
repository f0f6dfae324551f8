"""The bad-input zoo: every unusable file gives one clear error row, every good page is converted, and the CLI
exits non-zero; weights that cannot be loaded fail with one sentence."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from PIL import Image
from pipeline_support import CLI_SIZE, ZOO_ERRORS, make_zoo, tiny_weights
from safetensors.torch import load_file

from deepencoder.cli import main
from deepencoder.pipeline.writer import read_rows


def test_bad_input_zoo(tmp_path, capsys):
    inputs, good = make_zoo(tmp_path / "zoo")
    weights = tiny_weights(tmp_path / "tiny")
    out = tmp_path / "out"
    status = main(["encode", *inputs, "--weights", str(weights), "--out", str(out), "--batch-size", "4", *CLI_SIZE])
    assert status == 1
    rows = read_rows(out / "manifest.jsonl")
    errors = [row for row in rows if row["status"] == "error"]
    ok = [row for row in rows if row["status"] == "ok"]
    assert Counter(Path(row["source"]).name for row in errors) == Counter(ZOO_ERRORS)  # one row each
    assert all(row["error"] and row["tokens"] is None for row in errors)
    assert Counter(Path(row["source"]).name for row in ok) == Counter(good)
    messages = {Path(row["source"]).name: row["error"] for row in errors}
    assert "empty file" in messages["zero.png"]
    assert "no such file" in messages["missing.png"]
    assert "encrypted" in messages["encrypted.pdf"] and "password" in messages["encrypted.pdf"]
    assert "cannot open PDF" in messages["malformed.pdf"]
    assert "decompression-bomb" in messages["bomb.png"] and "--max-image-pixels" in messages["bomb.png"]
    assert "aspect ratio" in messages["strip.png"] and "1x20000" in messages["strip.png"]
    assert "truncated" in messages["truncated.png"]
    for row in ok:
        assert load_file(str(out / row["output"]))[row["key"]].shape[0] == row["tokens"]
    summary = capsys.readouterr().err
    assert "8 errors" in summary and "bomb.png" in summary

    # the limits are options: a 10x400 strip is refused by default, encoded with a higher --max-aspect
    Image.new("L", (10, 400), 200).save(tmp_path / "tall.png")
    args = ["encode", str(tmp_path / "tall.png"), "--weights", str(weights), "--out", str(out), *CLI_SIZE]
    assert main(args) == 1 and read_rows(out / "manifest.jsonl")[-1]["status"] == "error"
    limit = Image.MAX_IMAGE_PIXELS
    assert main([*args, "--max-aspect", "50", "--max-image-pixels", "0"]) == 0  # errors are retried on a re-run
    assert Image.MAX_IMAGE_PIXELS is None  # the CLI sets Pillow's process-wide guard too
    Image.MAX_IMAGE_PIXELS = limit
    assert read_rows(out / "manifest.jsonl")[-1]["status"] == "ok"


def test_default_weights_offline_fail_in_one_sentence(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    image = tmp_path / "a.png"
    image.write_bytes(b"")
    status = main(["encode", str(image), "--out", str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert status == 2
    assert err.startswith("error:") and len(err.splitlines()) == 1
    assert "deepseek-ai/DeepSeek-OCR" in err and "--weights" in err


def test_random_weights_are_announced(tmp_path, capsys):
    weights = tiny_weights(tmp_path / "tiny")
    (tmp_path / "a.png").write_bytes(b"")
    status = main(["encode", str(tmp_path / "a.png"), "--weights", "random", "--config", str(weights),
                   "--out", str(tmp_path / "out"), *CLI_SIZE])  # fmt: skip
    err = capsys.readouterr().err
    assert status == 1 and "RANDOM weights" in err and "meaningless" in err
