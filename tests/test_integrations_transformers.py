"""deepencoder.integrations.transformers: this library's tower inside transformers' `UnlimitedOcr*` models.

References are transformers' own classes on the same parameters: its stock vision path (`get_image_features`
before `attach` / after `detach`), its processor and its `generate`."""

from __future__ import annotations

import copy
import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from helpers import randomize_, rel_err
from PIL import Image
from safetensors.torch import load_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    PreTrainedTokenizerFast,
    UnlimitedOcrConfig,
    UnlimitedOcrForConditionalGeneration,
    UnlimitedOcrImageProcessor,
    UnlimitedOcrModel,
    UnlimitedOcrProcessor,
)

from deepencoder import DeepEncoderImageProcessor, DeepEncoderModel
from deepencoder.integrations import attach, detach, from_transformers, image_processor_from_transformers, is_attached

ROOT = Path(__file__).resolve().parents[1]
WORDS = ["Free", "OCR", ".", "document", "parsing"] + [f"w{i}" for i in range(59)]
TINY_VISION = dict(
    sam_config=dict(
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=2,
        global_attn_indexes=[1],
        window_size=5,
        image_size=256,
        output_channels=16,
        downsample_channels=[24, 48],
        mlp_dim=64,
    ),
    encoder_config=dict(
        hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, image_size=56, patch_size=14
    ),
)
TINY_TEXT = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    n_routed_experts=4,
    num_experts_per_tok=2,
    moe_intermediate_size=32,
    n_shared_experts=1,
    mlp_layer_types=["dense", "sparse"],
)
CHAT_TEMPLATE = (
    "{% for message in messages %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<image>\n{% else %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endfor %}"
)


def local_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer built here (no hub): specials, `<image>`, a few words."""
    specials = ["<pad>", "<s>", "</s>", "<unk>", "<image>"]
    vocab = {word: index for index, word in enumerate(specials + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split("<image>", "isolated"), pre_tokenizers.WhitespaceSplit()]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_special_tokens={"image_token": "<image>"},
    )
    tokenizer.padding_side = "left"
    return tokenizer


def local_processor(size: int, tile_size: int, max_patches: int = 9) -> UnlimitedOcrProcessor:
    image_processor = UnlimitedOcrImageProcessor(
        size={"height": size, "width": size}, tile_size=tile_size, max_patches=max_patches
    )
    return UnlimitedOcrProcessor(
        image_processor=image_processor, tokenizer=local_tokenizer(), chat_template=CHAT_TEMPLATE
    )


def ocr_model(vision: dict | None, seed: int = 0) -> UnlimitedOcrForConditionalGeneration:
    """transformers' OCR model with the given vision config (None: the full-size default) and a tiny random language
    model over `local_tokenizer`'s vocabulary; every vision parameter random (rel-pos and pos-embed included, which
    transformers initialises to zeros)."""
    tokenizer = local_tokenizer()
    config = UnlimitedOcrConfig(
        vision_config=vision,
        text_config={**TINY_TEXT, "vocab_size": len(tokenizer)},
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
    )
    config.text_config.eos_token_id = tokenizer.eos_token_id
    config.text_config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(seed)
    model = UnlimitedOcrForConditionalGeneration(config).eval()
    inner = model.model
    for part in (inner.vision_tower, inner.multi_modal_projector):
        randomize_(part, seed=seed)
    with torch.no_grad():
        inner.image_newline.normal_(std=0.5)
        inner.view_separator.normal_(std=0.5)
    return model


def noise_page(width: int, height: int, seed: int) -> Image.Image:
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (height, width, 3), generator=generator, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


# three pages for a 384 px global view and 256 px tiles: untiled, 2 x 1 tiles, 1 x 2 tiles
PAGES = [(240, 200), (500, 260), (260, 470)]


@pytest.fixture(scope="module")
def tiny():
    processor = local_processor(384, 256)
    pages = [noise_page(w, h, seed) for seed, (w, h) in enumerate(PAGES)]
    inputs = processor(images=pages, text=["<image>\nFree OCR ."] * len(pages), return_tensors="pt", padding=True)
    return ocr_model(TINY_VISION), inputs


def vision_inputs(inputs) -> dict:
    return {k: inputs[k] for k in ("pixel_values", "pixel_values_local", "num_local_patches", "patches_grid")}


def test_processor_pages_cover_untiled_and_two_grids(tiny):
    _, inputs = tiny
    assert inputs["patches_grid"] == [[1, 1], [2, 1], [1, 2]]
    assert inputs["num_local_patches"] == [0, 2, 2]


def test_attached_features_equal_stock_and_detach_restores(tiny):
    model, inputs = tiny
    with torch.no_grad():
        stock = model.get_image_features(**vision_inputs(inputs), output_hidden_states=True)
        tower = attach(model)
        ran = []
        handle = tower.sam.patch_embed.register_forward_hook(lambda *args: ran.append(1))
        ours = model.get_image_features(**vision_inputs(inputs), output_hidden_states=True)
        handle.remove()
        assert ran == [1, 1]  # globals, then tiles: the tower computed them
        assert attach(model) is tower
        detach(model)
        assert not is_attached(model)
        again = model.get_image_features(**vision_inputs(inputs))
    assert [p.shape for p in ours.pooler_output] == [p.shape for p in stock.pooler_output]
    for page_ours, page_stock, page_again in zip(ours.pooler_output, stock.pooler_output, again.pooler_output):
        assert rel_err(page_ours, page_stock) < 1e-5
        assert torch.equal(page_again, page_stock)
    assert rel_err(ours.last_hidden_state, stock.last_hidden_state) < 1e-5
    assert rel_err(ours.local_last_hidden_state, stock.local_last_hidden_state) < 1e-5
    assert len(ours.hidden_states) == len(stock.hidden_states)
    for state_ours, state_stock in zip(ours.hidden_states, stock.hidden_states):
        assert rel_err(state_ours, state_stock) < 1e-5


def test_attach_shares_every_parameter_and_keeps_the_saved_state_dict(tiny, tmp_path):
    model, _ = tiny
    model.save_pretrained(tmp_path / "before")
    tower = attach(model)
    try:
        model.save_pretrained(tmp_path / "after")
        inner = model.model
        theirs = [*inner.vision_tower.parameters(), *inner.multi_modal_projector.parameters()]
        theirs += [inner.image_newline, inner.view_separator]
        ours = list(tower.parameters())
        assert len(ours) == len(theirs)
        assert {p.data_ptr() for p in ours} == {p.data_ptr() for p in theirs}
        assert {id(p) for p in ours} == {id(p) for p in theirs}  # the same objects: moves and loads reach both
        qkv = tower.clip.transformer.layers[0].self_attn.qkv_proj
        hf_attn = inner.vision_tower.vision_encoder.encoder.layers[0].self_attn
        assert qkv.query is hf_attn.q_proj and qkv.query.weight.data_ptr() == hf_attn.q_proj.weight.data_ptr()
        assert tower.sam.blocks[1].attn.rel_pos_h.data_ptr() == (
            inner.vision_tower.sam_encoder.layers[1].attn.rel_pos_h.data_ptr()
        )
    finally:
        detach(model)
    before = load_file(tmp_path / "before" / "model.safetensors")
    after = load_file(tmp_path / "after" / "model.safetensors")
    assert before.keys() == after.keys()
    assert all(torch.equal(before[key], after[key]) for key in before)


def test_replaced_parameters_rebuild_the_tower(tiny):
    model, inputs = tiny
    state = {k: v.clone() * 1.5 for k, v in model.state_dict().items()}
    fresh = ocr_model(TINY_VISION)
    tower = attach(fresh)
    try:
        fresh.load_state_dict(state, assign=True)  # new Parameter objects: the old tower no longer matches
        with torch.no_grad():
            ours = fresh.get_image_features(**vision_inputs(inputs)).pooler_output
            rebuilt = attach(fresh)
            detach(fresh)
            stock = fresh.get_image_features(**vision_inputs(inputs)).pooler_output
    finally:
        detach(fresh)
    assert rebuilt is not tower
    assert rebuilt.projector.weight is fresh.model.multi_modal_projector.weight
    for page_ours, page_stock in zip(ours, stock):
        assert rel_err(page_ours, page_stock) < 1e-5


def test_from_transformers_gives_a_standalone_tower_that_saves_as_deepencoder(tiny, tmp_path):
    model, inputs = tiny
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    tower = DeepEncoderModel.from_transformers(model)
    assert type(tower) is DeepEncoderModel
    assert not is_attached(model)
    inner = model.model
    theirs = [*inner.vision_tower.parameters(), *inner.multi_modal_projector.parameters()]
    theirs += [inner.image_newline, inner.view_separator]
    assert {p.data_ptr() for p in tower.parameters()} == {p.data_ptr() for p in theirs}
    assert tower.projector.weight is inner.multi_modal_projector.weight
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    tower.save_pretrained(tmp_path)
    loaded = DeepEncoderModel.from_pretrained(tmp_path).eval()
    assert set(loaded.state_dict()) == set(tower.state_dict())
    hf_attn = model.model.vision_tower.vision_encoder.encoder.layers[1].self_attn
    fused = loaded.clip.transformer.layers[1].self_attn.qkv_proj.weight
    assert torch.equal(fused, torch.cat([hf_attn.q_proj.weight, hf_attn.k_proj.weight, hf_attn.v_proj.weight]))
    with torch.no_grad():
        stock = model.get_image_features(**vision_inputs(inputs)).pooler_output
        out = loaded(
            pixel_values=inputs["pixel_values"],
            pixel_values_tiles=inputs["pixel_values_local"],
            tile_grids=inputs["patches_grid"],
        ).image_embeds
    for page_ours, page_stock in zip(out, stock):
        assert rel_err(page_ours, page_stock) < 1e-5


def test_loading_a_deepencoder_state_dict_into_the_shared_tower_writes_transformers_parameters(tiny):
    model, _ = tiny
    fresh = ocr_model(TINY_VISION, seed=1)
    tower = from_transformers(fresh)
    tower.load_state_dict(from_transformers(model).state_dict())
    with torch.no_grad():
        for (name, theirs), mine in zip(model.model.named_parameters(), fresh.model.parameters()):
            if "language_model" not in name:
                assert torch.equal(theirs, mine), name


# ------------------------------------------------------------------------------------------------ training
def loss_gradients(model, inputs) -> dict[str, torch.Tensor]:
    """Every parameter's gradient of the language-model loss over the real prompt tokens."""
    model.zero_grad(set_to_none=True)
    labels = inputs["input_ids"].masked_fill(~inputs["attention_mask"].bool(), -100)
    model(**inputs, labels=labels).loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def check_attached_training_matches_stock(model, inputs) -> None:
    """Fine-tuning transformers' model with the tower attached: the same gradients for every parameter (vision,
    projector, layout embeddings, language model) as the stock path, in train mode and with transformers' gradient
    checkpointing switched on (which the tower, outside the module tree, follows)."""
    model.train()
    try:
        stock = loss_gradients(model, inputs)
        tower = attach(model)
        ours = loss_gradients(model, inputs)
        assert tower.training
        model.activation_checkpointing_enable()
        checkpointed = loss_gradients(model, inputs)
        assert tower.is_activation_checkpointing
        model.activation_checkpointing_disable()
        loss_gradients(model, inputs)
        assert not tower.is_activation_checkpointing
    finally:
        detach(model)
        model.activation_checkpointing_disable()
        model.zero_grad(set_to_none=True)
        model.eval()
    for part in ("sam_encoder.layers.0.attn.rel_pos_h", "vision_encoder", "multi_modal_projector", "view_separator"):
        assert any(part in name for name in stock), part
    assert stock.keys() == ours.keys() == checkpointed.keys()
    for name in stock:
        assert rel_err(ours[name], stock[name]) < 1e-4, name
        assert rel_err(checkpointed[name], stock[name]) < 1e-4, name


def test_training_through_the_attached_tower_gives_the_stock_gradients(tiny):
    check_attached_training_matches_stock(*tiny)


def check_lora_on_the_model_acts_on_the_attached_tower(model, inputs, targets: str) -> None:
    """PEFT LoRA on transformers' own vision modules (adapters with non-zero weights), the tower attached through
    the `PeftModel`: image features and every adapter's gradient equal the stock path's; with the adapters disabled
    the attached path follows; after `merge_and_unload` the tower is rebuilt on the plain model."""
    from peft import LoraConfig, get_peft_model

    model = copy.deepcopy(model)  # the fixture's model stays as it was
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=targets, init_lora_weights=False))
    inner = peft_model.get_base_model().model
    views = {
        k: inputs[k] for k in ("pixel_values", "pixel_values_local", "num_local_patches", "patches_grid") if k in inputs
    }

    def adapter_gradients() -> dict[str, torch.Tensor]:
        grads = loss_gradients(peft_model, inputs)
        return {name: grad for name, grad in grads.items() if "lora_" in name}

    def features() -> list[torch.Tensor]:
        with torch.no_grad():
            return inner.get_image_features(**views).pooler_output

    stock, stock_grads = features(), adapter_gradients()
    with peft_model.disable_adapter():
        stock_plain = features()
    tower = attach(peft_model)
    try:
        assert sum("lora_" in name for name, _ in tower.named_parameters()) > 0
        ours, ours_grads = features(), adapter_gradients()
        with peft_model.disable_adapter():
            ours_plain = features()
        merged = peft_model.merge_and_unload()
        assert is_attached(merged)
        ours_merged = features()
        assert not any("lora_" in name for name, _ in attach(merged).named_parameters())
    finally:
        detach(model)
    assert any("sam_encoder" in name for name in stock_grads) and any("vision_encoder" in name for name in stock_grads)
    assert stock_grads.keys() == ours_grads.keys()
    for name in stock_grads:
        assert rel_err(ours_grads[name], stock_grads[name]) < 1e-4, name
    for page_stock, page_ours, page_plain, page_ours_plain, page_merged in zip(
        stock, ours, stock_plain, ours_plain, ours_merged
    ):
        assert rel_err(page_ours, page_stock) < 1e-5
        assert rel_err(page_ours_plain, page_plain) < 1e-5
        assert rel_err(page_merged, page_stock) < 1e-5
        assert rel_err(page_plain, page_stock) > 1e-3  # the adapters change the features: the checks above can fail


def test_lora_on_transformers_modules_acts_on_the_attached_tower(tiny):
    check_lora_on_the_model_acts_on_the_attached_tower(
        *tiny, r".*(sam_encoder.*attn\.qkv|vision_encoder.*\.(q_proj|v_proj)|multi_modal_projector)"
    )


# ------------------------------------------------------------------------------------------------ token counts
# transformers' processor settings for each of our modes: global view side, tiling, tile side
HF_SETTINGS = {
    "tiny": dict(size=512, crop_to_patches=False),
    "small": dict(size=640, crop_to_patches=False),
    "base": dict(size=1024, crop_to_patches=False),
    "large": dict(size=1280, crop_to_patches=False),
    "gundam": dict(size=1024, crop_to_patches=True, tile_size=640, max_patches=9),
    "gundam-m": dict(size=1280, crop_to_patches=True, tile_size=1024, max_patches=9),
}
SWEEP = [
    (300, 200),
    (640, 640),
    (641, 640),
    (640, 1300),
    (1000, 1000),
    (1024, 1025),
    (1280, 960),
    (1700, 800),
    (2000, 2000),
    (600, 2500),
    (3000, 450),
    (2300, 1000),
]


def laid_out_counts(image_processor: UnlimitedOcrImageProcessor, sizes) -> tuple[list[int], list]:
    """Per page, the number of image features transformers' `UnlimitedOcrModel.get_image_features` lays out (run
    on the meta device: shapes without arithmetic), and the tile grids of transformers' processor."""
    inputs = image_processor([Image.new("RGB", size, "white") for size in sizes], return_tensors="pt")
    with torch.device("meta"):
        model = UnlimitedOcrModel(UnlimitedOcrConfig(text_config={**TINY_TEXT, "vocab_size": 8}))
    meta = {k: v.to("meta") if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    features = model.get_image_features(**meta).pooler_output
    return [page.shape[0] for page in features], inputs["patches_grid"]


@pytest.mark.parametrize("mode", sorted(HF_SETTINGS))
def test_token_counts_match_what_transformers_lays_out(mode):
    settings = dict(HF_SETTINGS[mode])
    side = settings.pop("size")
    hf_processor = UnlimitedOcrImageProcessor(size={"height": side, "width": side}, **settings)
    counts, grids = laid_out_counts(hf_processor, SWEEP)
    ours = DeepEncoderImageProcessor(mode=mode)
    assert [ours.num_image_tokens(w, h) for w, h in SWEEP] == counts
    assert [list(ours.plan(w, h).tile_grid) for w, h in SWEEP] == grids
    assert image_processor_from_transformers(hf_processor).mode == mode


def test_token_counts_match_unlimited_ocr_default_processor():
    """Unlimited-OCR's own processor defaults: Gundam's views with up to 32 tiles."""
    hf_processor = UnlimitedOcrImageProcessor()
    counts, _ = laid_out_counts(hf_processor, SWEEP)
    ours = image_processor_from_transformers(hf_processor)
    assert (ours.mode, ours.max_crops) == ("gundam", 32)
    assert [ours.num_image_tokens(w, h) for w, h in SWEEP] == counts


# ------------------------------------------------------------------------------------------------ example script
def load_example(monkeypatch):
    """examples/ocr_with_transformers.py as a module (its `main` is called in-process)."""
    spec = importlib.util.spec_from_file_location("ocr_example", ROOT / "examples" / "ocr_with_transformers.py")
    example = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, example)  # its dataclasses look their module up
    spec.loader.exec_module(example)
    return example


def test_example_transcribes_with_the_tower_attached(tiny, tmp_path, capsys, monkeypatch):
    model, _ = tiny
    model.save_pretrained(tmp_path / "ckpt")
    local_processor(384, 256).save_pretrained(tmp_path / "ckpt")
    page = tmp_path / "page.png"
    noise_page(*PAGES[1], seed=1).save(page)
    example = load_example(monkeypatch)
    args = [str(page), "--model", str(tmp_path / "ckpt"), "--max-new-tokens", "6", "--compare", "--device", "cpu"]
    runs = example.main(args)
    ours, stock = runs["deepencoder"][0], runs["transformers"][0]
    assert ours.token_ids == stock.token_ids
    assert 0 < len(ours.token_ids) <= 6
    printed = capsys.readouterr().out
    assert "identical token ids" in printed
    assert ours.text in printed


# ------------------------------------------------------------------------------------------------ acceptance
@pytest.mark.slow
def test_full_size_vision_generates_the_same_tokens_attached():
    """Full-size vision config (SAM ViT-B + CLIP-L, random weights), tiny random language model; a batch of the
    three pages (untiled, 2 x 1, 1 x 2) through transformers' processor; greedy `generate` with the stock vision path
    and with the tower attached. The prefill logits are the language model's prefill hidden states of that same
    `generate` call through `lm_head` (every position, not only the last)."""
    model = ocr_model(None)
    processor = local_processor(384, 256)
    pages = [noise_page(w, h, seed) for seed, (w, h) in enumerate(PAGES)]
    inputs = processor(images=pages, text=["<image>\nFree OCR ."] * len(pages), return_tensors="pt", padding=True)
    assert inputs["patches_grid"] == [[1, 1], [2, 1], [1, 2]]

    prefill = []

    def keep_prefill(module, args, output):
        if output.last_hidden_state.shape[1] > 1:
            prefill.append(output.last_hidden_state)

    model.model.language_model.register_forward_hook(keep_prefill)
    settings = dict(do_sample=False, max_new_tokens=5, min_new_tokens=5)
    with torch.no_grad():
        stock_ids = model.generate(**inputs, **settings)
        tower = attach(model)
        tower_calls = []
        tower.clip.pre_layrnorm.register_forward_hook(lambda *args: tower_calls.append(1))
        ours_ids = model.generate(**inputs, **settings)
        detach(model)
        stock_logits, ours_logits = (model.lm_head(hidden) for hidden in prefill)
    assert len(prefill) == 2 and tower_calls == [1, 1]
    assert torch.equal(ours_ids, stock_ids)
    real = inputs["attention_mask"].bool()
    assert rel_err(ours_logits[real], stock_logits[real]) < 1e-4
