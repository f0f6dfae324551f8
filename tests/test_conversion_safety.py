"""Safe loading and clear errors: pickles carrying code are refused unexecuted, damaged safetensors and wrong or
missing tensors are named, layouts are detected from keys, and range reads fetch only the tower's bytes."""

from __future__ import annotations

import builtins
import io
import json
import os

import pytest
import torch
from helpers import random_model, to_deepseek_ocr
from test_conversion_sources import (
    CountingFileSystem,
    hf_clip_vision,
    open_clip_model,
    save_safetensors,
    segment_anything_sam,
)

from deepencoder import DeepEncoderModel
from deepencoder.cli import main
from deepencoder.conversion.detect import detect_format
from deepencoder.conversion.io import CheckpointError, load_state_dict
from deepencoder.conversion.load import load_clip, load_deepseek_ocr, load_segment_anything
from deepencoder.conversion.sources import convert_state_dict, read_converted


class RunsCode:
    """Unpickling this would create the marker file: `__reduce__` names a callable and its arguments."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_with_code_is_refused_unexecuted(tmp_path, capsys):
    marker = tmp_path / "executed"
    state = segment_anything_sam().state_dict()
    state["image_encoder.payload"] = RunsCode(str(marker))
    path = tmp_path / "sam_vit_b_01ec64.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match="refused to load") as error:
        load_segment_anything(path)
    assert str(path) in str(error.value)
    assert main(["convert", "segment-anything", str(path), str(tmp_path / "out")]) == 2
    assert "refused to load" in capsys.readouterr().err
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_truncated_and_corrupted_safetensors_are_named(tmp_path):
    path = save_safetensors(open_clip_model().state_dict(), tmp_path / "clip.safetensors")
    data = path.read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match="truncated") as error:
        load_clip(truncated, clip_config={"num_attention_heads": 4})
    assert str(truncated) in str(error.value) and "tensor '" in str(error.value)  # names the tensor cut short
    corrupted = tmp_path / "corrupted.safetensors"
    corrupted.write_bytes(data[:8] + b"\xff" * 64 + data[72:])
    with pytest.raises(CheckpointError, match="corrupted safetensors header") as error:
        load_clip(corrupted)
    assert str(corrupted) in str(error.value)
    short = tmp_path / "short.safetensors"
    short.write_bytes(b"abc")
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        load_clip(short)


def test_wrong_shape_missing_and_unknown_keys_are_named(tmp_path):
    sam = segment_anything_sam().state_dict()
    wrong = dict(sam, **{"image_encoder.blocks.1.attn.proj.weight": torch.zeros(64, 32)})
    torch.save(wrong, tmp_path / "wrong.pth")
    with pytest.raises(CheckpointError, match=r"sam\.blocks\.1\.attn\.proj\.weight: \(64, 32\)") as error:
        load_segment_anything(tmp_path / "wrong.pth")
    assert str(tmp_path / "wrong.pth") in str(error.value)

    missing = {k: v for k, v in sam.items() if k != "image_encoder.blocks.2.norm1.weight"}
    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(CheckpointError, match=r"missing keys \['sam\.blocks\.2\.norm1\.weight'\]") as error:
        load_segment_anything(tmp_path / "missing.pth")
    assert str(tmp_path / "missing.pth") in str(error.value)

    with pytest.raises(CheckpointError, match=r"image_encoder\.blocks\.0\.attn\.extra"):
        convert_state_dict(dict(sam, **{"image_encoder.blocks.0.attn.extra": torch.zeros(1)}), "segment-anything")

    clip = open_clip_model().state_dict()
    clip.pop("visual.transformer.resblocks.1.mlp.c_fc.bias")
    path = save_safetensors(clip, tmp_path / "clip.safetensors")
    with pytest.raises(CheckpointError, match=r"clip\.transformer\.layers\.1\.mlp\.fc1\.bias") as error:
        load_clip(path, clip_config={"num_attention_heads": 4})
    assert str(path) in str(error.value)

    hf = hf_clip_vision().state_dict()
    hf.pop(next(k for k in hf if k.endswith("layers.0.self_attn.v_proj.weight")))
    with pytest.raises(
        CheckpointError, match=r"has no \['vision_model\.encoder\.layers\.0\.self_attn\.v_proj\.weight'\]"
    ):
        convert_state_dict(hf, "hf-clip")


def test_detect_format():
    assert detect_format(segment_anything_sam().state_dict()) == "segment-anything"
    assert detect_format(segment_anything_sam().image_encoder.state_dict()) == "segment-anything"
    assert detect_format(open_clip_model().state_dict()) == "open-clip"
    assert detect_format(open_clip_model().visual.state_dict()) == "open-clip"
    assert detect_format(hf_clip_vision().state_dict()) == "hf-clip"
    assert detect_format(hf_clip_vision(full=True).state_dict()) == "hf-clip"
    model = random_model()
    assert detect_format(model.state_dict()) == "deepencoder"
    assert detect_format(to_deepseek_ocr(model.state_dict())) == "deepseek-ocr"
    with pytest.raises(CheckpointError, match="unrecognised checkpoint layout"):
        detect_format(["encoder.weight", "decoder.weight"])


def test_range_reads_fetch_only_vision_tensors(tmp_path):
    """A CLIP file with a big text tower, and a DeepSeek-OCR-style file with a big language model: through the
    range-reading path, only the headers and the vision tensors are read, and the result equals a full read."""
    clip = open_clip_model(vocab_size=49408)  # a (49408, 32) token embedding dwarfs the tiny visual tower
    path = save_safetensors(clip.state_dict(), tmp_path / "open_clip_model.safetensors")
    filesystem = CountingFileSystem()
    model, report = load_clip(str(path), filesystem=filesystem, clip_config={"num_attention_heads": 4})
    size = os.path.getsize(path)
    assert 0 < filesystem.bytes_read < 0.2 * size, (filesystem.bytes_read, size)
    assert "token_embedding.weight" in report.dropped  # reported without being read
    reference, _ = load_clip(path, clip_config={"num_attention_heads": 4})
    for key, tensor in reference.state_dict().items():
        if key.startswith("clip."):
            assert torch.equal(model.state_dict()[key], tensor), key

    tower = random_model()
    directory = tmp_path / "deepseek"
    directory.mkdir()
    state = to_deepseek_ocr(tower.state_dict())
    state["model.embed_tokens.weight"] = torch.randn(20000, 256)
    state["lm_head.weight"] = torch.randn(20000, 256)
    save_safetensors(state, directory / "model.safetensors")
    filesystem = CountingFileSystem()
    loaded = load_deepseek_ocr(str(directory), filesystem=filesystem)
    size = os.path.getsize(directory / "model.safetensors")
    assert 0 < filesystem.bytes_read < 0.2 * size, (filesystem.bytes_read, size)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in tower.state_dict().items())


def test_pickle_through_a_remote_style_filesystem(tmp_path):
    """A .pth behind the fsspec interface is fetched whole and still loaded with weights_only=True."""
    sam = segment_anything_sam(seed=3)
    torch.save(sam.state_dict(), tmp_path / "sam.pth")
    model, _ = load_segment_anything(
        str(tmp_path / "sam.pth"),
        filesystem=CountingFileSystem(),
        clip_config=dict(
            hidden_size=64, num_hidden_layers=1, num_attention_heads=4, intermediate_size=128, image_size=56
        ),
    )
    assert torch.equal(model.state_dict()["sam.pos_embed"], sam.image_encoder.pos_embed)
    marker = tmp_path / "executed"
    torch.save({"image_encoder.pos_embed": RunsCode(str(marker))}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="refused to load"):
        load_segment_anything(str(tmp_path / "evil.pth"), filesystem=CountingFileSystem())
    assert not marker.exists()


def test_initialised_parts_are_a_fresh_models(tmp_path):
    """Parameters no source provides are initialised as `post_init` does (norms one, tables drawn), never left
    as uninitialised memory."""
    torch.save(segment_anything_sam().state_dict(), tmp_path / "sam.pth")
    model, report = load_segment_anything(
        tmp_path / "sam.pth",
        clip_config=dict(
            hidden_size=64, num_hidden_layers=1, num_attention_heads=4, intermediate_size=128, image_size=56
        ),
    )
    params = dict(model.named_parameters())
    assert all(torch.isfinite(p).all() for p in params.values())
    assert torch.equal(params["clip.pre_layrnorm.weight"], torch.ones(64))
    assert torch.equal(params["clip.transformer.layers.0.mlp.fc1.bias"], torch.zeros(128))
    assert 0.005 < params["projector.weight"].std().item() < 0.05  # N(0, 0.02)
    assert "clip.embeddings.class_embedding" in report.initialised


@pytest.mark.parametrize("entry", ["../outside.safetensors", "absolute", "shards/../../outside.safetensors"])
def test_index_naming_a_file_outside_its_folder_is_refused_unopened(tmp_path, monkeypatch, entry):
    """A sharded checkpoint's index may only name files inside its own folder: an entry pointing elsewhere (here at a
    valid checkpoint, so opening it would succeed) is refused before any shard is opened, through every reading
    path (local loader, the fsspec path that hub ids use, `from_deepseek_ocr`), with an error naming the entry."""
    state = to_deepseek_ocr(random_model().state_dict())
    directory = tmp_path / "checkpoint"
    directory.mkdir()
    save_safetensors(state, directory / "model-00001-of-00001.safetensors")
    outside = save_safetensors(state, tmp_path / "outside.safetensors")
    weight_map = dict.fromkeys(state, "model-00001-of-00001.safetensors")
    weight_map["model.sam_model.pos_embed"] = str(outside) if entry == "absolute" else entry
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))

    opened: list[str] = []
    real_open = builtins.open

    def recording_open(file, *args, **kwargs):
        opened.append(os.path.realpath(file) if isinstance(file, (str, os.PathLike)) else repr(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", recording_open)
    monkeypatch.setattr(io, "open", recording_open)
    filesystem = CountingFileSystem()
    attempts = [
        lambda: load_state_dict(directory),
        lambda: read_converted(str(directory), filesystem=filesystem),
        lambda: DeepEncoderModel.from_deepseek_ocr(str(directory)),
    ]
    for attempt in attempts:
        with pytest.raises(CheckpointError, match=r"weight_map entry 'model\.sam_model\.pos_embed'.*refused"):
            attempt()
    assert str(outside.resolve()) not in opened
    assert not any(os.path.realpath(path) == str(outside.resolve()) for path, _, _ in filesystem.reads)
    assert not any(path.endswith("model-00001-of-00001.safetensors") for path in opened)  # nothing read before
