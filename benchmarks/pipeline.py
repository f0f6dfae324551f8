"""The encode data path against the tower: pages/s end to end, with the tower stubbed out, and of the tower alone.

    python -m benchmarks.pipeline [--tower near-free|real|CONFIG.json] [--modes base,gundam] [--pages 48]
                                  [--batch-size 8] [--workers 2] [--device auto] [--compute-dtype float32]
                                  [--views-per-call N] [--threads N] [--command]

One command, on the CPU or a GPU. It writes its own input (multi-page letter-sized text PDFs, 6 pages each), then for
every mode measures, on the same pages:
- `end_to_end`: `encode` with the tower (weights random, `--tower`: `near-free` is benchmarks/configs/
  near_free_tower.json, one narrow windowed SAM block and one CLIP layer with the 1280-d projector, so the outputs
  keep their size and the run measures the data path; `real` the released architecture), pages/s from the run's
  summary, and the seconds from the start of `encode` to the end of the first tower batch;
- `feed_only`: the same run with the tower replaced by a stub returning zero tensors of the same shapes: what the
  page workers, the transfer, the normalisation and the writer sustain;
- `tower_only`: the tower on the same pages prepared beforehand (upload, forward, copy back; on the CPU normalised
  beforehand as the feeding thread does), no I/O.
- with `--command`, `command`: `deepencoder encode` itself in a fresh process on the same pages and settings: seconds
  from the command's start to its first batch's rows in the manifest and to its exit (imports and the tower's
  loading included: the start-up a user sees), and the pages/s its summary reports.
`--views-per-call` bounds the tower's passes (`model.set_views_per_call`, `deepencoder encode --views-per-call`);
`--threads` sets the forward's intra-op threads on the CPU (`--threads` of `encode`). The process runs under
`deepencoder.runtime`'s allocator. Results: benchmarks/results/pipeline-<device>-<tower>.json
and a bar chart next to it (`--out` another folder).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from PIL import Image, ImageDraw

RESULTS = Path(__file__).parent / "results"
NEAR_FREE = Path(__file__).parent / "configs" / "near_free_tower.json"


def make_input(folder: Path, pages: int, per_pdf: int = 6) -> None:
    """`pages` letter-sized pages of text in PDFs of `per_pdf` pages (rendered by pdfium like any PDF)."""
    folder.mkdir(parents=True, exist_ok=True)
    for start in range(0, pages, per_pdf):
        images = []
        for index in range(start, min(pages, start + per_pdf)):
            page = Image.new("RGB", (850, 1100), "white")
            draw = ImageDraw.Draw(page)
            for line in range(44):
                draw.text((60, 50 + 23 * line), f"document {start // per_pdf} page {index} line {line} " * 3, "black")
            images.append(page)
        images[0].save(folder / f"doc{start // per_pdf:03d}.pdf", save_all=True, append_images=images[1:])


class StubTower(torch.nn.Module):
    """Returns zeros of the shapes the tower would (projected features), computing nothing."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.config = model.config
        self.anchor = torch.nn.Parameter(torch.zeros((), device=next(model.parameters()).device,
                                                     dtype=next(model.parameters()).dtype))  # fmt: skip

    def forward(self, pixel_values, pixel_values_tiles=None, tile_grids=None, output_pre_projector=False):
        from deepencoder.layout import count_tokens

        down, dim = self.config.patch_size, self.config.projector_dim
        tile_side = pixel_values_tiles.shape[-1] // down if pixel_values_tiles is not None else 0
        embeds = []
        for view, grid in zip(pixel_values, tile_grids):
            tokens = count_tokens((view.shape[-2] // down, view.shape[-1] // down), tuple(grid), tile_side)
            embeds.append(self.anchor.new_zeros((tokens, dim)))
        return SimpleNamespace(image_embeds=embeds, pre_projector=None)


class FirstBatch(torch.nn.Module):
    """The tower, noting when its first forward over real pages returned (after `skip` warm-up calls)."""

    def __init__(self, model: torch.nn.Module, skip: int = 0) -> None:
        super().__init__()
        self.model, self.config, self.first, self.skip = model, model.config, None, skip

    def forward(self, **kwargs):
        out = self.model(**kwargs)
        if self.skip:
            self.skip -= 1
        elif self.first is None:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.first = time.perf_counter()
        return out


def run_encode(model, inputs: Path, out: Path, mode: str, args) -> tuple[float, float]:
    """(pages/s of the run, seconds from the call to the end of the first batch of pages: on a GPU the warm-up
    batch of blank pages runs before it, while the first pages render, and is counted in the seconds)."""
    from deepencoder import DeepEncoderImageProcessor
    from deepencoder.pipeline import encode
    from deepencoder.pipeline.runner import EncodeOptions, PageWork

    shutil.rmtree(out, ignore_errors=True)
    processor = DeepEncoderImageProcessor(mode=mode)
    options = EncodeOptions(batch_size=args.batch_size, workers=args.workers, progress=False, threads=args.threads)
    warm = PageWork(processor, options).wants_warm_up(model)  # the default: a warm-up batch on accelerators
    timed = FirstBatch(model, skip=int(warm))
    start = time.perf_counter()
    result = encode([str(inputs)], out, timed, processor, options)
    assert result.ok and result.pages_ok == args.pages, result.summary()
    return result.pages_ok / result.seconds, timed.first - start


def command_run(inputs: Path, out: Path, mode: str, config: str | None, device: torch.device, args) -> dict:
    """`deepencoder encode` as a user runs it, in a fresh process on the same pages and settings (random weights, the
    same tower): seconds from the command's start until the first batch's rows are in the manifest (the first batch
    through the tower and written: imports, allocator, the tower's loading and the first pages included), seconds
    until it exits, and the pages/s its summary reports (the run alone)."""
    shutil.rmtree(out, ignore_errors=True)
    command = [sys.executable, "-m", "deepencoder", "encode", str(inputs), "--out", str(out), "--weights", "random",
               "--mode", mode, "--device", str(device), "--compute-dtype", args.compute_dtype,
               "--batch-size", str(args.batch_size), "--workers", str(args.workers), "--no-progress"]  # fmt: skip
    command += ["--config", config] if config else []
    command += ["--views-per-call", str(args.views_per_call)] if args.views_per_call else []
    command += ["--threads", str(args.threads)] if args.threads else []
    manifest, log = out / "manifest.jsonl", out.with_name(f"{out.name}.log")
    with open(log, "w") as sink:  # a file, not a pipe: output the loop does not read can never block the command
        start = time.perf_counter()
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT)
        first = None
        while process.poll() is None:
            if first is None and manifest.exists() and manifest.stat().st_size > 0:
                first = time.perf_counter() - start
            time.sleep(0.005)
        total = time.perf_counter() - start
    output = log.read_text()
    if process.returncode != 0:
        raise RuntimeError(f"deepencoder encode failed ({process.returncode}):\n{output}")
    rate = re.search(r"^encoded (\d+) pages .*?: ([0-9.]+) pages/s", output, re.MULTILINE)
    assert rate and int(rate.group(1)) == args.pages, output
    return {"command_first_batch_s": round(first if first is not None else total, 3),
            "command_total_s": round(total, 3), "command_pages_per_s": float(rate.group(2))}  # fmt: skip


def tower_rate(model, inputs: Path, mode: str, args) -> float:
    """pages/s of the tower alone (upload, normalise, forward, copy back) on pages prepared beforehand."""
    from deepencoder import DeepEncoderImageProcessor
    from deepencoder.pipeline import EncodeOptions, discover
    from deepencoder.pipeline.runner import PageWork
    from deepencoder.pipeline.sources import count_pages

    work = PageWork(DeepEncoderImageProcessor(mode=mode), EncodeOptions(batch_size=args.batch_size))
    reader = work.page_reader()
    pages = [work.prepare(reader, d, i) for d in discover([str(inputs)]) for i in range(count_pages(d))]
    reader.close()
    parameter = next(model.parameters())
    stage = work.stager(parameter.device, parameter.dtype)  # on the CPU normalised beforehand, as the feeder does
    pages = [stage(page) for page in pages] if stage is not None else pages
    saved = torch.get_num_threads()
    if args.threads and parameter.device.type == "cpu":
        torch.set_num_threads(args.threads)
    try:
        work.forward(model, pages[: args.batch_size])  # warm-up (kernels, allocator)
        start = time.perf_counter()
        for first in range(0, len(pages), args.batch_size):
            work.forward(model, pages[first : first + args.batch_size])
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return len(pages) / (time.perf_counter() - start)
    finally:
        torch.set_num_threads(saved)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = list(report["modes"])
    kinds = ("end_to_end", "feed_only", "tower_only")
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(modes), 3.2))
    width = 0.8 / len(kinds)
    for k, kind in enumerate(kinds):
        values = [report["modes"][m][f"{kind}_pages_per_s"] for m in modes]
        ax.bar([i + k * width for i in range(len(modes))], values, width, label=kind.replace("_", " "))
    ax.set_xticks([i + width for i in range(len(modes))], modes)
    ax.set_ylabel("pages / s")
    ax.set_title(f"encode data path, {report['tower']} tower, {report['device']}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    from deepencoder import runtime

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tower", default="near-free", help="near-free | real | a config.json")
    parser.add_argument("--modes", default="base,gundam")
    parser.add_argument("--pages", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--compute-dtype", default="float32")
    parser.add_argument("--views-per-call", type=int, help="at most N views per tower pass (set_views_per_call)")
    parser.add_argument("--threads", type=int, help="intra-op threads of the forward on the CPU (default: all)")
    parser.add_argument("--command", action="store_true", help="also time `deepencoder encode` in a fresh process")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder of the JSON and the plot")
    args = parser.parse_args(argv)
    # the allocator `deepencoder encode` picks for the same device (a CUDA run: glibc tuned in place, no re-exec)
    cuda = runtime.cuda_requested(args.device)
    allocator = runtime.configure_allocator(prefer=("glibc-tuned",) if cuda else ("tcmalloc", "glibc-tuned"))

    from deepencoder.dtypes import parse_dtype
    from deepencoder.pipeline import load_model, prestart_workers

    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    prestart_workers(device, args.workers)  # as `deepencoder encode` does, before the tower is on its device
    config = {"near-free": str(NEAR_FREE), "real": None}.get(args.tower, args.tower)
    model, _ = load_model("random", config, seed=0, mode="base")
    model = model.to(device=device, dtype=parse_dtype(args.compute_dtype)).eval()
    if args.views_per_call:
        model.set_views_per_call(args.views_per_call)
    stub = StubTower(model)
    work = Path(tempfile.mkdtemp(prefix="deepencoder-pipeline-bench-"))
    report: dict = {
        "tower": args.tower,
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "compute_dtype": args.compute_dtype,
        "pages": args.pages,
        "batch_size": args.batch_size,
        "workers": args.workers,
        "views_per_call": args.views_per_call,
        "threads": args.threads,  # None: the process's intra-op threads
        "intra_op_threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "allocator": allocator,
        "load_average_1min": round(os.getloadavg()[0], 1),
        "modes": {},
    }
    try:
        make_input(work / "in", args.pages)
        for mode in args.modes.split(","):
            end_to_end, first_batch = run_encode(model, work / "in", work / "out", mode, args)
            feed_only, _ = run_encode(stub, work / "in", work / "stub", mode, args)
            tower_only = tower_rate(model, work / "in", mode, args)
            report["modes"][mode] = {
                "end_to_end_pages_per_s": round(end_to_end, 2),
                "feed_only_pages_per_s": round(feed_only, 2),
                "tower_only_pages_per_s": round(tower_only, 2),
                "first_batch_s": round(first_batch, 3),
            }
            if args.command:
                report["modes"][mode].update(command_run(work / "in", work / "cli", mode, config, device, args))
            print(mode, json.dumps(report["modes"][mode]), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"pipeline-{device.type}-{Path(args.tower).stem if args.tower.endswith('.json') else args.tower}"
    name += f"-views{args.views_per_call}" if args.views_per_call else ""
    (args.out / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    try:
        plot(report, args.out / f"{name}.png")
        print(f"-> {args.out / name}.json, .png")
    except ImportError as error:  # a machine without matplotlib still gets the figures
        print(f"-> {args.out / name}.json (no plot: {error})")
    return report


if __name__ == "__main__":
    main()
