"""Masked image modeling for the SAM stage (SimMIM-style, MAE-style targets).

SAM's ViT attends in 14x14 windows in most blocks, so MAE's trick of dropping masked patches would break the window
grid. Instead every masked patch embedding is replaced in place by a learned mask token (SimMIM), the full grid runs
through the blocks (windows, global blocks and rel-pos unchanged), and a light decoder predicts each patch's pixels
from the ViT output; the loss is the mean squared error over masked patches only, against per-patch normalised
pixels (MAE's `norm_pix_loss`) by default.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils import ModelOutput

from ..modeling_sam import DeepEncoderSamModel, resize_abs_pos


def patchify(pixel_values: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/p, W/p, p*p*C), pixels of each patch in (row, col, channel) order."""
    batch, channels, height, width = pixel_values.shape
    x = pixel_values.reshape(batch, channels, height // patch, patch, width // patch, patch)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(batch, height // patch, width // patch, patch * patch * channels)


def unpatchify(patches: torch.Tensor, patch: int, channels: int = 3) -> torch.Tensor:
    """Inverse of `patchify`: (B, h, w, p*p*C) -> (B, C, h*p, w*p)."""
    batch, h, w, _ = patches.shape
    x = patches.reshape(batch, h, w, patch, patch, channels).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(batch, channels, h * patch, w * patch)


def random_patch_mask(
    batch: int,
    height: int,
    width: int,
    ratio: float = 0.75,
    block: int = 1,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """(B, height, width) bool, True = masked. Exactly round(ratio * cells) cells of `block` x `block` patches are
    masked per image (SimMIM masks 32 px cells = 2x2 SAM patches with block=2), so every image masks as many
    patches (edge cells of a grid that `block` does not divide are partial)."""
    cells_h, cells_w = -(-height // block), -(-width // block)
    cells = cells_h * cells_w
    count = int(round(ratio * cells))
    noise = torch.rand(batch, cells, generator=generator)
    order = noise.argsort(dim=1)
    mask = torch.zeros(batch, cells, dtype=torch.bool)
    mask.scatter_(1, order[:, :count], True)
    mask = mask.reshape(batch, cells_h, cells_w)
    mask = mask.repeat_interleave(block, 1).repeat_interleave(block, 2)[:, :height, :width]
    return mask.to(device) if device is not None else mask


@dataclass
class MaskedImageModelingOutput(ModelOutput):
    """loss (scalar), prediction (B, h, w, p*p*3), target (B, h, w, p*p*3), mask (B, h, w) bool."""

    loss: torch.Tensor | None = None
    prediction: torch.Tensor | None = None
    target: torch.Tensor | None = None
    mask: torch.Tensor | None = None


class SamMaskedImageModeling(nn.Module):
    """SAM trunk + mask token + light pixel decoder.

    Args:
        sam: the `DeepEncoderSamModel` to pretrain (shared, not copied: `model.sam` of a tower trains in place).
        mask_ratio: share of patches masked (0.75).
        mask_block: side of the masking cell in patches (1: per patch).
        decoder_hidden: width of the decoder's hidden layer; 0 gives SimMIM's single linear head.
        norm_pix_loss: regress per-patch normalised pixels (MAE); raw pixels when False.
    """

    def __init__(
        self,
        sam: DeepEncoderSamModel,
        mask_ratio: float = 0.75,
        mask_block: int = 1,
        decoder_hidden: int = 256,
        norm_pix_loss: bool = True,
    ) -> None:
        super().__init__()
        if not 0.0 < mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in (0, 1), got {mask_ratio}")
        config = sam.config
        self.sam = sam
        self.patch_size = config.patch_size
        self.num_channels = config.num_channels
        self.mask_ratio = mask_ratio
        self.mask_block = mask_block
        self.norm_pix_loss = norm_pix_loss
        self.mask_token = nn.Parameter(torch.zeros(config.hidden_size))
        nn.init.normal_(self.mask_token, std=0.02)
        out = self.patch_size**2 * config.num_channels
        if decoder_hidden:
            self.decoder = nn.Sequential(
                nn.LayerNorm(config.hidden_size),
                nn.Linear(config.hidden_size, decoder_hidden),
                nn.GELU(),
                nn.Linear(decoder_hidden, out),
            )
        else:
            self.decoder = nn.Sequential(nn.LayerNorm(config.hidden_size), nn.Linear(config.hidden_size, out))

    def encode(self, pixel_values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W), mask (B, H/p, W/p) -> ViT output (B, H/p, W/p, C) with masked patches as mask tokens."""
        x = self.sam.patch_embed(pixel_values)  # (B, h, w, C)
        token = self.mask_token.to(x.dtype)
        x = torch.where(mask[..., None], token, x)
        if self.sam.pos_embed is not None:
            x = x + resize_abs_pos(self.sam.pos_embed, x.shape[1], x.shape[2])
        for block in self.sam.blocks:
            x = block(x)
        return x

    def target(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> regression target per patch (B, h, w, p*p*3), fp32."""
        target = patchify(pixel_values.float(), self.patch_size)
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1e-6).sqrt()
        return target

    def forward(
        self, pixel_values: torch.Tensor, mask: torch.Tensor | None = None, generator: torch.Generator | None = None
    ) -> MaskedImageModelingOutput:
        """pixel_values: (B, 3, H, W), H and W multiples of the patch size. mask: (B, H/p, W/p) bool, drawn with
        `mask_ratio` when None. loss = sum over masked patches of the per-patch MSE / number of masked patches."""
        batch, _, height, width = pixel_values.shape
        grid = (height // self.patch_size, width // self.patch_size)
        if mask is None:
            mask = random_patch_mask(batch, *grid, self.mask_ratio, self.mask_block, generator, pixel_values.device)
        prediction = self.decoder(self.encode(pixel_values, mask))  # (B, h, w, p*p*3)
        target = self.target(pixel_values)
        per_patch = F.mse_loss(prediction.float(), target, reduction="none").mean(dim=-1)  # (B, h, w)
        weights = mask.to(per_patch.dtype)
        loss = (per_patch * weights).sum() / weights.sum().clamp_min(1.0)
        return MaskedImageModelingOutput(loss=loss, prediction=prediction, target=target, mask=mask)

    @torch.no_grad()
    def reconstruct(
        self, pixel_values: torch.Tensor, mask: torch.Tensor | None = None, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Images for inspection, all (B, 3, H, W) in pixel_values' range: the masked input (masked patches grey),
        the prediction (de-normalised with each patch's own statistics under `norm_pix_loss`, MAE's
        visualisation), and the prediction pasted into the visible patches."""
        out = self(pixel_values, mask, generator)
        prediction = out.prediction.float()
        if self.norm_pix_loss:
            patches = patchify(pixel_values.float(), self.patch_size)
            mean = patches.mean(dim=-1, keepdim=True)
            std = (patches.var(dim=-1, keepdim=True) + 1e-6).sqrt()
            prediction = prediction * std + mean
        pred_image = unpatchify(prediction, self.patch_size, self.num_channels)
        pixel_mask = out.mask.repeat_interleave(self.patch_size, 1).repeat_interleave(self.patch_size, 2)[:, None]
        masked = torch.where(pixel_mask, torch.zeros_like(pixel_values), pixel_values)
        pasted = torch.where(pixel_mask, pred_image.to(pixel_values.dtype), pixel_values)
        return masked, pred_image, pasted
