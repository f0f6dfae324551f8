"""Configuration of DeepEncoder V2, DeepSeek-OCR-2's vision tower: SAM stage -> Qwen2-as-encoder with learned
queries -> projector.

Every architectural number lives here, as data. The defaults are the released DeepSeek-OCR-2 tower: SAM ViT-B with
`net_3` widened to 896 channels, a 24-layer Qwen2-0.5B-shaped stack used as an encoder, and an 896 -> 1280 projector.
"""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

from .configuration_deepencoder import DeepEncoderSamConfig
from .layout import count_query_tokens

V2_COMPRESSOR_CHANNELS = (512, 896)


class DeepEncoderV2EncoderConfig(PretrainedConfig):
    """The Qwen2 stack used as an encoder over `[image tokens ; learned queries]`.

    Args:
        hidden_size: width of the stack (896); must equal the SAM stage's output channels.
        num_hidden_layers: number of decoder layers (24).
        num_attention_heads: query heads (14).
        num_key_value_heads: key/value heads shared by groups of query heads (2).
        head_dim: per-head width; `hidden_size // num_attention_heads` when None (64).
        intermediate_size: SiLU-gated MLP width (4864).
        hidden_act: MLP activation (`silu`).
        rms_norm_eps: eps of every RMSNorm.
        rope_theta: RoPE base (1e6); positions run 0..2n-1 over the joined sequence.
        attention_bias: bias on q/k/v (Qwen2 has it; `o_proj` never has one).
        query_counts: sizes of the learned query tables; a view with n SAM tokens is read by the table of n
            queries (144: 768 px tiles, 256: 1024 px views).
    """

    model_type = "deepencoder_v2_encoder"
    base_config_key = "encoder_config"

    def __init__(
        self,
        hidden_size: int = 896,
        num_hidden_layers: int = 24,
        num_attention_heads: int = 14,
        num_key_value_heads: int = 2,
        head_dim: int | None = None,
        intermediate_size: int = 4864,
        hidden_act: str = "silu",
        rms_norm_eps: float = 1e-6,
        rope_theta: float = 1e6,
        attention_bias: bool = True,
        query_counts: list[int] | tuple[int, ...] = (144, 256),
        **kwargs: Any,
    ) -> None:
        if num_attention_heads % num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({num_attention_heads}) must be a multiple of num_key_value_heads "
                f"({num_key_value_heads})"
            )
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim if head_dim is not None else hidden_size // num_attention_heads
        self.intermediate_size = intermediate_size
        self.hidden_act = hidden_act
        self.rms_norm_eps = rms_norm_eps
        self.rope_theta = rope_theta
        self.attention_bias = attention_bias
        self.query_counts = sorted(int(n) for n in query_counts)
        super().__init__(**kwargs)


class DeepEncoderV2Config(PretrainedConfig):
    """The whole V2 tower: SAM stage (compressor to 896) -> encoder with learned queries -> linear projector ->
    page layout ([tile queries] + [global queries] + view_separator).

    Args:
        sam_config: `DeepEncoderSamConfig` or its dict; a dict without `compressor_channels` gets V2's (512, 896).
        encoder_config: `DeepEncoderV2EncoderConfig` or its dict.
        projector_dim: width of the language model the tokens are projected to (1280).
        projector_bias: bias on the projector.

    What VLM stacks read from a vision tower's config (LLaVA-style code: `vision_tower.config.hidden_size`, image
    and patch size for the token count), in the tower's terms:
        hidden_size: width of the tokens `forward` returns (an alias of `projector_dim`; 1280).
        image_size: side of the global view the tower was trained at (`sam_config.image_size`, 1024 px).
        patch_size: pixels per output token side (`sam_config.downsample`, 64), so `(image_size // patch_size) ** 2`
            is `num_patches`, the queries of one view (`queries_for(image_size)`, 256).
        num_patches: query tokens of one `image_size` view (256).
        num_image_tokens: length of an untiled `image_size` page's sequence, separator included (257).
    Tiled pages are longer: the processor's `num_image_tokens` gives each page's.
    """

    model_type = "deepencoder_v2"
    attribute_map = {"hidden_size": "projector_dim"}
    sub_configs = {"sam_config": DeepEncoderSamConfig, "encoder_config": DeepEncoderV2EncoderConfig}
    _auto_class = "AutoConfig"  # save_pretrained writes auto_map and the model files (trust_remote_code loading)

    def __init__(
        self,
        sam_config: DeepEncoderSamConfig | dict[str, Any] | None = None,
        encoder_config: DeepEncoderV2EncoderConfig | dict[str, Any] | None = None,
        projector_dim: int = 1280,
        projector_bias: bool = True,
        initializer_range: float = 0.02,
        **kwargs: Any,
    ) -> None:
        if sam_config is None:
            sam_config = DeepEncoderSamConfig(compressor_channels=V2_COMPRESSOR_CHANNELS)
        elif isinstance(sam_config, dict):
            sam_config = DeepEncoderSamConfig(**{"compressor_channels": V2_COMPRESSOR_CHANNELS, **sam_config})
        if encoder_config is None:
            encoder_config = DeepEncoderV2EncoderConfig()
        elif isinstance(encoder_config, dict):
            encoder_config = DeepEncoderV2EncoderConfig(**encoder_config)
        self.sam_config = sam_config
        self.encoder_config = encoder_config
        self.projector_dim = projector_dim
        self.projector_bias = projector_bias
        self.initializer_range = initializer_range
        super().__init__(**kwargs)
        if sam_config.output_channels != encoder_config.hidden_size:
            raise ValueError(
                f"the SAM stage outputs {sam_config.output_channels} channels but the encoder is "
                f"{encoder_config.hidden_size} wide; they must match (the SAM tokens enter the encoder as they are)"
            )

    @property
    def image_size(self) -> int:
        return self.sam_config.image_size

    @property
    def patch_size(self) -> int:
        return self.sam_config.downsample

    @property
    def num_patches(self) -> int:
        return self.queries_for(self.image_size)

    @property
    def num_image_tokens(self) -> int:
        return count_query_tokens(self.num_patches)

    def queries_for(self, view_size: int) -> int:
        """Query tokens a view_size x view_size view yields: (view_size / downsample)**2 (1024 -> 256, 768 -> 144)."""
        side = view_size // self.sam_config.downsample
        return side * side
