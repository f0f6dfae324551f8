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

    def image_tokens(self, image_embeds: Sequence[torch.Tensor] | None = None, **vision_inputs) -> list[torch.Tensor]:
        """Per page (N_i, hidden): the tower's page tokens (or the given `image_embeds`) through the connector.

        vision_inputs: what the tower's image processor returned (`pixel_values`, `pixel_values_tiles`,
        `tile_grids`, ...), passed to the tower as is; only `tower(**vision_inputs).image_embeds` (a list of
        (N_i, D) tensors) is relied on, so any tower with that output works."""
        if image_embeds is None:
            if self.vision is None:
                raise ValueError("no vision tower: pass image_embeds")
            image_embeds = self.vision(**vision_inputs).image_embeds
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
        batch = input_ids.shape[0]
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
        image_embeds: Sequence[torch.Tensor] | None = None,
        **vision_inputs,
    ):
        """Returns the LM's output; `.loss` is the mean cross-entropy over the text tokens of the batch.
        vision_inputs: the tower's processor outputs (see `image_tokens`)."""
        tokens = self.image_tokens(image_embeds, **vision_inputs)
        return self.language_model(**self.build_inputs(tokens, input_ids, attention_mask))

    @torch.no_grad()
    def generate_text(
        self,
        tokenizer,
        image_embeds: Sequence[torch.Tensor] | None = None,
        max_new_tokens: int = 64,
        **vision_inputs,
    ) -> list[str]:
        """Greedy transcription of each page (`image_embeds` or the tower's processor outputs)."""
        pages = self.image_tokens(image_embeds, **vision_inputs)
        return self.greedy_decode(pages, tokenizer, max_new_tokens)

    @torch.no_grad()
    def greedy_decode(self, pages: Sequence[torch.Tensor], tokenizer, max_new_tokens: int = 64) -> list[str]:
        """Greedy text after each page's (N_i, hidden) tokens (already through the connector), KV cache on.

        Pages with the same token count decode together as one batch (no padding, so any causal LM's own position
        handling applies unchanged); a row's text ends at its first eos."""
        embed = self.language_model.get_input_embeddings()
        eos = tokenizer.eos_token_id
        groups: dict[int, list[int]] = {}
        for index, tokens in enumerate(pages):
            groups.setdefault(int(tokens.shape[0]), []).append(index)
        results: list[str] = [""] * len(pages)
        for indices in groups.values():
            inputs = torch.stack([pages[i] for i in indices]).to(embed.weight.dtype)  # (b, N, hidden)
            past, ids = None, []
            finished = torch.zeros(len(indices), dtype=torch.bool, device=inputs.device)
            for _ in range(max_new_tokens):
                out = self.language_model(inputs_embeds=inputs, past_key_values=past, use_cache=True)
                past = out.past_key_values
                next_ids = out.logits[:, -1].argmax(dim=-1)  # (b,)
                finished = finished | (next_ids == eos)
                ids.append(next_ids)
                if bool(finished.all()):
                    break
                inputs = embed(next_ids[:, None])
            rows = torch.stack(ids, dim=1).tolist() if ids else [[] for _ in indices]
            for index, row in zip(indices, rows):
                text_ids = row[: row.index(eos)] if eos in row else row
                results[index] = tokenizer.decode(text_ids)
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
