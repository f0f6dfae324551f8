"""deepencoder.integrations.transformers on DeepSeek-OCR-2: `DeepEncoderV2Model` inside transformers'
`DeepseekOcr2*` models. References: transformers' own stock vision path, processor and `generate` on the same
parameters."""

from __future__ import annotations

import pytest
import torch
from helpers import randomize_, rel_err
from PIL import Image
from safetensors.torch import load_file
from test_integrations_transformers import (
    CHAT_TEMPLATE,
    TINY_TEXT,
    TINY_VISION,
    check_attached_training_matches_stock,
    check_lora_on_the_model_acts_on_the_attached_tower,
    load_example,
    local_tokenizer,
    noise_page,
    ocr_model,
)
from transformers import (
    DeepseekOcr2Config,
    DeepseekOcr2ForConditionalGeneration,
    DeepseekOcr2ImageProcessor,
    DeepseekOcr2Model,
    DeepseekOcr2Processor,
)
from transformers.models.deepseek_ocr2.image_processing_pil_deepseek_ocr2 import DeepseekOcr2ImageProcessorPil

from deepencoder import DeepEncoderImageProcessor, DeepEncoderModel
from deepencoder.integrations import attach, detach, from_transformers, image_processor_from_transformers, is_attached
from deepencoder.modeling_deepencoder_v2 import DeepEncoderV2Model

# real view sizes (1024 px global view, 768 px tiles: the query tables are 256 and 144), a narrow trunk
TINY_VISION_V2 = dict(
    sam_config=dict(
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=2,
        global_attn_indexes=[1],
        window_size=7,
        output_channels=16,
        downsample_channels=[24, 128],
    ),
    encoder_config=dict(
        hidden_size=128, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1
    ),
)
# DeepSeek-OCR-2's encoder (Qwen2-0.5B's decoder stack); transformers' config defaults are not it
QWEN2_0_5B = dict(
    hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2
)
# untiled (no side above 768), 2 x 1 tiles, 1 x 2 tiles
PAGES_V2 = [(700, 500), (1500, 800), (800, 1500)]


def ocr2_model(seed: int = 0) -> DeepseekOcr2ForConditionalGeneration:
    tokenizer = local_tokenizer()
    config = DeepseekOcr2Config(
        vision_config=TINY_VISION_V2,
        text_config={**TINY_TEXT, "vocab_size": len(tokenizer)},
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
    )
    config.text_config.eos_token_id = tokenizer.eos_token_id
    config.text_config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(seed)
    model = DeepseekOcr2ForConditionalGeneration(config).eval()
    for part in (model.model.vision_tower, model.model.multi_modal_projector):
        randomize_(part, seed=seed)
    with torch.no_grad():
        model.model.view_separator.normal_(std=0.5)
    return model


@pytest.fixture(scope="module")
def tiny_v2():
    processor = DeepseekOcr2Processor(image_processor=DeepseekOcr2ImageProcessor(), tokenizer=local_tokenizer())
    pages = [noise_page(w, h, seed) for seed, (w, h) in enumerate(PAGES_V2)]
    inputs = processor(images=pages, text=["<image>\nFree OCR ."] * len(pages), return_tensors="pt", padding=True)
    return ocr2_model(), inputs


def vision_inputs(inputs) -> dict:
    return {k: inputs[k] for k in ("pixel_values", "pixel_values_local", "num_local_patches")}


def test_v2_attached_features_and_generate_equal_stock(tiny_v2):
    model, inputs = tiny_v2
    assert list(inputs["num_local_patches"]) == [0, 2, 2]
    settings = dict(do_sample=False, max_new_tokens=5, min_new_tokens=5)
    with torch.no_grad():
        stock = model.get_image_features(**vision_inputs(inputs), output_hidden_states=True)
        stock_ids = model.generate(**inputs, **settings)
        tower = attach(model)
        assert isinstance(tower, DeepEncoderV2Model)
        ran = []
        tower.sam.patch_embed.register_forward_hook(lambda *args: ran.append(1))
        ours = model.get_image_features(**vision_inputs(inputs), output_hidden_states=True)
        ours_ids = model.generate(**inputs, **settings)
        detach(model)
        again = model.get_image_features(**vision_inputs(inputs))
    assert ran == [1, 1, 1, 1]  # globals and tiles, twice: the tower computed them
    assert torch.equal(ours_ids, stock_ids)
    assert [p.shape[0] for p in ours.pooler_output] == [257, 257 + 288, 257 + 288]
    for page_ours, page_stock, page_again in zip(ours.pooler_output, stock.pooler_output, again.pooler_output):
        assert rel_err(page_ours, page_stock) < 1e-5
        assert torch.equal(page_again, page_stock)
    assert rel_err(ours.last_hidden_state, stock.last_hidden_state) < 1e-5
    assert rel_err(ours.local_last_hidden_state, stock.local_last_hidden_state) < 1e-5
    assert len(ours.hidden_states) == len(stock.hidden_states) == 3  # input, layer 1, final norm over all tokens
    for state_ours, state_stock in zip(ours.hidden_states, stock.hidden_states):
        assert rel_err(state_ours, state_stock) < 1e-5


def test_v2_attach_shares_every_parameter_and_keeps_the_saved_state_dict(tiny_v2, tmp_path):
    model, _ = tiny_v2
    model.save_pretrained(tmp_path / "before")
    tower = attach(model)
    try:
        model.save_pretrained(tmp_path / "after")
        inner = model.model
        theirs = [*inner.vision_tower.parameters(), *inner.multi_modal_projector.parameters(), inner.view_separator]
        ours = list(tower.parameters())
        assert len(ours) == len(theirs)
        assert {p.data_ptr() for p in ours} == {p.data_ptr() for p in theirs}
        assert {id(p) for p in ours} == {id(p) for p in theirs}
        assert tower.encoder.queries["144"].data_ptr() == inner.vision_tower.query_768_resolution.weight.data_ptr()
    finally:
        detach(model)
    before = load_file(tmp_path / "before" / "model.safetensors")
    after = load_file(tmp_path / "after" / "model.safetensors")
    assert before.keys() == after.keys()
    assert all(torch.equal(before[key], after[key]) for key in before)


def test_v2_from_transformers_standalone_tower_matches_stock(tiny_v2, tmp_path):
    model, inputs = tiny_v2
    tower = DeepEncoderV2Model.from_transformers(model)
    assert type(tower) is DeepEncoderV2Model
    assert not is_attached(model)
    inner = model.model
    theirs = [*inner.vision_tower.parameters(), *inner.multi_modal_projector.parameters(), inner.view_separator]
    assert {id(p) for p in tower.parameters()} == {id(p) for p in theirs}
    assert type(from_transformers(model.model)) is DeepEncoderV2Model  # the family-blind function picks V2
    tower.save_pretrained(tmp_path)
    loaded = DeepEncoderV2Model.from_pretrained(tmp_path).eval()
    grids = [[1, 1], [2, 1], [1, 2]]
    with torch.no_grad():
        stock = model.get_image_features(**vision_inputs(inputs)).pooler_output
        out = loaded(
            pixel_values=inputs["pixel_values"], pixel_values_tiles=inputs["pixel_values_local"], tile_grids=grids
        ).image_embeds
    for page_ours, page_stock in zip(out, stock):
        assert rel_err(page_ours, page_stock) < 1e-5


def test_from_transformers_classmethods_refuse_the_other_family_and_other_models(tiny_v2):
    v2_model, _ = tiny_v2
    v1_model = ocr_model(TINY_VISION)
    with pytest.raises(TypeError, match=r"use DeepEncoderV2Model\.from_transformers"):
        DeepEncoderModel.from_transformers(v2_model)
    with pytest.raises(TypeError, match=r"use DeepEncoderModel\.from_transformers"):
        DeepEncoderV2Model.from_transformers(v1_model.model)
    with pytest.raises(TypeError, match="UnlimitedOcrForConditionalGeneration"):
        DeepEncoderModel.from_transformers(torch.nn.Linear(2, 2))


def test_v2_training_through_the_attached_tower_gives_the_stock_gradients(tiny_v2):
    check_attached_training_matches_stock(*tiny_v2)


def test_v2_lora_on_transformers_modules_acts_on_the_attached_tower(tiny_v2):
    check_lora_on_the_model_acts_on_the_attached_tower(
        *tiny_v2, r".*(sam_encoder.*attn\.qkv|vision_encoder.*\.(q_proj|down_proj)|multi_modal_projector)"
    )


# DeepSeek-OCR-2 pages across the 768 px tiling threshold, tall, wide, and aspect-ratio ties (1600 x 1280: 1.25 lies
# halfway between the 2 x 2 and 3 x 2 grids)
SWEEP_V2 = [(600, 400), (768, 768), (769, 500), (700, 700), (1000, 1000), (1600, 1280), (1500, 1200), (2000, 900)]


@pytest.mark.parametrize("backend", [DeepseekOcr2ImageProcessor, DeepseekOcr2ImageProcessorPil])
def test_v2_token_counts_match_what_transformers_lays_out(backend):
    """Our `ocr2` counts equal the features transformers' `DeepseekOcr2Model` lays out for what its processors make
    (both backends): a global view of 256 queries + 1 separator, 144 per tile; the sweep holds the 768 px threshold
    and aspect ties, where transformers 5.23-5.24's count helper (not what its processors make) was wrong."""
    inputs = backend()([Image.new("RGB", size, "white") for size in SWEEP_V2], return_tensors="pt")
    with torch.device("meta"):
        model = DeepseekOcr2Model(
            DeepseekOcr2Config(vision_config={"encoder_config": QWEN2_0_5B}, text_config={**TINY_TEXT, "vocab_size": 8})
        )
    made = [1 + int(n) for n in inputs["num_local_patches"]]
    meta = {k: v.to("meta") for k, v in inputs.items() if k.startswith("pixel_values")}
    meta["num_local_patches"] = [int(n) for n in inputs["num_local_patches"]]
    counts = [page.shape[0] for page in model.get_image_features(**meta).pooler_output]
    ours = DeepEncoderImageProcessor(mode="ocr2")
    assert [ours.num_image_tokens(w, h) for w, h in SWEEP_V2] == counts
    matched = image_processor_from_transformers(backend())
    assert matched.mode == "ocr2"
    assert [matched.num_image_tokens(w, h) for w, h in SWEEP_V2] == counts
    assert made[0] == 1 and made[5] == 7  # 600 x 400 untiled (no side above 768); 1600 x 1280: the 768 px tie-break
    assert [1 + 144 * (n - 1) + 256 for n in made] == counts  # what the processor makes is what the model lays out


@pytest.mark.slow
def test_v2_full_size_vision_generates_the_same_tokens_attached():
    """DeepSeek-OCR-2's full-size vision (SAM ViT-B + the Qwen2-0.5B encoder, random weights), tiny random language
    model; a batch of the three pages (untiled, 2 x 1, 1 x 2) through transformers' processor at its defaults (1024
    px global views with 256 queries, 768 px tiles with 144); greedy `generate` with the stock vision path and with
    the tower attached. The prefill logits are the language model's prefill hidden states of that same `generate`
    call through `lm_head` (every real position, not only the last)."""
    tokenizer = local_tokenizer()
    config = DeepseekOcr2Config(
        vision_config={"encoder_config": QWEN2_0_5B},
        text_config={**TINY_TEXT, "vocab_size": len(tokenizer)},
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
    )
    config.text_config.eos_token_id = tokenizer.eos_token_id
    config.text_config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(0)
    model = DeepseekOcr2ForConditionalGeneration(config).eval()
    for part in (model.model.vision_tower, model.model.multi_modal_projector):
        randomize_(part, seed=0, std=0.02)
    with torch.no_grad():
        model.model.view_separator.normal_(std=0.5)
    processor = DeepseekOcr2Processor(image_processor=DeepseekOcr2ImageProcessor(), tokenizer=tokenizer)
    pages = [noise_page(w, h, seed) for seed, (w, h) in enumerate(PAGES_V2)]
    inputs = processor(images=pages, text=["<image>\nFree OCR ."] * len(pages), return_tensors="pt", padding=True)
    assert tuple(inputs["pixel_values"].shape) == (3, 3, 1024, 1024)
    assert tuple(inputs["pixel_values_local"].shape) == (4, 3, 768, 768)
    assert list(inputs["num_local_patches"]) == [0, 2, 2]

    prefill = []
    model.model.language_model.register_forward_hook(
        lambda module, args, output: (
            prefill.append(output.last_hidden_state) if output.last_hidden_state.shape[1] > 1 else None
        )
    )
    settings = dict(do_sample=False, max_new_tokens=5, min_new_tokens=5)
    with torch.no_grad():
        stock_ids = model.generate(**inputs, **settings)
        tower = attach(model)
        ran = []
        tower.encoder.norm.register_forward_hook(lambda *args: ran.append(1))
        ours_ids = model.generate(**inputs, **settings)
        detach(model)
        stock_logits, ours_logits = (model.lm_head(hidden) for hidden in prefill)
    assert len(prefill) == 2 and ran == [1, 1]  # global views, then tiles: the tower computed them
    assert torch.equal(ours_ids, stock_ids)
    real = inputs["attention_mask"].bool()
    assert rel_err(ours_logits[real], stock_logits[real]) < 1e-4


def test_v2_example_transcribes_with_the_tower_attached(tiny_v2, tmp_path, monkeypatch, capsys):
    model, _ = tiny_v2
    model.save_pretrained(tmp_path / "ckpt")
    processor = DeepseekOcr2Processor(
        image_processor=DeepseekOcr2ImageProcessor(), tokenizer=local_tokenizer(), chat_template=CHAT_TEMPLATE
    )
    processor.save_pretrained(tmp_path / "ckpt")
    page = tmp_path / "page.png"
    noise_page(*PAGES_V2[1], seed=1).save(page)
    example = load_example(monkeypatch)
    args = [str(page), "--model", str(tmp_path / "ckpt"), "--max-new-tokens", "4", "--compare", "--device", "cpu"]
    runs = example.main(args)
    assert runs["deepencoder"][0].token_ids == runs["transformers"][0].token_ids
    assert "identical token ids" in capsys.readouterr().out
