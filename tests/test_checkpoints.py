"""transformers-native save/load, and loading a checkpoint in DeepSeek-OCR's released layout."""

import json
import subprocess
import sys

import pytest
import torch
from helpers import random_model, tiny_config, to_deepseek_ocr
from safetensors.torch import save_file

from deepencoder import DeepEncoderConfig, DeepEncoderImageProcessor, DeepEncoderModel
from deepencoder.conversion.io import CheckpointError


def outputs_equal(a, b, pixels):
    with torch.no_grad():
        return torch.equal(a.encode_views(pixels).image_embeds, b.encode_views(pixels).image_embeds)


def test_save_pretrained_round_trip_and_auto_classes(tmp_path):
    from transformers import AutoConfig, AutoImageProcessor, AutoModel

    model = random_model()
    model.save_pretrained(tmp_path)
    DeepEncoderImageProcessor(mode="small").save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "deepencoder" and config["sam_config"]["window_size"] == 6
    pixels = torch.randn(1, 3, 192, 256)
    for loaded in (DeepEncoderModel.from_pretrained(tmp_path), AutoModel.from_pretrained(tmp_path)):
        assert type(loaded) is DeepEncoderModel
        assert outputs_equal(model, loaded.eval(), pixels)
    assert isinstance(AutoConfig.from_pretrained(tmp_path), DeepEncoderConfig)
    assert AutoImageProcessor.from_pretrained(tmp_path).mode == "small"


def test_default_config_is_the_released_tower():
    config = DeepEncoderConfig()
    sam, clip = config.sam_config, config.clip_config
    assert (sam.hidden_size, sam.num_hidden_layers, sam.num_attention_heads, sam.window_size) == (768, 12, 12, 14)
    assert sam.global_attn_indexes == [2, 5, 8, 11] and sam.downsample == 64
    assert (clip.hidden_size, clip.num_hidden_layers, clip.num_attention_heads, clip.num_positions) == (
        1024,
        24,
        16,
        257,
    )
    assert config.join_dim == 2048 and config.projector_dim == 1280
    from deepencoder import DeepEncoderSamConfig

    assert DeepEncoderSamConfig.from_preset("vit_l").global_attn_indexes == [5, 11, 17, 23]
    assert DeepEncoderSamConfig.from_preset("vit_h").hidden_size == 1280
    with pytest.raises(ValueError, match="must match"):
        DeepEncoderConfig(sam_config={"compressor_channels": [512, 768]})


def write_deepseek_checkpoint(model, directory, extra_vision=None, drop=None):
    """A checkpoint in the released layout: two shards + index, language-model tensors beside the vision ones,
    CLIP's unused conv patch embedding, as in DeepSeek-OCR's files."""
    directory.mkdir(parents=True, exist_ok=True)
    vision = {k: v.clone().to(torch.bfloat16) for k, v in to_deepseek_ocr(model.state_dict()).items()}
    vision["model.vision_model.embeddings.patch_embedding.weight"] = torch.randn(64, 3, 14, 14).bfloat16()
    vision.update(extra_vision or {})
    for key in drop or []:
        vision.pop(key)
    language = {
        "model.embed_tokens.weight": torch.randn(1000, 80).bfloat16(),
        "model.layers.0.self_attn.q_proj.weight": torch.randn(80, 80).bfloat16(),
        "lm_head.weight": torch.randn(1000, 80).bfloat16(),
    }
    keys = sorted(vision)
    shard1 = {k: vision[k] for k in keys[: len(keys) // 2]} | {
        "model.embed_tokens.weight": language["model.embed_tokens.weight"]
    }
    shard2 = {k: vision[k] for k in keys[len(keys) // 2 :]} | {k: language[k] for k in language if k not in shard1}
    save_file(shard1, directory / "model-00001-of-00002.safetensors", metadata={"format": "pt"})
    save_file(shard2, directory / "model-00002-of-00002.safetensors", metadata={"format": "pt"})
    weight_map = {k: "model-00001-of-00002.safetensors" for k in shard1} | {
        k: "model-00002-of-00002.safetensors" for k in shard2
    }
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return directory


def test_from_deepseek_ocr_loads_vision_tensors_only(tmp_path):
    model = random_model()
    source = write_deepseek_checkpoint(model, tmp_path / "DeepSeek-OCR")
    loaded = DeepEncoderModel.from_deepseek_ocr(str(source))
    assert next(loaded.parameters()).dtype == torch.bfloat16  # the checkpoint's dtype is kept
    expected = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    assert loaded.state_dict().keys() == expected.keys()
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, expected[key]), key
    assert loaded.config.sam_config.window_size == 6 and loaded.config.sam_config.global_attn_indexes == [1, 3]
    assert loaded.config.projector_dim == 80
    as_fp32 = DeepEncoderModel.from_deepseek_ocr(str(source), dtype=torch.float32)
    assert next(as_fp32.parameters()).dtype == torch.float32


@pytest.mark.filterwarnings("ignore:.*to a meta parameter in the current model, which is a no-op")
def test_converted_checkpoint_is_copied_straight_into_a_tower_built_on_the_device(tmp_path, monkeypatch):
    """`load_model` / `from_pretrained(device_map=)` on a DeepSeek-OCR checkpoint: the tower is built on the target
    device and the checkpoint's tensors are loaded into it there (the meta device stands in for a GPU: a tower built
    on the host and moved would take its tensors on the CPU); on the CPU the values are the checkpoint's, cast."""
    from deepencoder.pipeline.weights import load_model

    source = write_deepseek_checkpoint(random_model(), tmp_path / "DeepSeek-OCR")
    devices = []
    load_state_dict = torch.nn.Module.load_state_dict

    def recording(self, *args, **kwargs):
        devices.append(next(self.parameters()).device.type)
        return load_state_dict(self, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "load_state_dict", recording)
    on_meta, _ = load_model(str(source), device="meta", dtype=torch.float16)
    assert devices == ["meta"]
    assert {(p.device.type, p.dtype) for p in on_meta.parameters()} == {("meta", torch.float16)}
    from_pretrained = DeepEncoderModel.from_pretrained(str(source), device_map="meta")
    assert devices == ["meta", "meta"] and next(from_pretrained.parameters()).device.type == "meta"
    on_cpu, _ = load_model(str(source), device="cpu", dtype=torch.float32)
    expected = DeepEncoderModel.from_deepseek_ocr(str(source))  # bf16, the checkpoint's dtype, built on the CPU
    assert devices[2:] == ["cpu", "cpu"]
    for key, value in on_cpu.state_dict().items():
        assert value.dtype == torch.float32 and torch.equal(value, expected.state_dict()[key].float()), key


def test_missing_and_unexpected_vision_keys_are_named(tmp_path):
    model = random_model()
    source = write_deepseek_checkpoint(model, tmp_path / "a", drop=["model.sam_model.blocks.1.attn.rel_pos_w"])
    with pytest.raises(CheckpointError, match=r"missing keys \['sam.blocks.1.attn.rel_pos_w'\]"):
        DeepEncoderModel.from_deepseek_ocr(str(source))
    extra = {"model.sam_model.blocks.0.attn.extra_bias": torch.zeros(3).bfloat16()}
    source = write_deepseek_checkpoint(model, tmp_path / "b", extra_vision=extra)
    with pytest.raises(CheckpointError, match="sam.blocks.0.attn.extra_bias"):
        DeepEncoderModel.from_deepseek_ocr(str(source))
    with pytest.raises(CheckpointError, match="no such file or directory"):
        DeepEncoderModel.from_deepseek_ocr(str(tmp_path / "nowhere" / "x"))


def test_cli_converts_deepseek_ocr(tmp_path):
    model = random_model()
    source = write_deepseek_checkpoint(model, tmp_path / "DeepSeek-OCR")
    out = tmp_path / "converted"
    result = subprocess.run(
        [sys.executable, "-m", "deepencoder", "convert", "deepseek-ocr", str(source), str(out), "--dtype", "fp32"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "patch_embedding" in result.stdout  # reported as dropped
    for name in ("config.json", "model.safetensors", "preprocessor_config.json", "README.md"):
        assert (out / name).exists(), name
    loaded = DeepEncoderModel.from_pretrained(out).eval()
    assert next(loaded.parameters()).dtype == torch.float32
    reference = DeepEncoderModel.from_deepseek_ocr(str(source), dtype=torch.float32)
    assert outputs_equal(loaded, reference, torch.randn(1, 3, 128, 128))
    missing = subprocess.run(
        [sys.executable, "-m", "deepencoder", "convert", "deepseek-ocr", str(tmp_path / "absent"), str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert missing.returncode != 0 and "absent" in missing.stderr


def test_gradient_checkpointing_flag_reaches_blocks():
    model = random_model(tiny_config())
    model.gradient_checkpointing_enable()
    assert all(block.gradient_checkpointing for block in model.sam.blocks)
    assert all(layer.gradient_checkpointing for layer in model.clip.transformer.layers)


@pytest.mark.parametrize("family", ["v1", "v2"])
def test_random_weights_are_initialised_once_like_a_fresh_model(family):
    """`--weights random` builds the tower with torch's per-layer default initialisation skipped and runs the
    model's own `_init_weights` once: every parameter is finite and drawn like a freshly constructed model's
    (same spread and centre per tensor; constants equal), the same seed gives the same tower, another seed not."""
    from fixtures.v2_support import tiny_config_kwargs

    from deepencoder import DeepEncoderV2Config, DeepEncoderV2Model
    from deepencoder.pipeline.weights import load_model

    config = tiny_config() if family == "v1" else DeepEncoderV2Config(**tiny_config_kwargs())
    fresh = dict((DeepEncoderModel if family == "v1" else DeepEncoderV2Model)(config).named_parameters())
    model, _ = load_model("random", config=config, seed=3)
    again, _ = load_model("random", config=config, seed=3)
    other, _ = load_model("random", config=config, seed=4)
    for name, value in model.named_parameters():
        reference = fresh[name]
        assert torch.isfinite(value).all(), name
        assert torch.equal(value, dict(again.named_parameters())[name]), name
        if reference.numel() < 64 or reference.std() == 0:
            if reference.std() == 0:
                assert torch.equal(value, reference), name  # ones / zeros
            continue
        assert abs(value.std() / reference.std() - 1) < 0.35, name
        assert abs(value.mean() - reference.mean()) < 0.35 * reference.std() + 1e-6, name
    assert not torch.equal(next(model.parameters()), next(other.parameters()))
