"""Every attention kernel and fast path of the tower against an independent plain path, on tiny configs (fp32,
relative error <= 1e-5 unless stated): each rel-pos kernel (eager, mask, folded, flex) against segment-anything's
`add_decomposed_rel_pos` + softmax, values and gradients, the blocked mask at ragged block sizes, the CPU's
half-precision mask blocks against the formula in float64, the folded bias on a fused SDPA kernel, flex through its
export fallback, GQA attention against repeated heads, batching against one view at a time, torch.compile without
graph breaks, the position-table cache, and the invariants that hooks and autocast see the same model whatever
mode runs."""

import json

import pytest
import torch
from helpers import random_model, rel_err, tiny_config
from segment_anything.modeling.image_encoder import add_decomposed_rel_pos

from deepencoder import DeepEncoderModel, attention
from deepencoder.modeling_sam import decomposed_rel_pos, window_partition, window_unpartition

TOL = 1e-5
KERNELS = ["eager", "mask", "folded", "flex"]


def _attention_inputs(batch=2, heads=3, height=5, width=7, head_dim=16):
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(batch, heads, height * width, head_dim, generator=generator) for _ in range(3))
    rel_pos_h = 0.5 * torch.randn(2 * height - 1, head_dim, generator=generator)
    rel_pos_w = 0.5 * torch.randn(2 * width - 1, head_dim, generator=generator)
    return q, k, v, rel_pos_h, rel_pos_w, (height, width)


def _segment_anything_attention(q, k, v, rel_pos_h, rel_pos_w, size):
    """segment-anything's own bias code on (B * heads, N, hd), then softmax and the value product."""
    batch, heads, n, head_dim = q.shape
    q3, k3, v3 = (x.reshape(batch * heads, n, head_dim) for x in (q, k, v))
    logits = (q3 * head_dim**-0.5) @ k3.transpose(-2, -1)
    logits = add_decomposed_rel_pos(logits, q3, rel_pos_h, rel_pos_w, size, size)
    return (logits.softmax(-1) @ v3).reshape(batch, heads, n, head_dim)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("inference", [False, True], ids=["autograd", "inference"])
def test_rel_pos_kernels_equal_segment_anything(kernel, inference):
    q, k, v, rel_pos_h, rel_pos_w, size = _attention_inputs()
    expected = _segment_anything_attention(q, k, v, rel_pos_h, rel_pos_w, size)
    rel_h, rel_w = decomposed_rel_pos(q, rel_pos_h, rel_pos_w, *size)
    with torch.inference_mode(inference):
        actual = attention.rel_pos_attention(q, k, v, rel_h, rel_w, scale=q.shape[-1] ** -0.5, kernel=kernel)
    assert actual.shape == expected.shape
    assert rel_err(actual, expected) < TOL


@pytest.mark.parametrize("kernel", KERNELS)
def test_rel_pos_kernel_gradients_equal_segment_anything(kernel):
    """Autograd through every kernel (flex on the CPU: its fallback, FlexAttention has no CPU backward), gradients of
    q, k, v and the two rel-pos tables against segment-anything's formula."""
    q, k, v, rel_pos_h, rel_pos_w, size = _attention_inputs()
    leaves = [t.requires_grad_() for t in (q, k, v, rel_pos_h, rel_pos_w)]
    theirs = [t.detach().clone().requires_grad_() for t in leaves]
    upstream = torch.randn(q.shape, generator=torch.Generator().manual_seed(2))
    rel_h, rel_w = decomposed_rel_pos(q, rel_pos_h, rel_pos_w, *size)
    actual = attention.rel_pos_attention(q, k, v, rel_h, rel_w, scale=q.shape[-1] ** -0.5, kernel=kernel)
    (actual * upstream).sum().backward()
    (_segment_anything_attention(*theirs, size) * upstream).sum().backward()
    for name, ours, reference in zip(("q", "k", "v", "rel_pos_h", "rel_pos_w"), leaves, theirs):
        assert rel_err(ours.grad, reference.grad) < TOL, name


def test_flex_kernel_exports_through_its_fallback():
    """torch.export sees the `mask` kernel's graph (FlexAttention's compiled kernel is not exportable) and the
    exported program equals segment-anything's formula."""
    q, k, v, rel_pos_h, rel_pos_w, size = _attention_inputs()
    rel_h, rel_w = decomposed_rel_pos(q, rel_pos_h, rel_pos_w, *size)

    class Attend(torch.nn.Module):
        def forward(self, q, k, v, rel_h, rel_w):
            return attention.rel_pos_attention(q, k, v, rel_h, rel_w, scale=q.shape[-1] ** -0.5, kernel="flex")

    program = torch.export.export(Attend(), (q, k, v, rel_h, rel_w))
    assert not [node for node in program.graph.nodes if "flex" in str(node.target)]
    expected = _segment_anything_attention(q, k, v, rel_pos_h, rel_pos_w, size)
    assert rel_err(program.module()(q, k, v, rel_h, rel_w), expected) < TOL


def test_every_default_kernel_is_registered():
    for device, regimes in attention.DEFAULT_REL_POS_KERNELS.items():
        assert [start for start, _ in regimes] == sorted({start for start, _ in regimes}), device
        assert regimes[0][0] == 0, device  # every call size has a default
        for start, name in regimes:
            assert name in attention.REL_POS_KERNELS, (device, name)
            assert attention.default_rel_pos_kernel(device, start) == name


# per block of (heads x rows), 3 heads x 35 rows in all: 1 x 1, 1 x 4 (ragged rows), 2 x 35 (ragged heads), all
@pytest.mark.parametrize("elements", [1, 2 * 35 * 4, 2 * 35 * 35 * 2, 10**9])
@pytest.mark.parametrize("inference", [False, True], ids=["autograd", "inference"])
def test_blocked_mask_at_every_block_shape(elements, inference):
    """Both the functional form (autograd, tracing) and the write-into-one-buffer form (inference)."""
    q, k, v, rel_pos_h, rel_pos_w, size = _attention_inputs()
    expected = _segment_anything_attention(q, k, v, rel_pos_h, rel_pos_w, size)
    rel_h, rel_w = decomposed_rel_pos(q, rel_pos_h, rel_pos_w, *size)
    with torch.inference_mode(inference):
        actual = attention.masked_rel_pos_attention(
            q, k, v, rel_h, rel_w, scale=q.shape[-1] ** -0.5, mask_block_elements=elements
        )
    assert rel_err(actual, expected) < TOL


# half precision on the CPU: the biased logits are rounded once to the half type (the only rounding the fp32 reference
# lacks besides the output's); logits up to ~10 here, so bf16's 8-bit mantissa moves a probability by up to ~3%
HALF_TOL = {torch.bfloat16: 3e-2, torch.float16: 5e-3}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("elements", [2 * 35 * 4, 2 * 35 * 35 * 2, None])  # ragged rows, ragged heads, one block
def test_half_precision_cpu_mask_kernel_equals_the_formula(dtype, elements):
    """The CPU's half-precision blocks (one baddbmm onto the mask, softmax on half logits) against the eager formula
    in float64 on the same half-precision inputs, and its gradients against float64 autograd."""
    q, k, v, rel_pos_h, rel_pos_w, size = _attention_inputs()
    inputs = [t.to(dtype).requires_grad_() for t in (q, k, v)]
    rel_h, rel_w = (t.detach().to(dtype).requires_grad_() for t in decomposed_rel_pos(q, rel_pos_h, rel_pos_w, *size))
    inputs += [rel_h, rel_w]
    reference = [t.detach().double().requires_grad_() for t in inputs]
    scale = q.shape[-1] ** -0.5
    actual = attention.masked_rel_pos_attention(*inputs, scale=scale, mask_block_elements=elements)
    expected = attention.eager_rel_pos_attention(*reference, scale=scale)
    assert actual.dtype == dtype
    assert rel_err(actual.double(), expected) < HALF_TOL[dtype]
    with torch.inference_mode():
        assert torch.equal(
            attention.masked_rel_pos_attention(*inputs, scale=scale, mask_block_elements=elements), actual
        )
    upstream = torch.randn(expected.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    actual.backward(upstream.to(dtype))
    expected.backward(upstream)
    for name, half, exact in zip(("q", "k", "v", "rel_h", "rel_w"), inputs, reference):
        assert rel_err(half.grad.double(), exact.grad) < 2 * HALF_TOL[dtype], name


def test_folded_kernel_runs_a_fused_sdpa_kernel():
    q, k, v, rel_pos_h, rel_pos_w, size = _attention_inputs()
    rel_h, rel_w = decomposed_rel_pos(q, rel_pos_h, rel_pos_w, *size)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        attention.folded_rel_pos_attention(q, k, v, rel_h, rel_w, scale=q.shape[-1] ** -0.5)
    names = {event.name for event in profile.events()}
    # q'/k' are wider than v; padding v keeps SDPA off the unfused math fallback
    assert "aten::_scaled_dot_product_attention_math" not in names, sorted(n for n in names if "attention" in n)


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("masked", [False, True])
def test_grouped_query_attention_equals_repeated_heads(implementation, masked):
    """6 query heads sharing 2 key/value heads, with a boolean mask, against plain SDPA on repeated K/V."""
    generator = torch.Generator().manual_seed(1)
    q = torch.randn(2, 6, 9, 8, generator=generator)
    k, v = (torch.randn(2, 2, 9, 8, generator=generator) for _ in range(2))
    mask = torch.rand(9, 9, generator=generator) > 0.3 if masked else None
    if mask is not None:
        mask.fill_diagonal_(True)
    expected = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(3, dim=1), v.repeat_interleave(3, dim=1), attn_mask=mask
    )
    actual = attention.attention(q, k, v, scale=8**-0.5, attn_mask=mask, implementation=implementation)
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
    with torch.no_grad():
        windows, padded = window_partition(block.norm1(x), window)
        hidden = x + window_unpartition(block.attn(windows), window, padded, x.shape[1:3])
        expected = hidden + block.mlp(block.norm2(hidden))
        actual = block(x)
    assert rel_err(actual, expected) < TOL


@pytest.mark.parametrize("kernel", ["mask", "folded"])
def test_batched_views_equal_one_at_a_time(kernel):
    model = random_model()
    model.set_attention_kernel(kernel)
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


@pytest.mark.parametrize("kernel", ["mask", "folded", "flex"])
def test_compile_has_no_graph_breaks_and_matches(kernel):
    model = random_model()
    model.set_attention_kernel(kernel)
    pixels = torch.randn(2, 3, 320, 256)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(model.encode_views)(pixels)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    compiled = torch.compile(model.encode_views, fullgraph=True, backend="aot_eager")
    with torch.inference_mode():
        expected = model.encode_views(pixels).image_embeds
        actual = compiled(pixels).image_embeds
    assert rel_err(actual, expected) < TOL


def test_bf16_weights_close_to_fp32():
    """Half-precision weights and inputs (interpolations in fp32): within 2e-2 of fp32."""
    model = random_model()
    pixels = torch.randn(1, 3, 320, 256)
    with torch.inference_mode():
        expected = model.encode_views(pixels).image_embeds
        actual = model.to(torch.bfloat16).encode_views(pixels.bfloat16()).image_embeds
    assert actual.dtype == torch.bfloat16
    assert rel_err(actual.float(), expected) < 2e-2


# ------------------------------------------------------------------------------------------------ invariants
HOOKED = [
    "sam.blocks.0.attn.qkv",
    "sam.blocks.0.attn.proj",
    "sam.blocks.0.mlp.lin1",
    "sam.blocks.0.mlp.act",
    "sam.blocks.0.mlp.lin2",
    "sam.blocks.0.attn",
    "sam.blocks.1.attn.qkv",
    "sam.blocks.1.mlp",
    "clip.transformer.layers.0",
    "clip.transformer.layers.0.self_attn",
    "clip.transformer.layers.1.mlp.fc1",
]


def _run_with_hooks(model, pixels, context):
    """Forward under `context`, recording each hooked module's output as the hook saw it (a clone) and the
    tensor itself (to check nothing wrote into it afterwards)."""
    seen = {}

    def record(name):
        def hook(module, args, output):
            seen.setdefault(name, (output, output.detach().clone()))  # the first call of each module

        return hook

    handles = [model.get_submodule(name).register_forward_hook(record(name)) for name in HOOKED]
    try:
        with context():
            out = model.encode_views(pixels).image_embeds
    finally:
        for handle in handles:
            handle.remove()
    return out, seen


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode], ids=["no_grad", "inference_mode"])
def test_hooks_see_the_same_values_with_and_without_autograd(context):
    model = random_model()
    pixels = torch.randn(1, 3, 320, 256)
    reference, reference_seen = _run_with_hooks(model, pixels, torch.enable_grad)
    out, seen = _run_with_hooks(model, pixels, context)
    assert sorted(seen) == sorted(HOOKED), "a hooked module was not called"
    for name in HOOKED:
        output, at_hook_time = seen[name]
        assert torch.equal(output, at_hook_time), f"{name}: its output was modified after the hook saw it"
        assert rel_err(at_hook_time, reference_seen[name][1]) < 1e-6, name
    assert rel_err(out, reference.detach()) < 1e-6


@pytest.mark.parametrize("kernel", ["mask", "folded"])
def test_bf16_autocast_is_the_same_with_and_without_grad(kernel):
    model = random_model()
    model.set_attention_kernel(kernel)
    pixels = torch.randn(1, 3, 320, 256)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with_grad = model.encode_views(pixels).image_embeds
        with torch.inference_mode():
            without_grad = model.encode_views(pixels).image_embeds
    assert with_grad.dtype == without_grad.dtype
    assert rel_err(without_grad.float(), with_grad.detach().float()) < 1e-6
    fp32 = model.encode_views(pixels).image_embeds.detach()
    assert rel_err(with_grad.detach().float(), fp32) < 3e-2  # and it is a bf16 approximation of the fp32 result


def test_kernel_choice_is_not_saved(tmp_path):
    model = random_model()
    model.set_attention_kernel("folded")
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert "rel_pos_attention" not in saved["sam_config"]
    assert "folded" not in json.dumps(saved)
    saved["sam_config"]["rel_pos_attention"] = "folded"  # a config written by an earlier version still loads
    (tmp_path / "config.json").write_text(json.dumps(saved))
    loaded = DeepEncoderModel.from_pretrained(tmp_path)
    assert all(m.kernel is None for m in loaded.modules() if hasattr(m, "kernel"))
    with pytest.raises(ValueError, match="unknown rel-pos kernel"):
        loaded.set_attention_kernel("flash-but-not-registered")


def test_position_tables_cached_per_size_and_refreshed_after_updates():
    """Inference reuses the resized/gathered position tables of a size; an in-place parameter update (an optimizer
    step), new weights or autograd recording make them be computed again, so outputs always match the parameters."""
    model = random_model()
    sam_attention = model.sam.blocks[1].attn  # a global block: its tables are resized to the grid
    pixels = torch.randn(1, 3, 320, 256)
    with torch.inference_mode():
        first = model.sam.position_embedding(20, 16)
        assert model.sam.position_embedding(20, 16) is first
        assert sam_attention.rel_pos_tables(20, 16)[0] is sam_attention.rel_pos_tables(20, 16)[0]
        assert model.sam.position_embedding(24, 16) is not first
        cached = model.encode_views(pixels).image_embeds
    with torch.no_grad():
        model.sam.pos_embed.mul_(-1)
        sam_attention.rel_pos_h.add_(0.5)
        model.clip.embeddings.position_embedding.weight.mul_(2)
        updated = model.encode_views(pixels).image_embeds
    with torch.enable_grad():  # computes every table afresh
        expected = model.encode_views(pixels).image_embeds.detach()
        assert model.sam.position_embedding(20, 16).requires_grad  # part of the graph, not a cached table
    assert rel_err(cached, expected) > 1e-2  # the updates change the output...
    assert rel_err(updated, expected) < 1e-6  # ...and the cached path sees them
    model.load_state_dict(random_model(seed=1).state_dict())
    with torch.inference_mode():
        reloaded = model.encode_views(pixels).image_embeds
    with torch.enable_grad():
        assert rel_err(reloaded, model.encode_views(pixels).image_embeds.detach()) < 1e-6
