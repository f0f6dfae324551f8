"""The tower inside a causal LM: page tokens first, then the text, loss on the text only.

```
page -> DeepEncoderModel -> (N_i, D) tokens -> connector (D -> LM width) ┐
text -> LM input embeddings -> (L_i, H) ──────────────────────────────────┴-> [image ; text] -> LM (inputs_embeds)
```
Any `AutoModelForCausalLM` works: the sequences go in as `inputs_embeds` with an attention mask, labels are -100
on image tokens and padding.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class OcrVisionLanguageModel(nn.Module):
    """DeepEncoder tower (or a PEFT wrapper of it) + connector + causal LM.

    Args:
        vision: `DeepEncoderModel`, a `peft.PeftModel` of it, or None when training on precomputed tokens
            (`image_embeds=`).
        language_model: any `PreTrainedModel` with a causal-LM head taking `inputs_embeds` and `labels`.
        image_dim: width of the tower's tokens (its `projector_dim`); taken from `vision` when given.
        connector: module mapping (N, image_dim) -> (N, hidden); a Linear when the widths differ, identity
            otherwise (DeepSeek-OCR's LM takes the 1280-d tokens directly).
    """

    def __init__(
        self,
        vision: nn.Module | None,
        language_model: nn.Module,
        image_dim: int | None = None,
        connector: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.vision = vision
        self.language_model = language_model
        hidden = language_model.get_input_embeddings().embedding_dim
        if image_dim is None:
            if vision is None:
                raise ValueError("image_dim is needed when no vision tower is given")
            image_dim = vision.config.projector_dim
        self.connector = connector or (nn.Identity() if image_dim == hidden else nn.Linear(image_dim, hidden))

    def image_tokens(
        self,
        pixel_values: torch.Tensor | Sequence[torch.Tensor] | None = None,
        pixel_values_tiles: torch.Tensor | None = None,
        tile_grids: Sequence[Sequence[int]] | None = None,
        image_embeds: Sequence[torch.Tensor] | None = None,
    ) -> list[torch.Tensor]:
        """Per page (N_i, hidden): the tower's page layout (or given `image_embeds`) through the connector."""
        if image_embeds is None:
            if self.vision is None:
                raise ValueError("no vision tower: pass image_embeds")
            image_embeds = self.vision(
                pixel_values=pixel_values, pixel_values_tiles=pixel_values_tiles, tile_grids=tile_grids
            ).image_embeds
        return [self.connector(tokens) for tokens in image_embeds]

    def build_inputs(
        self, image_tokens: list[torch.Tensor], input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Concatenate per sample [image tokens ; text tokens (unpadded)], right-pad to the longest.

        input_ids, attention_mask: (B, L) right-padded text. Returns inputs_embeds (B, T, H), attention_mask
        (B, T) and labels (B, T) with -100 on image tokens and padding.
        """
        text_embeds = self.language_model.get_input_embeddings()(input_ids)  # (B, L, H)
        lengths = attention_mask.sum(dim=1).tolist()
        total = max(img.shape[0] + n for img, n in zip(image_tokens, lengths))
        batch, hidden = input_ids.shape[0], text_embeds.shape[-1]
        embeds = text_embeds.new_zeros(batch, total, hidden)
        mask = attention_mask.new_zeros(batch, total)
        labels = torch.full((batch, total), -100, dtype=torch.long, device=input_ids.device)
        rows = []
        for row, (img, n) in enumerate(zip(image_tokens, lengths)):
            sequence = torch.cat([img.to(text_embeds.dtype), text_embeds[row, :n]])
            rows.append(nn.functional.pad(sequence, (0, 0, 0, total - sequence.shape[0])))
            mask[row, : sequence.shape[0]] = 1
            labels[row, img.shape[0] : img.shape[0] + n] = input_ids[row, :n]
        embeds = torch.stack(rows)
        return {"inputs_embeds": embeds, "attention_mask": mask, "labels": labels}

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor | Sequence[torch.Tensor] | None = None,
        pixel_values_tiles: torch.Tensor | None = None,
        tile_grids: Sequence[Sequence[int]] | None = None,
        image_embeds: Sequence[torch.Tensor] | None = None,
    ):
        """Returns the LM's output; `.loss` is the mean cross-entropy over the text tokens of the batch."""
        tokens = self.image_tokens(pixel_values, pixel_values_tiles, tile_grids, image_embeds)
        return self.language_model(**self.build_inputs(tokens, input_ids, attention_mask))

    @torch.no_grad()
    def generate_text(
        self,
        tokenizer,
        pixel_values: torch.Tensor | Sequence[torch.Tensor] | None = None,
        pixel_values_tiles: torch.Tensor | None = None,
        tile_grids: Sequence[Sequence[int]] | None = None,
        image_embeds: Sequence[torch.Tensor] | None = None,
        max_new_tokens: int = 64,
    ) -> list[str]:
        """Greedy transcription of each page (one page at a time, KV cache on)."""
        pages = self.image_tokens(pixel_values, pixel_values_tiles, tile_grids, image_embeds)
        embed = self.language_model.get_input_embeddings()
        results = []
        for tokens in pages:
            inputs = tokens[None].to(embed.weight.dtype)
            past, ids = None, []
            for _ in range(max_new_tokens):
                out = self.language_model(inputs_embeds=inputs, past_key_values=past, use_cache=True)
                past = out.past_key_values
                next_id = int(out.logits[0, -1].argmax())
                if next_id == tokenizer.eos_token_id:
                    break
                ids.append(next_id)
                inputs = embed(torch.tensor([[next_id]], device=inputs.device))
            results.append(tokenizer.decode(ids))
        return results


def tiny_causal_lm(
    vocab_size: int, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4, family: str = "llama", **overrides
):
    """A small randomly initialised `AutoModelForCausalLM` (`llama` or `qwen2`), for tests and CPU examples."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        family,
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        **overrides,
    )
    return AutoModelForCausalLM.from_config(config)
