"""DeepEncoder V2 against transformers' `DeepseekOcr2` vision path (SAM + encoder + Linear projector) on a 1024 px
view and a 768 px tile: seconds per view, ratio, and the outputs compared, on shared random weights.

    python -m benchmarks.tower_v2 [--rounds 3] [--threads 2] [--paths ours,ours-eager,transformers]
    python -m benchmarks.tower_v2 --device cuda --dtype bf16   # batch 1 and 32, eager and compiled paths too

One process, one allocator for every path (`deepencoder.runtime.configure_allocator`: tcmalloc when installed, set
before anything is allocated, glibc tuned on CUDA as `deepencoder encode` does; `DEEPENCODER_ALLOCATOR` overrides), the paths alternating view by view in every round
after a warm-up of each, so a shared machine's drift slows all alike. The ratio uses each path's best round (median
also printed). Results: benchmarks/results/tower-v2-<device>-<dtype>.json (`--out` another folder).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from deepencoder import DeepEncoderV2Config, DeepEncoderV2Model, runtime

RESULTS = Path(__file__).parent / "results"
VIEWS = {"1024 view": 1024, "768 tile": 768}


def random_tower(seed: int = 0) -> DeepEncoderV2Model:
    """The released architecture with seeded random weights on every tensor: norm weights around 1, the rest
    N(0, 0.02) (zero-initialised tables such as rel-pos, pos-embed and biases included)."""
    model = DeepEncoderV2Model(DeepEncoderV2Config()).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            is_norm = param.ndim == 1 and ("norm" in name or name.startswith(("sam.neck.1", "sam.neck.3")))
            param.copy_(1 + 0.1 * noise if is_norm and name.endswith("weight") else 0.02 * noise)
    return model


def transformers_path(model: DeepEncoderV2Model):
    """transformers' `DeepseekOcr2VisionModel` (SDPA) + a Linear projector with the same weights."""
    from transformers.models.deepseek_ocr2.configuration_deepseek_ocr2 import DeepseekOcr2VisionConfig
    from transformers.models.deepseek_ocr2.modeling_deepseek_ocr2 import DeepseekOcr2VisionModel

    from deepencoder.conversion.unlimited_ocr import to_unlimited_ocr_vision

    sam, encoder = model.config.sam_config, model.config.encoder_config
    config = DeepseekOcr2VisionConfig(
        sam_config=dict(
            hidden_size=sam.hidden_size, output_channels=sam.out_channels, num_hidden_layers=sam.num_hidden_layers,
            num_attention_heads=sam.num_attention_heads, window_size=sam.window_size,
            global_attn_indexes=list(sam.global_attn_indexes), mlp_dim=sam.mlp_dim,
            downsample_channels=list(sam.compressor_channels),
        ),
        encoder_config=dict(
            hidden_size=encoder.hidden_size, intermediate_size=encoder.intermediate_size,
            num_hidden_layers=encoder.num_hidden_layers, num_attention_heads=encoder.num_attention_heads,
            num_key_value_heads=encoder.num_key_value_heads, rms_norm_eps=encoder.rms_norm_eps,
            rope_parameters={"rope_type": "default", "rope_theta": encoder.rope_theta},
        ),
    )  # fmt: skip
    config._attn_implementation = "sdpa"
    vision = DeepseekOcr2VisionModel(config).eval()
    state = model.state_dict()
    weights = to_unlimited_ocr_vision({k: v for k, v in state.items() if k.startswith("sam.")})
    for key, value in state.items():
        if key.startswith("encoder.queries."):
            size = {144: 768, 256: 1024}[int(key.rsplit(".", 1)[1])]
            weights[f"query_{size}_resolution.weight"] = value
        elif key.startswith("encoder."):
            weights["vision_encoder." + key[len("encoder.") :]] = value
    missing, unexpected = vision.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"transformers' port: missing {missing}, unexpected {unexpected}")
    projector = torch.nn.Linear(model.projector.in_features, model.projector.out_features)
    projector.load_state_dict(model.projector.state_dict())
    encode = lambda pixels: projector(vision(pixels).last_hidden_state)  # noqa: E731
    encode.vision, encode.projector = vision, projector
    return encode


def stage_times(model: DeepEncoderV2Model, transformers_encode, pixels: torch.Tensor) -> dict[str, dict[str, float]]:
    """Seconds of the SAM stage (trunk + neck + compressor) and of the encoder (+ projector) for both paths, on the
    same SAM features (the stages alternate, ours first)."""
    vision = transformers_encode.vision
    start = time.perf_counter()
    features = model.sam(pixels)
    ours_sam = time.perf_counter() - start
    start = time.perf_counter()
    theirs_features = vision.sam_encoder(pixels).last_hidden_state
    theirs_sam = time.perf_counter() - start
    start = time.perf_counter()
    model.projector(model.encoder(features)[0])
    ours_encoder = time.perf_counter() - start
    tokens = theirs_features.flatten(2).transpose(1, 2)
    n = tokens.shape[1]
    table = vision.query_768_resolution if n == 144 else vision.query_1024_resolution
    start = time.perf_counter()
    joined = torch.cat([tokens, table.weight[None].expand(tokens.shape[0], -1, -1)], dim=1)
    vision.vision_encoder(inputs_embeds=joined, num_patches=n)
    theirs_encoder = time.perf_counter() - start
    return {
        "ours": {"sam": ours_sam, "encoder": ours_encoder},
        "transformers": {"sam": theirs_sam, "encoder": theirs_encoder},
    }


def views_of(tower: DeepEncoderV2Model):
    return lambda pixels: tower.encode_views(pixels).image_embeds


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument(
        "--paths", default=None,
        help="ours, ours-eager, ours-compile, ours-compile-ro (CUDA graphs), transformers (default: ours,transformers;"
        " on CUDA also the two compiled paths)",
    )  # fmt: skip
    parser.add_argument("--stages", action="store_true", help="also time the SAM stage and the encoder apart")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--batches", default=None, help="comma list of batch sizes (default 1; on CUDA 1,32)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder of the JSON")
    args = parser.parse_args(argv)
    cuda_run = runtime.cuda_requested(args.device)  # as the CLI: a CUDA run keeps glibc (tuned), no re-exec
    allocator = runtime.configure_allocator(prefer=("glibc-tuned",) if cuda_run else ("tcmalloc", "glibc-tuned"))
    torch.set_num_threads(args.threads)
    cuda = args.device.startswith("cuda")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    batches = [int(b) for b in (args.batches or ("1,32" if cuda else "1")).split(",")]
    model = random_tower().to(device=args.device, dtype=dtype)
    paths = (args.paths or ("ours,ours-compile,ours-compile-ro,transformers" if cuda else "ours,transformers")).split(
        ","
    )
    encoders = {}
    for path in paths:
        if path == "ours":
            encoders[path] = views_of(model)
        elif path in ("ours-compile", "ours-compile-ro"):
            compiled = DeepEncoderV2Model(model.config).eval().to(device=args.device, dtype=dtype)
            compiled.load_state_dict(model.state_dict())
            compiled.compile("reduce-overhead" if path == "ours-compile-ro" else None)
            encoders[path] = (lambda tower: lambda pixels: tower.encode_views(pixels).image_embeds.clone())(compiled)
        elif path == "ours-eager":
            eager = DeepEncoderV2Model(model.config).eval()
            eager.load_state_dict(model.state_dict())
            eager.config.sam_config._attn_implementation = "eager"
            eager.config.encoder_config._attn_implementation = "eager"
            encoders[path] = views_of(eager)
        elif path == "transformers":
            encoders[path] = transformers_path(model)
            encoders[path].vision.to(device=args.device, dtype=dtype)
            encoders[path].projector.to(device=args.device, dtype=dtype)
        else:
            raise SystemExit(f"unknown path {path!r}")
    generator = torch.Generator().manual_seed(1)
    cases = {
        (f"{name} b{batch}" if batches != [1] else name): torch.randn(batch, 3, size, size, generator=generator).to(
            device=args.device, dtype=dtype
        )
        for batch in batches
        for name, size in VIEWS.items()
    }  # case name -> pixels
    pixels = cases
    times: dict[str, dict[str, list[float]]] = {view: {path: [] for path in encoders} for view in cases}
    outputs: dict[str, dict[str, torch.Tensor]] = {view: {} for view in cases}
    with torch.inference_mode():
        for view in cases:  # warm-up (compiles), and the outputs compared
            for path, encode in encoders.items():
                outputs[view][path] = encode(pixels[view])
        for _ in range(args.rounds):
            for view in cases:
                for path, encode in encoders.items():
                    _sync(args.device)
                    start = time.perf_counter()
                    encode(pixels[view])
                    _sync(args.device)
                    times[view][path].append(time.perf_counter() - start)
    stages: dict[str, list[dict]] = {view: [] for view in cases}
    if args.stages and {"ours", "transformers"} <= set(encoders) and not cuda and batches == [1]:
        with torch.inference_mode():
            for _ in range(args.rounds):
                for view in VIEWS:
                    stages[view].append(stage_times(model, encoders["transformers"], pixels[view]))
    record = {
        "machine": torch.cuda.get_device_name(args.device)
        if cuda
        else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "device": args.device,
        "dtype": args.dtype,
        "torch": torch.__version__,
        "allocator": allocator,
        "rounds": args.rounds,
        "views": {},
    }
    lines = [
        f"DeepEncoder V2 vs transformers' DeepseekOcr2 vision path, {record['machine']} {args.dtype}, batches "
        f"{args.batches or batches}, allocator {allocator}, "
        f"{torch.get_num_threads()} threads, {args.rounds} interleaved rounds",
        "| view | path | best s | median s | views/s | vs ours (best) | rel. err vs transformers |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for view in cases:
        best = {path: min(values) for path, values in times[view].items()}
        reference = outputs[view].get("transformers")
        entries = {}
        for path, values in times[view].items():
            error = None
            if reference is not None and path != "transformers":
                actual, expected = outputs[view][path].double(), reference.double()
                error = ((actual - expected).abs().max() / expected.abs().max()).item()
            entries[path] = {
                "seconds": values,
                "best": best[path],
                "median": statistics.median(values),
                "rel_err": error,
            }
            ratio = best[path] / best["ours"] if "ours" in best else float("nan")
            shown = f"{error:.1e}" if error is not None else ""
            lines.append(
                f"| {view} | {path} | {best[path]:.4f} | {statistics.median(values):.4f} | "
                f"{pixels[view].shape[0] / best[path]:.1f} | {ratio:.2f}x | {shown} |"
            )
        record["views"][view] = entries
    for view in cases:
        if {"ours", "transformers"} <= set(times[view]):
            ours, theirs = record["views"][view]["ours"], record["views"][view]["transformers"]
            lines.append(
                f"{view}: ours {ours['best']:.2f} s vs transformers {theirs['best']:.2f} s: "
                f"{theirs['best'] / ours['best']:.2f}x (best), {theirs['median'] / ours['median']:.2f}x (median)"
            )
    for view, rounds in stages.items():
        if rounds:
            record["views"][view]["stages"] = rounds
            best = {
                (path, stage): min(r[path][stage] for r in rounds)
                for path in ("ours", "transformers")
                for stage in ("sam", "encoder")
            }
            lines.append(
                f"{view} stages (best of {len(rounds)}): SAM ours {best['ours', 'sam']:.2f} s vs transformers "
                f"{best['transformers', 'sam']:.2f} s ({best['transformers', 'sam'] / best['ours', 'sam']:.2f}x); "
                f"encoder ours {best['ours', 'encoder']:.2f} s vs transformers {best['transformers', 'encoder']:.2f} s "
                f"({best['transformers', 'encoder'] / best['ours', 'encoder']:.2f}x)"
            )
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    record["load_average_1min"] = load
    lines.append(f"load average at the end: {load:.1f} on {os.cpu_count()} CPUs")
    print("\n".join(lines))
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"tower-v2-{args.device.split(':')[0]}-{args.dtype}.json"
    (args.out / name).write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
