"""SAM stage: segment-anything's `ImageEncoderViT` (windowed ViT with decomposed relative position bias), its neck,
and DeepEncoder's stride-2 compressor (`net_2`, `net_3`).

Parameter names follow segment-anything (`patch_embed.proj`, `blocks.i.attn.qkv`, `neck.0` ...) so the SAM and
DeepSeek-OCR checkpoints map onto this module by prefix only. Nothing here assumes a square grid: a page of
H x W pixels gives an (H/16) x (W/16) grid, every interpolation is per axis.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer

from .attention import attention, rel_pos_attention
from .configuration_deepencoder import DeepEncoderSamConfig
from .modeling_utils import cached_positions


def resize_abs_pos(pos_embed: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Resize SAM's absolute position embedding to a (height, width) grid.

    pos_embed: (1, Hp, Wp, C) -> (1, height, width, C). Bicubic, antialias, align_corners=False, computed in fp32
    and cast back (the released model's semantics); returned unchanged when the grid already matches.
    """
    if pos_embed.shape[1] == height and pos_embed.shape[2] == width:
        return pos_embed
    resized = F.interpolate(
        pos_embed.permute(0, 3, 1, 2).float(),  # (1, C, Hp, Wp)
        size=(height, width),
        mode="bicubic",
        antialias=True,
        align_corners=False,
    )
    return resized.to(pos_embed.dtype).permute(0, 2, 3, 1)


def get_rel_pos(size: int, rel_pos: torch.Tensor) -> torch.Tensor:
    """Relative position table gathered for a query/key axis of `size` positions.

    rel_pos: (L, head_dim), L = 2 * trained_size - 1. Linearly resized (fp32) to 2 * size - 1 rows when it differs.
    Returns (size_q, size_k, head_dim) with entry [i, j] = table[i - j + size - 1].
    """
    length = 2 * size - 1
    if rel_pos.shape[0] != length:
        resized = F.interpolate(rel_pos.float().t()[None], size=length, mode="linear")  # (1, hd, length)
        rel_pos = resized[0].t().to(rel_pos.dtype)
    coords = torch.arange(size, device=rel_pos.device)
    relative = coords[:, None] - coords[None, :] + (size - 1)
    return rel_pos[relative]


def decomposed_rel_pos(
    query: torch.Tensor, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor, height: int, width: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-query relative position terms of MViTv2 / SAM, from the unscaled query.

    query: (B, heads, H*W, hd). Returns rel_h: (B, heads, H*W, H) and rel_w: (B, heads, H*W, W); the bias of
    query (qh, qw) on key (kh, kw) is rel_h[..., kh] + rel_w[..., kw].
    """
    return rel_pos_terms(query, get_rel_pos(height, rel_pos_h), get_rel_pos(width, rel_pos_w))


def rel_pos_terms(query: torch.Tensor, r_h: torch.Tensor, r_w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`decomposed_rel_pos` from the gathered tables r_h: (H, H, hd), r_w: (W, W, hd) (`get_rel_pos`)."""
    batch, heads, _, head_dim = query.shape
    height, width = r_h.shape[0], r_w.shape[0]
    q = query.reshape(batch, heads, height, width, head_dim)
    rel_h = torch.einsum("bnhwc,hkc->bnhwk", q, r_h).reshape(batch, heads, height * width, height)
    rel_w = torch.einsum("bnhwc,wkc->bnhwk", q, r_w).reshape(batch, heads, height * width, width)
    return rel_h, rel_w


class SamAttention(nn.Module):
    """Multi-head self-attention with decomposed relative position bias. x: (B, H, W, C) -> (B, H, W, C)."""

    def __init__(self, config: DeepEncoderSamConfig, input_size: int) -> None:
        super().__init__()
        self.config = config
        self.num_heads = config.num_attention_heads
        head_dim = config.hidden_size // config.num_attention_heads
        self.scale = head_dim**-0.5
        self.qkv = nn.Linear(config.hidden_size, config.hidden_size * 3, bias=config.qkv_bias)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.use_rel_pos = config.use_rel_pos
        if self.use_rel_pos:
            self.rel_pos_h = nn.Parameter(torch.zeros(2 * input_size - 1, head_dim))
            self.rel_pos_w = nn.Parameter(torch.zeros(2 * input_size - 1, head_dim))
        # rel-pos attention kernel pinned at run time (`DeepEncoderModel.set_attention_kernel`); None: the device's
        # default (`deepencoder.attention.DEFAULT_REL_POS_KERNELS`). Not architecture: never saved in the config.
        self.kernel: str | None = None

    def forward(self, hidden_states: torch.Tensor, window_size: int = 0) -> torch.Tensor:
        """(B, H, W, C) -> (B, H, W, C): attention over the whole grid, or within window_size x window_size
        windows (window_size > 0; the grid padded up to whole windows as segment-anything pads it).

        qkv and proj are per token, so they run on the H x W grid only: segment-anything pads the normed input
        with zeros before windowing, and a zero token projects to what `qkv` gives for zeros (its bias), so the
        padded keys and values are filled with that instead (same result, ~20% fewer qkv/proj FLOPs at 64 x 64
        with 14 x 14 windows).
        """
        projections = self.project(hidden_states)
        if window_size <= 0:
            return self.proj(self.attend(*projections))
        height, width = hidden_states.shape[1], hidden_states.shape[2]
        if height % window_size or width % window_size:
            fills = self._zero_token_projections(hidden_states)
            projections = [pad_grid(p, window_size, fill) for p, fill in zip(projections, fills)]
        windows = [window_partition(p, window_size)[0] for p in projections]
        padded = (projections[0].shape[1], projections[0].shape[2])
        return self.proj(window_unpartition(self.attend(*windows), window_size, padded, (height, width)))

    def project(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, H, W, C) -> query, key, value, each (B, H, W, C)."""
        return self.qkv(hidden_states).chunk(3, dim=-1)

    def _zero_token_projections(self, like: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        """What `qkv` gives a zero (padding) token, as (q, k, v) fills: a plain Linear's bias (None: zeros)."""
        if type(self.qkv) is nn.Linear:
            return self.qkv.bias.chunk(3) if self.qkv.bias is not None else (None,) * 3
        return self.qkv(like.new_zeros(like.shape[-1])).chunk(3)

    def rel_pos_tables(self, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`get_rel_pos` of both axes for a height x width grid: (H, H, hd), (W, W, hd), cached per size."""
        tables = (self.rel_pos_h, self.rel_pos_w)
        return cached_positions(
            self,
            ("rel_pos", height, width),
            tables,
            lambda: (get_rel_pos(height, tables[0]), get_rel_pos(width, tables[1])),
        )

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """The attention between the two projections: query/key/value (B, H, W, C) -> (B, H, W, C), before `proj`."""
        batch, height, width, _ = query.shape
        query, key, value = (
            x.reshape(batch, height * width, self.num_heads, -1).transpose(1, 2) for x in (query, key, value)
        )  # each (B, heads, N, hd)

        implementation = getattr(self.config, "_attn_implementation", None)
        if self.use_rel_pos:
            rel_h, rel_w = rel_pos_terms(query, *self.rel_pos_tables(height, width))
            out = rel_pos_attention(
                query, key, value, rel_h, rel_w, scale=self.scale, implementation=implementation, kernel=self.kernel
            )
        else:
            out = attention(query, key, value, scale=self.scale, implementation=implementation)
        return out.transpose(1, 2).reshape(batch, height, width, -1)  # (B, H, W, C)


def pad_grid(x: torch.Tensor, multiple: int, fill: torch.Tensor | None = None) -> torch.Tensor:
    """(B, H, W, C) -> (B, Hp, Wp, C): H and W padded up to multiples of `multiple` with `fill` (C,) or zeros."""
    _, height, width, _ = x.shape
    pad_h, pad_w = (multiple - height % multiple) % multiple, (multiple - width % multiple) % multiple
    if not (pad_h or pad_w):
        return x
    if fill is None:
        return F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    padded = x.new_empty(x.shape[0], height + pad_h, width + pad_w, x.shape[3])  # every entry written once
    padded[:, :height, :width] = x
    padded[:, height:] = fill
    padded[:, :height, width:] = fill
    return padded


def window_partition(x: torch.Tensor, window: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """(B, H, W, C) -> (B * nWindows, window, window, C), zero-padding H and W up to multiples of `window`."""
    x = pad_grid(x, window)
    batch, hp, wp, channels = x.shape
    x = x.view(batch, hp // window, window, wp // window, window, channels)
    windows = x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window, window, channels)
    return windows, (hp, wp)


def window_unpartition(
    windows: torch.Tensor, window: int, padded: tuple[int, int], size: tuple[int, int]
) -> torch.Tensor:
    """(B * nWindows, window, window, C) -> (B, H, W, C), dropping the padding."""
    hp, wp = padded
    height, width = size
    batch = windows.shape[0] // ((hp // window) * (wp // window))
    x = windows.view(batch, hp // window, wp // window, window, window, -1)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(batch, hp, wp, -1)
    if hp > height or wp > width:
        x = x[:, :height, :width, :].contiguous()
    return x


class SamMLP(nn.Module):
    def __init__(self, config: DeepEncoderSamConfig) -> None:
        super().__init__()
        self.lin1 = nn.Linear(config.hidden_size, config.mlp_dim)
        self.lin2 = nn.Linear(config.mlp_dim, config.hidden_size)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., C) -> (..., C)."""
        return self.lin2(self.act(self.lin1(x)))


class SamBlock(GradientCheckpointingLayer):
    """Pre-LN ViT block; attention in windows (window_size > 0) or over the whole grid (window_size == 0)."""

    def __init__(self, config: DeepEncoderSamConfig, window_size: int) -> None:
        super().__init__()
        self.window_size = window_size
        self.norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attn = SamAttention(config, window_size if window_size > 0 else config.grid_size)
        self.norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = SamMLP(config)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """hidden_states: (B, H, W, C) -> (B, H, W, C)."""
        hidden_states = hidden_states + self.attn(self.norm1(hidden_states), self.window_size)
        return hidden_states + self.mlp(self.norm2(hidden_states))


class LayerNorm2d(nn.Module):
    """LayerNorm over the channel axis of (B, C, H, W)."""

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class PatchEmbed(nn.Module):
    """Conv patch embedding: (B, 3, H, W) -> (B, H/16, W/16, C)."""

    def __init__(self, config: DeepEncoderSamConfig) -> None:
        super().__init__()
        self.proj = nn.Conv2d(
            config.num_channels, config.hidden_size, kernel_size=config.patch_size, stride=config.patch_size
        )

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # channels-last in memory too: the residual stream of every block then reads and writes (B, H, W, C)
        # rows, instead of transposing on each residual sum and LayerNorm (~3% of a Base page on CPU)
        return self.proj(pixel_values).permute(0, 2, 3, 1).contiguous()


class DeepEncoderSamModel(nn.Module):
    """SAM ViT + neck + compressor.

    `forward(pixel_values)`: (B, 3, H, W) -> (B, 1024, H/64, W/64), the tokens DeepEncoder passes to CLIP.
    `neck_features(pixel_values)`: (B, 3, H, W) -> (B, 256, H/16, W/16), segment-anything's image embedding.
    """

    def __init__(self, config: DeepEncoderSamConfig) -> None:
        super().__init__()
        self.config = config
        self.patch_embed = PatchEmbed(config)
        self.pos_embed: nn.Parameter | None = None
        if config.use_abs_pos:
            grid = config.grid_size
            self.pos_embed = nn.Parameter(torch.zeros(1, grid, grid, config.hidden_size))
        global_blocks = set(config.global_attn_indexes)
        self.blocks = nn.ModuleList(
            SamBlock(config, 0 if i in global_blocks else config.window_size) for i in range(config.num_hidden_layers)
        )
        out = config.out_channels
        self.neck = nn.Sequential(
            nn.Conv2d(config.hidden_size, out, kernel_size=1, bias=False),
            LayerNorm2d(out, eps=config.layer_norm_eps),
            nn.Conv2d(out, out, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(out, eps=config.layer_norm_eps),
        )
        channels = [out, *config.compressor_channels]
        for index, (cin, cout) in enumerate(zip(channels[:-1], channels[1:]), start=2):
            self.add_module(f"net_{index}", nn.Conv2d(cin, cout, kernel_size=3, stride=2, padding=1, bias=False))
        self.num_compressor_convs = len(config.compressor_channels)

    def _check_input(self, pixel_values: torch.Tensor) -> None:
        if pixel_values.ndim != 4 or pixel_values.shape[1] != self.config.num_channels:
            raise ValueError(
                f"pixel_values must be (B, {self.config.num_channels}, H, W), got {tuple(pixel_values.shape)}"
            )
        step = self.config.downsample
        if pixel_values.shape[-2] % step or pixel_values.shape[-1] % step:
            raise ValueError(
                f"pixel_values height and width must be multiples of {step}, got {tuple(pixel_values.shape[-2:])}"
            )

    def position_embedding(self, height: int, width: int) -> torch.Tensor:
        """The absolute position embedding resized to a height x width grid (`resize_abs_pos`), cached per size."""
        pos_embed = self.pos_embed
        return cached_positions(
            self, ("pos_embed", height, width), (pos_embed,), lambda: resize_abs_pos(pos_embed, height, width)
        )

    def trunk(self, pixel_values: torch.Tensor, output_hidden_states: bool = False):
        """(B, 3, H, W) -> ViT output (B, H/16, W/16, C) [, tuple of per-block outputs]."""
        self._check_input(pixel_values)
        x = self.patch_embed(pixel_values)
        if self.pos_embed is not None:
            x = x + self.position_embedding(x.shape[1], x.shape[2])
        hidden_states = (x,) if output_hidden_states else None
        for block in self.blocks:
            x = block(x)
            if hidden_states is not None:
                hidden_states = hidden_states + (x,)
        return x, hidden_states

    def compress(self, neck: torch.Tensor) -> torch.Tensor:
        """(B, 256, h, w) -> (B, 1024, h/4, w/4)."""
        for index in range(2, 2 + self.num_compressor_convs):
            neck = getattr(self, f"net_{index}")(neck)
        return neck

    def neck_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, 256, H/16, W/16)."""
        x, _ = self.trunk(pixel_values)
        return self.neck(x.permute(0, 3, 1, 2))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, 1024, H/64, W/64)."""
        return self.compress(self.neck_features(pixel_values))
