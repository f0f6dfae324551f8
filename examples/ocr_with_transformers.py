"""Page -> text with transformers' DeepSeek-OCR models and this library's tower as their vision engine.

transformers loads the checkpoint (`UnlimitedOcrForConditionalGeneration` for DeepSeek-OCR's architecture,
`DeepseekOcr2ForConditionalGeneration` for DeepSeek-OCR-2, with its processor) as usual;
`deepencoder.integrations.attach(model)` then routes the image features through `DeepEncoderModel` (or
`DeepEncoderV2Model`) built on the model's own weights (nothing copied or loaded twice). The processor's inputs and
`generate` are unchanged.

    python examples/ocr_with_transformers.py page.png --model baidu/Unlimited-OCR        # hub id or local directory
    python examples/ocr_with_transformers.py scan1.png scan2.jpg --model /ckpt/Unlimited-OCR --dtype bf16 --device cuda
    python examples/ocr_with_transformers.py page.png --model /ckpt/Unlimited-OCR --compare   # also the stock path

`--compare` runs transformers' own vision path too and prints whether the generated token ids are identical and both
run times. `--prompt` is the user message after the image (`document parsing.` by default; Unlimited-OCR's card also
uses `Free OCR.`). The process runs under the fastest allocator installed (`deepencoder.runtime.configure_allocator`;
`DEEPENCODER_ALLOCATOR=system` keeps yours).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from deepencoder.dtypes import DTYPE_NAMES, parse_dtype
from deepencoder.image_processing_deepencoder import load_image
from deepencoder.integrations import attach, detach


@dataclass
class PageResult:
    page: str
    text: str
    token_ids: list[int]
    seconds: float


def page_inputs(processor, page: str, prompt: str, device: torch.device, dtype: torch.dtype):
    """One page and the prompt through the checkpoint's chat template and processor."""
    messages = [
        {
            "role": "user",
            "content": [{"type": "image", "image": load_image(page)}, {"type": "text", "text": prompt}],
        }
    ]
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    return inputs.to(device, dtype)  # floating tensors take the model's dtype, ids stay integers


@torch.inference_mode()
def transcribe(model, processor, pages: Sequence[str], prompt: str, max_new_tokens: int) -> list[PageResult]:
    """Greedy transcription of each page with whatever vision path `model` has now."""
    results = []
    for page in pages:
        inputs = page_inputs(processor, page, prompt, model.device, model.dtype)
        start = time.perf_counter()
        output = model.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens)
        seconds = time.perf_counter() - start
        new_ids = output[0, inputs["input_ids"].shape[1] :].tolist()
        text = processor.decode(new_ids, skip_special_tokens=True)
        results.append(PageResult(str(page), text, new_ids, seconds))
    return results


def main(argv: Sequence[str] | None = None) -> dict[str, list[PageResult]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pages", nargs="+", help="page images")
    parser.add_argument("--model", required=True, help="Unlimited-OCR checkpoint: hub id or local directory")
    parser.add_argument("--prompt", default="document parsing.")
    parser.add_argument("--max-new-tokens", type=int, default=2048)
    parser.add_argument("--dtype", choices=DTYPE_NAMES, default="fp32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--compare", action="store_true", help="also run transformers' stock vision path")
    args = parser.parse_args(argv)

    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(args.model)
    model = AutoModelForImageTextToText.from_pretrained(args.model, dtype=parse_dtype(args.dtype))
    model = model.to(args.device).eval()

    attach(model)
    runs = {"deepencoder": transcribe(model, processor, args.pages, args.prompt, args.max_new_tokens)}
    if args.compare:
        detach(model)
        runs["transformers"] = transcribe(model, processor, args.pages, args.prompt, args.max_new_tokens)

    for index, result in enumerate(runs["deepencoder"]):
        print(f"=== {result.page} ({len(result.token_ids)} tokens, {result.seconds:.1f} s)")
        print(result.text)
        if args.compare:
            stock = runs["transformers"][index]
            same = "identical" if stock.token_ids == result.token_ids else "DIFFERENT"
            print(f"--- transformers' vision path: {same} token ids, {stock.seconds:.1f} s")
    return runs


if __name__ == "__main__":
    from deepencoder.runtime import configure_allocator

    configure_allocator()  # process-level tuning belongs to entry points (may re-execute this command once)
    main()
