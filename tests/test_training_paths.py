"""Both training paths on tiny configs: loss falls, artifacts are written, resume continues identically, data
loaders and run configs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from deepencoder.training import (
    ImageTextFolder,
    ManifestTokens,
    OcrFinetuneConfig,
    SamPretrainConfig,
    SyntheticPages,
    Trainer,
    build_mim_run,
    build_ocr_run,
    load_config,
    mim_loss,
    ocr_loss,
    run_ocr_finetune,
    run_sam_pretrain,
)

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "configs"


def _ocr_config(tmp_path, steps: int, **data) -> OcrFinetuneConfig:
    config = OcrFinetuneConfig()
    config.train.output_dir = str(tmp_path / "ocr")
    config.train.max_steps, config.train.batch_size, config.train.progress = steps, 4, False
    config.train.optim.lr, config.train.optim.warmup_steps = 2e-3, 2
    config.data.num_samples, config.data.base_size = 8, 128
    config.language_model.max_text_tokens = 40
    config.sample_transcriptions = 1
    for key, value in data.items():
        setattr(config.data, key, value)
    return config


def _mean(history, part) -> float:
    values = [loss for _, loss in history]
    return sum(values[part]) / len(values[part])


def test_ocr_finetune_loss_falls(tmp_path):
    trainer = run_ocr_finetune(_ocr_config(tmp_path, 24))
    first, last = _mean(trainer.history, slice(0, 4)), _mean(trainer.history, slice(-4, None))
    print(f"OCR fine-tuning loss: {first:.3f} -> {last:.3f}")
    assert last < first - 0.5
    out = tmp_path / "ocr"
    for name in (
        "loss_curve.png",
        "loss.jsonl",
        "samples.txt",
        "config.yaml",
        "tower/config.json",
        "language_model/config.json",
        "connector.safetensors",
    ):
        assert (out / name).is_file(), name
    from deepencoder import DeepEncoderModel

    DeepEncoderModel.from_pretrained(out / "tower")


def test_sam_pretrain_loss_falls(tmp_path):
    config = SamPretrainConfig()
    config.train.output_dir = str(tmp_path / "mim")
    config.train.max_steps, config.train.batch_size, config.train.progress = 100, 4, False
    config.train.optim.lr, config.train.optim.warmup_steps = 3e-3, 2
    config.data.num_samples, config.data.image_size = 8, 128
    config.num_reconstructions = 3
    # a fixed held-out batch with fixed masks, scored with the initial and the trained weights
    model, _, dataset, collate = build_mim_run(config)
    held_out = collate([SyntheticPages(4, (256, 256), seed=99)[i] for i in range(4)], [10_000 + i for i in range(4)])
    with torch.no_grad():
        before = mim_loss(model.eval(), held_out).item()
    trainer = run_sam_pretrain(config)
    with torch.no_grad():
        after = mim_loss(trainer.unwrapped.eval(), held_out).item()
    first, last = _mean(trainer.history, slice(0, 3)), _mean(trainer.history, slice(-3, None))
    print(f"SAM masked-image pretraining: held-out loss {before:.3f} -> {after:.3f}, train {first:.3f} -> {last:.3f}")
    assert after < 0.8 * before
    out = tmp_path / "mim"
    for name in ("reconstructions.png", "loss_curve.png", "mim_head.safetensors", "tower/config.json"):
        assert (out / name).is_file(), name
    from PIL import Image

    assert Image.open(out / "reconstructions.png").size == ((128 + 4) * 3 + 4, (128 + 4) * 4 + 4)


def test_mim_mask_ratio_and_windows():
    from helpers import random_model

    from deepencoder.training import SamMaskedImageModeling, random_patch_mask

    mask = random_patch_mask(3, 8, 12, 0.75)
    assert mask.shape == (3, 8, 12) and (mask.sum(dim=(1, 2)) == 72).all()
    model = SamMaskedImageModeling(random_model().sam)
    pixels = torch.randn(2, 3, 128, 192)  # 8 x 12 patches: windows of 6 with padding, global blocks
    out = model(pixels)
    assert out.prediction.shape == (2, 8, 12, 16 * 16 * 3) and out.mask.float().mean().item() == 0.75
    out.loss.backward()
    assert model.mask_token.grad is not None and model.sam.blocks[0].attn.qkv.weight.grad is not None


def test_resume_continues_identically(tmp_path):
    """LoRA on the tower + a Qwen2 LM: 3 steps, checkpoint, a fresh process-like rebuild resumes 3 more; the
    losses and final weights equal an uninterrupted 6-step run."""

    def build(output_dir):
        config = _ocr_config(tmp_path, 6)
        config.train.output_dir = str(output_dir)
        config.tower.lora.stages = ["sam", "clip"]
        config.tower.unfreeze = []
        config.language_model.family = "qwen2"
        model, dataset, collate, _, _ = build_ocr_run(config)
        return Trainer(model, config.train, dataset, collate, ocr_loss)

    straight = build(tmp_path / "a")
    straight.train()
    interrupted = build(tmp_path / "b")
    interrupted.train(max_steps=3)
    resumed = build(tmp_path / "b")
    torch.manual_seed(1234)  # disturb the RNG: the checkpoint restores it
    assert resumed.maybe_resume() is not None and resumed.step == 3
    resumed.train()
    assert [loss for _, loss in resumed.history] == [loss for _, loss in straight.history]
    a, b = straight.unwrapped.state_dict(), resumed.unwrapped.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_folder_and_manifest_loaders(tmp_path):
    from safetensors.torch import save_file

    pages = SyntheticPages(num_samples=3, size=(128, 128))
    folder = tmp_path / "pages"
    folder.mkdir()
    for i in range(3):
        pages[i]["image"].save(folder / f"p{i}.png")
        (folder / f"p{i}.txt").write_text(pages[i]["text"])
    (folder / "orphan.png").write_bytes((folder / "p0.png").read_bytes())
    dataset = ImageTextFolder(folder)
    assert len(dataset) == 3 and dataset[1]["text"] == pages[1]["text"]

    run = tmp_path / "run"
    run.mkdir()
    save_file({"page.0": torch.randn(7, 80), "page.1": torch.randn(13, 80)}, str(run / "doc.safetensors"))
    rows = [
        {
            "source": "doc.pdf",
            "page": 0,
            "status": "ok",
            "tokens": 7,
            "output": "doc.safetensors",
            "key": "page.0",
            "mode": "tiny",
            "grid": [1, 1],
            "size": [128, 128],
            "seconds": 0.1,
            "error": None,
        },
        {
            "source": "doc.pdf",
            "page": 1,
            "status": "ok",
            "tokens": 13,
            "output": "doc.safetensors",
            "key": "page.1",
            "mode": "tiny",
            "grid": [1, 1],
            "size": [128, 192],
            "seconds": 0.1,
            "error": None,
        },
        {
            "source": "bad.png",
            "page": 0,
            "status": "error",
            "tokens": 0,
            "output": None,
            "key": None,
            "mode": "tiny",
            "grid": None,
            "size": None,
            "seconds": 0.0,
            "error": "unreadable",
        },
    ]
    # page 1 failed in a first run and was retried: the pipeline's reader keeps the last row of a page
    retried = {**rows[1], "status": "error", "error": "timeout", "output": None, "key": None}
    (run / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [retried, *rows]))
    (run / "texts.jsonl").write_text(json.dumps({"source": "doc.pdf", "page": 1, "text": "second page"}) + "\n")
    (run / "doc.page0.txt").write_text("first page")
    manifest = ManifestTokens(run / "manifest.jsonl", run / "texts.jsonl")
    assert [manifest[i]["text"] for i in range(2)] == ["first page", "second page"]
    assert manifest[1]["image_embeds"].shape == (13, 80)
    # a rank part of an unfinished multi-process run is read too, after manifest.jsonl
    save_file({"page.0": torch.randn(5, 80)}, str(run / "more.safetensors"))
    part = {**rows[0], "source": "more.png", "output": "more.safetensors", "tokens": 5, "text": "third page"}
    (run / "manifest.rank1.jsonl").write_text(json.dumps(part) + "\n")
    manifest = ManifestTokens(run, run / "texts.jsonl")
    assert [manifest[i]["text"] for i in range(3)] == ["first page", "second page", "third page"]
    assert manifest[2]["image_embeds"].shape == (5, 80)

    config = _ocr_config(
        tmp_path, 3, kind="manifest", manifest=str(run / "manifest.jsonl"), texts=str(run / "texts.jsonl")
    )
    config.train.batch_size = 2
    trainer = run_ocr_finetune(config)
    assert len(trainer.history) == 3 and trainer.unwrapped.vision is None


@pytest.mark.parametrize(
    "name", ["finetune_ocr_tiny.yaml", "finetune_ocr_reads.yaml", "finetune_ocr_lora.yaml", "pretrain_sam_tiny.yaml"]
)
def test_example_configs_load(name):
    cls = OcrFinetuneConfig if name.startswith("finetune") else SamPretrainConfig
    config = load_config(cls, EXAMPLES / name, ["train.max_steps=7", "train.optim.lr=3e-4"])
    assert config.train.max_steps == 7 and config.train.optim.lr == 3e-4
    with pytest.raises(ValueError, match="unknown key"):
        load_config(cls, EXAMPLES / name, ["train.max_stepz=7"])
