"""Configuration of the DeepEncoder tower: SAM stage, CLIP stage, projector.

Every architectural number lives here, as data. The defaults are the released DeepSeek-OCR tower
(SAM ViT-B + CLIP-L/14 + 2048->1280 projector).
"""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

from .layout import count_tokens

SAM_PRESETS: dict[str, dict[str, Any]] = {
    "vit_b": {
        "hidden_size": 768,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "global_attn_indexes": [2, 5, 8, 11],
    },
    "vit_l": {
        "hidden_size": 1024,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "global_attn_indexes": [5, 11, 17, 23],
    },
    "vit_h": {
        "hidden_size": 1280,
        "num_hidden_layers": 32,
        "num_attention_heads": 16,
        "global_attn_indexes": [7, 15, 23, 31],
    },
}


class DeepEncoderSamConfig(PretrainedConfig):
    """SAM `ImageEncoderViT` trunk + neck + the DeepEncoder compressor (`net_2`, `net_3`).

    Args:
        hidden_size: ViT width (768 for ViT-B).
        num_hidden_layers: number of ViT blocks.
        num_attention_heads: heads per block.
        mlp_ratio: MLP hidden width / hidden_size.
        patch_size: patch embedding kernel and stride.
        image_size: pretraining resolution; the absolute pos-embed is (1, image_size/patch, image_size/patch, C)
            and global-attention rel-pos tables have 2 * image_size/patch - 1 rows.
        window_size: side of the attention windows of the non-global blocks.
        global_attn_indexes: blocks that attend over the whole grid.
        layer_norm_eps: eps of the block LayerNorms and the neck LayerNorm2d.
        qkv_bias: bias on the fused qkv projection.
        use_rel_pos: decomposed relative position bias.
        use_abs_pos: absolute position embedding.
        out_channels: neck width (segment-anything's image embedding width).
        compressor_channels: output widths of the stride-2 convs after the neck (`net_2`, `net_3`).

    The attention kernel (how SDPA receives the rel-pos bias) is not architecture and is not part of the config: it
    is chosen per device at run time (`deepencoder.attention`); configs saved with the old `rel_pos_attention` key
    still load (the key is ignored).
    """

    model_type = "deepencoder_sam"
    base_config_key = "sam_config"

    def __init__(
        self,
        hidden_size: int = 768,
        num_hidden_layers: int = 12,
        num_attention_heads: int = 12,
        mlp_ratio: float = 4.0,
        patch_size: int = 16,
        num_channels: int = 3,
        image_size: int = 1024,
        window_size: int = 14,
        global_attn_indexes: list[int] | tuple[int, ...] = (2, 5, 8, 11),
        layer_norm_eps: float = 1e-6,
        qkv_bias: bool = True,
        use_rel_pos: bool = True,
        use_abs_pos: bool = True,
        out_channels: int = 256,
        compressor_channels: list[int] | tuple[int, ...] = (512, 1024),
        **kwargs: Any,
    ) -> None:
        kwargs.pop("rel_pos_attention", None)  # a kernel choice saved by earlier versions; see `deepencoder.attention`
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.mlp_ratio = mlp_ratio
        self.patch_size = patch_size
        self.num_channels = num_channels
        self.image_size = image_size
        self.window_size = window_size
        self.global_attn_indexes = list(global_attn_indexes)
        self.layer_norm_eps = layer_norm_eps
        self.qkv_bias = qkv_bias
        self.use_rel_pos = use_rel_pos
        self.use_abs_pos = use_abs_pos
        self.out_channels = out_channels
        self.compressor_channels = list(compressor_channels)
        super().__init__(**kwargs)

    @classmethod
    def from_preset(cls, name: str, **kwargs: Any) -> DeepEncoderSamConfig:
        """`vit_b` | `vit_l` | `vit_h`, with optional overrides."""
        if name not in SAM_PRESETS:
            raise ValueError(f"unknown SAM preset {name!r}; choose one of {sorted(SAM_PRESETS)}")
        return cls(**{**SAM_PRESETS[name], **kwargs})

    @property
    def mlp_dim(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    @property
    def grid_size(self) -> int:
        """Side of the pretraining patch grid (64 for 1024 px / 16)."""
        return self.image_size // self.patch_size

    @property
    def downsample(self) -> int:
        """Pixels per output token side: patch_size * 2 per compressor conv (64 for the default)."""
        return self.patch_size * 2 ** len(self.compressor_channels)

    @property
    def output_channels(self) -> int:
        return self.compressor_channels[-1] if self.compressor_channels else self.out_channels


class DeepEncoderClipConfig(PretrainedConfig):
    """CLIP-L/14 trunk fed by the SAM features instead of its conv patch embedding.

    Args:
        hidden_size: transformer width (1024).
        num_hidden_layers: number of pre-LN layers (24).
        num_attention_heads: heads per layer (16).
        intermediate_size: MLP hidden width (4096).
        hidden_act: MLP activation (`quick_gelu`: x * sigmoid(1.702 x); `gelu` for exact GELU).
        layer_norm_eps: eps of the per-layer LayerNorms.
        pre_layernorm_eps: eps of `pre_layrnorm`.
        image_size, patch_size: define the position table: (image_size / patch_size)**2 + 1 rows (257).
    """

    model_type = "deepencoder_clip"
    base_config_key = "clip_config"

    def __init__(
        self,
        hidden_size: int = 1024,
        num_hidden_layers: int = 24,
        num_attention_heads: int = 16,
        intermediate_size: int = 4096,
        hidden_act: str = "quick_gelu",
        layer_norm_eps: float = 1e-5,
        pre_layernorm_eps: float = 1e-5,
        image_size: int = 224,
        patch_size: int = 14,
        **kwargs: Any,
    ) -> None:
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.hidden_act = hidden_act
        self.layer_norm_eps = layer_norm_eps
        self.pre_layernorm_eps = pre_layernorm_eps
        self.image_size = image_size
        self.patch_size = patch_size
        super().__init__(**kwargs)

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_positions(self) -> int:
        return self.grid_size**2 + 1


class DeepEncoderConfig(PretrainedConfig):
    """The whole tower: SAM stage -> CLIP stage -> join (2048) -> linear projector -> layout.

    Args:
        sam_config: `DeepEncoderSamConfig` or its dict.
        clip_config: `DeepEncoderClipConfig` or its dict.
        projector_dim: width of the language model the tokens are projected to (1280 for DeepSeek-OCR).
        projector_bias: bias on the projector.

    What VLM stacks read from a vision tower's config (LLaVA-style code: `vision_tower.config.hidden_size`, image
    and patch size for the token count), in the tower's terms:
        hidden_size: width of the tokens `forward` returns (an alias of `projector_dim`; 1280).
        image_size: side of the view the tower was trained at (`sam_config.image_size`, 1024 px).
        patch_size: pixels per output token side (`sam_config.downsample`, 64: patch 16 and two stride-2 convs), so
            `(image_size // patch_size) ** 2` is `num_patches`.
        num_patches: tokens of one `image_size` view before the page layout (256).
        num_image_tokens: length of an untiled `image_size` page's sequence, newlines and separator included (273).
    Pages of other sizes and tiled pages have other lengths: the processor's `num_image_tokens` gives each page's.
    """

    model_type = "deepencoder"
    attribute_map = {"hidden_size": "projector_dim"}
    sub_configs = {"sam_config": DeepEncoderSamConfig, "clip_config": DeepEncoderClipConfig}
    _auto_class = "AutoConfig"  # save_pretrained writes auto_map and the model files (trust_remote_code loading)

    def __init__(
        self,
        sam_config: DeepEncoderSamConfig | dict[str, Any] | None = None,
        clip_config: DeepEncoderClipConfig | dict[str, Any] | None = None,
        projector_dim: int = 1280,
        projector_bias: bool = True,
        initializer_range: float = 0.02,
        **kwargs: Any,
    ) -> None:
        if sam_config is None:
            sam_config = DeepEncoderSamConfig()
        elif isinstance(sam_config, dict):
            sam_config = DeepEncoderSamConfig(**sam_config)
        if clip_config is None:
            clip_config = DeepEncoderClipConfig()
        elif isinstance(clip_config, dict):
            clip_config = DeepEncoderClipConfig(**clip_config)
        self.sam_config = sam_config
        self.clip_config = clip_config
        self.projector_dim = projector_dim
        self.projector_bias = projector_bias
        self.initializer_range = initializer_range
        super().__init__(**kwargs)
        if sam_config.output_channels != clip_config.hidden_size:
            raise ValueError(
                f"the SAM stage outputs {sam_config.output_channels} channels but the CLIP stage is "
                f"{clip_config.hidden_size} wide; they must match (the SAM tokens replace CLIP's patch embedding)"
            )

    @property
    def join_dim(self) -> int:
        """Width of `cat(clip_tokens, sam_tokens)` (2048)."""
        return self.clip_config.hidden_size + self.sam_config.output_channels

    @property
    def image_size(self) -> int:
        return self.sam_config.image_size

    @property
    def patch_size(self) -> int:
        return self.sam_config.downsample

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_image_tokens(self) -> int:
        side = self.image_size // self.patch_size
        return count_tokens((side, side))
