"""CLIP stage: the CLIP-L/14 transformer trunk of DeepEncoder, fed by the SAM tokens.

The SAM output (B, 1024, h, w) is flattened row-major and used as the patch embedding; a CLS embedding is
prepended and CLIP's 16 x 16 position table (+ CLS row) is resized per axis to (h, w) when needed. Then
`pre_layrnorm` and 24 pre-LN layers with fused qkv and quick-GELU. There is no post-LayerNorm.
Parameter names follow DeepSeek-OCR's `vision_model` (`transformer.layers.i.self_attn.qkv_proj` ...).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer

from .attention import attention
from .configuration_deepencoder import DeepEncoderClipConfig
from .modeling_utils import cached_positions


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": F.gelu}


def resize_clip_pos(position_embedding: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """CLIP position table (1 + g*g, C) -> (1 + height*width, C); the CLS row is kept, the grid part resized
    bicubic with antialias in fp32 (returned unchanged when the grid already matches)."""
    num_patches = position_embedding.shape[0] - 1
    grid = round(num_patches**0.5)
    if grid == height and grid == width:
        return position_embedding
    cls_pos, patch_pos = position_embedding[:1], position_embedding[1:]
    dim = position_embedding.shape[-1]
    patch_pos = patch_pos.reshape(1, grid, grid, dim).permute(0, 3, 1, 2).float()
    patch_pos = F.interpolate(patch_pos, size=(height, width), mode="bicubic", antialias=True, align_corners=False)
    patch_pos = patch_pos.to(position_embedding.dtype).permute(0, 2, 3, 1).reshape(height * width, dim)
    return torch.cat([cls_pos, patch_pos], dim=0)


class ClipEmbeddings(nn.Module):
    """(B, C, h, w) SAM features -> (B, 1 + h*w, C) token embeddings with CLS and positions."""

    def __init__(self, config: DeepEncoderClipConfig) -> None:
        super().__init__()
        self.class_embedding = nn.Parameter(torch.zeros(config.hidden_size))
        self.position_embedding = nn.Embedding(config.num_positions, config.hidden_size)

    def forward(self, patch_embeds: torch.Tensor) -> torch.Tensor:
        batch, _, height, width = patch_embeds.shape
        tokens = patch_embeds.flatten(2).transpose(1, 2)  # (B, h*w, C)
        cls = self.class_embedding.to(tokens.dtype).expand(batch, 1, -1)
        embeddings = torch.cat([cls, tokens], dim=1)
        table = self.position_embedding.weight
        positions = cached_positions(self, (height, width), (table,), lambda: resize_clip_pos(table, height, width))
        return embeddings + positions


class ClipAttention(nn.Module):
    """Fused-qkv multi-head self-attention. x: (B, N, C) -> (B, N, C)."""

    def __init__(self, config: DeepEncoderClipConfig) -> None:
        super().__init__()
        self.config = config
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.scale = self.head_dim**-0.5
        self.qkv_proj = nn.Linear(config.hidden_size, config.hidden_size * 3)
        self.out_proj = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch, n, _ = hidden_states.shape
        qkv = self.qkv_proj(hidden_states).reshape(batch, n, 3, self.num_heads, self.head_dim)
        query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, N, hd)
        implementation = getattr(self.config, "_attn_implementation", None)
        out = attention(query, key, value, scale=self.scale, implementation=implementation)
        return self.out_proj(out.transpose(1, 2).reshape(batch, n, -1))


class ClipMLP(nn.Module):
    def __init__(self, config: DeepEncoderClipConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.act = ACTIVATIONS[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class ClipLayer(GradientCheckpointingLayer):
    """Pre-LN transformer layer. (B, N, C) -> (B, N, C)."""

    def __init__(self, config: DeepEncoderClipConfig) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = ClipAttention(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = ClipMLP(config)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = hidden_states + self.self_attn(self.layer_norm1(hidden_states))
        return hidden_states + self.mlp(self.layer_norm2(hidden_states))


class ClipTransformer(nn.Module):
    def __init__(self, config: DeepEncoderClipConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(ClipLayer(config) for _ in range(config.num_hidden_layers))


class DeepEncoderClipModel(nn.Module):
    """`forward(sam_features)`: (B, C, h, w) -> (B, 1 + h*w, C), CLS token first, before the join."""

    def __init__(self, config: DeepEncoderClipConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = ClipEmbeddings(config)
        self.pre_layrnorm = nn.LayerNorm(config.hidden_size, eps=config.pre_layernorm_eps)
        self.transformer = ClipTransformer(config)

    def encode(self, hidden_states: torch.Tensor, output_hidden_states: bool = False):
        """Run `pre_layrnorm` and the layers on token embeddings (B, N, C) -> (B, N, C) [, per-layer outputs]."""
        hidden_states = self.pre_layrnorm(hidden_states)
        all_states = (hidden_states,) if output_hidden_states else None
        for layer in self.transformer.layers:
            hidden_states = layer(hidden_states)
            if all_states is not None:
                all_states = all_states + (hidden_states,)
        return hidden_states, all_states

    def forward(self, sam_features: torch.Tensor) -> torch.Tensor:
        if sam_features.ndim != 4 or sam_features.shape[1] != self.config.hidden_size:
            raise ValueError(
                f"sam_features must be (B, {self.config.hidden_size}, h, w), got {tuple(sam_features.shape)}"
            )
        return self.encode(self.embeddings(sam_features))[0]
