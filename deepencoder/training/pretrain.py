"""Masked-image pretraining recipe for the SAM stage, from a `SamPretrainConfig`.

Outputs under `train.output_dir`: `tower/` (the whole tower, `save_pretrained`, with the pretrained SAM stage),
`mim_head.safetensors` (mask token + decoder, to continue pretraining), `checkpoints/`, `loss.jsonl`,
`loss_curve.png`, `reconstructions.png` (rows: page, masked input, prediction, prediction in the masked patches),
`config.yaml`.
"""

from __future__ import annotations

from pathlib import Path

import torch
import yaml
from torch import nn

from .config import SamPretrainConfig, config_to_dict
from .data import dataset_from_settings, stack_pixels
from .mim import SamMaskedImageModeling, random_patch_mask
from .ocr import build_tower
from .trainer import Trainer, save_loss_curve


class MimCollator:
    """Pages -> `pixel_values` (B, 3, S, S) and a mask per page drawn from (seed, stream position), so masks do not
    depend on the number of processes and repeat exactly on resume."""

    def __init__(self, image_size: int, patch_size: int, mask_ratio: float, mask_block: int, seed: int) -> None:
        self.image_size, self.patch_size = image_size, patch_size
        self.mask_ratio, self.mask_block, self.seed = mask_ratio, mask_block, seed

    def mask(self, position: int) -> torch.Tensor:
        grid = self.image_size // self.patch_size
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + position)
        return random_patch_mask(1, grid, grid, self.mask_ratio, self.mask_block, generator)[0]

    def __call__(self, items: list[dict], positions: list[int]) -> dict:
        return {
            "pixel_values": stack_pixels([item["image"] for item in items], self.image_size),
            "mask": torch.stack([self.mask(p) for p in positions]),
        }


def mim_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    return model(pixel_values=batch["pixel_values"], mask=batch["mask"]).loss


def build_mim_run(config: SamPretrainConfig):
    """(SamMaskedImageModeling, tower, dataset, collate)."""
    data, mim = config.data, config.mim
    torch.manual_seed(config.train.seed)
    if data.kind not in ("synthetic", "folder"):
        raise ValueError("SAM pretraining reads pages: data.kind must be synthetic or folder")
    dataset = dataset_from_settings(data)
    tower = build_tower(config.tower)
    tower.freeze("sam.neck", "sam.compressor")  # outside the objective; frozen so DDP sees no unused parameters
    if data.image_size % tower.config.sam_config.patch_size:
        raise ValueError(f"data.image_size {data.image_size} is not a multiple of the patch size")
    model = SamMaskedImageModeling(tower.sam, mim.mask_ratio, mim.mask_block, mim.decoder_hidden, mim.norm_pix_loss)
    collate = MimCollator(
        data.image_size, tower.config.sam_config.patch_size, mim.mask_ratio, mim.mask_block, config.train.seed
    )
    return model, tower, dataset, collate


def save_reconstruction_grid(model: SamMaskedImageModeling, batch: dict, path: str | Path) -> None:
    """PNG grid, one column per page; rows: page, masked input, prediction, prediction pasted into the page."""
    import numpy as np
    from PIL import Image

    model.eval()
    rows = model.reconstruct(batch["pixel_values"], batch["mask"])
    pages = [batch["pixel_values"].float(), *[r.float() for r in rows]]
    tiles = [((p.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy() for p in pages]
    gap = 4
    count, size = tiles[0].shape[0], tiles[0].shape[1]
    canvas = np.full(((size + gap) * len(tiles) + gap, (size + gap) * count + gap, 3), 255, dtype=np.uint8)
    for r, row in enumerate(tiles):
        for c in range(count):
            y, x = gap + r * (size + gap), gap + c * (size + gap)
            canvas[y : y + size, x : x + size] = row[c]
    Image.fromarray(canvas).save(path)


def run_sam_pretrain(config: SamPretrainConfig, accelerator=None) -> Trainer:
    """Build, resume if asked, train, save (see module docstring). Returns the trainer."""
    from safetensors.torch import save_file

    model, tower, dataset, collate = build_mim_run(config)
    trainer = Trainer(model, config.train, dataset, collate, mim_loss, accelerator)
    resumed = trainer.maybe_resume()
    if resumed is not None:
        trainer.accelerator.print(f"resumed from {resumed} at step {trainer.step}")
    trainer.train()
    if not trainer.accelerator.is_main_process:
        return trainer
    out = Path(config.train.output_dir)
    (out / "config.yaml").write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))
    save_loss_curve(trainer.history, out / "loss_curve.png", "SAM masked-image pretraining: masked-patch MSE")
    tower.save_pretrained(out / "tower")
    head = {k: v.contiguous() for k, v in trainer.unwrapped.state_dict().items() if not k.startswith("sam.")}
    save_file(head, str(out / "mim_head.safetensors"))
    count = min(config.num_reconstructions, len(dataset))
    if count:
        batch = collate([dataset[i] for i in range(count)], list(range(count)))
        batch = {k: v.to(trainer.accelerator.device) for k, v in batch.items()}
        save_reconstruction_grid(trainer.unwrapped, batch, out / "reconstructions.png")
    return trainer
