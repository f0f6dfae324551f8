"""Walkthrough: from `deepencoder encode` to a language model's `inputs_embeds`.

    .venv/bin/python examples/make_examples.py
    .venv/bin/deepencoder encode examples/data --weights random --mode gundam --out runs/example
    .venv/bin/python examples/encode_to_lm.py runs/example

1. The run folder holds `manifest.jsonl` (one row per page) and one safetensors file per document with tensors
   `page.<i>`: (tokens, 1280), already laid out as DeepSeek-OCR's language model receives them (tile rows with
   newline tokens, global view rows with newline tokens, the view separator).
2. `EncodedPages` reads them back as a PyTorch Dataset.
3. Here a tiny randomly initialised Llama stands in for DeepSeek-OCR's 1280-wide language model: the page tokens go
   into `inputs_embeds` in place of the `<image>` placeholders, the text's token embeddings after them; the loss is
   taken on the text only, and `generate` continues from the page. (A language model of another width needs a
   connector, e.g. `torch.nn.Linear(1280, hidden_size)`, trained with it: see `deepencoder.training`.)
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from deepencoder.pipeline import EncodedPages


def byte_ids(text: str) -> torch.Tensor:
    """A stand-in tokenizer without downloads: UTF-8 bytes, ids 0-255 (BOS = 256)."""
    return torch.tensor([256, *text.encode("utf-8")])


def page_text(row: dict) -> str:
    """The transcription `make_examples.py` wrote beside the source (`<stem>.page<i>.txt` or `<stem>.txt`)."""
    source = Path(row["source"])
    for candidate in (source.with_name(f"{source.stem}.page{row['page']}.txt"), source.with_suffix(".txt")):
        if candidate.is_file():
            return candidate.read_text(encoding="utf-8")
    return ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", nargs="?", default="runs/example", help="output folder of `deepencoder encode`")
    args = parser.parse_args()

    pages = EncodedPages(Path(args.run) / "manifest.jsonl", dtype=torch.float32)
    print(f"{len(pages)} encoded pages in {args.run}")
    width = pages[0]["image_embeds"].shape[1]

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=257, hidden_size=width, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=10,
        num_key_value_heads=10, max_position_embeddings=4096,
    )  # fmt: skip
    language_model = LlamaForCausalLM(config).eval()
    embed = language_model.get_input_embeddings()

    for index in range(len(pages)):
        item = pages[index]
        image_embeds = item["image_embeds"]  # (tokens, 1280)
        text_ids = byte_ids(page_text(item))
        # [page tokens][text tokens]: the page takes the place of DeepSeek-OCR's <image> placeholder tokens
        inputs_embeds = torch.cat([image_embeds, embed(text_ids)])[None]  # (1, tokens + text, 1280)
        labels = torch.cat([torch.full((image_embeds.shape[0],), -100), text_ids])[None]  # no loss on the page
        with torch.no_grad():
            out = language_model(inputs_embeds=inputs_embeds, labels=labels)
            generated = language_model.generate(
                inputs_embeds=image_embeds[None], max_new_tokens=8, do_sample=False, pad_token_id=0
            )
        print(
            f"{item['source']} page {item['page']}: {image_embeds.shape[0]} page tokens + {len(text_ids)} text tokens "
            f"-> logits {tuple(out.logits.shape)}, text loss {out.loss.item():.3f} (random LM: about ln 257 = 5.55); "
            f"greedy continuation ids {generated[0].tolist()}"
        )


if __name__ == "__main__":
    main()
