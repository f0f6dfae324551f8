"""The ways of running the tower that the benchmark compares, all on the same weights.

Each builder takes (state_dict, config, device, dtype) and returns `encode(global_views, tiles) -> tokens`:
global_views (B, 3, S, S), tiles (T, 3, t, t) or None -> (B * h*w + T * th*tw, projector_dim) projected tokens,
global views first. Our paths go through `DeepEncoderModel.forward` (batching, layout included).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from deepencoder import DeepEncoderConfig, DeepEncoderModel
from deepencoder.conversion.unlimited_ocr import to_unlimited_ocr_vision, unlimited_ocr_vision_config
from deepencoder.modeling_sam import resize_abs_pos

Encode = Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]


def _ours(state_dict, config: DeepEncoderConfig, device, dtype, *, attn="sdpa", rel_pos=None, compile=False) -> Encode:
    config = DeepEncoderConfig.from_dict(config.to_dict())
    config._attn_implementation = attn
    config.sam_config._attn_implementation = attn
    config.clip_config._attn_implementation = attn
    with torch.device("meta"):
        model = DeepEncoderModel(config)
    model.load_state_dict(state_dict, assign=True, strict=True)
    model = model.to(device=device, dtype=dtype).eval()
    model.set_attention_kernel(rel_pos)
    if compile:
        model.compile(None if compile is True else compile)

    def encode(global_views, tiles):
        grids = None
        if tiles is not None:
            per_page = tiles.shape[0] // global_views.shape[0]
            grids = [(per_page, 1)] * global_views.shape[0]  # only the count matters to the tower
        out = model(global_views, pixel_values_tiles=tiles, tile_grids=grids)
        parts = [out.global_embeds.flatten(0, 1)]
        if out.tile_embeds is not None:
            parts.append(out.tile_embeds.flatten(0, 1))
        return torch.cat(parts)

    return encode


def _transformers(state_dict, config: DeepEncoderConfig, device, dtype) -> Encode:
    """transformers' `UnlimitedOcrVisionModel` (SDPA) + a 2048 -> 1280 Linear."""
    from transformers.initialization import no_init_weights
    from transformers.models.unlimited_ocr.modeling_unlimited_ocr import UnlimitedOcrVisionModel

    reference_config = unlimited_ocr_vision_config(config, attn_implementation="sdpa")
    with no_init_weights():  # every weight is loaded below; skipping the random init saves seconds per run
        reference = UnlimitedOcrVisionModel(reference_config)
    mapped = to_unlimited_ocr_vision(state_dict)
    missing, unexpected = reference.load_state_dict(mapped, strict=False)
    if unexpected or set(missing) - {"vision_encoder.embeddings.patch_embedding.weight"}:
        raise RuntimeError(f"unmapped weights: missing {missing}, unexpected {unexpected}")
    projector = _projector(state_dict, config)
    reference = reference.to(device=device, dtype=dtype).eval()
    projector = projector.to(device=device, dtype=dtype)

    def encode(global_views, tiles):
        parts = [projector(reference(global_views).last_hidden_state).flatten(0, 1)]
        if tiles is not None:
            parts.append(projector(reference(tiles).last_hidden_state).flatten(0, 1))
        return torch.cat(parts)

    return encode


def _projector(state_dict, config: DeepEncoderConfig) -> nn.Linear:
    projector = nn.Linear(config.join_dim, config.projector_dim, bias=config.projector_bias)
    projector.load_state_dict({k[len("projector.") :]: v for k, v in state_dict.items() if k.startswith("projector.")})
    return projector


def _segment_anything_clip(state_dict, config: DeepEncoderConfig, device, dtype) -> Encode:
    """segment-anything's `ImageEncoderViT` + the two compressor convs, feeding transformers' `CLIPEncoder`
    (CLS, position table and `pre_layrnorm` from our embedding module: they are additions, not compute)."""
    from segment_anything.modeling import ImageEncoderViT
    from transformers import CLIPVisionConfig
    from transformers.models.clip.modeling_clip import CLIPEncoder

    sam, clip = config.sam_config, config.clip_config
    sam_state = {k[4:]: v for k, v in state_dict.items() if k.startswith("sam.") and not k.startswith("sam.net_")}
    encoders: dict[tuple[int, int], nn.Module] = {}

    def sam_encoder(height: int, width: int) -> nn.Module:
        """segment-anything fixes the input size at construction: one encoder per view size, its position
        embedding resized as this tower resizes it and the global blocks' rel-pos tables as segment-anything's own
        `get_rel_pos` would at run time (linear)."""
        if height != width:
            raise ValueError("segment-anything's ImageEncoderViT takes square inputs")
        if (height, width) not in encoders:
            encoder = ImageEncoderViT(
                img_size=height, patch_size=sam.patch_size, embed_dim=sam.hidden_size, depth=sam.num_hidden_layers,
                num_heads=sam.num_attention_heads, mlp_ratio=sam.mlp_ratio, out_chans=sam.out_channels,
                qkv_bias=sam.qkv_bias, norm_layer=partial(nn.LayerNorm, eps=sam.layer_norm_eps),
                use_rel_pos=sam.use_rel_pos, window_size=sam.window_size,
                global_attn_indexes=list(sam.global_attn_indexes),
            )  # fmt: skip
            grid = height // sam.patch_size
            state = dict(sam_state)
            state["pos_embed"] = resize_abs_pos(state["pos_embed"], grid, grid)
            for key, value in sam_state.items():
                target = encoder.state_dict()[key].shape
                if "rel_pos" in key and value.shape != target:
                    state[key] = F.interpolate(value.float().t()[None], size=target[0], mode="linear")[0].t()
            encoder.load_state_dict(state, strict=True)
            encoders[height, width] = encoder.to(device=device, dtype=dtype).eval()
        return encoders[height, width]

    channels = [sam.out_channels, *sam.compressor_channels]
    compressor = nn.Sequential(
        *(nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False) for cin, cout in zip(channels[:-1], channels[1:]))
    )
    compressor.load_state_dict(
        {f"{i}.weight": state_dict[f"sam.net_{i + 2}.weight"] for i in range(len(sam.compressor_channels))}
    )
    clip_config = CLIPVisionConfig(
        hidden_size=clip.hidden_size, intermediate_size=clip.intermediate_size,
        num_hidden_layers=clip.num_hidden_layers, num_attention_heads=clip.num_attention_heads,
        hidden_act=clip.hidden_act, layer_norm_eps=clip.layer_norm_eps, attn_implementation="sdpa",
    )  # fmt: skip
    clip_encoder = CLIPEncoder(clip_config)
    clip_state = {}
    for key, value in state_dict.items():
        if key.startswith("clip.transformer.layers."):
            k = key[len("clip.transformer.") :]
            if ".qkv_proj." in k:
                for name, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                    clip_state[k.replace("qkv_proj", name)] = part
            else:
                clip_state[k] = value
    clip_encoder.load_state_dict(clip_state, strict=True)
    with torch.device("meta"):
        ours = DeepEncoderModel(config)  # only its CLIP embeddings and pre-LayerNorm are used
    ours.load_state_dict(state_dict, assign=True, strict=True)
    embeddings, pre_layrnorm = ours.clip.embeddings, ours.clip.pre_layrnorm
    modules = nn.ModuleList([compressor, clip_encoder, embeddings, pre_layrnorm, _projector(state_dict, config)])
    modules.to(device=device, dtype=dtype).eval()
    projector = modules[4]

    def run(views):
        sam_features = compressor(sam_encoder(*views.shape[-2:])(views))  # (B, 1024, h, w)
        hidden = clip_encoder(inputs_embeds=pre_layrnorm(embeddings(sam_features))).last_hidden_state
        joined = torch.cat([hidden[:, 1:], sam_features.flatten(2).transpose(1, 2)], dim=-1)
        return projector(joined).flatten(0, 1)

    def encode(global_views, tiles):
        parts = [run(global_views)]
        if tiles is not None:
            parts.append(run(tiles))
        return torch.cat(parts)

    def prepare(global_views, tiles) -> None:
        """Build the per-size encoders outside the timed runs."""
        for views in (global_views, tiles):
            if views is not None:
                sam_encoder(*views.shape[-2:])

    encode.prepare = prepare
    return encode


DEEPSEEK_SRC_ENV = "DEEPENCODER_DEEPSEEK_SRC"


def _deepseek(state_dict, config: DeepEncoderConfig, device, dtype) -> Encode:
    """DeepSeek-OCR's own encoder (`build_sam_vit_b`, `build_clip_l` from its `sam_vary_sdpa.py` / `clip_sdpa.py`,
    as in DeepSeek-OCR-vllm's `deepencoder/` folder) + a Linear projector, loaded from the directory in
    `$DEEPENCODER_DEEPSEEK_SRC` (benchmarks/tower.py's `--deepseek-src`; never part of this repository). Its
    parameter names are this tower's with `sam_model.` / `vision_model.` for `sam.` / `clip.`; CLIP's unused conv
    patch embedding keeps its random init."""
    import importlib.util
    import os
    import sys
    from pathlib import Path

    source = Path(os.environ[DEEPSEEK_SRC_ENV]).expanduser()
    folder = next((d for d in (source, source / "deepencoder") if (d / "sam_vary_sdpa.py").exists()), None)
    if folder is None:
        raise FileNotFoundError(f"no sam_vary_sdpa.py / clip_sdpa.py under {source} (or its deepencoder/ folder)")
    modules = {}
    for name in ("sam_vary_sdpa", "clip_sdpa"):  # under their own names: `deepencoder` is this library
        spec = importlib.util.spec_from_file_location(f"deepseek_ocr_{name}", folder / f"{name}.py")
        modules[name] = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = modules[name]
        spec.loader.exec_module(modules[name])
    sam_model = modules["sam_vary_sdpa"].build_sam_vit_b()
    vision_model = modules["clip_sdpa"].build_clip_l()
    sam_model.load_state_dict({k[4:]: v for k, v in state_dict.items() if k.startswith("sam.")}, strict=True)
    missing, unexpected = vision_model.load_state_dict(
        {k[5:]: v for k, v in state_dict.items() if k.startswith("clip.")}, strict=False
    )
    if unexpected or set(missing) - {"embeddings.patch_embedding.weight", "embeddings.position_ids"}:
        raise RuntimeError(f"unmapped weights: missing {missing}, unexpected {unexpected}")
    modules = nn.ModuleList([sam_model, vision_model, _projector(state_dict, config)]).to(device=device, dtype=dtype)
    projector = modules[2].eval()
    sam_model.eval(), vision_model.eval()

    def run(views):
        sam_features = sam_model(views)  # (B, 1024, h, w)
        clip_features = vision_model(views, sam_features)  # (B, 1 + h*w, 1024)
        joined = torch.cat([clip_features[:, 1:], sam_features.flatten(2).permute(0, 2, 1)], dim=-1)
        return projector(joined).flatten(0, 1)

    def encode(global_views, tiles):
        return torch.cat([run(global_views)] + ([run(tiles)] if tiles is not None else []))

    return encode


# name -> (builder, description); the first entry is this library's default path
PATHS: dict[str, tuple[Callable[..., Encode], str]] = {
    "ours": (_ours, "deepencoder, default config (SDPA)"),
    "ours-folded": (partial(_ours, rel_pos="folded"), "deepencoder, SDPA, rel-pos folded into q/k"),
    "ours-mask": (partial(_ours, rel_pos="mask"), "deepencoder, SDPA, rel-pos as blocked additive mask"),
    "ours-flex": (partial(_ours, rel_pos="flex"), "deepencoder, SDPA, rel-pos inside FlexAttention (score_mod)"),
    "ours-eager": (partial(_ours, attn="eager"), "deepencoder, eager attention (plain reference path)"),
    "ours-compile": (partial(_ours, compile=True), "deepencoder, default config + model.compile() (device's mode)"),
    "ours-compile-ro": (
        partial(_ours, compile="reduce-overhead"),
        "deepencoder, default config + model.compile('reduce-overhead')",
    ),
    "deepseek": (_deepseek, "DeepSeek-OCR's own sam_vary_sdpa + clip_sdpa (--deepseek-src) + Linear projector"),
    "transformers": (_transformers, "transformers UnlimitedOcrVisionModel (SDPA) + Linear projector"),
    "sam+clip": (_segment_anything_clip, "segment-anything ImageEncoderViT + convs -> transformers CLIPEncoder"),
}
