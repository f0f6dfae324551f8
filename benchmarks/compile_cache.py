"""Compile cache across processes: `model.compile(cache_dir=...)` in a fresh process twice on the same folder; the
first call of the first process compiles, the second process's first call should load the kernels (seconds).

    python -m benchmarks.compile_cache [--device cuda] [--dtype bf16] [--size 1024] [--batch 1] [--mode ...]
        [--tiny] [--cache-dir DIR]

Each process prints its first-call time (compile + one forward) and a steady-state forward; a temporary folder is
used unless --cache-dir is given (then the first process may already find a warm cache).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from deepencoder import DeepEncoderConfig, DeepEncoderModel
from deepencoder.dtypes import parse_dtype


def child(args: argparse.Namespace) -> None:
    config = DeepEncoderConfig()
    if args.tiny:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
        from helpers import tiny_config

        config = tiny_config()
    model = DeepEncoderModel(config).eval().to(device=args.device, dtype=parse_dtype(args.dtype))
    model.compile(args.mode, cache_dir=args.cache_dir)
    views = torch.randn(args.batch, 3, args.size, args.size, device=args.device, dtype=parse_dtype(args.dtype))
    times = []
    with torch.inference_mode():
        for _ in range(2):
            _sync(args.device)
            start = time.perf_counter()
            model.encode_views(views)
            _sync(args.device)
            times.append(time.perf_counter() - start)
    print(json.dumps({"first_call_s": times[0], "steady_s": times[1]}))


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--mode", default=None, help="torch.compile mode (default: the device's in the model)")
    parser.add_argument("--tiny", action="store_true", help="the tests' tiny config (a quick check of the mechanism)")
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args)
        return 0
    with tempfile.TemporaryDirectory(prefix="deepencoder-compile-") as tmp:
        cache_dir = args.cache_dir or tmp
        command = [sys.executable, "-m", "benchmarks.compile_cache", "--child", "--cache-dir", cache_dir]
        command += ["--device", args.device, "--dtype", args.dtype, "--size", str(args.size)]
        command += ["--batch", str(args.batch)] + (["--mode", args.mode] if args.mode else [])
        command += ["--tiny"] if args.tiny else []
        runs = []
        for run in ("first process (cold cache)", "second process (same cache folder)"):
            started = time.perf_counter()
            proc = subprocess.run(command, capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent)
            if proc.returncode:
                print(f"{run}: FAILED\n{proc.stderr[-3000:]}")
                return 1
            result = json.loads(proc.stdout.strip().splitlines()[-1])
            result["process_s"] = time.perf_counter() - started
            runs.append(result)
            print(
                f"{run}: first call (compile + forward) {result['first_call_s']:.1f} s, then a forward "
                f"{result['steady_s']:.3f} s; whole process {result['process_s']:.1f} s",
                flush=True,
            )
        print(f"second run's first call {runs[0]['first_call_s'] / runs[1]['first_call_s']:.1f}x faster")
    return 0


if __name__ == "__main__":
    sys.exit(main())
