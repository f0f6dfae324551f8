"""DeepEncoder V2 model math against transformers' own port (`transformers.models.deepseek_ocr2`) on identical random
weights, the attention kernels against each other, and the tower's conventions (layout, batching, checkpointing)."""

from __future__ import annotations

import pytest
import torch
from fixtures.v2_support import tiny_config_kwargs, transformers_reference
from helpers import randomize_, rel_err

from deepencoder import DeepEncoderV2Config, DeepEncoderV2Model
from deepencoder.attention import eager_mixed_attention, mixed_attention_mask, sdpa_mixed_attention

TOL = 1e-4  # fp32: max |ours - reference| / max |reference|


def tiny_v2(seed: int = 0, **overrides) -> DeepEncoderV2Model:
    return randomize_(DeepEncoderV2Model(DeepEncoderV2Config(**{**tiny_config_kwargs(), **overrides})), seed).eval()


@pytest.fixture(scope="module")
def model_and_reference():
    model = tiny_v2()
    reference, projector = transformers_reference(model)
    return model, reference, projector


@pytest.mark.parametrize(
    "size, queries, implementation", [(1024, 256, "sdpa"), (768, 144, "sdpa"), (768, 144, "eager")]
)
def test_views_match_transformers_port(model_and_reference, size, queries, implementation):
    model, reference, projector = model_and_reference
    model.config.encoder_config._attn_implementation = implementation
    pixels = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(size))
    try:
        with torch.inference_mode():
            ours = model.encode_views(pixels, output_pre_projector=True, output_hidden_states=True)
            theirs = reference(pixels, output_hidden_states=True)
            expected = projector(theirs.last_hidden_state)
    finally:
        model.config.encoder_config._attn_implementation = None
    assert ours.image_embeds.shape == (2, queries, model.config.projector_dim)
    assert rel_err(ours.pre_projector, theirs.last_hidden_state) <= TOL
    assert rel_err(ours.image_embeds, expected) <= TOL
    # the input and every encoder layer's output over the joined [image tokens ; queries] sequence (transformers
    # records the last one after the final norm)
    states = list(ours.encoder_hidden_states)
    assert len(states) == len(theirs.hidden_states) == model.config.encoder_config.num_hidden_layers + 1
    with torch.inference_mode():
        states[-1] = model.encoder.norm(states[-1])
    for mine, their in zip(states, theirs.hidden_states):
        assert mine.shape == (2, 2 * queries, 64)
        assert rel_err(mine, their) <= TOL


def test_page_layout_matches_transformers_get_image_features(model_and_reference):
    """[every tile's queries, tile by tile] + [global queries] + [separator], against transformers'
    `DeepseekOcr2Model.get_image_features` (pages with 0 and 2 tiles in one batch)."""
    from transformers.models.deepseek_ocr2.configuration_deepseek_ocr2 import DeepseekOcr2Config
    from transformers.models.deepseek_ocr2.modeling_deepseek_ocr2 import DeepseekOcr2Model

    model, reference, projector = model_and_reference
    text = dict(
        hidden_size=48,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        vocab_size=32,
        mlp_layer_types=["dense"],
    )
    full = DeepseekOcr2Model(DeepseekOcr2Config(vision_config=reference.config, text_config=text)).eval()
    full.vision_tower.load_state_dict(reference.state_dict())
    full.multi_modal_projector.load_state_dict(projector.state_dict())
    with torch.no_grad():
        full.view_separator.copy_(model.view_separator)
    generator = torch.Generator().manual_seed(1)
    globals_ = torch.randn(2, 3, 1024, 1024, generator=generator)
    tiles = torch.randn(2, 3, 768, 768, generator=generator)
    with torch.inference_mode():
        ours = model(pixel_values=globals_, pixel_values_tiles=tiles, tile_grids=[(1, 1), (2, 1)])
        theirs = full.get_image_features(globals_, pixel_values_local=tiles, num_local_patches=[0, 2]).pooler_output
    assert [p.shape[0] for p in ours.image_embeds] == [257, 2 * 144 + 257]
    for mine, their in zip(ours.image_embeds, theirs):
        assert mine.shape == their.shape
        assert rel_err(mine, their) <= TOL


def test_mixed_attention_kernels_agree():
    """The SDPA kernel (image rows mask-free, query rows masked, K/V not repeated) equals the eager reference, and
    both follow the mask: query i never reads queries after it, image tokens never read queries."""
    generator = torch.Generator().manual_seed(0)
    n, heads, kv_heads, hd = 12, 6, 2, 16
    query = torch.randn(2, heads, 2 * n, hd, generator=generator)
    key = torch.randn(2, kv_heads, 2 * n, hd, generator=generator)
    value = torch.randn(2, kv_heads, 2 * n, hd, generator=generator)
    mask = mixed_attention_mask(n)
    eager = eager_mixed_attention(query, key, value, mask, n, scale=hd**-0.5)
    sdpa = sdpa_mixed_attention(query, key, value, mask, n, scale=hd**-0.5)
    assert rel_err(sdpa, eager) <= 1e-5
    # perturb query token j's key/value: image rows and queries before j unchanged, queries from j on changed
    j = n + 5
    key2, value2 = key.clone(), value.clone()
    key2[:, :, j] += 1.0
    value2[:, :, j] += 1.0
    changed = sdpa_mixed_attention(query, key2, value2, mask, n, scale=hd**-0.5)
    assert torch.equal(changed[:, :, :j], sdpa[:, :, :j])
    assert (changed[:, :, j:] - sdpa[:, :, j:]).abs().amax(dim=(0, 1, 3)).min() > 1e-4


def test_batched_pages_equal_single_pages():
    model = tiny_v2(seed=3)
    generator = torch.Generator().manual_seed(2)
    globals_ = torch.randn(2, 3, 1024, 1024, generator=generator)
    tiles = torch.randn(2, 3, 768, 768, generator=generator)
    grids = [(2, 1), (1, 1)]
    with torch.inference_mode():
        batched = model(globals_, pixel_values_tiles=tiles, tile_grids=grids, output_pre_projector=True)
        singles = [
            model(globals_[0:1], pixel_values_tiles=tiles, tile_grids=[grids[0]]),
            model(globals_[1:2], tile_grids=[grids[1]]),
        ]
    for page, single in zip(batched.image_embeds, singles):
        assert rel_err(page, single.image_embeds[0]) <= 1e-5
    counts = [2 * 144 + 257, 257]
    assert [p.shape[0] for p in batched.image_embeds] == counts
    assert [p.shape for p in batched.pre_projector] == [(c - 1, 64) for c in counts]
    assert torch.equal(batched.image_embeds[1][-1], model.view_separator.detach())
    with pytest.raises(ValueError, match="asks for 2 tiles"):
        model(globals_, tile_grids=grids)


def test_no_query_table_for_other_view_sizes():
    model = tiny_v2()
    with pytest.raises(ValueError, match="no learned query table for a view of 64 tokens"):
        model.encode_views(torch.zeros(1, 3, 512, 512))


def test_gradient_checkpointing_same_gradients():
    model = tiny_v2(seed=4).train()
    pixels = torch.randn(1, 3, 768, 768, generator=torch.Generator().manual_seed(5))

    def grads():
        model.zero_grad()
        model.encode_views(pixels).image_embeds.square().mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = grads()
    model.gradient_checkpointing_enable()
    checkpointed = grads()
    model.gradient_checkpointing_disable()
    assert plain.keys() == checkpointed.keys()
    assert any(k.startswith("encoder.queries.144") for k in plain)
    for name in plain:
        assert rel_err(checkpointed[name], plain[name]) <= 1e-5, name


def test_bf16_forward_follows_weights():
    model = tiny_v2().to(torch.bfloat16)
    pixels = torch.randn(1, 3, 768, 768, generator=torch.Generator().manual_seed(6))
    with torch.inference_mode():
        out = model.encode_views(pixels.to(torch.bfloat16))
        reference = tiny_v2().encode_views(pixels)
    assert out.image_embeds.dtype == torch.bfloat16
    assert rel_err(out.image_embeds.float(), reference.image_embeds) <= 5e-2


def test_freeze_targets():
    model = tiny_v2()
    assert model.freeze("encoder.layers.0-0") > 0
    assert not model.encoder.layers[0].self_attn.q_proj.weight.requires_grad
    assert model.encoder.layers[1].self_attn.q_proj.weight.requires_grad
    model.freeze("queries")
    assert not any(p.requires_grad for p in model.encoder.queries.values())
    model.unfreeze()
    model.freeze("sam", "projector")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("encoder.") for n in trainable)
    summary = str(model.trainable_summary())
    assert "encoder.queries" in summary and "encoder.layers" in summary
