"""The CUDA branches of the encode data path, checked on a GPU against the CPU (step 1 of `gpu_session.sh`).

    python -m benchmarks.gpu_checks [--device cuda]

- normalisation on the device is bit for bit the CPU's (fp32) and its cast the CPU's cast (bf16);
- `upload` of a batch makes no synchronising call (a blocking copy would hold batch k+1's upload back until batch
  k's forward is done), and `launch` of a real-size Base batch returns before its forward is done;
- `encode` on the device (page workers from a forkserver, pinned copies, side stream, event-waited copy back) writes
  every page, equal to a CPU run's within fp32 rounding;
- out of memory: under a memory cap that fits 12 real-size Base pages, a batch of 16 runs out of memory once, is
  halved to 8 (the failed forward's memory freed first: one halving, not two) and every page is written.
On the CPU (`--device cpu`) the same script runs what has a CPU meaning, as a dry run of itself.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import tempfile
import time
import warnings
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from deepencoder import DeepEncoderConfig, DeepEncoderImageProcessor, DeepEncoderModel
from deepencoder.pipeline import EncodedPages, encode, load_model, runner
from deepencoder.pipeline.producer import start_method

TINY = DeepEncoderConfig(
    sam_config=dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=2, global_attn_indexes=[1, 3],
                    window_size=6, image_size=256, out_channels=32, compressor_channels=[48, 64]),
    clip_config=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128),
    projector_dim=80,
)  # fmt: skip


def make_pdf(path: Path, pages: int) -> None:
    images = []
    for i in range(pages):
        page = Image.new("RGB", (500 + 40 * (i % 4), 700), "white")
        ImageDraw.Draw(page).text((20, 20), f"page {i} " * 20, fill="black")
        images.append(page)
    path.parent.mkdir(parents=True, exist_ok=True)
    images[0].save(path, save_all=True, append_images=images[1:])


def check(name: str, ok: bool, detail: str = "") -> bool:
    print(f"{'ok  ' if ok else 'FAIL'} {name}{': ' + detail if detail else ''}", flush=True)
    return ok


def normalisation(device: torch.device) -> bool:
    processor = DeepEncoderImageProcessor(mode="gundam", base_size=256, tile_size=128)
    pixels = torch.randint(0, 256, (4, 3, 256, 256), dtype=torch.uint8)
    cpu = processor.normalize(pixels)
    ok = check("normalise on the device == CPU, fp32, bit for bit",
               torch.equal(processor.normalize(pixels.to(device)).cpu(), cpu))  # fmt: skip
    got = processor.normalize(pixels.to(device), torch.bfloat16).cpu()
    return check("normalise + cast to bf16 on the device == CPU", torch.equal(got, cpu.to(torch.bfloat16))) and ok


def prepared(processor, pdf: Path, count: int, batch_size: int):
    work = runner.PageWork(processor, runner.EncodeOptions(batch_size=batch_size))
    document = runner.discover([str(pdf)])[0]
    reader = work.page_reader()
    try:
        return work, [work.prepare(reader, document, i) for i in range(count)]
    finally:
        reader.close()


def no_synchronisation(device: torch.device, folder: Path) -> bool:
    if device.type != "cuda":
        return check("upload without synchronising", True, "skipped (not CUDA)")
    make_pdf(folder / "sync.pdf", 8)
    work, pages = prepared(DeepEncoderImageProcessor(mode="base"), folder / "sync.pdf", 8, 8)
    model, _ = load_model("random", None, seed=0, mode="base", device=device, dtype=torch.bfloat16)
    work.launch(model, pages)()  # first call: constants, streams, kernels
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            work.upload(pages, device, torch.bfloat16)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [str(w.message).splitlines()[0] for w in caught]
    ok = check("upload of a Base batch of 8 makes no synchronising call", not syncs, "; ".join(syncs[:3]))
    torch.cuda.synchronize()
    start = time.perf_counter()
    wait = work.launch(model, pages)
    queued = time.perf_counter() - start
    wait()
    whole = time.perf_counter() - start
    return check("launch returns before the forward is done", queued < 0.5 * whole,
                 f"launch {queued * 1000:.1f} ms, with the wait {whole * 1000:.1f} ms") and ok  # fmt: skip


def encode_against_cpu(device: torch.device, folder: Path) -> bool:
    processor = DeepEncoderImageProcessor(mode="gundam", base_size=256, tile_size=128)
    make_pdf(folder / "in" / "doc.pdf", 7)
    torch.manual_seed(0)
    model = DeepEncoderModel(TINY).eval()
    encode([str(folder / "in")], folder / "cpu", model, processor, batch_size=3, workers=2, progress=False)
    result = encode([str(folder / "in")], folder / "dev", model.to(device), processor, batch_size=3, workers=2,
                    progress=False)  # fmt: skip
    key = lambda row: (row["source"], row["page"])  # noqa: E731
    a = {key(r): r["image_embeds"] for r in EncodedPages(folder / "cpu" / "manifest.jsonl")}
    b = {key(r): r["image_embeds"] for r in EncodedPages(folder / "dev" / "manifest.jsonl")}
    worst = max(((a[k] - b[k]).abs().max() / a[k].abs().max()).item() for k in a) if a.keys() == b.keys() else 1.0
    return check(f"encode on {device.type} == CPU (fp32, {len(b)} of 7 pages, workers from a "
                 f"{start_method(cuda=device.type == 'cuda')})",
                 result.pages_ok == 7 and a.keys() == b.keys() and worst < 1e-4, f"max relative {worst:.2e}")  # fmt: skip


def out_of_memory_halving(device: torch.device, folder: Path) -> bool:
    if device.type != "cuda":
        return check("out-of-memory halving under a memory cap", True, "skipped (not CUDA)")
    make_pdf(folder / "oom" / "doc.pdf", 16)
    model, _ = load_model("random", None, seed=0, mode="base", device=device, dtype=torch.bfloat16)
    work, pages = prepared(DeepEncoderImageProcessor(mode="base"), folder / "oom" / "doc.pdf", 4, 4)
    work.launch(model, pages)()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    work.launch(model, pages)()
    per_page = (torch.cuda.max_memory_allocated(device) - base) / 4
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, (base + 12 * per_page) / total), device)
    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors):
            result = encode([str(folder / "oom")], folder / "oom-out", model, "base", batch_size=16, workers=4,
                            progress=False)  # fmt: skip
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)
        torch.cuda.empty_cache()
    said = [line for line in errors.getvalue().splitlines() if "out of memory" in line]
    return check("a batch of 16 under a 12-page cap: halved once, to 8, every page written",
                 result.pages_ok == 16 and len(said) == 1 and "batches are now of 8 pages" in said[0],
                 f"{per_page / 2**20:.0f} MiB a page; {result.pages_ok} pages; {said}")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"torch {torch.__version__} on {name}", flush=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="deepencoder-gpu-checks-") as work:
        for step in (normalisation, no_synchronisation, encode_against_cpu, out_of_memory_halving):
            start = time.perf_counter()
            try:
                results.append(step(device, Path(work)) if step is not normalisation else step(device))
            except Exception as error:  # noqa: BLE001 - every check runs and reports
                results.append(check(step.__name__, False, f"{type(error).__name__}: {error}"))
            print(f"     ({step.__name__}: {time.perf_counter() - start:.1f} s)", flush=True)
    print(f"{sum(results)} of {len(results)} checks passed")
    return 0 if all(results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
