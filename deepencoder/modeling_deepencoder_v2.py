"""DeepEncoderV2Model, DeepSeek-OCR-2's vision tower: SAM stage -> Qwen2 stack as an encoder over
`[image tokens ; learned queries]` -> projector -> per-page layout.

The encoder is a Qwen2 decoder stack with no token embedding. A view's n SAM tokens (row-major) are followed by n
learned queries (the table of n queries: 144 for a 768 px tile, 256 for a 1024 px view); RoPE positions run
0..2n-1 over the joined sequence; image tokens attend to all image tokens and to no query, query i attends to all
image tokens and to queries 0..i. After the final RMSNorm only the n query outputs are kept, projected to the
language model's width. A page is [every tile's queries, tile by tile, row-major] + [global queries] +
[view_separator]; no newline tokens.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.utils import ModelOutput

from .attention import mixed_attention, mixed_attention_mask
from .configuration_deepencoder_v2 import DeepEncoderV2Config, DeepEncoderV2EncoderConfig
from .freezing import FreezeTargets, FreezingMixin
from .layout import group_views_by_size, layout_query_page, tile_counts
from .modeling_sam import DeepEncoderSamModel, SamAttention
from .modeling_utils import CompileMixin, TowerLoadingMixin, cached_positions, checkpoint_loader


@dataclass
class DeepEncoderV2ViewsOutput(ModelOutput):
    """Output of `DeepEncoderV2Model.encode_views` for a batch of same-size views.

    image_embeds: (B, n, projector_dim), projected query outputs. pre_projector: (B, n, hidden), the encoder's query
    outputs after its final norm. sam_hidden_states / encoder_hidden_states: per-block outputs, when requested
    (encoder: its input and each layer's output over the joined (B, 2n, hidden) sequence).
    """

    image_embeds: torch.Tensor | None = None
    pre_projector: torch.Tensor | None = None
    sam_hidden_states: tuple[torch.Tensor, ...] | None = None
    encoder_hidden_states: tuple[torch.Tensor, ...] | None = None


@dataclass
class DeepEncoderV2Output(ModelOutput):
    """Output of `DeepEncoderV2Model.forward`.

    image_embeds: list with one (num_tokens_i, projector_dim) tensor per page, laid out as DeepSeek-OCR-2 does
        ([tile queries, tile by tile] + [global queries] + view_separator).
    global_embeds: (B, n, D) projected global-view queries (tensor when all pages share the view size, else list).
    tile_embeds: (T, n_t, D) projected tile queries of all pages, or None.
    pre_projector: per page, the encoder's query outputs (tiles then global view, (tokens - 1, hidden)), when
        `output_pre_projector=True`.
    sam_hidden_states / encoder_hidden_states: with `output_hidden_states=True`, the global views' per-block states
        (tensors when all pages share the view size, else per block a list with one (1, ...) tensor per page);
        tile_sam_hidden_states / tile_encoder_hidden_states: the same for all tiles, or None.
    """

    image_embeds: list[torch.Tensor] | None = None
    global_embeds: torch.Tensor | list[torch.Tensor] | None = None
    tile_embeds: torch.Tensor | None = None
    pre_projector: list[torch.Tensor] | None = None
    sam_hidden_states: tuple | None = None
    encoder_hidden_states: tuple | None = None
    tile_sam_hidden_states: tuple[torch.Tensor, ...] | None = None
    tile_encoder_hidden_states: tuple[torch.Tensor, ...] | None = None


# ---------------------------------------------------------------------------------------------------- encoder
class DeepEncoderV2RMSNorm(nn.Module):
    """RMSNorm computed in fp32: weight * x / sqrt(mean(x**2) + eps). x: (..., C) -> (..., C)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        dtype = hidden_states.dtype
        x = hidden_states.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_cos_sin(length: int, head_dim: int, theta: float, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE tables for positions 0..length-1: cos, sin (length, head_dim), computed in fp32, cast to like.dtype."""
    exponents = torch.arange(0, head_dim, 2, device=like.device, dtype=torch.int64).float() / head_dim
    inv_freq = 1.0 / (theta**exponents)  # (head_dim / 2,)
    positions = torch.arange(length, device=like.device, dtype=torch.float32)
    freqs = positions[:, None] * inv_freq[None, :]  # (length, head_dim / 2)
    angles = torch.cat([freqs, freqs], dim=-1)  # (length, head_dim)
    return angles.cos().to(like.dtype), angles.sin().to(like.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, heads, L, hd); cos, sin: (L, hd)."""
    return x * cos + rotate_half(x) * sin


class DeepEncoderV2Attention(nn.Module):
    """Grouped-query self-attention with RoPE over `[image tokens ; queries]` under the mixed mask.
    hidden_states: (B, 2n, C) -> (B, 2n, C)."""

    def __init__(self, config: DeepEncoderV2EncoderConfig) -> None:
        super().__init__()
        self.config = config
        self.num_heads = config.num_attention_heads
        self.num_key_value_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scale = self.head_dim**-0.5
        hidden, kv = config.hidden_size, config.num_key_value_heads * config.head_dim
        self.q_proj = nn.Linear(hidden, self.num_heads * self.head_dim, bias=config.attention_bias)
        self.k_proj = nn.Linear(hidden, kv, bias=config.attention_bias)
        self.v_proj = nn.Linear(hidden, kv, bias=config.attention_bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=False)

    def forward(
        self,
        hidden_states: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor,
        num_image_tokens: int,
    ) -> torch.Tensor:
        """cos, sin: (2n, hd) RoPE tables; mask: (2n, 2n) bool, True where a row may attend (`mixed_attention_mask`);
        num_image_tokens: n, a Python int."""
        batch, length, _ = hidden_states.shape
        query = self.q_proj(hidden_states).view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)
        key = self.k_proj(hidden_states).view(batch, length, self.num_key_value_heads, self.head_dim).transpose(1, 2)
        value = self.v_proj(hidden_states).view(batch, length, self.num_key_value_heads, self.head_dim).transpose(1, 2)
        query, key = apply_rope(query, cos, sin), apply_rope(key, cos, sin)  # (B, heads | kv_heads, 2n, hd)
        implementation = getattr(self.config, "_attn_implementation", None) or "sdpa"
        out = mixed_attention(
            query, key, value, mask, num_image_tokens, scale=self.scale, implementation=implementation
        )  # (B, heads, 2n, hd)
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, -1))


class DeepEncoderV2MLP(nn.Module):
    """SiLU-gated MLP: down(act(gate(x)) * up(x)). x: (..., C) -> (..., C)."""

    def __init__(self, config: DeepEncoderV2EncoderConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class DeepEncoderV2Layer(GradientCheckpointingLayer):
    """Pre-norm Qwen2 decoder layer: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: DeepEncoderV2EncoderConfig) -> None:
        super().__init__()
        self.input_layernorm = DeepEncoderV2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.self_attn = DeepEncoderV2Attention(config)
        self.post_attention_layernorm = DeepEncoderV2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = DeepEncoderV2MLP(config)

    def forward(
        self,
        hidden_states: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor,
        num_image_tokens: int,
    ) -> torch.Tensor:
        """hidden_states: (B, 2n, C) -> (B, 2n, C)."""
        hidden_states = hidden_states + self.self_attn(
            self.input_layernorm(hidden_states), cos, sin, mask, num_image_tokens
        )
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class DeepEncoderV2Encoder(nn.Module):
    """The Qwen2 stack as an encoder with learned queries.

    `forward(image_tokens)`: SAM tokens (B, n, C) row-major, or SAM features (B, C, h, w) -> the n query outputs
    after the final norm (B, n, C).
    """

    def __init__(self, config: DeepEncoderV2EncoderConfig) -> None:
        super().__init__()
        self.config = config
        self.queries = nn.ParameterDict(
            {str(n): nn.Parameter(torch.zeros(n, config.hidden_size)) for n in config.query_counts}
        )
        self.layers = nn.ModuleList(DeepEncoderV2Layer(config) for _ in range(config.num_hidden_layers))
        self.norm = DeepEncoderV2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def query_table(self, num_tokens: int) -> torch.Tensor:
        """The learned queries read by a view of `num_tokens` SAM tokens: (num_tokens, C)."""
        key = str(num_tokens)
        if key not in self.queries:
            raise ValueError(
                f"no learned query table for a view of {num_tokens} tokens; tables: {self.config.query_counts} "
                "(a 1024 px view gives 256 tokens, a 768 px tile 144)"
            )
        return self.queries[key]

    def forward(
        self, image_tokens: torch.Tensor, output_hidden_states: bool = False
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        """image_tokens: (B, n, C) or (B, C, h, w) -> query outputs (B, n, C) [, (input, each layer's output),
        each (B, 2n, C)]."""
        if image_tokens.ndim == 4:
            image_tokens = image_tokens.flatten(2).transpose(1, 2)  # (B, h*w, C)
        batch, n, channels = image_tokens.shape
        queries = self.query_table(n).to(image_tokens.dtype).expand(batch, n, channels)
        hidden_states = torch.cat([image_tokens, queries], dim=1)  # (B, 2n, C)
        head_dim, theta = self.config.head_dim, self.config.rope_theta
        cos, sin = cached_positions(
            self, ("rope", 2 * n, head_dim, theta, hidden_states.dtype, hidden_states.device), (),
            lambda: rope_cos_sin(2 * n, head_dim, theta, hidden_states),
        )  # fmt: skip
        mask = mixed_attention_mask(n, hidden_states.device)  # built once, shared by every layer
        states = (hidden_states,) if output_hidden_states else None
        for layer in self.layers:
            hidden_states = layer(hidden_states, cos, sin, mask, n)
            if states is not None:
                states = states + (hidden_states,)
        return self.norm(hidden_states[:, n:]), states


# ---------------------------------------------------------------------------------------------------- tower
FREEZE_TARGETS = FreezeTargets(
    roots=("sam.", "encoder.", "projector.", "view_separator"),
    ranges={
        "sam": "sam.blocks.",
        "sam.blocks": "sam.blocks.",
        "encoder": "encoder.layers.",
        "encoder.layers": "encoder.layers.",
    },
    aliases={
        "sam.compressor": ("sam.net_",),
        "queries": ("encoder.queries.",),
        "encoder.queries": ("encoder.queries.",),
        "projector": ("projector.", "view_separator"),
        "layout": ("view_separator",),
    },
    summary={
        "sam.patch_embed+pos_embed": ("sam.patch_embed.", "sam.pos_embed"),
        "sam.blocks": ("sam.blocks.",),
        "sam.neck": ("sam.neck.",),
        "sam.compressor": ("sam.net_",),
        "encoder.queries": ("encoder.queries.",),
        "encoder.layers": ("encoder.layers.",),
        "encoder.norm": ("encoder.norm.",),
        "projector+layout": ("projector.", "view_separator"),
    },
)


class DeepEncoderV2PreTrainedModel(FreezingMixin, PreTrainedModel):
    config_class = DeepEncoderV2Config
    config: DeepEncoderV2Config
    base_model_prefix = "deepencoder_v2"
    main_input_name = "pixel_values"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _no_split_modules = ["SamBlock", "DeepEncoderV2Layer"]
    _freeze_targets = FREEZE_TARGETS

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, SamAttention) and module.use_rel_pos:
            init.normal_(module.rel_pos_h, std=std)
            init.normal_(module.rel_pos_w, std=std)
        elif isinstance(module, DeepEncoderSamModel) and module.pos_embed is not None:
            init.normal_(module.pos_embed, std=std)
        elif isinstance(module, DeepEncoderV2Encoder):
            for table in module.queries.values():
                init.normal_(table, std=std)
        elif isinstance(module, DeepEncoderV2Model):
            init.normal_(module.view_separator, std=1 / math.sqrt(self.config.projector_dim))


class DeepEncoderV2Model(CompileMixin, TowerLoadingMixin, DeepEncoderV2PreTrainedModel):
    """The DeepSeek-OCR-2 vision tower.

    `forward(pixel_values, pixel_values_tiles=None, tile_grids=None)` takes the processor's output (mode `ocr2` or
    `ocr2-base`) and returns one token sequence per page. Stages on their own: `model.sam(pixel_values)`
    (B, 896, H/64, W/64), `model.encoder(sam_features)` (B, n, 896) query outputs, `model.projector`.
    """

    _auto_class = "AutoModel"  # save_pretrained writes auto_map and the model files (trust_remote_code loading)

    def __init__(self, config: DeepEncoderV2Config) -> None:
        super().__init__(config)
        self.sam = DeepEncoderSamModel(config.sam_config)
        self.encoder = DeepEncoderV2Encoder(config.encoder_config)
        self.projector = nn.Linear(config.encoder_config.hidden_size, config.projector_dim, bias=config.projector_bias)
        self.view_separator = nn.Parameter(torch.zeros(config.projector_dim))
        self.post_init()

    # ------------------------------------------------------------------ loading
    # (`from_pretrained`, which also converts other checkpoints of the tower, and `from_transformers`: from
    # `TowerLoadingMixin`, deepencoder/modeling_utils.py)
    @classmethod
    def from_deepseek_ocr2(
        cls,
        path_or_repo_id: str,
        *,
        revision: str | None = None,
        dtype: torch.dtype | None = None,
        cache_dir: str | None = None,
        local_files_only: bool = False,
        token: str | bool | None = None,
        subfolder: str = "",
        force_download: bool = False,
        **kwargs,
    ) -> DeepEncoderV2Model:
        """Build the tower from a DeepSeek-OCR-2 checkpoint (local directory of *.safetensors, or a hub id), reading
        only the vision tensors (`model.sam_model.*`, `model.qwen2_model.*`, `model.projector.*`,
        `model.view_seperator`). `revision`, `cache_dir`, `local_files_only`, `token`, `subfolder` and
        `force_download` mean what they mean to `from_pretrained`; the byte ranges read from the hub are kept in its
        cache. Extra keyword arguments go to `DeepEncoderV2Config`. Needs the `deepencoder` package imported (its
        conversion layer)."""
        hub = dict(revision=revision, cache_dir=cache_dir, local_files_only=local_files_only, token=token)
        hub.update(subfolder=subfolder, force_download=force_download)
        return checkpoint_loader("deepseek-ocr2")(cls, path_or_repo_id, dtype=dtype, config_kwargs=kwargs, **hub)

    # ------------------------------------------------------------------ compute
    def encode_views(
        self,
        pixel_values: torch.Tensor,
        output_hidden_states: bool = False,
        output_pre_projector: bool = False,
    ) -> DeepEncoderV2ViewsOutput:
        """Same-size views (B, 3, S, S) -> projected query outputs (B, (S/64)**2, projector_dim)."""
        neck_in, sam_states = self.sam.trunk(pixel_values, output_hidden_states=output_hidden_states)
        sam_features = self.sam.compress(self.sam.neck(neck_in.permute(0, 3, 1, 2)))  # (B, 896, h, w)
        queries, encoder_states = self.encoder(sam_features, output_hidden_states=output_hidden_states)
        return DeepEncoderV2ViewsOutput(
            image_embeds=self.projector(queries),
            pre_projector=queries if output_pre_projector else None,
            sam_hidden_states=sam_states,
            encoder_hidden_states=encoder_states,
        )

    def _encode_globals(
        self,
        pixel_values: torch.Tensor | Sequence[torch.Tensor],
        output_pre_projector: bool,
        output_hidden_states: bool,
    ) -> tuple[list[torch.Tensor], list[torch.Tensor | None], tuple | None, tuple | None, bool]:
        """Global views, one batched pass per distinct size. Returns per page the projected queries and the
        pre-projector queries (or None), the SAM and encoder hidden states (see `DeepEncoderV2Output`), and
        whether all views shared one size."""
        groups = group_views_by_size(pixel_values)
        count = sum(len(indices) for indices, _ in groups)
        embeds: list = [None] * count
        pre: list = [None] * count
        states: dict[str, list] = {"sam": [None] * count, "encoder": [None] * count}
        for indices, views in groups:
            out = self.encode_views(
                views, output_pre_projector=output_pre_projector, output_hidden_states=output_hidden_states
            )
            for position, i in enumerate(indices):
                embeds[i] = out.image_embeds[position]
                pre[i] = out.pre_projector[position] if output_pre_projector else None
                if output_hidden_states:
                    states["sam"][i] = [h[position : position + 1] for h in out.sam_hidden_states]
                    states["encoder"][i] = [h[position : position + 1] for h in out.encoder_hidden_states]
        one_size = len(groups) == 1
        if not output_hidden_states:
            return embeds, pre, None, None, one_size
        if one_size:
            return embeds, pre, out.sam_hidden_states, out.encoder_hidden_states, one_size
        per_block = {k: tuple(list(layer) for layer in zip(*pages)) for k, pages in states.items()}
        return embeds, pre, per_block["sam"], per_block["encoder"], one_size

    def forward(
        self,
        pixel_values: torch.Tensor | Sequence[torch.Tensor],
        pixel_values_tiles: torch.Tensor | None = None,
        tile_grids: Sequence[Sequence[int]] | None = None,
        output_pre_projector: bool = False,
        return_dict: bool = True,
        output_hidden_states: bool = False,
        **kwargs,
    ) -> DeepEncoderV2Output | tuple:
        """pixel_values: (B, 3, S, S) global views (or a list of (3, S_i, S_i)); pixel_values_tiles: (T, 3, t, t) all
        tiles of the batch in page order; tile_grids: per page (cols, rows) as Python ints ((1, 1) for an untiled
        page). Returns `DeepEncoderV2Output`."""
        kwargs.pop("num_image_tokens", None)
        if kwargs:
            raise TypeError(f"unexpected arguments: {sorted(kwargs)}")
        grids, counts = tile_counts(pixel_values, tile_grids, pixel_values_tiles)
        batch = len(grids)
        total_tiles = sum(counts)

        global_embeds, global_pre, sam_states, encoder_states, one_size = self._encode_globals(
            pixel_values, output_pre_projector, output_hidden_states
        )
        tiles_out = None
        tile_embeds: list = [None] * batch
        tile_pre: list = [None] * batch
        if total_tiles:
            tiles_out = self.encode_views(
                pixel_values_tiles, output_pre_projector=output_pre_projector, output_hidden_states=output_hidden_states
            )
            tile_embeds = list(tiles_out.image_embeds.split(counts))
            if output_pre_projector:
                tile_pre = list(tiles_out.pre_projector.split(counts))

        pages = [layout_query_page(global_embeds[i], self.view_separator, tile_embeds[i]) for i in range(batch)]
        pre = None
        if output_pre_projector:
            pre = [
                torch.cat([tile_pre[i].flatten(0, 1), global_pre[i]]) if counts[i] else global_pre[i]
                for i in range(batch)
            ]
        output = DeepEncoderV2Output(
            image_embeds=pages,
            global_embeds=torch.stack(global_embeds) if one_size else global_embeds,
            tile_embeds=tiles_out.image_embeds if tiles_out is not None else None,
            pre_projector=pre,
            sam_hidden_states=sam_states,
            encoder_hidden_states=encoder_states,
            tile_sam_hidden_states=tiles_out.sam_hidden_states if tiles_out is not None else None,
            tile_encoder_hidden_states=tiles_out.encoder_hidden_states if tiles_out is not None else None,
        )
        return output if return_dict else output.to_tuple()


__all__ = [
    "DeepEncoderV2Encoder",
    "DeepEncoderV2Model",
    "DeepEncoderV2Output",
    "DeepEncoderV2PreTrainedModel",
    "DeepEncoderV2ViewsOutput",
]
