"""`encode` end to end with a tiny random tower: token counts, bit-exact outputs, manifest rows, resume, features,
discovery, page ranges, previews and the manifest loaders."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import random_model
from pipeline_support import direct_outputs, make_documents, make_pdf, processor, text_page
from safetensors.torch import load_file

from deepencoder.pipeline import (
    EncodedPages,
    EncodeOptions,
    discover,
    encode,
    load_manifest,
    manifest_generator,
    parse_page_ranges,
)
from deepencoder.pipeline.writer import read_rows

ROW_FIELDS = {"source", "page", "status", "tokens", "output", "key", "mode", "grid", "size", "seconds", "error"}


@pytest.fixture(scope="module")
def model():
    return random_model()


def test_end_to_end_bit_exact(tmp_path, model):
    docs = make_documents(tmp_path / "in")
    out = tmp_path / "out"
    result = encode([str(tmp_path / "in")], out, model, processor(), batch_size=3, progress=False,
                    preview_dir=tmp_path / "preview")  # fmt: skip
    assert result.ok and result.pages_ok == 3 + 2 + 1 + 1 and result.documents == len(docs)
    rows = read_rows(out / "manifest.jsonl")
    assert len(rows) == 7 and all(ROW_FIELDS <= set(row) for row in rows)
    assert all(row["status"] == "ok" and row["error"] is None for row in rows)
    assert [(r["document"], r["page"]) for r in rows] == [
        ("book.pdf", 0), ("book.pdf", 1), ("book.pdf", 2), ("memo.pdf", 0), ("memo.pdf", 1), ("photo.jpg", 0),
        ("small.png", 0)]  # fmt: skip
    proc = processor()
    expected = direct_outputs(rows, model, batch_size=3)
    for row in rows:
        width, height = row["size"]
        assert row["tokens"] == proc.num_image_tokens(width, height)
        plan = proc.plan(width, height)
        assert row["grid"] == list(plan.tile_grid) and row["mode"] == "gundam"
        stored = load_file(str(out / row["output"]))[row["key"]]
        assert stored.shape == (row["tokens"], model.config.projector_dim)
        assert torch.equal(stored, expected[(row["document"], row["page"])])  # bit-exact
        assert (tmp_path / "preview" / row["document"] / f"page.{row['page']}.png").is_file()
    assert {r["grid"][0] * r["grid"][1] > 1 for r in rows} == {True, False}  # tiled and untiled pages
    assert not (out / ".parts").exists() or not any((out / ".parts").iterdir())
    assert result.tokens == sum(r["tokens"] for r in rows)

    again = encode([str(tmp_path / "in")], out, model, processor(), batch_size=3, progress=False)
    assert again.pages_ok == 0 and again.pages_skipped == 7 and again.ok
    assert len(read_rows(out / "manifest.jsonl")) == 7

    pages = EncodedPages(out / "manifest.jsonl")
    assert len(pages) == 7
    item = pages[0]
    assert torch.equal(item["image_embeds"], expected[("book.pdf", 0)]) and item["page"] == 0
    generated = list(manifest_generator(out))
    assert [g["tokens"] for g in generated] == [r["tokens"] for r in rows]
    assert generated[3]["image_embeds"].shape == (rows[3]["tokens"], model.config.projector_dim)


def test_pre_projector_bf16_and_page_ranges(tmp_path, model):
    pdf = make_pdf(tmp_path / "long.pdf", 5)
    out = tmp_path / "out"
    options = EncodeOptions(features="pre-projector", dtype=torch.bfloat16, batch_size=2, pages="1,3-", progress=False)
    result = encode([pdf], out, model, processor(), options)
    rows = read_rows(out / "manifest.jsonl")
    assert result.ok and [r["page"] for r in rows] == [1, 3, 4]
    expected = direct_outputs(rows, model, batch_size=2, features="pre-projector")
    tensors = load_file(str(out / "long.pdf.safetensors"))
    assert sorted(tensors) == ["page.1", "page.3", "page.4"]
    for row in rows:
        stored = tensors[row["key"]]
        assert stored.dtype == torch.bfloat16 and stored.shape[1] == model.config.join_dim == row["dim"]
        assert torch.equal(stored, expected[("long.pdf", row["page"])].to(torch.bfloat16))
    # a later run with more pages adds them to the same document file
    encode([pdf], out, model, processor(), options, pages=None)
    assert sorted(load_file(str(out / "long.pdf.safetensors"))) == [f"page.{i}" for i in range(5)]
    assert sorted(r["page"] for r in load_manifest(out)) == [0, 1, 2, 3, 4]


def test_page_ranges_apply_to_multi_page_documents_and_keep_single_images(tmp_path, model):
    """`--pages 1-`: pages 1 on of a PDF and of a 3-frame TIFF; a single image is its one page and is encoded (it used
    to get no row at all)."""
    (tmp_path / "in").mkdir()
    make_pdf(tmp_path / "in" / "book.pdf", 3)
    text_page((120, 90), "scan").save(tmp_path / "in" / "scan.png")
    frames = [text_page((120, 90), f"frame {i}") for i in range(3)]
    frames[0].save(tmp_path / "in" / "stack.tiff", save_all=True, append_images=frames[1:])
    result = encode([str(tmp_path / "in")], tmp_path / "out", model, processor(), batch_size=2, pages="1-",
                    progress=False)  # fmt: skip
    rows = read_rows(tmp_path / "out" / "manifest.jsonl")
    assert result.ok and sorted((r["document"], r["page"]) for r in rows) == [
        ("book.pdf", 1), ("book.pdf", 2), ("scan.png", 0), ("stack.tiff", 1), ("stack.tiff", 2)
    ]  # fmt: skip


def test_discovery(tmp_path):
    make_documents(tmp_path / "a")
    make_documents(tmp_path / "b" / "sub")
    (tmp_path / "list.txt").write_text("# two documents\na/book.pdf\nb/sub/small.png\n")
    docs = discover([tmp_path / "a", str(tmp_path / "b" / "**" / "*.jpg"), tmp_path / "list.txt"])
    names = [d.name for d in docs]
    # a/: 4 documents; the glob adds b/sub/photo.jpg; the list adds b/sub/small.png (a/book.pdf again: kept once)
    assert len(names) == len(set(names)) == 6 and names.count("book.pdf") == 1 and "memo.pdf" in names
    # same relative name from two places: both kept, told apart by a hash of the absolute path
    assert sum(n.startswith("small.png-") for n in names) == 2 and sum(n.startswith("photo.jpg-") for n in names) == 2
    assert discover([tmp_path / "a"]) == discover([tmp_path / "a"])  # deterministic
    assert parse_page_ranges("0-2,5,9-") == [(0, 2), (5, 5), (9, None)]
    with pytest.raises(ValueError, match="page range"):
        parse_page_ranges("one")


def test_discovery_of_globs_links_lists_and_empty_inputs(tmp_path, capsys):
    """A glob takes folders, PDFs and images (a page's OCR `.txt` beside it is not read as a list of paths), or the
    files of the suffix it names itself; a folder is walked through links to folders, a link back up walked once;
    a list file saved with a byte-order mark keeps its first entry; an input that gives no document is told to
    `on_empty` (the CLI warns) instead of passing silently; a range ending before it starts is refused."""
    make_documents(tmp_path / "a")
    (tmp_path / "a" / "scan.page0.txt").write_text("Invoice 2024\nTotal: 12.00 EUR\n")
    assert sorted(d.name for d in discover([str(tmp_path / "a" / "*")])) == sorted(
        d.name for d in discover([tmp_path / "a"])
    )
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "one.txt").write_text(f"{tmp_path / 'a' / 'book.pdf'}\n")
    assert [d.name for d in discover([str(tmp_path / "lists" / "*.txt")])] == ["book.pdf"]  # asked for lists

    make_documents(tmp_path / "elsewhere")
    inside = [d.name for d in discover([tmp_path / "elsewhere"])]
    (tmp_path / "top").mkdir()
    make_pdf(tmp_path / "top" / "own.pdf", 1)
    (tmp_path / "top" / "linked").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (tmp_path / "elsewhere" / "loop").symlink_to(tmp_path / "top", target_is_directory=True)
    names = sorted(d.name for d in discover([tmp_path / "top"]))
    # own.pdf and linked/'s four documents; the link from there back to top/ walks nothing again
    assert names == sorted(["own.pdf"] + [f"linked/{name}" for name in inside]) and len(inside) == 4

    (tmp_path / "bom.txt").write_bytes("\ufeff".encode() + f"{tmp_path / 'a' / 'memo.pdf'}\n".encode())
    assert [d.name for d in discover([tmp_path / "bom.txt"])] == ["memo.pdf"]

    (tmp_path / "empty").mkdir()
    told = []
    found = discover([tmp_path / "a" / "book.pdf", str(tmp_path / "nothing" / "*.pdf"), tmp_path / "empty"],
                     on_empty=told.append)  # fmt: skip
    assert [d.name for d in found] == ["book.pdf"]
    assert told == [str(tmp_path / "nothing" / "*.pdf"), str(tmp_path / "empty")]
    assert parse_page_ranges("-3,7-") == [(0, 3), (7, None)]
    with pytest.raises(ValueError, match="selects no page"):
        parse_page_ranges("5-2")


def test_hf_datasets_loader(tmp_path, model):
    datasets = pytest.importorskip("datasets", reason="the `datasets` loader is optional")
    make_documents(tmp_path / "in")
    encode([tmp_path / "in" / "small.png"], tmp_path / "out", model, processor(), progress=False)
    dataset = datasets.Dataset.from_generator(
        manifest_generator, gen_kwargs={"manifest": str(tmp_path / "out" / "manifest.jsonl")},
        cache_dir=str(tmp_path / "cache"),
    )  # fmt: skip
    assert len(dataset) == 1 and len(dataset[0]["image_embeds"]) == dataset[0]["tokens"]
    row = json.loads((tmp_path / "out" / "manifest.jsonl").read_text().splitlines()[0])
    assert dataset[0]["source"] == row["source"]
