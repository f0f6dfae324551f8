"""Each stage against an independent implementation on identical random weights: the SAM trunk + neck against
segment-anything's `ImageEncoderViT`, the CLIP layers against transformers' `CLIPVisionModel` encoder."""

from functools import partial

import pytest
import segment_anything
import torch
from helpers import random_model, randomize_, rel_err, tiny_config
from segment_anything.modeling import ImageEncoderViT

from deepencoder import DeepEncoderConfig, DeepEncoderModel
from deepencoder.configuration_deepencoder import DeepEncoderClipConfig
from deepencoder.modeling_clip import DeepEncoderClipModel

TOL = 1e-4


def sam_reference(sam_config, img_size):
    return ImageEncoderViT(
        img_size=img_size,
        patch_size=sam_config.patch_size,
        embed_dim=sam_config.hidden_size,
        depth=sam_config.num_hidden_layers,
        num_heads=sam_config.num_attention_heads,
        mlp_ratio=sam_config.mlp_ratio,
        out_chans=sam_config.out_channels,
        qkv_bias=True,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
        use_rel_pos=True,
        window_size=sam_config.window_size,
        global_attn_indexes=sam_config.global_attn_indexes,
    ).eval()


def load_sam_into_reference(model: DeepEncoderModel, reference) -> None:
    # our SAM parameter names are segment-anything's (the compressor convs are ours only)
    state = {k[4:]: v for k, v in model.state_dict().items() if k.startswith("sam.") and ".net_" not in f".{k[4:]}"}
    reference.load_state_dict(state, strict=True)


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_tiny_sam_neck_matches_segment_anything(implementation):
    model = random_model(tiny_config(attn_implementation=implementation))
    reference = sam_reference(model.config.sam_config, 256)
    load_sam_into_reference(model, reference)
    pixels = torch.randn(2, 3, 256, 256)
    with torch.no_grad():
        ours = model.sam.neck_features(pixels)
        theirs = reference(pixels)
    assert ours.shape == theirs.shape == (2, 32, 16, 16)
    assert rel_err(ours, theirs) < TOL


def test_sam_compressor_shapes():
    model = random_model()
    with torch.no_grad():
        out = model.sam(torch.randn(1, 3, 320, 192))
    assert out.shape == (1, 64, 5, 3)


@pytest.mark.slow
def test_real_size_sam_vit_b_matches_segment_anything():
    """ViT-B at 1024 px: 64x64 grid, 14x14 windows padded to 70, global blocks 2/5/8/11, no interpolation."""
    model = DeepEncoderModel(DeepEncoderConfig())
    randomize_(model.sam, std=0.02)
    model.eval()
    reference = segment_anything.build_sam_vit_b().image_encoder.eval()
    load_sam_into_reference(model, reference)
    pixels = torch.randn(1, 3, 1024, 1024)
    with torch.no_grad():
        ours = model.sam.neck_features(pixels)
        theirs = reference(pixels)
    assert ours.shape == theirs.shape == (1, 256, 64, 64)
    assert rel_err(ours, theirs) < TOL


def hf_clip_reference(config: DeepEncoderClipConfig, ours: DeepEncoderClipModel):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    reference = CLIPVisionModel(
        CLIPVisionConfig(
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_hidden_layers=config.num_hidden_layers,
            num_attention_heads=config.num_attention_heads,
            image_size=config.image_size,
            patch_size=config.patch_size,
            hidden_act="quick_gelu",
            layer_norm_eps=config.layer_norm_eps,
        )
    ).eval()
    state = {}
    for key, value in ours.state_dict().items():
        k = key.replace("transformer.layers.", "encoder.layers.")
        if ".qkv_proj." in k:
            for name, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3)):
                state[k.replace("qkv_proj", name)] = part
        else:
            state[k] = value
    # transformers 5 flattens CLIPVisionModel (no `vision_model.` level)
    missing, unexpected = reference.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {
        "embeddings.patch_embedding.weight",
        "post_layernorm.weight",
        "post_layernorm.bias",
        "embeddings.position_ids",
    }, (missing, unexpected)
    return reference


@pytest.mark.parametrize("real_size", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_clip_layers_match_transformers_clip(real_size):
    """Same token embeddings through `pre_layrnorm` + the layers of both implementations."""
    config = DeepEncoderClipConfig() if real_size else DeepEncoderClipConfig(**tiny_config().clip_config.to_diff_dict())
    clip = randomize_(DeepEncoderClipModel(config), std=0.02).eval()
    reference = hf_clip_reference(config, clip)
    grid = config.grid_size
    sam_features = torch.randn(2, config.hidden_size, grid, grid)
    with torch.no_grad():
        embeddings = clip.embeddings(sam_features)
        ours = clip(sam_features)
        theirs = reference.encoder(inputs_embeds=reference.pre_layrnorm(embeddings)).last_hidden_state
        # transformers' own embeddings (with its position table) agree with ours at the native grid
        cls = reference.embeddings.class_embedding.expand(2, 1, -1)
        tokens = torch.cat([cls, sam_features.flatten(2).transpose(1, 2)], dim=1)
        hf_embeddings = tokens + reference.embeddings.position_embedding.weight
    assert ours.shape == (2, 1 + grid * grid, config.hidden_size)
    assert rel_err(embeddings, hf_embeddings) < 1e-6
    assert rel_err(ours, theirs) < TOL
