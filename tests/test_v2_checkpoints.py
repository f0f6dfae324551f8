"""DeepEncoder V2 checkpoints: a DeepSeek-OCR-2-layout checkpoint (vision + language-model tensors) loads reading
only the vision tensors, round-trips through save_pretrained / AutoModel; transformers' DeepseekOcr2 save_pretrained
loads; `deepencoder convert deepseek-ocr2` and `convert compose-v2` (SAM .pth + a Qwen2 decoder) write directories
that load, with the report of what was dropped and initialised."""

from __future__ import annotations

import json

import pytest
import torch
from fixtures.v2_support import tiny_config_kwargs, to_deepseek_ocr2, transformers_ocr2
from helpers import random_model, randomize_, rel_err
from safetensors.torch import save_file
from test_conversion_sources import CountingFileSystem

from deepencoder import DeepEncoderImageProcessor, DeepEncoderModel, DeepEncoderV2Config, DeepEncoderV2Model
from deepencoder.cli import main
from deepencoder.conversion.deepseek_ocr2 import DEEPENCODER_V2
from deepencoder.conversion.io import CheckpointError
from deepencoder.conversion.load import load_tower
from deepencoder.conversion.sources import read_converted

# DeepSeek-OCR-2's checkpoint states no head counts; its shapes give them for 64-wide heads (the released 14 / 2),
# a tiny tower states them
HEADS = {"encoder_config": {"num_attention_heads": 4, "num_key_value_heads": 2}}
LANGUAGE_MODEL = {
    "model.embed_tokens.weight": (64, 32),
    "model.layers.0.self_attn.q_proj.weight": (32, 32),
    "model.layers.0.mlp.gate_proj.weight": (48, 32),
    "model.norm.weight": (32,),
    "lm_head.weight": (64, 32),
}


def tiny_v2(seed: int = 0) -> DeepEncoderV2Model:
    return randomize_(DeepEncoderV2Model(DeepEncoderV2Config(**tiny_config_kwargs())), seed).eval()


def write_deepseek_ocr2_checkpoint(model: DeepEncoderV2Model, folder) -> None:
    """Two shards and an index as the release has them: the vision tensors, and a language-model shard."""
    folder.mkdir(parents=True, exist_ok=True)
    vision = to_deepseek_ocr2(model.state_dict())
    generator = torch.Generator().manual_seed(3)
    language = {name: torch.randn(shape, generator=generator) for name, shape in LANGUAGE_MODEL.items()}
    save_file(vision, str(folder / "model-00001-of-00002.safetensors"))
    save_file(language, str(folder / "model-00002-of-00002.safetensors"))
    weight_map = {**dict.fromkeys(vision, "model-00001-of-00002.safetensors")}
    weight_map.update(dict.fromkeys(language, "model-00002-of-00002.safetensors"))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def test_from_deepseek_ocr2_reads_only_vision_tensors_and_round_trips(tmp_path):
    from transformers import AutoConfig, AutoImageProcessor, AutoModel

    model = tiny_v2(seed=1)
    write_deepseek_ocr2_checkpoint(model, tmp_path / "ckpt")
    filesystem = CountingFileSystem()
    loaded, report = load_tower(
        str(tmp_path / "ckpt"), family=DEEPENCODER_V2, filesystem=filesystem, config_kwargs=HEADS
    )
    assert type(loaded) is DeepEncoderV2Model
    language_shard = tmp_path / "ckpt" / "model-00002-of-00002.safetensors"
    header = 8 + int.from_bytes(language_shard.read_bytes()[:8], "little")
    language_reads = [
        (offset, length)
        for path, offset, length in filesystem.reads
        if path.endswith("model-00002-of-00002.safetensors")
    ]
    # its header only, never a tensor
    assert language_reads and all(offset + length <= header for offset, length in language_reads), language_reads
    assert len(report.converted) == len(model.state_dict())
    expected = model.state_dict()
    assert set(loaded.state_dict()) == set(expected)
    assert all(torch.equal(loaded.state_dict()[k], expected[k]) for k in expected)
    config = loaded.config.encoder_config
    assert (config.num_attention_heads, config.num_key_value_heads, config.query_counts) == (4, 2, [144, 256])
    assert DeepEncoderV2Model.from_deepseek_ocr2(str(tmp_path / "ckpt"), **HEADS).state_dict().keys() == expected.keys()

    loaded.save_pretrained(tmp_path / "saved")
    DeepEncoderImageProcessor(mode="ocr2").save_pretrained(tmp_path / "saved")
    assert type(AutoConfig.from_pretrained(tmp_path / "saved")) is DeepEncoderV2Config
    again = AutoModel.from_pretrained(tmp_path / "saved").eval()
    assert type(again) is DeepEncoderV2Model
    assert all(torch.equal(again.state_dict()[k], expected[k]) for k in expected)
    processor = AutoImageProcessor.from_pretrained(tmp_path / "saved")
    assert processor.mode == "ocr2" and processor.num_image_tokens(1600, 820) == 2 * 144 + 257
    pixels = torch.randn(1, 3, 768, 768, generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        assert torch.equal(again.encode_views(pixels).image_embeds, model.encode_views(pixels).image_embeds)


@pytest.mark.parametrize("original_names", [True, False], ids=["default-save", "transformers-names"])
def test_transformers_deepseek_ocr2_save_pretrained_loads(tmp_path, original_names):
    """transformers' `DeepseekOcr2ForConditionalGeneration.save_pretrained` writes DeepSeek's names by default and
    transformers' own with `save_original_format=False`; its config.json states the encoder's heads. Either reads
    only the vision tensors, through `from_deepseek_ocr2`, `from_pretrained` and `deepencoder convert`, and the
    tower's pages equal transformers' `get_image_features`."""
    model = tiny_v2(seed=2)
    full = transformers_ocr2(model, vocab_size=20000)
    source = tmp_path / "hf"
    full.save_pretrained(source, save_original_format=original_names)
    filesystem = CountingFileSystem()
    part = read_converted(str(source), filesystem=filesystem)
    assert part.format.name == ("deepseek-ocr2" if original_names else "hf-deepseek-ocr2")
    size = sum(f.stat().st_size for f in source.glob("*.safetensors"))
    assert 0 < filesystem.bytes_read < 0.2 * size, (filesystem.bytes_read, size)  # the language model is not read

    loaded = DeepEncoderV2Model.from_deepseek_ocr2(str(source)).eval()
    assert (loaded.config.encoder_config.num_attention_heads, loaded.config.encoder_config.num_key_value_heads) == (
        4,
        2,
    )  # from config.json: q / k widths alone do not say
    pretrained = DeepEncoderV2Model.from_pretrained(str(source))
    assert main(["convert", "deepseek-ocr2", str(source), str(tmp_path / "out"), "--dtype", "float32"]) == 0
    converted = DeepEncoderV2Model.from_pretrained(tmp_path / "out")
    expected = model.state_dict()
    for tower in (loaded, pretrained, converted):
        assert tower.state_dict().keys() == expected.keys()
        assert all(torch.equal(tower.state_dict()[k], v) for k, v in expected.items())
    pixels = torch.randn(1, 3, 1024, 1024, generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        ours = loaded(pixels).image_embeds[0]
        theirs = full.model.get_image_features(pixels).pooler_output[0]
    assert rel_err(ours, theirs) <= 1e-4


def test_from_pretrained_converts_with_config_values_and_refuses_what_holds_no_tower_of_its_family(tmp_path):
    """A DeepSeek-OCR-2 checkpoint with no config.json loads through `from_pretrained` with the head counts given as
    config values; a checkpoint of the other tower, or keywords a converted load cannot honour, are errors naming
    them, not a randomly initialised model; this library's own directories still load through transformers."""
    from transformers import AutoModel

    model = tiny_v2(seed=1)
    write_deepseek_ocr2_checkpoint(model, tmp_path / "ocr2")
    loaded = DeepEncoderV2Model.from_pretrained(str(tmp_path / "ocr2"), device_map="cpu", **HEADS)
    assert (loaded.config.encoder_config.num_attention_heads, loaded.config.encoder_config.num_key_value_heads) == (
        4,
        2,
    )
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())
    with pytest.raises(TypeError, match="config"):
        DeepEncoderV2Model.from_pretrained(str(tmp_path / "ocr2"), config="elsewhere/config.json")
    with pytest.raises(CheckpointError, match="deepseek-ocr2 checkpoint"):
        DeepEncoderModel.from_pretrained(str(tmp_path / "ocr2"))
    with pytest.raises(TypeError, match="attn_implementation"):
        DeepEncoderV2Model.from_pretrained(str(tmp_path / "ocr2"), attn_implementation="eager", **HEADS)
    v1 = random_model()
    v1.save_pretrained(tmp_path / "v1")
    with pytest.raises(CheckpointError, match="deepencoder checkpoint"):
        DeepEncoderV2Model.from_pretrained(tmp_path / "v1")
    for loaded in (DeepEncoderModel.from_pretrained(tmp_path / "v1"), AutoModel.from_pretrained(tmp_path / "v1")):
        assert type(loaded) is DeepEncoderModel
        assert all(torch.equal(loaded.state_dict()[k], v) for k, v in v1.state_dict().items())


def test_cli_convert_deepseek_ocr2(tmp_path):
    from transformers import AutoModel

    model = tiny_v2(seed=6)
    write_deepseek_ocr2_checkpoint(model, tmp_path / "ckpt")
    # heads stated the way a transformers DeepseekOcr2 config.json states them
    vision_config = {"encoder_config": HEADS["encoder_config"]}
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps({"vision_config": vision_config}))
    assert main(["convert", "deepseek-ocr2", str(tmp_path / "ckpt"), str(tmp_path / "out"), "--dtype", "bf16"]) == 0
    converted = AutoModel.from_pretrained(tmp_path / "out")
    assert type(converted) is DeepEncoderV2Model and next(converted.parameters()).dtype == torch.bfloat16
    expected = model.state_dict()
    assert all(torch.equal(converted.state_dict()[k], expected[k].to(torch.bfloat16)) for k in expected)
    assert json.loads((tmp_path / "out" / "preprocessor_config.json").read_text())["mode"] == "ocr2"
    card = (tmp_path / "out" / "README.md").read_text()
    assert "DeepEncoderV2Model" in card and "Apache-2.0" in card and "encoder: Qwen2 64-d" in card


def test_cli_compose_v2_from_sam_and_qwen2(tmp_path):
    """SAM trunk + neck from a segment-anything .pth, the encoder layers and final norm from a Qwen2 causal LM
    directory; compressor, queries, projector and separator initialised and reported; token embedding dropped."""
    from test_conversion_sources import segment_anything_sam
    from transformers import AutoModel, Qwen2Config, Qwen2ForCausalLM

    sam = segment_anything_sam(seed=7)
    torch.save(sam.state_dict(), tmp_path / "sam.pth")
    qwen2_config = Qwen2Config(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=100, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True,
    )  # fmt: skip
    qwen2 = randomize_(Qwen2ForCausalLM(qwen2_config), seed=8).eval()
    qwen2.save_pretrained(tmp_path / "qwen2")
    out = tmp_path / "composed"
    assert (
        main(
            ["convert", "compose-v2", "--sam", str(tmp_path / "sam.pth"), "--qwen2", str(tmp_path / "qwen2"), str(out)]
        )
        == 0
    )
    report = json.loads((out / "conversion_report.json").read_text())
    assert set(report["initialised"]) == {
        "sam.net_2.weight",
        "sam.net_3.weight",
        "encoder.queries.144",
        "encoder.queries.256",
        "projector.weight",
        "projector.bias",
        "view_separator",
    }
    assert any(key.endswith("model.embed_tokens.weight") for key in report["dropped"])
    model = AutoModel.from_pretrained(out).eval()
    assert type(model) is DeepEncoderV2Model
    encoder = model.config.encoder_config
    assert (encoder.num_attention_heads, encoder.num_key_value_heads, encoder.rms_norm_eps, encoder.rope_theta) == (
        4, 2, 1e-5, 10000.0,
    )  # fmt: skip
    assert model.config.sam_config.compressor_channels == [512, 64]
    theirs = qwen2.model.state_dict()
    for key, value in model.encoder.state_dict().items():
        if not key.startswith("queries."):
            assert torch.equal(value, theirs[key]), key
    with torch.inference_mode():
        expected = sam.image_encoder(torch.ones(1, 3, 256, 256))
        assert rel_err(model.sam.neck_features(torch.ones(1, 3, 256, 256)), expected) <= 1e-4
