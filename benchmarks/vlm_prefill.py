"""Prefill of one page in transformers' OCR model: its stock vision path against this library's tower attached.

    python -m benchmarks.vlm_prefill [--model unlimited-ocr | deepseek-ocr2] [--page 1240x1754] [--rounds 3]
                                     [--text-layers 2] [--device cpu] [--dtype fp32]
    python -m benchmarks.vlm_prefill --allocators glibc,glibc-tuned,tcmalloc     # a row per allocator

One process, one model with the full-size vision config and random weights, one page through transformers' own
processor:
- `unlimited-ocr`: `UnlimitedOcrForConditionalGeneration` (DeepSeek-OCR's architecture; the tower attached is a
  `DeepEncoderModel`), DeepSeek-OCR's language model width and vocabulary with `--text-layers` layers (12 in the
  released model), the processor in Gundam settings (1024 px global view, 640 px tiles, up to 9);
- `deepseek-ocr2`: `DeepseekOcr2ForConditionalGeneration` (SAM ViT-B + the Qwen2-0.5B encoder with learned queries;
  a `DeepEncoderV2Model` attached), DeepSeek-OCR-2's language model shape (width 1280, vocabulary 129280, a dense
  first layer, then MoE layers of 64 experts, 6 routed) with `--text-layers` layers, the processor at its defaults
  (1024 px global view, 768 px tiles, 2 to 6).
Each round runs the prefill (`forward` over the whole prompt, last-position logits as `generate`'s prefill computes
them) with the stock path and with the tower attached, alternating which goes first, so machine drift slows both
alike; what the language model receives (the prompt's embeddings with the image features in place) and the logits
are compared on every round. Both paths of a row run under the same allocator (`deepencoder.runtime`: the one
`configure_allocator` picks, or one process per `--allocators` entry), named in the row with the thread count.
Results: benchmarks/results/vlm-prefill-<device>-<dtype>.json for `unlimited-ocr`,
vlm-prefill-deepseek-ocr2-<device>-<dtype>.json for `deepseek-ocr2` (a list of rows).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from deepencoder import runtime
from deepencoder.dtypes import DTYPE_NAMES, dtype_name, parse_dtype
from deepencoder.integrations import attach, detach, image_processor_from_transformers

RESULTS = Path(__file__).parent / "results"


# DeepSeek-OCR-2's encoder (Qwen2-0.5B's decoder stack) and language model (DeepSeek's 3B MoE: a dense first layer,
# then MoE layers); transformers' config defaults are neither
QWEN2_0_5B = dict(
    hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2
)
OCR2_TEXT = dict(
    hidden_size=1280, intermediate_size=6848, num_attention_heads=10, num_key_value_heads=10, vocab_size=129280,
    moe_intermediate_size=896, n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6,
)  # fmt: skip


def build(model_name: str, text_layers: int, dtype: torch.dtype, device: str, seed: int = 0):
    """Full-size vision, random weights (rel-pos and pos-embed included, which transformers initialises to 0)."""
    if model_name == "deepseek-ocr2":
        from transformers import DeepseekOcr2Config, DeepseekOcr2ForConditionalGeneration

        layers = ["dense"] + ["moe"] * (text_layers - 1)
        text = {**OCR2_TEXT, "num_hidden_layers": text_layers, "mlp_layer_types": layers}
        config = DeepseekOcr2Config(vision_config={"encoder_config": QWEN2_0_5B}, text_config=text)
        model_class = DeepseekOcr2ForConditionalGeneration
    else:
        from transformers import UnlimitedOcrConfig, UnlimitedOcrForConditionalGeneration

        config = UnlimitedOcrConfig(text_config={"num_hidden_layers": text_layers})
        model_class = UnlimitedOcrForConditionalGeneration
    torch.manual_seed(seed)
    model = model_class(config)
    with torch.no_grad():
        for name, parameter in model.model.vision_tower.named_parameters():
            if name.endswith(("rel_pos_h", "rel_pos_w", "pos_embed")):
                parameter.normal_(std=0.02)
        model.model.view_separator.normal_(std=0.02)
    return model.to(device, dtype).eval()


def page_inputs(model, model_name: str, width: int, height: int, device: str, dtype: torch.dtype) -> dict:
    """One noise page of width x height px through transformers' processor (Gundam settings for `unlimited-ocr`, the
    defaults for `deepseek-ocr2`), and a prompt holding as many image tokens as the model lays out for it."""
    from PIL import Image

    if model_name == "deepseek-ocr2":
        from transformers import DeepseekOcr2ImageProcessor

        processor = DeepseekOcr2ImageProcessor()
    else:
        from transformers import UnlimitedOcrImageProcessor

        processor = UnlimitedOcrImageProcessor(size={"height": 1024, "width": 1024}, tile_size=640, max_patches=9)
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (height, width, 3), generator=generator, dtype=torch.uint8)
    inputs = processor(Image.fromarray(pixels.numpy()), return_tensors="pt")
    plan = image_processor_from_transformers(processor).plan(width, height)
    image_token = model.config.image_token_id
    text = torch.randint(0, 1000, (1, 12), generator=generator)
    input_ids = torch.cat([torch.full((1, plan.num_tokens), image_token), text], dim=1)
    out = {
        k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) if isinstance(v, torch.Tensor) else v
        for k, v in inputs.items()
    }
    out["input_ids"] = input_ids.to(device)
    out["attention_mask"] = torch.ones_like(out["input_ids"])
    return out, plan


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(function, device: str) -> tuple[float, object]:
    _sync(device)
    start = time.perf_counter()
    result = function()
    _sync(device)
    return time.perf_counter() - start, result


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-12)).item()


def measure(args) -> dict:
    """One row: build, then `args.rounds` interleaved rounds of the prefill with each path, in this process."""
    dtype = parse_dtype(args.dtype)
    width, height = (int(v) for v in args.page.lower().split("x"))
    model = build(args.model, args.text_layers, dtype, args.device)
    inputs, plan = page_inputs(model, args.model, width, height, args.device, dtype)

    # what the language model receives (image features scattered into the prompt), captured without extra work
    received: list[torch.Tensor] = []
    model.model.language_model.register_forward_pre_hook(
        lambda module, positional, keywords: received.append(keywords["inputs_embeds"]), with_kwargs=True
    )
    times: dict[str, list[float]] = {"prefill stock": [], "prefill ours": []}
    errors: dict[str, list[float]] = {"image features": [], "logits": []}
    with torch.inference_mode():
        for round_index in range(args.rounds):
            order = ("stock", "ours") if round_index % 2 == 0 else ("ours", "stock")
            logits, embeds = {}, {}
            for path in order:
                (attach if path == "ours" else detach)(model)
                received.clear()
                seconds, out = timed(lambda: model(**inputs, logits_to_keep=1), args.device)
                times[f"prefill {path}"].append(seconds)
                logits[path], embeds[path] = out.logits, received[0]
            errors["logits"].append(rel_err(logits["ours"], logits["stock"]))
            errors["image features"].append(rel_err(embeds["ours"], embeds["stock"]))
    detach(model)

    best = {name: min(values) for name, values in times.items()}
    median = {name: statistics.median(values) for name, values in times.items()}
    tiles = int(inputs["num_local_patches"][0]) if "num_local_patches" in inputs else 0
    return {
        "model": args.model,
        "page": [width, height],
        "tile_grid": list(plan.tile_grid or (0, 0)),
        "tiles": tiles,
        "prompt_tokens": inputs["input_ids"].shape[1],
        "text_layers": args.text_layers,
        "device": args.device,
        "dtype": dtype_name(dtype),
        "threads": torch.get_num_threads(),
        "allocator": runtime.active(),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "cpus": os.cpu_count(),
        "load_average": os.getloadavg(),
        "torch": torch.__version__,
        "rounds": args.rounds,
        "times": times,
        "best": best,
        "median": median,
        "prefill_speedup_best": best["prefill stock"] / best["prefill ours"],
        "prefill_speedup_median": median["prefill stock"] / median["prefill ours"],
        "max_rel_err_image_features": max(errors["image features"]),
        "max_rel_err_logits": max(errors["logits"]),
    }


def table(records: list[dict]) -> str:
    lines = [
        "| model | page | tiles | prompt tokens | LM layers | allocator | threads | prefill stock (best / median s) | "
        "prefill attached (best / median s) | speed-up (best / median) | rel. err image features / logits |",
        "|---|---|---|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in records:
        (width, height), (columns, rows) = r["page"], r["tile_grid"]
        best, median = r["best"], r["median"]
        lines.append(
            f"| {r.get('model', 'unlimited-ocr')} | {width}x{height} | {columns}x{rows} | {r['prompt_tokens']} | {r['text_layers']} | {r['allocator']} | "
            f"{r['threads']} | {best['prefill stock']:.2f} / {median['prefill stock']:.2f} | "
            f"{best['prefill ours']:.2f} / {median['prefill ours']:.2f} | "
            f"{r['prefill_speedup_best']:.2f}x / {r['prefill_speedup_median']:.2f}x | "
            f"{r['max_rel_err_image_features']:.1e} / {r['max_rel_err_logits']:.1e} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("unlimited-ocr", "deepseek-ocr2"), default="unlimited-ocr")
    parser.add_argument("--page", default="1240x1754", help="page size WxH in px (default: A4 at 150 dpi)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--text-layers", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=DTYPE_NAMES, default="fp32")
    parser.add_argument(
        "--allocators",
        default=None,
        help="comma-separated rows to run, each in its own process (from deepencoder.runtime.ALLOCATORS, where "
        "installed); default: one row under the allocator deepencoder.runtime.configure_allocator picks",
    )
    parser.add_argument("--out", type=Path, default=None, help="results JSON (default under benchmarks/results/)")
    parser.add_argument("--row-out", type=Path, default=None, help=argparse.SUPPRESS)  # a child's one row
    args = parser.parse_args(argv)

    if args.row_out is not None:  # a child: the parent chose its allocator
        args.row_out.write_text(json.dumps(measure(args)))
        return 0
    stem = "vlm-prefill" if args.model == "unlimited-ocr" else f"vlm-prefill-{args.model}"
    out = args.out or RESULTS / f"{stem}-{args.device.split(':')[0]}-{args.dtype}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.allocators is None:
        runtime.configure_allocator()  # may re-execute this command once, with the allocator preloaded
        records = [measure(args)]
    else:
        records, failed = [], []
        child_args = list(argv if argv is not None else sys.argv[1:])
        with tempfile.TemporaryDirectory() as tmp:
            for name in args.allocators.split(","):
                row = Path(tmp) / f"{name}.json"
                command = [sys.executable, "-m", "benchmarks.vlm_prefill", *child_args, "--row-out", str(row)]
                done = subprocess.run(command, env=runtime.environment(name), cwd=Path(__file__).parents[1])
                if done.returncode != 0:  # e.g. killed for memory: the other rows still count
                    failed.append(f"{name}: exit status {done.returncode}")
                    continue
                records.append(json.loads(row.read_text()))
                out.write_text(json.dumps(records, indent=2) + "\n")  # every finished row kept
                print(table(records[-1:]), flush=True)
        for failure in failed:
            print(f"row failed: {failure}")
    out.write_text(json.dumps(records, indent=2) + "\n")
    print(table(records))
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
