"""`encode --mode auto`: pages of different modes in one batch give the tensors each page gets when encoded alone
in its chosen mode (v1 with tiles, V2 `ocr2` vs `ocr2-base`, local and Ray engines); every ok row carries the
choice; the summary counts tokens by mode; `plan` decides as `encode` does; the command line wires it."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from auto_mode_support import lines_of_text, text_image, text_pdf
from fixtures.v2_support import tiny_config_kwargs
from helpers import randomize_, rel_err
from pipeline_support import REPO, cli, tiny_weights
from safetensors.torch import load_file

from deepencoder import DeepEncoderImageProcessor, DeepEncoderModel, DeepEncoderV2Config, DeepEncoderV2Model
from deepencoder.pipeline import encode, load_manifest
from deepencoder.pipeline.auto_mode import ROW_FIELDS, plan_pages

TESTS = Path(__file__).resolve().parent


def make_inputs(folder: Path) -> list[str]:
    """A text-layer PDF (a sparse and a dense page), a medium PNG, a dense wide PNG and a blank PNG."""
    folder.mkdir(parents=True, exist_ok=True)
    text_pdf(folder / "doc.pdf", [lines_of_text(4, 5, seed=1), lines_of_text(55, 12, seed=2)])
    text_image((900, 700), lines_of_text(14, 8, seed=3), 20).save(folder / "medium.png")
    text_image((1800, 900), lines_of_text(30, 20, seed=4), 16).save(folder / "dense.png")
    text_image((600, 800), [], 20).save(folder / "blank.png")
    return [str(folder / name) for name in ("doc.pdf", "medium.png", "dense.png", "blank.png")]


def stored(out: Path, row: dict) -> torch.Tensor:
    return load_file(str(out / row["output"]))[row["key"]]


def assert_equal_to_pages_alone(rows: list[dict], out: Path, model, scratch: Path) -> None:
    """Each ok row's tensor equals a run of that page alone in the row's mode (same reader, batch of one)."""
    for index, row in enumerate(rows):
        alone = scratch / f"alone-{index}"
        processor = DeepEncoderImageProcessor(mode=row["mode"])
        encode([row["source"]], alone, model, processor, pages=str(row["page"]), batch_size=1, progress=False)
        (single,) = [r for r in load_manifest(alone) if r["status"] == "ok"]
        assert (single["tokens"], single["size"], single["grid"]) == (row["tokens"], row["size"], row["grid"])
        assert rel_err(stored(out, row), stored(alone, single)) < 1e-5, row


def test_mixed_modes_batch_equals_pages_alone_with_choice_in_every_row(tmp_path):
    model = DeepEncoderModel.from_pretrained(tiny_weights(tmp_path / "tiny")).eval()
    inputs = make_inputs(tmp_path / "docs")
    processor = DeepEncoderImageProcessor(mode="auto", max_compression=2)
    out = tmp_path / "auto"
    result = encode(inputs, out, model, processor, batch_size=5, progress=False)
    rows = sorted(load_manifest(out), key=lambda row: (row["document"], row["page"]))
    assert result.pages_ok == 5 and all(row["status"] == "ok" for row in rows)
    assert {"tiny", "gundam"} <= {row["mode"] for row in rows} and len({row["mode"] for row in rows}) >= 3
    for row in rows:
        assert set(ROW_FIELDS) <= set(row)
        assert row["vision_tokens"] == row["tokens"] == row["vision_tokens_by_mode"][row["mode"]]
        assert row["compression"] == round(row["text_tokens_estimate"] / row["tokens"], 3)
    sources = {(Path(row["source"]).name, row["page"]): row["estimate_source"] for row in rows}
    assert sources == {("doc.pdf", 0): "text-layer", ("doc.pdf", 1): "text-layer", ("medium.png", 0): "pixels",
                       ("dense.png", 0): "pixels", ("blank.png", 0): "pixels"}  # fmt: skip
    # the summary: tokens by mode, against every single mode
    assert result.auto is not None and result.auto.total == result.tokens == sum(row["tokens"] for row in rows)
    assert result.auto.fixed["gundam"] == sum(row["vision_tokens_by_mode"]["gundam"] for row in rows)
    assert "auto mode:" in result.summary() and "the same pages in one mode" in result.summary()
    # `plan` decides as `encode` did
    planned = plan_pages(inputs, processor)["pages"]
    assert sorted((Path(p["source"]).name, p["page"], p["mode"], p["text_tokens_estimate"]) for p in planned) == sorted(
        (Path(r["source"]).name, r["page"], r["mode"], r["text_tokens_estimate"]) for r in rows
    )
    assert_equal_to_pages_alone(rows, out, model, tmp_path)


def test_v2_tower_chooses_between_ocr2_base_and_ocr2(tmp_path):
    model = randomize_(DeepEncoderV2Model(DeepEncoderV2Config(**tiny_config_kwargs())), seed=2).eval()
    docs = tmp_path / "docs"
    docs.mkdir()
    text_image((700, 600), lines_of_text(3, 4, seed=5), 24).save(docs / "small.png")
    text_image((1800, 1000), lines_of_text(40, 18, seed=6), 16).save(docs / "dense.png")
    processor = DeepEncoderImageProcessor(mode="auto", auto_modes=["ocr2-base", "ocr2"], max_compression=2)
    out = tmp_path / "auto"
    encode([str(docs)], out, model, processor, batch_size=2, progress=False)
    rows = sorted(load_manifest(out), key=lambda row: row["document"])
    assert [row["mode"] for row in rows] == ["ocr2", "ocr2-base"]  # dense.png tiles; small.png needs no tiles
    assert rows[0]["grid"] != [1, 1] and rows[1]["grid"] == [1, 1]
    assert [row["tower"] for row in rows] == ["deepencoder_v2"] * 2
    assert_equal_to_pages_alone(rows, out, model, tmp_path)


def test_command_line_auto_mode(tmp_path):
    weights = tiny_weights(tmp_path / "tiny")
    inputs = make_inputs(tmp_path / "docs")
    out = tmp_path / "out"
    args = [*inputs, "--out", str(out), "--weights", str(weights), "--mode", "auto", "--max-compression", "2"]
    done = cli([*args, "--auto-modes", "tiny,base,gundam", "--no-progress"])
    assert done.returncode == 0, done.stderr
    rows = [row for row in load_manifest(out) if row["status"] == "ok"]
    assert len(rows) == 5 and {row["mode"] for row in rows} <= {"tiny", "base", "gundam"}
    assert all(set(row["vision_tokens_by_mode"]) == {"tiny", "base", "gundam"} for row in rows)
    assert "auto mode:" in done.stderr
    refused = cli([*inputs, "--out", str(tmp_path / "x"), "--weights", str(weights), "--mode", "auto",
                   "--base-size", "512", "--no-progress"])  # fmt: skip
    assert refused.returncode == 2 and "--base-size" in refused.stderr
    fixed = cli([*inputs, "--out", str(tmp_path / "y"), "--weights", str(weights), "--mode", "tiny",
                 "--tokenizer", str(tmp_path), "--no-progress"])  # fmt: skip
    assert fixed.returncode == 2 and "apply to --mode auto" in fixed.stderr


def test_ray_engine_auto_mode_equals_local(tmp_path):
    import ray

    from deepencoder.pipeline.ray import encode_dataset

    weights = tiny_weights(tmp_path / "tiny")
    model = DeepEncoderModel.from_pretrained(weights).eval()
    inputs = make_inputs(tmp_path / "docs")
    processor = DeepEncoderImageProcessor(mode="auto", max_compression=2)
    encode(inputs, tmp_path / "local", model, processor, batch_size=1, progress=False)
    ray.init(num_cpus=2, include_dashboard=False,
             runtime_env={"env_vars": {"PYTHONPATH": f"{TESTS}{os.pathsep}{REPO}", "OMP_NUM_THREADS": "1"}})  # fmt: skip
    try:
        result = encode_dataset(inputs, f"file://{tmp_path / 'ray'}", str(weights), processor, batch_size=3,
                                progress=False)  # fmt: skip
    finally:
        ray.shutdown()
    local = {(r["document"], r["page"]): r for r in load_manifest(tmp_path / "local")}
    remote = {(r["document"], r["page"]): r for r in load_manifest(tmp_path / "ray")}
    assert set(local) == set(remote) and result.pages_ok == 5
    for key, row in local.items():
        assert {f: remote[key][f] for f in ROW_FIELDS} == {f: row[f] for f in ROW_FIELDS}
        assert rel_err(stored(tmp_path / "ray", remote[key]), stored(tmp_path / "local", row)) < 1e-5
    assert result.auto is not None and result.auto.total == result.tokens
