"""Ray engine vs local runner: pages/s on the same input on this machine (Ray's single-machine overhead).

    python -m benchmarks.ray_engine [--tower real|tiny] [--mode tiny] [--pages 20] [--batch-size 4] [--repeats 1]

Both engines do the same work end to end, from weights on disk to a finished output folder: the local runner loads
the tower in this process and runs `encode`; the Ray engine (`encode_dataset`, one tower actor) loads it inside
its actor. The Ray session is started once beforehand (its start-up is reported apart, it is paid once per cluster).
The tower actor gets every core (`num_cpus_per_worker`, logical CPUs doubled so the CPU stages still schedule), so
both engines run the tower with the same threads, under the same allocator (`deepencoder.runtime`). Outputs of the two runs are compared. `--tower real` is the
released architecture with random weights; `tiny` the test suite's tiny tower (views 256 / 128 px), where the
ratio is almost pure Ray overhead. Results: benchmarks/results/ray-engine-<tower>-<mode>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.pipeline import make_input
from deepencoder import DeepEncoderConfig, DeepEncoderImageProcessor, DeepEncoderModel, runtime

RESULTS = Path(__file__).parent / "results"
TINY = dict(
    sam_config=dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=2, global_attn_indexes=[1, 3],
                    window_size=6, image_size=256, out_channels=32, compressor_channels=[48, 64]),
    clip_config=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, image_size=56),
    projector_dim=80,
)  # fmt: skip


def processor(args) -> DeepEncoderImageProcessor:
    if args.tower == "tiny":
        return DeepEncoderImageProcessor(mode="gundam", base_size=256, tile_size=128)
    return DeepEncoderImageProcessor(mode=args.mode)


def run_local(args, weights: Path, inputs: Path, out: Path) -> float:
    from deepencoder.pipeline import encode, load_model

    start = time.perf_counter()
    model, _ = load_model(str(weights))
    result = encode([inputs], out, model, processor(args), batch_size=args.batch_size, progress=False)
    seconds = time.perf_counter() - start
    assert result.ok and result.pages_ok == args.pages, result.summary()
    return seconds


def run_ray(args, weights: Path, inputs: Path, out: Path) -> float:
    from deepencoder.pipeline.ray import encode_dataset

    start = time.perf_counter()
    result = encode_dataset([str(inputs)], out, str(weights), processor(args), batch_size=args.batch_size,
                            num_cpus_per_worker=os.cpu_count(), num_gpus_per_worker=0, concurrency=1,
                            progress=False)  # fmt: skip
    seconds = time.perf_counter() - start
    assert result.ok and result.pages_ok == args.pages, result.summary()
    return seconds


def prepare_rate(inputs: Path, mode: str = "gundam") -> tuple[float, float]:
    """CPU side of the pipeline alone, one thread: (pages/s rendering + preprocessing a page in `mode`, tokens per
    page). What one CPU core can feed a tower worker."""
    from deepencoder.pipeline import EncodeOptions, discover
    from deepencoder.pipeline.runner import PageInput, PageWork
    from deepencoder.pipeline.sources import PageReader, count_pages

    work = PageWork(DeepEncoderImageProcessor(mode=mode), EncodeOptions())
    reader = PageReader(work.render)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        start, tokens, pages = time.perf_counter(), 0, 0
        for document in discover([inputs]):
            for index in range(count_pages(document)):
                page = work.prepare(reader, document, index)
                assert isinstance(page, PageInput), page
                tokens += page.plan.num_tokens
                pages += 1
        return pages / (time.perf_counter() - start), tokens / pages
    finally:
        torch.set_num_threads(threads)
        reader.close()


def page_seconds(out: Path) -> float:
    """Sum over pages of the manifest's `seconds` (preparing the page + its share of the tower batch): the per-page
    work, without the run's fixed costs."""
    from deepencoder.pipeline import load_manifest

    return sum(row["seconds"] for row in load_manifest(out))


def max_difference(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    worst = 0.0
    for path in sorted(a.glob("*.safetensors")):
        x, y = load_file(str(path)), load_file(str(b / path.name))
        for key in x:
            worst = max(worst, (x[key] - y[key]).abs().max().item())
    return worst


def main() -> None:
    allocator = runtime.configure_allocator()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tower", choices=("real", "tiny"), default="real")
    parser.add_argument("--mode", default="tiny", help="resolution mode of the real tower (default tiny: 512 px)")
    parser.add_argument("--pages", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2, help="runs of each engine, interleaved (first: cold Ray)")
    args = parser.parse_args()

    import ray

    work = Path(tempfile.mkdtemp(prefix="deepencoder-ray-bench-"))
    try:
        make_input(work / "in", args.pages, per_pdf=5)
        torch.manual_seed(0)
        config = DeepEncoderConfig(**TINY) if args.tower == "tiny" else DeepEncoderConfig()
        DeepEncoderModel(config).save_pretrained(work / "weights")
        cores = os.cpu_count() or 1
        prepare_per_core, gundam_tokens = prepare_rate(work / "in")
        start = time.perf_counter()
        # Ray's workers run under the allocator this process runs under
        child = runtime.environment(allocator, {})
        env = {k: child[k] for k in ("LD_PRELOAD", "GLIBC_TUNABLES", runtime.ENV_CHOICE) if k in child}
        ray.init(num_cpus=2 * cores, include_dashboard=False, runtime_env={"env_vars": env})
        ray_start = time.perf_counter() - start
        local_s, ray_s, local_page_s, ray_page_s = [], [], [], []
        for repeat in range(args.repeats):
            local_s.append(run_local(args, work / "weights", work / "in", work / f"local{repeat}"))
            ray_s.append(run_ray(args, work / "weights", work / "in", work / f"ray{repeat}"))
            local_page_s.append(page_seconds(work / f"local{repeat}"))
            ray_page_s.append(page_seconds(work / f"ray{repeat}"))
            print(f"repeat {repeat}: local {local_s[-1]:.1f} s, ray {ray_s[-1]:.1f} s", flush=True)
        ray.shutdown()
        difference = max_difference(work / "local0", work / "ray0")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    warm_local, warm_ray = statistics.median(local_s[1:] or local_s), statistics.median(ray_s[1:] or ray_s)
    report = {
        "tower": args.tower,
        "mode": "gundam 256/128" if args.tower == "tiny" else args.mode,
        "pages": args.pages,
        "batch_size": args.batch_size,
        "cpu": platform.processor() or platform.machine(),
        "cores": cores,
        "torch_threads": torch.get_num_threads(),
        "allocator": allocator,
        "load_average_1min": round(os.getloadavg()[0], 1),
        "ray_init_s": round(ray_start, 2),
        "local_s": [round(s, 2) for s in local_s],
        "ray_s": [round(s, 2) for s in ray_s],
        # first run: Ray's worker processes start and import torch; later runs reuse them (the tower actor is new
        # in every run: process start + model load)
        "cold_local_pages_per_s": round(args.pages / local_s[0], 3),
        "cold_ray_pages_per_s": round(args.pages / ray_s[0], 3),
        "cold_ray_over_local_throughput": round(local_s[0] / ray_s[0], 3),
        "warm_local_pages_per_s": round(args.pages / warm_local, 3),
        "warm_ray_pages_per_s": round(args.pages / warm_ray, 3),
        "warm_ray_over_local_throughput": round(warm_local / warm_ray, 3),
        "warm_ray_overhead_s": round(warm_ray - warm_local, 2),
        # per-page work (prepare + tower share) summed over pages, from the manifests: what is not fixed cost
        "local_page_seconds": [round(s, 2) for s in local_page_s],
        "ray_page_seconds": [round(s, 2) for s in ray_page_s],
        "max_abs_difference": difference,
        "gundam_prepare_pages_per_s_per_core": round(prepare_per_core, 2),
        "gundam_tokens_per_page": round(gundam_tokens, 1),
    }
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"ray-engine-{args.tower}-{args.mode if args.tower == 'real' else 'small'}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    print(f"-> {path}")


if __name__ == "__main__":
    main()
