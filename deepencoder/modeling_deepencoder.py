"""DeepEncoderModel: SAM stage -> CLIP stage -> join (2048) -> projector -> per-page token layout."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput

from .attention import REL_POS_KERNELS
from .configuration_deepencoder import DeepEncoderConfig
from .freezing import FreezeTargets, FreezingMixin
from .layout import group_views_by_size, layout_page, tile_counts
from .modeling_clip import ClipEmbeddings, DeepEncoderClipModel
from .modeling_sam import DeepEncoderSamModel, SamAttention
from .modeling_utils import CompileMixin, TowerLoadingMixin, checkpoint_loader


@dataclass
class DeepEncoderViewsOutput(ModelOutput):
    """Output of `DeepEncoderModel.encode_views` for a batch of same-size views.

    image_embeds: (B, h*w, projector_dim), projected tokens, row-major.
    pre_projector: (B, h*w, 2048), `cat(clip_tokens, sam_tokens)`, when requested.
    sam_hidden_states / clip_hidden_states: per-block outputs, when `output_hidden_states`.
    grid: (h, w) token grid.
    """

    image_embeds: torch.Tensor | None = None
    pre_projector: torch.Tensor | None = None
    sam_hidden_states: tuple[torch.Tensor, ...] | None = None
    clip_hidden_states: tuple[torch.Tensor, ...] | None = None
    grid: tuple[int, int] | None = None


@dataclass
class DeepEncoderOutput(ModelOutput):
    """Output of `DeepEncoderModel.forward`.

    image_embeds: list with one (num_tokens_i, projector_dim) tensor per page, laid out as DeepSeek-OCR does
        ([tile rows + newlines] + [global rows + newlines] + view_separator).
    global_embeds: (B, h*w, D) projected global-view tokens (tensor when all pages share the grid, else list).
    tile_embeds: (T, th*tw, D) projected tile tokens of all pages, or None.
    pre_projector: same structure as image_embeds but 2048-d join features without newline/separator tokens
        (per page: tiles then global view, row-major), when `output_pre_projector=True`.
    sam_hidden_states / clip_hidden_states: with `output_hidden_states=True`, the global views' per-block states
        (SAM: patch embedding + each block, (B, H/16, W/16, C); CLIP: after pre_layrnorm + each layer,
        (B, 1 + h*w, C)); each entry a tensor when all pages share the grid, else a list with one (1, ...) tensor
        per page. tile_sam_hidden_states / tile_clip_hidden_states: the same for all tiles, (T, ...), or None.
    """

    image_embeds: list[torch.Tensor] | None = None
    global_embeds: torch.Tensor | list[torch.Tensor] | None = None
    tile_embeds: torch.Tensor | None = None
    pre_projector: list[torch.Tensor] | None = None
    sam_hidden_states: tuple | None = None
    clip_hidden_states: tuple | None = None
    tile_sam_hidden_states: tuple[torch.Tensor, ...] | None = None
    tile_clip_hidden_states: tuple[torch.Tensor, ...] | None = None


FREEZE_TARGETS = FreezeTargets(
    roots=("sam.", "clip.", "projector.", "image_newline", "view_separator"),
    ranges={
        "sam": "sam.blocks.",
        "sam.blocks": "sam.blocks.",
        "clip": "clip.transformer.layers.",
        "clip.layers": "clip.transformer.layers.",
    },
    aliases={
        "sam.compressor": ("sam.net_",),
        "clip.layers": ("clip.transformer.layers.",),
        "projector": ("projector.", "image_newline", "view_separator"),
        "layout": ("image_newline", "view_separator"),
    },
    summary={
        "sam.patch_embed+pos_embed": ("sam.patch_embed.", "sam.pos_embed"),
        "sam.blocks": ("sam.blocks.",),
        "sam.neck": ("sam.neck.",),
        "sam.compressor": ("sam.net_",),
        "clip.embeddings+pre_layrnorm": ("clip.embeddings.", "clip.pre_layrnorm."),
        "clip.layers": ("clip.transformer.layers.",),
        "projector+layout": ("projector.", "image_newline", "view_separator"),
    },
)


class DeepEncoderPreTrainedModel(FreezingMixin, PreTrainedModel):
    config_class = DeepEncoderConfig
    config: DeepEncoderConfig
    base_model_prefix = "deepencoder"
    main_input_name = "pixel_values"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _no_split_modules = ["SamBlock", "ClipLayer"]
    _freeze_targets = FREEZE_TARGETS

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, SamAttention) and module.use_rel_pos:
            init.normal_(module.rel_pos_h, std=std)
            init.normal_(module.rel_pos_w, std=std)
        elif isinstance(module, DeepEncoderSamModel) and module.pos_embed is not None:
            init.normal_(module.pos_embed, std=std)
        elif isinstance(module, ClipEmbeddings):
            init.normal_(module.class_embedding, std=module.class_embedding.shape[0] ** -0.5)
            init.normal_(module.position_embedding.weight, std=std)
        elif isinstance(module, DeepEncoderModel):
            embed_std = 1 / math.sqrt(self.config.projector_dim)
            init.normal_(module.image_newline, std=embed_std)
            init.normal_(module.view_separator, std=embed_std)


class DeepEncoderModel(CompileMixin, TowerLoadingMixin, DeepEncoderPreTrainedModel):
    """The DeepSeek-OCR vision tower.

    `forward(pixel_values, pixel_values_tiles=None, tile_grids=None)` takes the processor's output and returns one
    token sequence per page. Stages are reachable on their own: `model.sam(pixel_values)` (B, 1024, H/64, W/64),
    `model.sam.neck_features(pixel_values)` (B, 256, H/16, W/16), `model.clip(sam_features)` (B, 1 + h*w, 1024).
    """

    _auto_class = "AutoModel"  # save_pretrained writes auto_map and the model files (trust_remote_code loading)

    def __init__(self, config: DeepEncoderConfig) -> None:
        super().__init__(config)
        self.sam = DeepEncoderSamModel(config.sam_config)
        self.clip = DeepEncoderClipModel(config.clip_config)
        self.projector = nn.Linear(config.join_dim, config.projector_dim, bias=config.projector_bias)
        self.image_newline = nn.Parameter(torch.zeros(config.projector_dim))
        self.view_separator = nn.Parameter(torch.zeros(config.projector_dim))
        self.post_init()

    # ------------------------------------------------------------------ loading
    # (`from_pretrained`, which also converts other checkpoints of the tower, and `from_transformers`: from
    # `TowerLoadingMixin`, deepencoder/modeling_utils.py)
    @classmethod
    def from_deepseek_ocr(
        cls,
        path_or_repo_id: str,
        *,
        revision: str | None = None,
        dtype: torch.dtype | None = None,
        cache_dir: str | None = None,
        local_files_only: bool = False,
        token: str | bool | None = None,
        subfolder: str = "",
        force_download: bool = False,
        **kwargs,
    ) -> DeepEncoderModel:
        """Build the tower from a DeepSeek-OCR checkpoint (local directory of *.safetensors, or a hub id), reading
        only the vision tensors. `revision`, `cache_dir`, `local_files_only`, `token`, `subfolder` and
        `force_download` mean what they mean to `from_pretrained`; the byte ranges read from the hub are kept in its
        cache. Extra keyword arguments go to `DeepEncoderConfig`. Needs the `deepencoder` package imported (its
        conversion layer)."""
        hub = dict(revision=revision, cache_dir=cache_dir, local_files_only=local_files_only, token=token)
        hub.update(subfolder=subfolder, force_download=force_download)
        return checkpoint_loader("deepseek-ocr")(cls, path_or_repo_id, dtype=dtype, config_kwargs=kwargs, **hub)

    def set_attention_kernel(self, rel_pos: str | None = None) -> None:
        """Pin the kernel SAM's rel-pos attention runs with (`mask`, `folded`, `eager`, or one registered with
        `deepencoder.attention.register_rel_pos_kernel`); None restores the per-device default. A run-time choice:
        it is not saved with the model and does not change the math (tests keep every kernel equal)."""
        if rel_pos is not None and rel_pos not in REL_POS_KERNELS:
            raise ValueError(f"unknown rel-pos kernel {rel_pos!r}; registered: {sorted(REL_POS_KERNELS)}")
        for module in self.modules():
            if isinstance(module, SamAttention):
                module.kernel = rel_pos

    # ------------------------------------------------------------------ compute
    def encode_views(
        self,
        pixel_values: torch.Tensor,
        output_hidden_states: bool = False,
        output_pre_projector: bool = False,
    ) -> DeepEncoderViewsOutput:
        """Same-size views (B, 3, H, W) -> projected tokens (B, H/64 * W/64, projector_dim)."""
        neck_in, sam_states = self.sam.trunk(pixel_values, output_hidden_states=output_hidden_states)
        sam_features = self.sam.compress(self.sam.neck(neck_in.permute(0, 3, 1, 2)))  # (B, 1024, h, w)
        clip_out, clip_states = self.clip.encode(
            self.clip.embeddings(sam_features), output_hidden_states=output_hidden_states
        )
        joined = torch.cat([clip_out[:, 1:], sam_features.flatten(2).transpose(1, 2)], dim=-1)  # (B, h*w, 2048)
        return DeepEncoderViewsOutput(
            image_embeds=self.projector(joined),
            pre_projector=joined if output_pre_projector else None,
            sam_hidden_states=sam_states,
            clip_hidden_states=clip_states,
            grid=(sam_features.shape[2], sam_features.shape[3]),
        )

    def _encode_globals(
        self,
        pixel_values: torch.Tensor | Sequence[torch.Tensor],
        output_pre_projector: bool,
        output_hidden_states: bool = False,
    ) -> tuple[list[torch.Tensor], list[torch.Tensor | None], list[tuple[int, int]], tuple | None, tuple | None]:
        """Global views, one batched pass per distinct size. Returns per page: projected tokens (h*w, D),
        pre-projector features (h*w, 2048) or None, and the (h, w) grid; then the SAM and CLIP hidden states
        (see `DeepEncoderOutput`) or None."""
        groups = group_views_by_size(pixel_values)
        count = sum(len(indices) for indices, _ in groups)
        embeds: list = [None] * count
        pre: list = [None] * count
        grids: list = [None] * count
        states: dict[str, list] = {"sam": [None] * count, "clip": [None] * count}
        for indices, views in groups:
            out = self.encode_views(
                views, output_pre_projector=output_pre_projector, output_hidden_states=output_hidden_states
            )
            for position, i in enumerate(indices):
                embeds[i] = out.image_embeds[position]
                pre[i] = out.pre_projector[position] if output_pre_projector else None
                grids[i] = out.grid
                if output_hidden_states:
                    states["sam"][i] = [h[position : position + 1] for h in out.sam_hidden_states]
                    states["clip"][i] = [h[position : position + 1] for h in out.clip_hidden_states]
        if not output_hidden_states:
            return embeds, pre, grids, None, None
        if len(groups) == 1:  # one size: keep the batched tensors
            return embeds, pre, grids, out.sam_hidden_states, out.clip_hidden_states
        per_block = {k: tuple(list(layer) for layer in zip(*pages)) for k, pages in states.items()}
        return embeds, pre, grids, per_block["sam"], per_block["clip"]

    def forward(
        self,
        pixel_values: torch.Tensor | Sequence[torch.Tensor],
        pixel_values_tiles: torch.Tensor | None = None,
        tile_grids: Sequence[Sequence[int]] | None = None,
        output_pre_projector: bool = False,
        return_dict: bool = True,
        output_hidden_states: bool = False,
        **kwargs,
    ) -> DeepEncoderOutput | tuple:
        """pixel_values: (B, 3, S, S) global views, or a list of (3, H, W) views of different sizes (`native`);
        pixel_values_tiles: (T, 3, t, t) all tiles of the batch in page order; tile_grids: per page (cols, rows)
        as Python ints ((1, 1) for an untiled page). Returns `DeepEncoderOutput`."""
        kwargs.pop("num_image_tokens", None)
        if kwargs:
            raise TypeError(f"unexpected arguments: {sorted(kwargs)}")
        grids, counts = tile_counts(pixel_values, tile_grids, pixel_values_tiles)
        batch = len(grids)
        total_tiles = sum(counts)

        global_embeds, global_pre, global_grids, sam_states, clip_states = self._encode_globals(
            pixel_values, output_pre_projector, output_hidden_states
        )
        tiles_out = None
        tile_batch = None
        tile_embeds: list = [None] * batch
        tile_pre: list = [None] * batch
        if total_tiles:
            tiles_out = self.encode_views(
                pixel_values_tiles, output_pre_projector=output_pre_projector, output_hidden_states=output_hidden_states
            )
            tile_batch = tiles_out.image_embeds  # (T, th*tw, D)
            tile_embeds = [t if n else None for t, n in zip(tile_batch.split(counts), counts)]
            if output_pre_projector:
                tile_pre = [t if n else None for t, n in zip(tiles_out.pre_projector.split(counts), counts)]

        pages = [
            layout_page(
                global_embeds[i], global_grids[i], self.image_newline, self.view_separator, tile_embeds[i], grids[i]
            )
            for i in range(batch)
        ]
        pre = None
        if output_pre_projector:
            pre = [
                torch.cat([tile_pre[i].flatten(0, 1), global_pre[i]]) if counts[i] else global_pre[i]
                for i in range(batch)
            ]
        same_grid = len(set(global_grids)) == 1
        output = DeepEncoderOutput(
            image_embeds=pages,
            global_embeds=torch.stack(global_embeds) if same_grid else global_embeds,
            tile_embeds=tile_batch,
            pre_projector=pre,
            sam_hidden_states=sam_states,
            clip_hidden_states=clip_states,
            tile_sam_hidden_states=tiles_out.sam_hidden_states if tiles_out is not None else None,
            tile_clip_hidden_states=tiles_out.clip_hidden_states if tiles_out is not None else None,
        )
        return output if return_dict else output.to_tuple()
