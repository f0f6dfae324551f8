"""ONNX export of the tower's view encoder at a fixed view size: v1 (SAM -> compressor -> CLIP -> join -> projector)
or DeepEncoder V2 (SAM -> compressor -> Qwen2 encoder with learned queries -> projector; modes `ocr2`, `ocr2-base`).

`deepencoder export-onnx --weights DIR|random --mode base --out tower.onnx` writes a graph
`pixel_values (batch, 3, S, S) -> image_embeds (batch, (S/64)**2, projector_dim)` with a dynamic batch axis and
checks it against PyTorch with onnxruntime. The page layout (newlines, separator, tile stitching) stays in Python:
it is indexing, not compute (`deepencoder.layout`).

The view size is baked in: position tables (SAM's absolute embedding, the global blocks' rel-pos tables, CLIP's
position table) are resized once, with the same functions the model calls at run time, so the graph holds no
interpolation. Needs the `onnx` extra (onnx, onnxruntime, onnxscript).
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import AutoModel

from .configuration_deepencoder import DeepEncoderConfig
from .configuration_deepencoder_v2 import DeepEncoderV2Config
from .image_processing_deepencoder import RESOLUTION_MODES
from .modeling_clip import resize_clip_pos
from .modeling_deepencoder import DeepEncoderModel
from .modeling_deepencoder_v2 import DeepEncoderV2Model
from .modeling_sam import SamAttention, resize_abs_pos

DEFAULT_OPSET = 18
Tower = DeepEncoderModel | DeepEncoderV2Model


class ViewEncoder(nn.Module):
    """`encode_views(...).image_embeds` as a module with one tensor in and one out.
    pixel_values: (B, 3, S, S) -> (B, (S/64)**2, projector_dim)."""

    def __init__(self, model: Tower) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.encode_views(pixel_values).image_embeds


def bake_view_size(model: Tower, size: int) -> Tower:
    """A copy of `model` whose position tables are pre-resized for `size` x `size` views (outputs unchanged)."""
    model = copy.deepcopy(model)
    sam_config = model.config.sam_config
    if size % sam_config.downsample:
        raise ValueError(f"the view size must be a multiple of {sam_config.downsample}, got {size}")
    grid = size // sam_config.patch_size
    with torch.no_grad():
        sam = model.sam
        if sam.pos_embed is not None:
            sam.pos_embed = nn.Parameter(resize_abs_pos(sam.pos_embed, grid, grid))
        for block in sam.blocks:
            attention: SamAttention = block.attn
            side = grid if block.window_size == 0 else block.window_size
            if attention.use_rel_pos and attention.rel_pos_h.shape[0] != 2 * side - 1:
                for name in ("rel_pos_h", "rel_pos_w"):
                    table = getattr(attention, name)
                    resized = F.interpolate(table.float().t()[None], size=2 * side - 1, mode="linear")[0].t()
                    setattr(attention, name, nn.Parameter(resized.to(table.dtype)))
        if getattr(model, "clip", None) is not None:  # v1; DeepEncoder V2's encoder has no position table
            tokens = size // sam_config.downsample
            embedding = model.clip.embeddings.position_embedding
            embedding.weight = nn.Parameter(resize_clip_pos(embedding.weight, tokens, tokens))
    return model


def export_onnx(
    model: Tower,
    path: str | Path,
    size: int,
    opset: int = DEFAULT_OPSET,
    example_batch: int = 2,
) -> Path:
    """Export the view encoder for `size` x `size` views with a dynamic batch axis. Returns the path written."""
    if opset < 17:
        raise ValueError(f"opset must be >= 17, got {opset}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    encoder = ViewEncoder(bake_view_size(model, size)).eval()
    parameter = next(model.parameters())
    example = torch.zeros(example_batch, model.config.sam_config.num_channels, size, size, dtype=parameter.dtype)
    batch = torch.export.Dim("batch", min=1)
    # trace SDPA as its math form: the ONNX graph decomposes it anyway, and the fused CPU kernel's output strides
    # differ from the decomposition's (which would turn a later reshape into an invalid view)
    with sdpa_kernel(SDPBackend.MATH):
        program = torch.onnx.export(
            encoder,
            (example.to(parameter.device),),
            dynamo=True,
            opset_version=opset,
            input_names=["pixel_values"],
            output_names=["image_embeds"],
            dynamic_shapes={"pixel_values": {0: batch}},
            external_data=True,
            verbose=False,
        )
    program.save(str(path))
    return path


def verify_onnx(
    model: Tower, path: str | Path, size: int, batch: int = 2, seed: int = 0
) -> tuple[float, tuple[int, ...]]:
    """Run the exported graph with onnxruntime (CPU) and PyTorch on the same random views; returns
    (max |onnx - torch| / max |torch|, output shape)."""
    import onnxruntime

    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randn(batch, model.config.sam_config.num_channels, size, size, generator=generator)
    parameter = next(model.parameters())
    with torch.inference_mode():
        expected = model.encode_views(pixels.to(device=parameter.device, dtype=parameter.dtype)).image_embeds
    expected = expected.float().cpu()
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: pixels.to(parameter.dtype).numpy()}
    actual = torch.from_numpy(session.run(None, feed)[0]).float()
    if actual.shape != expected.shape:
        raise RuntimeError(f"onnx output shape {tuple(actual.shape)} != torch {tuple(expected.shape)}")
    error = ((actual.double() - expected.double()).abs().max() / expected.double().abs().max().clamp_min(1e-12)).item()
    return error, tuple(actual.shape)


# ------------------------------------------------------------------ CLI
def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export-onnx", help="export the view encoder (SAM + CLIP or V2 encoder + projector) to ONNX at a fixed mode"
    )
    parser.add_argument("--weights", required=True, help="save_pretrained directory, or `random` (random weights)")
    parser.add_argument("--mode", default="base", choices=sorted(RESOLUTION_MODES), help="view size from the mode")
    parser.add_argument("--tiles", action="store_true", help="export the mode's tile size instead of its global view")
    parser.add_argument("--out", required=True, help="output .onnx file (weights in a .data file beside it)")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET)
    parser.add_argument("--no-verify", action="store_true", help="skip the onnxruntime check")
    parser.add_argument("--tolerance", type=float, default=1e-3, help="max relative error against PyTorch")
    parser.set_defaults(func=run_export)


def run_export(args: argparse.Namespace) -> int:
    mode = RESOLUTION_MODES[args.mode]
    if args.tiles and mode.tile_size is None:
        print(f"error: mode {args.mode!r} has no tiles", file=sys.stderr)
        return 2
    size = mode.tile_size if args.tiles else mode.base_size
    v2 = mode.layout == "queries"  # the mode's token layout names the tower (ocr2, ocr2-base: DeepEncoder V2)
    if args.weights == "random":
        torch.manual_seed(0)
        model = DeepEncoderV2Model(DeepEncoderV2Config()) if v2 else DeepEncoderModel(DeepEncoderConfig())
    else:
        model = AutoModel.from_pretrained(args.weights)
    model = model.float().eval()
    path = export_onnx(model, args.out, size, opset=args.opset)
    print(f"wrote {path} ({size} x {size} views, dynamic batch, opset {args.opset})")
    if not args.no_verify:
        error, shape = verify_onnx(model, path, size)
        ok = error <= args.tolerance
        print(f"onnxruntime vs PyTorch: output {shape}, relative error {error:.2e} ({'ok' if ok else 'FAILED'})")
        if not ok:
            return 1
    return 0
