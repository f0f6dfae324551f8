"""Model-side training support on tiny configs: gradient checkpointing, freezing, LoRA, hidden states, bf16."""

from __future__ import annotations

import pytest
import torch
from helpers import random_model, rel_err, tiny_config

from deepencoder import DeepEncoderModel
from deepencoder.training import LORA_TARGETS, apply_lora, merge_lora, trainable_summary


def _inputs(seed: int = 1):
    """Two pages: one untiled, one with a 2x1 tile grid (tiles 128 px), global views 128 px."""
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randn(2, 3, 128, 128, generator=generator)
    tiles = torch.randn(2, 3, 128, 128, generator=generator)
    return {"pixel_values": pixels, "pixel_values_tiles": tiles, "tile_grids": [(1, 1), (2, 1)]}


def _loss(model, inputs) -> torch.Tensor:
    out = model(**inputs)
    return sum((page.float() ** 2).mean() for page in out.image_embeds)


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def test_gradient_checkpointing_same_gradients():
    model = random_model().train()
    inputs = _inputs()
    _loss(model, inputs).backward()
    plain = _grads(model)
    model.zero_grad(set_to_none=True)

    calls = {"n": 0}
    model.sam.blocks[0].attn.register_forward_hook(lambda *args: calls.__setitem__("n", calls["n"] + 1))
    model.gradient_checkpointing_enable()
    assert model.sam.blocks[0].gradient_checkpointing and model.clip.transformer.layers[0].gradient_checkpointing
    _loss(model, inputs).backward()
    checkpointed = _grads(model)
    # 2 view batches (globals, tiles), each recomputed once in backward (the hook sits inside the block)
    assert calls["n"] == 4, calls
    assert plain.keys() == checkpointed.keys() and len(plain) == len(list(model.parameters()))
    worst = max((plain[k] - checkpointed[k]).abs().max().item() for k in plain)
    print(f"gradient checkpointing: max |grad difference| = {worst:.3e}")
    for name in plain:
        assert rel_err(checkpointed[name], plain[name]) <= 1e-6, name


def test_freeze_targets_and_summary():
    model = random_model()
    model.freeze("sam.blocks.0-1")
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {n for n, _ in model.named_parameters() if n.startswith(("sam.blocks.0.", "sam.blocks.1."))}
    model.unfreeze()
    model.freeze("sam", blocks=range(2))
    assert {n for n, p in model.named_parameters() if not p.requires_grad} == frozen
    model.unfreeze()
    model.freeze("projector")
    assert {n for n, p in model.named_parameters() if not p.requires_grad} == {
        "projector.weight",
        "projector.bias",
        "image_newline",
        "view_separator",
    }
    model.freeze("clip")
    model.unfreeze("clip.layers.1")
    assert all(
        p.requires_grad == n.startswith("clip.transformer.layers.1.")
        for n, p in model.named_parameters()
        if n.startswith("clip.")
    )
    model.unfreeze()
    model.freeze("sam.compressor", "sam.pos_embed")
    assert {n for n, p in model.named_parameters() if not p.requires_grad} == {
        "sam.net_2.weight",
        "sam.net_3.weight",
        "sam.pos_embed",
    }
    with pytest.raises(ValueError, match="matches no parameter"):
        model.freeze("sam.blocks.9")
    summary = model.trainable_summary()
    assert summary.total == sum(p.numel() for p in model.parameters())
    assert summary.trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert "sam.blocks" in str(summary)


def test_frozen_weights_bit_identical_after_adamw_steps():
    model = random_model().train()
    model.freeze("sam", "clip.layers.0")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    # every parameter handed to AdamW with weight decay: decay would move frozen weights if they got a grad
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    for seed in range(3):
        optimizer.zero_grad()
        _loss(model, _inputs(seed)).backward()
        optimizer.step()
    for name, param in model.named_parameters():
        frozen = name.startswith(("sam.", "clip.transformer.layers.0."))
        assert torch.equal(param, before[name]) == frozen, name


def test_lora_round_trip(tmp_path):
    from peft import PeftModel

    base = random_model()
    base.save_pretrained(tmp_path / "base")
    peft_model = apply_lora(base, ["sam", "clip"], r=4, alpha=8)
    config = base.config
    wrapped = [n for n, _ in peft_model.named_modules() if n.endswith("lora_A")]
    assert len(wrapped) == 4 * config.sam_config.num_hidden_layers + 4 * config.clip_config.num_hidden_layers
    assert trainable_summary(peft_model).rows[-1][0] == "lora"
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    peft_model.train()
    for seed in range(3):
        optimizer.zero_grad()
        _loss(peft_model, _inputs(seed)).backward()
        optimizer.step()
    peft_model.eval()
    inputs = _inputs(7)
    with torch.no_grad():
        expected = torch.cat(peft_model(**inputs).image_embeds)
        untouched = torch.cat(DeepEncoderModel.from_pretrained(tmp_path / "base")(**inputs).image_embeds)
    assert rel_err(untouched, expected) > 1e-3  # the adapters learned something
    peft_model.save_pretrained(tmp_path / "adapter")

    reloaded = PeftModel.from_pretrained(DeepEncoderModel.from_pretrained(tmp_path / "base"), tmp_path / "adapter")
    merge_lora(tmp_path / "base", tmp_path / "adapter", tmp_path / "merged")
    from transformers import AutoModel

    merged = AutoModel.from_pretrained(tmp_path / "merged")
    assert type(merged) is DeepEncoderModel and not any("lora" in k for k in merged.state_dict())
    with torch.no_grad():
        err_reload = rel_err(torch.cat(reloaded(**inputs).image_embeds), expected)
        err_merged = rel_err(torch.cat(merged(**inputs).image_embeds), expected)
    print(f"LoRA round trip: reload {err_reload:.2e}, merged {err_merged:.2e}")
    assert err_reload <= 1e-6
    assert err_merged <= 1e-5


def test_lora_targets_match_nested_tower():
    import re

    names = [
        "vision.base_model.model.sam.blocks.3.attn.qkv",
        "sam.blocks.0.mlp.lin2",
        "clip.transformer.layers.1.self_attn.out_proj",
        "vision.clip.transformer.layers.0.mlp.fc1",
    ]
    assert [bool(re.fullmatch(LORA_TARGETS["sam"], n)) for n in names] == [True, True, False, False]
    assert [bool(re.fullmatch(LORA_TARGETS["clip"], n)) for n in names] == [False, False, True, True]
    assert not re.fullmatch(LORA_TARGETS["all"], "sam.neck.0")


def test_hidden_states_through_forward():
    model = random_model()
    inputs = _inputs()
    out = model(**inputs, output_hidden_states=True, output_pre_projector=True)
    views = model.encode_views(inputs["pixel_values"], output_hidden_states=True)
    config = model.config
    assert len(out.sam_hidden_states) == config.sam_config.num_hidden_layers + 1
    assert len(out.clip_hidden_states) == config.clip_config.num_hidden_layers + 1
    assert out.sam_hidden_states[-1].shape == (2, 8, 8, config.sam_config.hidden_size)
    assert torch.equal(out.sam_hidden_states[-1], views.sam_hidden_states[-1])
    assert torch.equal(out.clip_hidden_states[-1], views.clip_hidden_states[-1])
    assert out.tile_sam_hidden_states[0].shape[0] == 2 and out.tile_clip_hidden_states[-1].shape == (2, 5, 64)
    assert out.pre_projector[0].shape == (4, config.join_dim)
    mixed = model([torch.randn(3, 128, 128), torch.randn(3, 192, 128)], output_hidden_states=True)
    assert isinstance(mixed.sam_hidden_states[0], list) and mixed.sam_hidden_states[-1][1].shape == (1, 12, 8, 64)
    assert model(**inputs).sam_hidden_states is None


def test_bf16_autocast_forward_backward():
    model = random_model(tiny_config()).train()
    inputs = _inputs()
    with torch.no_grad():
        reference = torch.cat(model(**inputs).image_embeds)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(**inputs).image_embeds
        loss = sum((page.float() ** 2).mean() for page in out)
    assert torch.cat(out).dtype == torch.bfloat16
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert rel_err(torch.cat(out).float(), reference) < 5e-2
