"""The bad-input zoo: every unusable file gives one clear error row, every good page is converted, and the CLI
exits non-zero; weights that cannot be loaded fail with one sentence."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
from PIL import Image
from pipeline_support import CLI_SIZE, ZOO_ERRORS, make_pdf, make_zoo, tiny_weights
from safetensors.torch import load_file

from deepencoder.cli import main
from deepencoder.pipeline import weights
from deepencoder.pipeline.sources import PageError, count_pages, discover
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


BAD_FLAGS = [
    (["--base-size", "100"], "base_size 100 must be a multiple of 64"),
    (["--tile-size", "700"], "tile_size 700 must be a multiple of 64"),
    (["--base-size", "0"], "--base-size must be at least 1"),
    (["--dpi", "-50"], "--dpi must be positive"),
    (["--dpi", "0"], "--dpi must be positive"),
    (["--max-aspect", "0"], "--max-aspect must be at least 1"),
    (["--max-image-pixels", "-5"], "--max-image-pixels must be at least 0"),
    (["--pages", "5-2"], "selects no page"),
    (["--device", "tpu"], "--device tpu: not a device name"),
    (["--device", "cuda:99"], "--device cuda:99: this machine has"),  # no cuda device / 1 cuda device(s)
    (["--out", "memory://x/out"], "memory://x/out: fsspec's memory:// lives inside this process"),
]


@pytest.mark.parametrize("flags, said", BAD_FLAGS, ids=[" ".join(f) for f, _ in BAD_FLAGS])
def test_bad_flag_values_fail_in_one_line_before_the_tower_loads(tmp_path, capsys, monkeypatch, flags, said):
    """Each gave a traceback after the tower had loaded (minutes for a real checkpoint), was taken as the default
    (`--dpi 0`, `--base-size 0`), or made every page an error row (`--dpi -50`, `--max-aspect 0`)."""
    monkeypatch.setattr(weights, "load_model", lambda *a, **k: pytest.fail("the tower loaded before the check"))
    (tmp_path / "a.png").write_bytes(b"")
    args = ["encode", str(tmp_path / "a.png"), "--weights", "random", "--out", str(tmp_path / "out"), "--workers", "0",
            "--no-progress", *flags]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and len(err.splitlines()) == 1 and said in err, err
    assert not (tmp_path / "out").exists()


def test_inputs_giving_no_document_are_warned_about_and_no_part_folder_stays(tmp_path, capsys):
    """A glob that matches nothing and an empty folder each get a warning (they passed silently: a typo in a script
    lost a whole folder without a word); the run encodes the rest; no empty `.parts/` folder stays behind."""
    weights_dir = tiny_weights(tmp_path / "tiny")
    (tmp_path / "in" / "sub").mkdir(parents=True)
    make_pdf(tmp_path / "in" / "sub" / "book.pdf", 2)
    (tmp_path / "empty").mkdir()
    pattern = str(tmp_path / "in" / "*.pfd")
    out = tmp_path / "out"
    status = main(["encode", str(tmp_path / "in"), pattern, str(tmp_path / "empty"), "--weights", str(weights_dir),
                   "--out", str(out), *CLI_SIZE])  # fmt: skip
    err = capsys.readouterr().err
    assert status == 0 and "encoded 2 pages" in err
    assert f"warning: {pattern}: no PDF or image found" in err and f"warning: {tmp_path / 'empty'}: no PDF" in err
    assert (out / "sub" / "book.pdf.safetensors").is_file() and not (out / ".parts").exists()


def test_a_file_whose_suffix_lies_is_named_for_what_it_is(tmp_path):
    """A PDF saved as `.jpg` and a PNG saved as `.pdf`: the error row says what each file is (it said "cannot
    identify image file" / "Data format error" and left the user to guess)."""
    make_pdf(tmp_path / "real.pdf", 1)
    (tmp_path / "scan.jpg").write_bytes((tmp_path / "real.pdf").read_bytes())
    Image.new("RGB", (40, 60), "white").save(tmp_path / "picture.png")
    (tmp_path / "image.pdf").write_bytes((tmp_path / "picture.png").read_bytes())
    by_name = {d.name: d for d in discover([tmp_path / "scan.jpg", tmp_path / "image.pdf"])}
    with pytest.raises(PageError, match=r"cannot read image .*; the file is a PDF: give it the \.pdf suffix"):
        count_pages(by_name["scan.jpg"])
    with pytest.raises(PageError, match=r"cannot open PDF .*; the file is a PNG image: give it its image suffix"):
        count_pages(by_name["image.pdf"])
