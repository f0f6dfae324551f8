"""SIGKILL mid-run, then resume: every page present exactly once, in the manifest and in the document files, and
no file under its final name is corrupt."""

from __future__ import annotations

import signal
import subprocess
from collections import Counter

import pytest
import torch
from pipeline_support import (
    CLI_SIZE,
    cli,
    direct_outputs,
    gated_cli,
    make_documents,
    make_pdf,
    processes_with,
    processor,
    tiny_weights,
    wait_for,
)
from safetensors.torch import load_file

from deepencoder import DeepEncoderModel
from deepencoder.pipeline import OutputMismatch, encode
from deepencoder.pipeline.writer import Folder, read_rows, write_pages


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
    # its page worker processes notice and stop by themselves (a hang here fails after wait_for's limit)
    wait_for(lambda: not processes_with(str(tmp_path / "gate")), what="the killed run's page workers to exit")
    killed_rows = read_rows(manifest)
    assert len(killed_rows) == 2  # batch size 1: one row per batch, the run stopped after two
    # what the killed run wrote loads (its batches' part files; a document finished by then, merged) and holds
    # exactly the pages of its rows
    on_disk = [key for path in out.rglob("*.safetensors") for key in load_file(str(path))]
    assert sorted(on_disk) == sorted(row["key"] for row in killed_rows)

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


def test_kill_between_a_part_and_its_rows_then_resume(tmp_path, monkeypatch):
    """Killed in the writer after a batch's part file is written and before its rows are appended: the resumed run
    restores those rows from the part's metadata and encodes every other page, each exactly once."""
    make_documents(tmp_path / "in")
    weights = tiny_weights(tmp_path / "tiny")
    out = tmp_path / "out"
    args = [str(tmp_path / "in"), "--weights", str(weights), "--out", str(out), "--batch-size", "2", *CLI_SIZE]
    gate = tmp_path / "gate"
    gate.mkdir()
    (gate / "go-1").touch()
    (gate / "go-part-1").touch()  # past the first part; stopped after writing the second, before its rows
    monkeypatch.setenv("DEEPENCODER_GATE_PARTS", "1")
    process = gated_cli(gate, args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: (gate / "part-2").exists(), process, "the second part file")
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    wait_for(lambda: not processes_with(str(gate)), what="the killed run's page workers to exit")
    killed_rows = read_rows(out / "manifest.jsonl")
    parts = [p for p in (out / ".parts").rglob("*.safetensors") if ".tmp-" not in p.name]
    on_disk = {(p.parent.relative_to(out / ".parts").as_posix(), int(k.split(".")[1])) for p in parts
               for k in load_file(str(p))} | {(p.name.removesuffix(".safetensors"), int(k.split(".")[1]))
                                             for p in out.glob("*.safetensors") for k in load_file(str(p))}  # fmt: skip
    with_rows = {(r["document"], r["page"]) for r in killed_rows if r["status"] == "ok"}
    assert with_rows < on_disk  # the second batch's pages are on disk without their rows

    monkeypatch.delenv("DEEPENCODER_GATE_PARTS")
    finished = cli(args)
    assert finished.returncode == 0, finished.stderr
    rows = read_rows(out / "manifest.jsonl")
    assert rows[: len(killed_rows)] == killed_rows
    pages = Counter((row["document"], row["page"]) for row in rows if row["status"] == "ok")
    assert len(pages) == 7 and set(pages.values()) == {1}
    assert not list(out.rglob("*.tmp-*")) and not any(p.is_file() for p in (out / ".parts").rglob("*"))
    stored = {(p.name.removesuffix(".safetensors"), int(k.split(".")[1])) for p in out.glob("*.safetensors")
              for k in load_file(str(p))}  # fmt: skip
    assert stored == set(pages)


def test_clean_temp_files_removes_temp_files_only(tmp_path):
    """A killed run's temp files go at the next start; a document whose own name holds `.tmp-` stays (it used to be
    deleted at every start, its pages encoded again each time)."""
    from deepencoder.pipeline import writer

    names = ["scan.tmp-2.pdf.safetensors", "a.pdf.safetensors", "a.pdf.safetensors.tmp-4242-139871",
             ".parts/b.pdf/pages.0-7.safetensors.tmp-17-23", ".lock.tmp-stale-0f3a9c", "p/x.png.tmp-preview"]  # fmt: skip
    for name in names:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    assert writer.clean_temp_files(writer.Folder(tmp_path)) == 4
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()) == [
        "a.pdf.safetensors", "scan.tmp-2.pdf.safetensors"
    ]  # fmt: skip


def _tree(folder) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_a_run_with_other_settings_refuses_the_folder(tmp_path):
    """A folder holding another mode's (or other features', dtype's, view sizes') pages is refused, exit 2, one error
    line, nothing written: resuming into it skipped the pages found and mixed (903, 1280) gundam pages with (64, 128)
    tiny pre-projector pages in one document file, and reported success."""
    make_documents(tmp_path / "in")
    weights = tiny_weights(tmp_path / "tiny")
    out = tmp_path / "out"
    args = [str(tmp_path / "in"), "--weights", str(weights), "--out", str(out), "--batch-size", "2"]
    first = cli([*args, *CLI_SIZE])
    assert first.returncode == 0, first.stderr
    before = _tree(out)
    other_mode = ["--mode", "tiny", "--no-progress"]
    other_size = ["--mode", "gundam", "--base-size", "384", "--tile-size", "128", "--no-progress"]
    for changed, said in ((other_mode, "mode gundam (this run: tiny)"), ([*CLI_SIZE, "--dtype", "bfloat16"],
                          "dtype float32 (this run: bfloat16)"), ([*CLI_SIZE, "--features", "pre-projector"],
                          "features projected (this run: pre-projector)"), (other_size, "this run's processor")):  # fmt: skip
        run = cli([*args, *changed])
        assert run.returncode == 2, (changed, run.stderr)
        assert said in run.stderr and "holds pages encoded otherwise" in run.stderr, run.stderr
        assert "Traceback" not in run.stderr
        assert {k: v for k, v in _tree(out).items() if k != ".lock"} == before  # nothing written, nothing removed
    again = cli([*args, *CLI_SIZE])  # the same settings resume as before
    assert again.returncode == 0 and "7 pages already done" in again.stderr, again.stderr
    (tmp_path / "more").mkdir()  # another document in another mode beside them: its own pages, nothing skipped
    make_pdf(tmp_path / "more" / "new.pdf", 2)
    more = cli([str(tmp_path / "more"), "--weights", str(weights), "--out", str(out), *other_mode])
    assert more.returncode == 0 and "encoded 2 pages" in more.stderr, more.stderr


def test_parts_left_by_a_run_with_other_settings_stop_the_run(tmp_path):
    """Pages a killed run left only in its part files (no manifest rows yet) are checked when their document starts:
    another mode's part stops the run with `OutputMismatch` instead of being taken as done."""
    (tmp_path / "in").mkdir()
    make_pdf(tmp_path / "in" / "book.pdf", 2)
    row = {"document": "book.pdf", "page": 0, "status": "ok", "tokens": 64, "mode": "tiny", "features": "projected",
           "dtype": "float32", "size": [300, 400], "output": "book.pdf.safetensors", "key": "page.0"}  # fmt: skip
    write_pages(Folder(tmp_path / "out"), "book.pdf", [("page.0", torch.zeros(64, 80), row)])
    model = DeepEncoderModel.from_pretrained(tiny_weights(tmp_path / "tiny")).eval()
    with pytest.raises(OutputMismatch, match=r"book\.pdf page 0: mode tiny \(this run: gundam\)"):
        encode([str(tmp_path / "in")], tmp_path / "out", model, processor(), workers=0, progress=False)


def test_another_file_under_a_done_documents_name_is_not_mixed_in(tmp_path):
    """A second input folder whose `report.pdf` is another file (3 pages, where the folder holds a 2-page
    `report.pdf`): it used to be taken as 2 pages done and its page 2 appended to the other file's. It now gets a
    document error row naming both files and nothing of it is written; the same file (by size) resumes as before."""
    model = DeepEncoderModel.from_pretrained(tiny_weights(tmp_path / "tiny")).eval()
    for folder, count in (("batch1", 2), ("batch2", 3)):
        (tmp_path / folder).mkdir()
        make_pdf(tmp_path / folder / "report.pdf", count, label=folder)
    out = tmp_path / "out"
    first = encode([tmp_path / "batch1"], out, model, processor(), workers=0, progress=False)
    assert first.pages_ok == 2
    before = _tree(out)
    second = encode([tmp_path / "batch2"], out, model, processor(), workers=0, progress=False)
    assert not second.ok and second.pages_ok == 0 and second.pages_skipped == 0
    (error,) = second.errors
    assert error["page"] is None and "holds pages of another file under this name" in error["error"]
    assert str(tmp_path / "batch1" / "report.pdf") in error["error"]
    stored = load_file(str(out / "report.pdf.safetensors"))
    assert (
        sorted(stored) == ["page.0", "page.1"]
        and (out / "report.pdf.safetensors").read_bytes() == before["report.pdf.safetensors"]
    )
    rows = [r for r in read_rows(out / "manifest.jsonl") if r["status"] == "ok"]
    assert [r["source_bytes"] for r in rows] == [(tmp_path / "batch1" / "report.pdf").stat().st_size] * 2
    again = encode([tmp_path / "batch1"], out, model, processor(), workers=0, progress=False)
    assert again.ok and again.pages_skipped == 2 and again.pages_ok == 0
