"""Text side of OCR fine-tuning: a dependency-free byte tokenizer and text batching for causal LMs."""

from __future__ import annotations

from collections.abc import Sequence

import torch


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255 plus `pad` (256), `bos` (257), `eos` (258): vocab_size 259. Needs no files, so
    tests and examples can pair the tower with a randomly initialised LM."""

    vocab_size = 259
    pad_token_id = 256
    bos_token_id = 257
    eos_token_id = 258

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


def encode_text(tokenizer, text: str) -> list[int]:
    """Token ids of `text` without special tokens, for `ByteTokenizer` or any transformers tokenizer."""
    if isinstance(tokenizer, ByteTokenizer) or not callable(tokenizer):
        return tokenizer.encode(text)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def text_batch(tokenizer, texts: Sequence[str], max_tokens: int | None = None) -> dict[str, torch.Tensor]:
    """Texts -> right-padded `input_ids` (B, L) ending in eos and `attention_mask` (B, L); truncated to
    `max_tokens` (eos kept)."""
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    sequences = []
    for text in texts:
        ids = encode_text(tokenizer, text)
        if max_tokens is not None:
            ids = ids[: max_tokens - 1]
        sequences.append([*ids, eos])
    length = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), length), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, ids in enumerate(sequences):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention_mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}
