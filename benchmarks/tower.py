"""Tower benchmark: pages/s, tokens/s, achieved GFLOP/s, fraction of the measured matmul peak and peak memory per
resolution mode, batch size and way of running the tower (this library's paths and the peers in `peers.py`), with
outputs compared on shared random weights.

    python -m benchmarks.tower --device cpu --dtype fp32 [--quick] [--paths ours,transformers] [--modes base]
        [--allocator tcmalloc] [--allocators glibc,glibc-tuned,tcmalloc,jemalloc]
    python -m benchmarks.tower --device cuda --dtype bf16 [--deepseek-src DIR]

On a GPU (`gpu_plan`) every path runs on Base at batch 1 and 32: each rel-pos kernel (`ours` = the device default,
`ours-mask`, `ours-folded`, `ours-flex`), eager and compiled (`ours-compile`: the device's compile mode,
`ours-compile-ro`: CUDA graphs), transformers' port and segment-anything + CLIP, and DeepSeek-OCR's own encoder from
the directory `--deepseek-src` names (its `sam_vary_sdpa.py` / `clip_sdpa.py`; never committed here); then our
default path on the other modes. GFLOP/s are counted on the formula (eager attention), the peak is a measured
bf16/fp32 matmul, memory is `torch.cuda.max_memory_allocated`.

Every (path, mode) runs in a fresh subprocess (batch sizes ascending), so the CPU peak RSS it reports is that
configuration's own, and every subprocess runs under the same memory allocator (`--allocator`, default the fastest
installed: see `deepencoder.runtime`). The headline pair (ours and transformers' port, Base batch 1) then runs
interleaved in one process once per allocator in `--allocators` (default: every one installed), a row each; the
headline ratio is our best row against the peer's best row. Results: benchmarks/results/tower-<device>-<dtype>.json
and .png.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from deepencoder import DeepEncoderConfig, DeepEncoderModel, runtime
from deepencoder.attention import DEFAULT_REL_POS_KERNELS, default_rel_pos_kernel
from deepencoder.layout import count_tokens

RESULTS = Path(__file__).parent / "results"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TOLERANCE = {"fp32": 1e-4, "bf16": 2e-2, "fp16": 2e-2}


@dataclass(frozen=True)
class Mode:
    """A page: one global view of `size` px and `tiles` tiles of `tile_size` px (gundam: a 2 x 3 page)."""

    size: int
    tiles: int = 0
    tile_size: int = 0

    def tokens(self) -> int:
        grid = self.size // 64
        if not self.tiles:
            return count_tokens((grid, grid))
        return count_tokens((grid, grid), (3, 2), self.tile_size // 64)


MODES = {
    "tiny": Mode(512),
    "small": Mode(640),
    "base": Mode(1024),
    "large": Mode(1280),
    "gundam": Mode(1024, tiles=6, tile_size=640),
}
PEERS = ("transformers", "sam+clip")
HEADLINE = ("ours", "transformers")  # the acceptance pair


GPU_BATCHES = {"base": [1, 32], "tiny": [1, 64], "small": [1, 64], "large": [1, 16], "gundam": [1, 8]}


def gpu_plan(paths: list[str]) -> list[tuple[str, str, list[int]]]:
    """(path, mode, batch sizes) on a GPU: every path (every kernel, eager and compiled, and the peers) on Base at
    batch 1 (latency) and 32 (throughput; 8 for the paths with unfused attention); our default path alone on the
    other modes at batch 1 and a large batch.
    About 8 minutes on an H200, most of it compiling (two modes x two shapes)."""
    unfused = ("ours-eager", "sam+clip")  # materialise (B, heads, N, N) logits: 25 GB per global block at b32
    runs = [(path, "base", [1, 8] if path in unfused else GPU_BATCHES["base"]) for path in paths]
    return runs + [("ours", mode, GPU_BATCHES[mode]) for mode in MODES if mode != "base" and "ours" in paths]


def plan(quick: bool, paths: list[str], device: str = "cpu") -> list[tuple[str, str, list[int]]]:
    """(path, mode, batch sizes) to run. GPU: `gpu_plan`. Full: every path, mode and batch 1 and 4. Quick (under
    10 minutes on 2 cores): every path on tiny and base batch 1, our default path and transformers on small, only
    our default path on base batch 4, large and gundam."""
    if device.startswith("cuda"):
        return gpu_plan(paths)
    runs = []
    for mode in MODES:
        for path in paths:
            if not quick:
                runs.append((path, mode, [1, 4]))
                continue
            if (mode in ("small", "large") and path not in HEADLINE) or (
                mode in ("large", "gundam") and path != "ours"
            ):
                continue
            batches = [1, 4] if mode == "base" and path == "ours" else [1]
            runs.append((path, mode, batches))
    return runs


def timed_runs(quick: bool) -> int:
    """Timed runs per configuration (the best counts): 3, or 1 with --quick (whose headline figure comes from the
    interleaved rounds of `interleaved_worker` instead)."""
    return 1 if quick else 3


def warmup(quick: bool, path: str, mode: str) -> str | None:
    """The mode of the one untimed run before a configuration's first batch size, or None. Full runs: the same
    mode. --quick: the same mode for every path on tiny and the headline pair on base, a tiny page for the
    headline pair on small (it starts thread pools and kernels), nothing for the rest (their per-size set-up is
    done before timing either way)."""
    if not quick or mode == "tiny" or (path in HEADLINE and mode == "base"):
        return mode
    if path in HEADLINE and mode == "small":
        return "tiny"
    return None


def inputs(mode: Mode, batch: int, dtype: torch.dtype, device: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    generator = torch.Generator().manual_seed(batch)
    views = torch.randn(batch, 3, mode.size, mode.size, generator=generator)
    tiles = None
    if mode.tiles:
        tiles = torch.randn(batch * mode.tiles, 3, mode.tile_size, mode.tile_size, generator=generator)
        tiles = tiles.to(device=device, dtype=dtype)
    return views.to(device=device, dtype=dtype), tiles


def count_flops(config: DeepEncoderConfig, mode: Mode, batch: int) -> int:
    """FLOPs of one forward (eager attention, so every matmul is counted as written), on the meta device."""
    from torch.utils.flop_counter import FlopCounterMode

    config = DeepEncoderConfig.from_dict(config.to_dict(), attn_implementation="eager")
    with torch.device("meta"):
        model = DeepEncoderModel(config).eval()
        views, tiles = inputs(Mode(mode.size, mode.tiles, mode.tile_size), batch, torch.float32, "meta")
        grids = [(mode.tiles, 1)] * batch if mode.tiles else None
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(views, pixel_values_tiles=tiles, tile_grids=grids)
    return counter.get_total_flops()


def matmul_peak(device: str, dtype: torch.dtype, seconds: float = 3.0) -> float:
    """Best GFLOP/s of square matmuls (2048..4096) in `dtype` on `device`."""
    best = 0.0
    for n in (2048, 3072, 4096):
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        torch.mm(a, b)
        deadline = time.perf_counter() + seconds / 3
        while time.perf_counter() < deadline:
            _sync(device)
            start = time.perf_counter()
            torch.mm(a, b)
            _sync(device)
            best = max(best, 2 * n**3 / (time.perf_counter() - start) / 1e9)
    return best


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _peak_memory_mb(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    status = Path("/proc/self/status")
    if status.exists():  # VmHWM: peak RSS since the last reset (see `_reset_peak_rss`)
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _reset_peak_rss() -> None:
    """Reset the process's peak RSS to its current RSS (Linux), so the harness's own copy of the weights while a
    path is built does not count; the weights the path holds do."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


# ------------------------------------------------------------------ worker (one fresh process per path and mode)
def _build(spec: dict, paths: list[str]) -> tuple[dict, str, torch.dtype]:
    """A worker's set-up: thread count, then each path built on the shared weights -> ({path: encode}, device,
    dtype)."""
    from safetensors.torch import load_file

    from benchmarks.peers import PATHS

    torch.set_num_threads(spec["threads"])
    device, dtype = spec["device"], DTYPES[spec["dtype"]]
    config = DeepEncoderConfig.from_dict(spec["config"])
    state_dict = load_file(spec["weights"])
    return {path: PATHS[path][0](state_dict, config, device, dtype) for path in paths}, device, dtype


def _timed(encode, views: torch.Tensor, tiles: torch.Tensor | None, device: str) -> tuple[float, torch.Tensor]:
    """(seconds, output) of one encode, the device synchronised on both sides."""
    _sync(device)
    start = time.perf_counter()
    out = encode(views, tiles)
    _sync(device)
    return time.perf_counter() - start, out


def worker(spec: dict) -> None:
    build_start = time.perf_counter()
    encoders, device, dtype = _build(spec, [spec["path"]])
    encode = encoders[spec["path"]]
    mode = Mode(**spec["mode"])
    gc.collect()
    _reset_peak_rss()
    results = {"build_s": time.perf_counter() - build_start, "batches": {}}
    with torch.inference_mode():
        for index, batch in enumerate(spec["batches"]):
            views, tiles = inputs(mode, batch, dtype, device)
            if device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            repeats = spec["repeats"][index]
            if hasattr(encode, "prepare"):
                encode.prepare(views, tiles)
            if spec["warmup"] and (index == 0 or repeats > 1):
                encode(*inputs(MODES[spec["warmup"]] if index == 0 else mode, batch, dtype, device))
            times = []
            for _ in range(repeats):
                seconds, out = _timed(encode, views, tiles, device)
                times.append(seconds)
            results["batches"][str(batch)] = {"times": times, "peak_mb": _peak_memory_mb(device)}
            if index == 0:
                torch.save(out.float().cpu(), spec["output"])
            del out
    Path(spec["result"]).write_text(json.dumps(results))


def interleaved_worker(spec: dict) -> None:
    """The headline pair in one process, alternating one run of each per round (after a tiny-page warm-up), so a
    machine whose speed drifts (a shared VM) slows both alike; the ratio of the best rounds is the headline."""
    encoders, device, dtype = _build(spec, spec["paths"])
    times: dict[str, list[float]] = {path: [] for path in encoders}
    with torch.inference_mode():
        views, tiles = inputs(Mode(**spec["mode"]), 1, dtype, device)
        for encode in encoders.values():
            encode(*inputs(MODES["tiny"], 1, dtype, device))
        for _ in range(spec["rounds"]):
            for path, encode in encoders.items():
                times[path].append(_timed(encode, views, tiles, device)[0])
    Path(spec["result"]).write_text(json.dumps(times))


# ------------------------------------------------------------------ driver
def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-12)).item()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--quick", action="store_true", help="one timed run per shape, fewer configurations")
    parser.add_argument(
        "--paths", default=None, help="comma list of paths (default: all but ours-compile; --quick: and ours-folded)"
    )
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", type=Path, default=RESULTS)
    installed = runtime.available()
    best = next((name for name in ("tcmalloc", "glibc-tuned", "jemalloc") if name in installed), "glibc")
    parser.add_argument("--allocator", default=best, choices=runtime.ALLOCATORS, help="allocator of the tables")
    parser.add_argument("--allocators", default=",".join(installed), help="allocators of the interleaved headline rows")
    parser.add_argument(
        "--deepseek-src", default=None, help="directory of DeepSeek-OCR's sam_vary_sdpa.py/clip_sdpa.py"
    )
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        spec = json.loads(Path(args.worker).read_text())
        interleaved_worker(spec) if spec.get("interleaved") else worker(spec)
        return 0

    from benchmarks.peers import DEEPSEEK_SRC_ENV, PATHS

    started = time.perf_counter()
    config = DeepEncoderConfig()
    default_rel_pos = default_rel_pos_kernel(args.device.split(":")[0], 4096)
    quick_skip = ("ours-folded", "ours-flex") if args.quick else ()  # options, not the default: full runs only
    cpu_skip = () if args.device.startswith("cuda") else ("ours-compile", "ours-compile-ro")
    if args.deepseek_src:
        os.environ[DEEPSEEK_SRC_ENV] = str(Path(args.deepseek_src).expanduser().resolve())  # read by the workers
    optional = (*cpu_skip, *quick_skip, *(() if args.deepseek_src else ("deepseek",)))
    names = args.paths.split(",") if args.paths else [p for p in PATHS if p not in optional]
    if len(DEFAULT_REL_POS_KERNELS.get(args.device.split(":")[0], ())) <= 1:  # one kernel at every size
        names = [p for p in names if p != f"ours-{default_rel_pos}"]  # the same as "ours"
    else:  # per call size (CUDA): "ours" switches kernels between batch 1 and 32, both kernels run too
        default_rel_pos = DEFAULT_REL_POS_KERNELS[args.device.split(":")[0]]
    unknown = set(names) - set(PATHS)
    if unknown:
        parser.error(f"unknown paths {sorted(unknown)}; choose from {sorted(PATHS)}")
    modes = args.modes.split(",")

    runs = [run for run in plan(args.quick, names, args.device) if run[1] in modes]

    card = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else None
    print(
        f"torch {torch.__version__}, {card or platform.processor() or platform.machine()}, {args.threads} threads, "
        f"device {args.device}, {args.dtype}; default rel-pos kernel {default_rel_pos!r}; tables under "
        f"{args.allocator}, headline rows under {args.allocators}",
        flush=True,
    )
    peak = matmul_peak(args.device, DTYPES[args.dtype])
    print(f"measured matmul peak: {peak:.1f} GFLOP/s (measured again at the end; the higher one counts)", flush=True)

    flops = {}
    for _, mode, batches in runs:
        for batch in batches:
            if (mode, batch) not in flops:
                flops[mode, batch] = count_flops(config, MODES[mode], batch)

    records = []
    with tempfile.TemporaryDirectory(prefix="deepencoder-bench-") as tmp:
        tmp = Path(tmp)
        weights = tmp / "weights.safetensors"
        _random_weights(config, weights)
        for path, mode, batches in runs:
            spec = {
                "path": path, "mode": vars(MODES[mode]), "batches": batches, "device": args.device,
                "dtype": args.dtype, "config": config.to_dict(), "weights": str(weights), "threads": args.threads,
                "repeats": [args.repeats or timed_runs(args.quick) for _ in batches], "warmup": warmup(args.quick, path, mode), "output": str(tmp / f"{path}-{mode}.pt"),
                "result": str(tmp / f"{path}-{mode}.json"),
            }  # fmt: skip
            proc = _spawn(spec, tmp / f"{path}-{mode}.spec.json", args.allocator)
            if proc.returncode:
                print(f"{path} {mode}: FAILED\n{proc.stderr[-2000:]}", flush=True)
                records.append({"path": path, "mode": mode, "batch": batches[0], "error": proc.stderr[-2000:]})
                continue
            result = json.loads(Path(spec["result"]).read_text())
            for batch in batches:
                entry = result["batches"][str(batch)]
                seconds = min(entry["times"])
                record = {
                    "path": path, "mode": mode, "batch": batch, "seconds": seconds, "times": entry["times"],
                    "pages_per_s": batch / seconds, "tokens_per_s": batch * MODES[mode].tokens() / seconds,
                    "gflop": flops[mode, batch] / 1e9, "gflop_per_s": flops[mode, batch] / seconds / 1e9,
                    "peak_mb": entry["peak_mb"],
                }  # fmt: skip
                records.append(record)
                print(
                    f"  {path:13s} {mode:7s} b{batch}: {seconds:7.2f} s  {record['gflop_per_s']:6.1f} GFLOP/s  "
                    f"{entry['peak_mb']:7.0f} MB",
                    flush=True,
                )
        _compare_outputs(records, tmp, TOLERANCE[args.dtype])
        interleaved = {}
        if set(HEADLINE) <= set(names) and "base" in modes:
            rounds = args.repeats or (3 if args.quick else 5)
            for allocator in args.allocators.split(","):
                print(f"headline under {allocator}: {' and '.join(HEADLINE)} alternating in one process, Base b1")
                spec = {
                    "interleaved": True, "paths": list(HEADLINE), "mode": vars(MODES["base"]), "rounds": rounds,
                    "device": args.device, "dtype": args.dtype, "config": config.to_dict(), "weights": str(weights),
                    "threads": args.threads, "result": str(tmp / f"interleaved-{allocator}.json"),
                }  # fmt: skip
                proc = _spawn(spec, tmp / f"interleaved-{allocator}.spec.json", allocator)
                if proc.returncode:
                    print(f"interleaved headline under {allocator}: FAILED\n{proc.stderr[-2000:]}", flush=True)
                    continue
                interleaved[allocator] = json.loads((tmp / f"interleaved-{allocator}.json").read_text())
                print("  " + allocator_row(allocator, interleaved[allocator]), flush=True)

    # a shared machine can be slowed at any moment: the peak is the best of a measurement before and after
    end_peak = matmul_peak(args.device, DTYPES[args.dtype])
    print(f"matmul peak at the end: {end_peak:.1f} GFLOP/s", flush=True)
    peak = max(peak, end_peak)
    for record in records:
        if "gflop_per_s" in record:
            record["fraction_of_peak"] = record["gflop_per_s"] / peak

    table = format_table(records, args)
    print(table)
    headline = summary(records, interleaved)
    if headline:
        print(headline)
    elapsed = time.perf_counter() - started
    print(f"total {elapsed:.0f} s")
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"tower-{args.device.split(':')[0]}-{args.dtype}" + ("-quick" if args.quick else "")
    meta = {
        "torch": torch.__version__, "machine": platform.machine(), "processor": platform.processor(), "card": card,
        "cpu_count": os.cpu_count(), "threads": args.threads, "device": args.device, "dtype": args.dtype,
        "quick": args.quick, "matmul_peak_gflop_per_s": peak, "default_rel_pos_kernel": default_rel_pos,
        "allocator": args.allocator,
        "elapsed_s": elapsed, "paths": {p: PATHS[p][1] for p in names},
    }  # fmt: skip
    payload = {"meta": meta, "results": records, "interleaved": interleaved, "table": table, "summary": headline}
    (args.out / f"{stem}.json").write_text(json.dumps(payload, indent=1))
    try:
        _chart(records, args.out / f"{stem}.png", f"{args.device} {args.dtype}, peak {peak:.0f} GFLOP/s")
        print(f"wrote {args.out / stem}.json and .png")
    except ImportError as error:  # a machine without matplotlib still gets the figures
        print(f"wrote {args.out / stem}.json (no chart: {error})")
    return 0


def _spawn(spec: dict, spec_file: Path, allocator: str) -> subprocess.CompletedProcess:
    """Run one worker on `spec` in a fresh interpreter (its own peak RSS) under `allocator`, output captured."""
    spec_file.write_text(json.dumps(spec))
    return subprocess.run(
        [sys.executable, "-m", "benchmarks.tower", "--worker", str(spec_file)],
        cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True,
        env=runtime.environment(allocator),
    )  # fmt: skip


def _random_weights(config: DeepEncoderConfig, path: Path) -> None:
    """Seeded random weights for every tensor of the tower (zero-initialised tables such as rel-pos and biases
    matter too): norm weights around 1, everything else N(0, 0.02)."""
    from safetensors.torch import save_file

    with torch.device("meta"):
        shapes = {name: tensor.shape for name, tensor in DeepEncoderModel(config).state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    tensors = {}
    for name, shape in shapes.items():
        noise = torch.randn(shape, generator=generator)
        is_norm_weight = len(shape) == 1 and "norm" in name and name.endswith("weight")
        tensors[name] = 1 + 0.1 * noise if is_norm_weight else 0.02 * noise
    save_file(tensors, str(path))


def _compare_outputs(records: list[dict], tmp: Path, tolerance: float) -> None:
    """Each path's batch-1 output against transformers' (the independent port), else our eager path."""
    for record in records:
        if "error" in record or record["batch"] != min(
            r["batch"] for r in records if r.get("path") == record["path"] and r["mode"] == record["mode"]
        ):
            continue
        reference = None
        for name in ("transformers", "ours-eager"):
            file = tmp / f"{name}-{record['mode']}.pt"
            if file.exists() and name != record["path"]:
                reference, record["reference"] = torch.load(file), name
                break
        if reference is None:
            continue
        error = rel_err(torch.load(tmp / f"{record['path']}-{record['mode']}.pt"), reference)
        record["rel_err"] = error
        record["correct"] = error <= tolerance
    for record in records:  # larger batches share the batch-1 verdict
        if "error" in record or "rel_err" in record:
            continue
        first = next((r for r in records if r["path"] == record["path"] and r["mode"] == record["mode"]
                      and "rel_err" in r), None)  # fmt: skip
        if first is not None:
            record["rel_err"], record["correct"] = first["rel_err"], first["correct"]
            record["reference"] = first["reference"]


def allocator_row(allocator: str, times: dict[str, list[float]]) -> str:
    ours, peer = times[HEADLINE[0]], times[HEADLINE[1]]
    return (
        f"{allocator:12s} ours best {min(ours):.2f} s / median {statistics.median(ours):.2f} s, transformers best "
        f"{min(peer):.2f} s / median {statistics.median(peer):.2f} s: {min(peer) / min(ours):.2f}x (best), "
        f"{statistics.median(peer) / statistics.median(ours):.2f}x (median)"
    )


def summary(records: list[dict], interleaved: dict[str, dict[str, list[float]]] | None = None) -> str:
    """The issue's acceptance figure: transformers' best allocator row over our best allocator row (interleaved
    rounds), one row per allocator, then per (mode, batch) the pair in their own processes."""
    lines = []
    if interleaved:
        lines.append(f"base b1, interleaved in one process ({len(next(iter(interleaved.values()))['ours'])} rounds):")
        lines.extend("  " + allocator_row(name, times) for name, times in interleaved.items())
        ours = {name: min(times[HEADLINE[0]]) for name, times in interleaved.items()}
        peer = {name: min(times[HEADLINE[1]]) for name, times in interleaved.items()}
        best_ours, best_peer = min(ours, key=ours.get), min(peer, key=peer.get)
        lines.append(
            f"headline: ours under {best_ours} {ours[best_ours]:.2f} s vs transformers' best row ({best_peer}) "
            f"{peer[best_peer]:.2f} s: {peer[best_peer] / ours[best_ours]:.2f}x"
        )
    for mode in MODES:
        for batch in (1, 4):
            ours = [r for r in records if (r["path"], r["mode"], r.get("batch")) == ("ours", mode, batch)]
            peer = [r for r in records if (r["path"], r["mode"], r.get("batch")) == ("transformers", mode, batch)]
            if ours and peer and "seconds" in ours[0] and "seconds" in peer[0]:
                o, p = ours[0], peer[0]
                lines.append(
                    f"{mode} b{batch}, own processes (best of {len(o['times'])} / {len(p['times'])} runs): "
                    f"ours {o['seconds']:.2f} s ({100 * o['fraction_of_peak']:.0f}% of matmul peak, "
                    f"{o['peak_mb']:.0f} MB) vs transformers {p['seconds']:.2f} s ({p['peak_mb']:.0f} MB): "
                    f"{p['seconds'] / o['seconds']:.2f}x" + ("" if o.get("correct", True) else " (ours WRONG)")
                )
    return "\n".join(lines)


def format_table(records: list[dict], args) -> str:
    lines = []
    header = (
        "| mode | batch | path | s/batch | pages/s | tokens/s | GFLOP/s | % of peak | peak mem MB | vs fastest ours "
        "| rel. err (vs) |"
    )
    rule = "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|"
    for mode in MODES:
        for batch in sorted({r["batch"] for r in records if r["mode"] == mode}):
            rows = [r for r in records if r["mode"] == mode and r["batch"] == batch]
            if not rows:
                continue
            ours = [r for r in rows if r["path"].startswith("ours") and r.get("correct", True) and "error" not in r]
            fastest = min((r["seconds"] for r in ours), default=None)
            lines.append(f"\n{mode}, batch {batch} ({rows[0].get('gflop', 0):.0f} GFLOP per batch)")
            lines.append(header)
            lines.append(rule)
            for r in sorted(rows, key=lambda r: r.get("seconds", float("inf"))):
                if "error" in r:
                    lines.append(f"| {mode} | {batch} | {r['path']} | FAILED | | | | | | | |")
                    continue
                ratio = f"{r['seconds'] / fastest:.2f}x" if fastest else ""
                err = ""
                if "rel_err" in r:
                    err = f"{r['rel_err']:.1e} ({r['reference']})" + ("" if r["correct"] else " WRONG")
                lines.append(
                    f"| {mode} | {batch} | {r['path']} | {r['seconds']:.2f} | {r['pages_per_s']:.3f} | "
                    f"{r['tokens_per_s']:.1f} | {r['gflop_per_s']:.1f} | {100 * r['fraction_of_peak']:.0f}% | "
                    f"{r['peak_mb']:.0f} | {ratio} | {err} |"
                )
    return "\n".join(lines)


def _chart(records: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in records if "error" not in r]
    groups = sorted({(r["mode"], r["batch"]) for r in rows}, key=lambda g: (list(MODES).index(g[0]), g[1]))
    paths = list(dict.fromkeys(r["path"] for r in rows))
    fig, ax = plt.subplots(figsize=(max(8, 1.6 * len(groups)), 4.5))
    width = 0.8 / max(1, len(paths))
    for i, name in enumerate(paths):
        xs, ys = [], []
        for j, group in enumerate(groups):
            match = [r for r in rows if r["path"] == name and (r["mode"], r["batch"]) == group]
            if match:
                xs.append(j + i * width)
                ys.append(match[0]["pages_per_s"])
        ax.bar(xs, ys, width, label=name)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(groups))], [f"{m}\nb{b}" for m, b in groups])
    ax.set_ylabel("pages / s")
    ax.set_yscale("log")
    ax.set_title(f"deepencoder tower throughput ({title})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
