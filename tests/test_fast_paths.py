"""Every fast path of the tower against its plain path, on tiny configs (fp32, relative error <= 1e-5 unless
stated): the blocked additive mask against the one-shot mask and the eager formula, the folded bias on a fused
SDPA kernel, batching against one view at a time, and torch.compile without graph breaks."""

import pytest
import torch
import torch.nn.functional as F
from helpers import random_model, rel_err, tiny_config

from deepencoder import modeling_sam
from deepencoder.modeling_sam import (
    decomposed_rel_pos,
    folded_rel_pos_attention,
    masked_rel_pos_attention,
    window_partition,
    window_unpartition,
)

TOL = 1e-5


def _attention_inputs(batch=2, heads=3, height=5, width=7, head_dim=16):
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(batch, heads, height * width, head_dim, generator=generator) for _ in range(3))
    rel_pos_h = 0.5 * torch.randn(2 * height - 1, head_dim, generator=generator)
    rel_pos_w = 0.5 * torch.randn(2 * width - 1, head_dim, generator=generator)
    rel_h, rel_w = decomposed_rel_pos(q, rel_pos_h, rel_pos_w, height, width)
    return q, k, v, rel_h, rel_w


def _eager(q, k, v, rel_h, rel_w):
    logits = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    logits = logits + (rel_h[..., :, None] + rel_w[..., None, :]).flatten(-2)
    return logits.softmax(-1) @ v


# per block of (heads x rows), 3 heads x 35 rows in all: 1 x 1, 1 x 4 (ragged rows), 2 x 35 (ragged heads), all
@pytest.mark.parametrize("elements", [1, 2 * 35 * 4, 2 * 35 * 35 * 2, 10**9])
@pytest.mark.parametrize("inference", [False, True], ids=["autograd", "inference"])
def test_blocked_mask_equals_eager(elements, inference):
    """Both the functional form (autograd, tracing) and the write-into-one-buffer form (inference)."""
    q, k, v, rel_h, rel_w = _attention_inputs()
    expected = _eager(q, k, v, rel_h, rel_w)
    with torch.inference_mode(inference):
        actual = masked_rel_pos_attention(q, k, v, rel_h, rel_w, mask_block_elements=elements)
    assert actual.shape == expected.shape
    assert rel_err(actual, expected) < TOL


def test_window_block_skips_padding_in_projections():
    """A windowed block on a grid that needs padding (qkv/proj on the unpadded grid, padded keys/values = qkv
    bias) against segment-anything's order: zero-pad the normed input, then the whole attention per window."""
    config = tiny_config()
    model = random_model(config)
    block = next(b for b in model.sam.blocks if b.window_size > 0)
    window = block.window_size
    x = torch.randn(2, 2 * window + 3, window + 5, config.sam_config.hidden_size)
    assert block.attn.qkv.bias.abs().max() > 0
    normed = block.norm1(x)
    windows, padded = window_partition(normed, window)
    attended = window_unpartition(block.attn(windows), window, padded, x.shape[1:3])
    hidden = x + attended
    expected = hidden + block.mlp(block.norm2(hidden))
    with torch.inference_mode():
        fast = block(x)
    plain = block(x.clone().requires_grad_())
    assert rel_err(fast, expected.detach()) < TOL
    assert rel_err(plain.detach(), expected.detach()) < TOL


def test_chunked_inference_mlp_equals_one_launch(monkeypatch):
    model = random_model()
    mlp = model.sam.blocks[0].mlp
    x = torch.randn(3, 10, 7, mlp.lin1.in_features)
    expected = mlp(x.requires_grad_()).detach()
    per_token = mlp.lin1.out_features * x.element_size()
    monkeypatch.setattr(modeling_sam, "CPU_TEMPORARY_BYTES", 64 * per_token)  # 210 tokens: 4 chunks of 53 / 51
    with torch.inference_mode():
        actual = mlp(x)
    assert actual.shape == expected.shape
    assert rel_err(actual, expected) < TOL


def test_folded_equals_eager_and_uses_a_fused_kernel():
    q, k, v, rel_h, rel_w = _attention_inputs()
    expected = _eager(q, k, v, rel_h, rel_w)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        actual = folded_rel_pos_attention(q, k, v, rel_h, rel_w, q.shape[-1] ** -0.5)
    assert rel_err(actual, expected) < TOL
    names = {event.name for event in profile.events()}
    # q'/k' are wider than v; padding v keeps SDPA off the unfused math fallback
    assert "aten::_scaled_dot_product_attention_math" not in names, sorted(n for n in names if "attention" in n)


@pytest.mark.parametrize("rel_pos_attention", ["folded", "mask"])
def test_batched_views_equal_one_at_a_time(rel_pos_attention):
    model = random_model(tiny_config(sam_config={"rel_pos_attention": rel_pos_attention}))
    pixels = torch.randn(3, 3, 320, 256)
    with torch.inference_mode():
        batched = model.encode_views(pixels).image_embeds
        single = torch.cat([model.encode_views(pixels[i : i + 1]).image_embeds for i in range(3)])
    assert rel_err(batched, single) < TOL


def test_forward_with_tiles_equals_encode_views():
    """One batched launch for the global views and one for all tiles, against encoding each view alone."""
    model = random_model()
    pages = torch.randn(2, 3, 256, 256)
    tiles = torch.randn(5, 3, 192, 192)
    with torch.inference_mode():
        out = model(pages, pixel_values_tiles=tiles, tile_grids=[(3, 1), (2, 1)])
        single_tiles = torch.cat([model.encode_views(tiles[i : i + 1]).image_embeds for i in range(5)])
        single_pages = torch.cat([model.encode_views(pages[i : i + 1]).image_embeds for i in range(2)])
    assert rel_err(out.tile_embeds, single_tiles) < TOL
    assert rel_err(out.global_embeds, single_pages) < TOL


@pytest.mark.parametrize("rel_pos_attention", ["folded", "mask"])
def test_compile_has_no_graph_breaks_and_matches(rel_pos_attention):
    model = random_model(tiny_config(sam_config={"rel_pos_attention": rel_pos_attention}))
    pixels = torch.randn(2, 3, 320, 256)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(model.encode_views)(pixels)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    compiled = torch.compile(model.encode_views, fullgraph=True, backend="aot_eager")
    with torch.inference_mode():
        expected = model.encode_views(pixels).image_embeds
        actual = compiled(pixels).image_embeds
    assert rel_err(actual, expected) < TOL


def test_inference_mlp_equals_autograd_mlp():
    """The in-place activation used without autograd against the plain one."""
    model = random_model()
    pixels = torch.randn(1, 3, 256, 256)
    with torch.inference_mode():
        fast = model.encode_views(pixels).image_embeds
    plain = model.encode_views(pixels.requires_grad_()).image_embeds
    assert rel_err(fast, plain.detach()) < TOL


def test_bf16_weights_close_to_fp32():
    """Half-precision weights and inputs (interpolations in fp32): within 2e-2 of fp32."""
    model = random_model()
    pixels = torch.randn(1, 3, 320, 256)
    with torch.inference_mode():
        expected = model.encode_views(pixels).image_embeds
        actual = model.to(torch.bfloat16).encode_views(pixels.bfloat16()).image_embeds
    assert actual.dtype == torch.bfloat16
    assert rel_err(actual.float(), expected) < 2e-2


def test_eager_attention_matches_sdpa_formula():
    """The eager reference formula used above is SDPA's (guards the test helper itself)."""
    q, k, v, rel_h, rel_w = _attention_inputs()
    mask = (rel_h[..., :, None] + rel_w[..., None, :]).flatten(-2)
    assert rel_err(_eager(q, k, v, rel_h, rel_w), F.scaled_dot_product_attention(q, k, v, attn_mask=mask)) < TOL


def test_inference_fast_path_keeps_module_hooks():
    """With hooks on `attn`, `qkv` or `mlp` the fast path calls those modules (hooks fire) and leaves the outputs
    a hook kept untouched (no in-place residual sums on them)."""
    model = random_model()
    block = next(b for b in model.sam.blocks if b.window_size > 0)
    kept = {}

    def keep(name):
        def hook(module, args, output):
            kept.setdefault(name, (output, output.clone()))  # the inference call's outputs

        return hook

    for name in ("attn", "mlp"):
        getattr(block, name).register_forward_hook(keep(name))
    block.attn.qkv.register_forward_hook(keep("qkv"))
    x = torch.randn(1, 13, 11, block.norm1.normalized_shape[0])
    with torch.inference_mode():
        fast = block(x)
    expected = block(x.clone().requires_grad_()).detach()
    assert set(kept) == {"attn", "mlp", "qkv"}
    for name, (output, snapshot) in kept.items():
        assert torch.equal(output, snapshot), name
    assert rel_err(fast, expected) < TOL
