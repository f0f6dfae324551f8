"""`encode` end to end with a tiny random tower: token counts, bit-exact outputs, manifest rows, resume, features,
discovery, page ranges, previews and the manifest loaders."""

from __future__ import annotations

import json
import os

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
    to_hf_dataset,
    writer,
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


def test_hf_dataset_follows_a_resumed_run_and_the_manifest_keeps_the_latest_rows(tmp_path, model):
    """`to_hf_dataset` after a later run added pages gives them (`datasets` served the first state from its cache,
    keyed by the unchanged path); `load_manifest` lists a document that failed and was fixed since as fixed, and
    a page retried under another spelling of its source keeps only its latest row."""
    make_documents(tmp_path / "in")
    cache = tmp_path / "cache"
    encode([tmp_path / "in"], tmp_path / "out", model, processor(), pages="0", progress=False)
    first = to_hf_dataset(tmp_path / "out", cache_dir=cache)
    encode([tmp_path / "in"], tmp_path / "out", model, processor(), progress=False)
    again = to_hf_dataset(tmp_path / "out", cache_dir=cache)
    assert len(first) == 4 and len(again) == len(EncodedPages(tmp_path / "out")) == 7

    (tmp_path / "fix").mkdir()
    (tmp_path / "fix" / "late.png").write_bytes(b"not yet a picture")
    encode([tmp_path / "fix"], tmp_path / "fixed", model, processor(), progress=False)
    assert [r["page"] for r in load_manifest(tmp_path / "fixed", status="error")] == [None]
    text_page((200, 300), "late").save(tmp_path / "fix" / "late.png")
    relative = os.path.relpath(tmp_path / "fix", os.getcwd())  # another spelling of the same source
    encode([relative], tmp_path / "fixed", model, processor(), progress=False)
    assert load_manifest(tmp_path / "fixed", status="error") == []
    assert [(r["document"], r["page"]) for r in load_manifest(tmp_path / "fixed")] == [("late.png", 0)]


BAD_OPTIONS = [
    (dict(dtype=torch.int8), "EncodeOptions.dtype: unsupported dtype torch.int8"),
    (dict(batch_size=2.5), "batch_size must be a whole number of at least 1"),
    (dict(batch_size=0), "batch_size must be a whole number of at least 1"),
    (dict(threads=-1), "threads must be a whole number of at least 1"),
    (dict(prefetch=-5), "prefetch must be a whole number of at least 1"),
    (dict(dpi=0), "dpi must be a number above 0"),
    (dict(dpi=-5), "dpi must be a number above 0"),
    (dict(max_aspect=0), "max_aspect must be a number at least 1"),
    (dict(max_image_pixels=-1), "max_image_pixels must be a whole number of at least 0"),
    (dict(page_timeout=-1), "page_timeout must be a number at least 0"),
    (dict(lock_stale_after=-1), "lock_stale_after must be a number above 0"),
    (dict(features="tokens"), "features must be one of"),
    (dict(pages="5-2"), "selects no page"),
]


@pytest.mark.parametrize("bad, said", BAD_OPTIONS, ids=[str(b) for b, _ in BAD_OPTIONS])
def test_bad_options_raise_before_anything_is_created(tmp_path, model, bad, said):
    """Each failed after the forward (a string dtype, int8: every page an error row or a writer traceback), was
    taken as another value (batch_size 0 as 1, dpi 0 as the default) or made every page an error row (dpi -5,
    max_aspect 0); a bad `features` left an empty locked-then-released folder behind."""
    make_documents(tmp_path / "in")
    with pytest.raises(ValueError, match=said):
        encode([tmp_path / "in"], tmp_path / "out", model, processor(), progress=False, **bad)
    assert not (tmp_path / "out").exists()


def test_a_dtype_by_name_and_options_left_as_given(tmp_path, model):
    """`dtype="bfloat16"` (the CLI's spelling) stores bf16 pages; the caller's `EncodeOptions` is not changed by
    the keyword overrides of a run (a reused object kept them)."""
    make_documents(tmp_path / "in")
    options = EncodeOptions(batch_size=2)
    result = encode([tmp_path / "in" / "book.pdf"], tmp_path / "out", model, processor(), options, dtype="bfloat16",
                    progress=False)  # fmt: skip
    assert result.ok and options.dtype == torch.float32 and options.progress
    assert load_file(str(tmp_path / "out" / "book.pdf.safetensors"))["page.0"].dtype == torch.bfloat16


def test_encoded_pages_of_a_run_in_progress_are_read_from_their_parts(tmp_path):
    """Rows are appended as soon as a batch's part file is written, before the document is merged: `EncodedPages`
    reads such a page from its part (it raised FileNotFoundError for a new document, KeyError for a page added to
    an existing one), and from the document file once merged."""
    folder = writer.Folder(tmp_path / "out")
    pages = {i: torch.randn(3 + i, 4) for i in range(3)}

    def write(indices):
        entries = [(writer.page_key(i), pages[i], {"document": "doc.pdf", "page": i, "status": "ok",
                                                   "output": "doc.pdf.safetensors", "key": writer.page_key(i),
                                                   "source": "doc.pdf", "tokens": 3 + i}) for i in indices]  # fmt: skip
        writer.write_pages(folder, "doc.pdf", entries)
        with open(tmp_path / "out" / "manifest.jsonl", "a") as manifest:
            manifest.writelines(json.dumps(row) + "\n" for *_, row in entries)

    write([0])
    assert torch.equal(EncodedPages(tmp_path / "out")[0]["image_embeds"], pages[0])  # only in its part
    writer.merge_document(folder, "doc.pdf")
    write([1, 2])  # a resumed document: page 0 in the file, pages 1 and 2 in a part
    read = EncodedPages(tmp_path / "out")
    assert [read[i]["page"] for i in range(3)] == [0, 1, 2]
    assert all(torch.equal(read[i]["image_embeds"], pages[i]) for i in range(3))
    writer.merge_document(folder, "doc.pdf")
    assert all(torch.equal(read[i]["image_embeds"], pages[i]) for i in range(3))
