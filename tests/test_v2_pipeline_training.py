"""DeepEncoder V2 in the code around the tower: `deepencoder.pipeline.encode` in `ocr2` mode (manifest rows name the
tower, tensors equal the model's pages, pre-projector features are the encoder's query outputs), LoRA on the encoder
through PEFT, and `OcrVisionLanguageModel` with a V2 tower."""

from __future__ import annotations

import json

import torch
from fixtures.v2_support import make_page, tiny_config_kwargs
from helpers import randomize_, rel_err
from safetensors.torch import load_file

from deepencoder import DeepEncoderImageProcessor, DeepEncoderV2Config, DeepEncoderV2Model
from deepencoder.pipeline import encode, load_manifest


def tiny_v2(seed: int = 0) -> DeepEncoderV2Model:
    return randomize_(DeepEncoderV2Model(DeepEncoderV2Config(**tiny_config_kwargs())), seed).eval()


def test_encode_ocr2_pages(tmp_path):
    model = tiny_v2(seed=1)
    pages = {"letter.png": make_page("untiled"), "wide.png": make_page("tiles_2x1")}
    for name, page in pages.items():
        page.save(tmp_path / name)
    for features in ("projected", "pre-projector"):
        out = tmp_path / f"run-{features}"
        encode([str(tmp_path / n) for n in pages], out, model, "ocr2", batch_size=2, features=features, progress=False)
        rows = sorted(load_manifest(out), key=lambda row: row["document"])
        assert [row["tower"] for row in rows] == ["deepencoder_v2"] * 2
        assert [row["mode"] for row in rows] == ["ocr2"] * 2
        separator = 1 if features == "projected" else 0  # pre-projector: query outputs only
        assert [row["tokens"] for row in rows] == [256 + separator, 2 * 144 + 256 + separator]
        assert [row["grid"] for row in rows] == [[1, 1], [2, 1]]
        processor = DeepEncoderImageProcessor(mode="ocr2")
        for row, (_, page) in zip(rows, sorted(pages.items())):
            stored = load_file(str(out / row["output"]))[row["key"]]
            with torch.inference_mode():
                expected = model(**processor(page), output_pre_projector=True)
            if features == "projected":
                assert stored.shape == (row["tokens"], 48) and rel_err(stored, expected.image_embeds[0]) <= 1e-5
            else:  # the encoder's query outputs, tiles then global view
                assert stored.shape == (row["tokens"], 64) and rel_err(stored, expected.pre_projector[0]) <= 1e-5


def test_lora_on_the_encoder():
    from peft import LoraConfig, get_peft_model

    from deepencoder.training import LORA_TARGETS

    model = tiny_v2(seed=2)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS["encoder"]))
    adapted = {name.split(".lora_A")[0] for name, _ in peft_model.named_parameters() if ".lora_A" in name}
    layers = model.config.encoder_config.num_hidden_layers
    assert len(adapted) == 7 * layers
    assert all(".encoder.layers." in name for name in adapted)
    for name, param in peft_model.named_parameters():
        if ".lora_B" in name:
            torch.nn.init.normal_(param, std=0.02)
    pixels = torch.randn(1, 3, 768, 768, generator=torch.Generator().manual_seed(3))
    loss = peft_model(pixels).image_embeds[0].square().mean()
    loss.backward()
    grads = {name for name, p in peft_model.named_parameters() if p.grad is not None}
    assert grads and all("lora_" in name for name in grads)
    merged = peft_model.merge_and_unload()
    with torch.inference_mode():
        assert rel_err(merged(pixels).image_embeds[0], peft_model(pixels).image_embeds[0]) <= 1e-5


def test_ocr_vlm_with_a_v2_tower():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from deepencoder.training import OcrVisionLanguageModel

    tower = tiny_v2(seed=4)
    tower.freeze("sam")
    language_model = Qwen2ForCausalLM(
        Qwen2Config(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                    num_key_value_heads=1, vocab_size=50)
    )  # fmt: skip
    vlm = OcrVisionLanguageModel(tower, language_model)  # Linear connector: 48 -> 32
    inputs = DeepEncoderImageProcessor(mode="ocr2")(make_page("untiled"))
    input_ids = torch.tensor([[5, 6, 7, 8]])
    out = vlm(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **inputs)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert tower.encoder.queries["256"].grad is not None
    assert tower.sam.blocks[0].attn.qkv.weight.grad is None


def test_encode_command_takes_v2_weights_in_either_layout(tmp_path):
    """`deepencoder encode --weights <V2> --mode ocr2` from the command line: a save_pretrained directory, a
    DeepSeek-OCR-2-layout checkpoint and transformers' `DeepseekOcr2ForConditionalGeneration` saved in its own names
    all give a V2 tower (the tower class follows from the weights), with the stored tensors equal to the model's
    pages and a preview whose budget counts queries."""
    from fixtures.v2_support import to_deepseek_ocr2, transformers_ocr2
    from safetensors.torch import save_file

    from deepencoder.cli import main
    from deepencoder.pipeline.preview import budget_text

    model = tiny_v2(seed=4)
    model.save_pretrained(tmp_path / "v2-own")
    (tmp_path / "v2-deepseek").mkdir()
    save_file(to_deepseek_ocr2(model.state_dict()), str(tmp_path / "v2-deepseek" / "model.safetensors"))
    # a tiny encoder's head counts are stated, as a transformers DeepseekOcr2 config.json states them
    heads = {"num_attention_heads": 4, "num_key_value_heads": 2}
    (tmp_path / "v2-deepseek" / "config.json").write_text(json.dumps({"vision_config": {"encoder_config": heads}}))
    transformers_ocr2(model).save_pretrained(tmp_path / "v2-transformers", save_original_format=False)
    (tmp_path / "in").mkdir()
    page = make_page("tiles_2x1")
    page.save(tmp_path / "in" / "wide.png")
    processor = DeepEncoderImageProcessor(mode="ocr2")
    with torch.inference_mode():
        expected = model(**processor(page)).image_embeds[0]
    for name in ("v2-own", "v2-deepseek", "v2-transformers"):
        out = tmp_path / f"out-{name}"
        args = ["encode", str(tmp_path / "in"), "--weights", str(tmp_path / name), "--mode", "ocr2"]
        assert main([*args, "--out", str(out), "--preview", str(tmp_path / f"preview-{name}")]) == 0
        (row,) = load_manifest(out)
        assert row["tower"] == "deepencoder_v2" and row["tokens"] == 2 * 144 + 256 + 1
        assert rel_err(load_file(str(out / row["output"]))[row["key"]], expected) <= 1e-5
        assert (tmp_path / f"preview-{name}" / row["document"] / "page.0.png").is_file()
    plan = processor.plan(*page.size)
    assert budget_text(plan, processor) == (
        "ocr2: 545 tokens | global 1024x1024 = 256 queries | tiles 2x1 of 768px = 288 queries | + 1 separator"
    )
