"""Held-out OCR evaluation: greedy transcription, character error rate, exact match, and the page-blind control.

The control feeds the same model another page's tokens (a shuffle of the held-out set in which no page keeps its
own tokens) and scores the output against the real page's text. A model that reads has a low CER and a control
CER far above it; a model that writes the likely text of the training distribution has both about equal.

Works for any tower whose forward returns `.image_embeds` (a list of (N_i, D) tensors) on the processor's outputs,
and for precomputed tokens (`ManifestTokens`): pages go through `OcrVisionLanguageModel.image_tokens`.

```python
result = evaluate_ocr(model, held_out, collate, tokenizer, max_new_tokens=64)
result.metrics["cer"], result.metrics["cer_shuffled"]; write_evaluation(result, "runs/x")  # eval.jsonl, eval.json
```
"""

from __future__ import annotations

import contextlib
import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance between two strings (insertions, deletions, substitutions, each cost 1)."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, 1):
        current = [i]
        for j, char_b in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b)))
        previous = current
    return previous[-1]


def character_error_rate(outputs: Sequence[str], targets: Sequence[str]) -> float:
    """Corpus CER: total edit distance / total target characters."""
    chars = sum(len(t) for t in targets)
    if not chars:
        raise ValueError("targets have no characters")
    return sum(edit_distance(o, t) for o, t in zip(outputs, targets, strict=True)) / chars


def shuffled_order(count: int, seed: int = 0) -> list[int]:
    """A random permutation of range(count) with no fixed point (page i gets page order[i]'s tokens, never its
    own): a random cycle through all pages."""
    if count < 2:
        raise ValueError("the page-blind control needs at least 2 pages")
    cycle = list(range(count))
    random.Random(seed).shuffle(cycle)
    order = [0] * count
    for position, page in enumerate(cycle):
        order[page] = cycle[(position + 1) % count]
    return order


def ocr_metrics(rows: Sequence[dict[str, str]]) -> dict[str, Any]:
    """Rates from rows with `target`, `output` and `output_shuffled`.

    cer / cer_shuffled: corpus character error rates of the model and of the page-blind control; control_ratio:
    cer_shuffled / cer (None when cer is 0); exact_match(_shuffled): fraction of pages transcribed exactly;
    distinct_outputs: distinct outputs / pages."""
    targets = [row["target"] for row in rows]
    outputs = [row["output"] for row in rows]
    shuffled = [row["output_shuffled"] for row in rows]
    cer = character_error_rate(outputs, targets)
    cer_shuffled = character_error_rate(shuffled, targets)
    return {
        "pages": len(rows),
        "target_chars": sum(len(t) for t in targets),
        "cer": cer,
        "cer_shuffled": cer_shuffled,
        "control_ratio": cer_shuffled / cer if cer > 0 else None,
        "exact_match": sum(o == t for o, t in zip(outputs, targets)) / len(rows),
        "exact_match_shuffled": sum(o == t for o, t in zip(shuffled, targets)) / len(rows),
        "distinct_outputs": len(set(outputs)) / len(rows),
    }


@dataclass
class OcrEvaluation:
    """rows: per held-out page `index`, `target`, `output`, `output_shuffled`, `shuffled_from` (the page whose
    tokens the control saw); metrics: `ocr_metrics(rows)`."""

    rows: list[dict[str, Any]]
    metrics: dict[str, Any]

    def summary(self) -> str:
        m = self.metrics
        ratio = "inf" if m["control_ratio"] is None else f"{m['control_ratio']:.1f}x"
        return (
            f"held-out pages {m['pages']}: CER {m['cer']:.3f}, exact match {m['exact_match']:.0%}, "
            f"distinct outputs {m['distinct_outputs']:.0%}; page-blind control CER {m['cer_shuffled']:.3f} "
            f"({ratio} the model's)"
        )


def _to_device(value, device: torch.device):
    """Tensors, and tensors inside lists / tuples / dicts (e.g. per-page `image_embeds`), moved to `device`."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)) and any(isinstance(v, torch.Tensor) for v in value):
        return type(value)(_to_device(v, device) for v in value)
    return value


@torch.no_grad()
def evaluate_ocr(
    model,
    dataset: Dataset,
    collate: Callable[[list], dict],
    tokenizer,
    max_new_tokens: int = 64,
    num_samples: int | None = None,
    batch_size: int = 16,
    seed: int = 0,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> OcrEvaluation:
    """Greedy transcription of the first `num_samples` pages of `dataset` (all when None), and of the same pages
    with shuffled page tokens (`shuffled_order(n, seed)`).

    model: an `OcrVisionLanguageModel` (unwrapped); dataset items `{"image" | "image_embeds", "text"}`; collate:
    the training collator (`OcrCollator`), whose vision keys go to `model.image_tokens`. The model is put in eval
    mode and back. Page tokens are kept on the CPU between the two decoding passes."""
    count = len(dataset) if num_samples is None else min(num_samples, len(dataset))
    order = shuffled_order(count, seed)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        pages: list[torch.Tensor] = []
        targets: list[str] = []
        for start in range(0, count, batch_size):
            items = [dataset[i] for i in range(start, min(start + batch_size, count))]
            targets.extend(item["text"] for item in items)
            batch = _to_device(collate(items), device)
            vision = {k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask")}
            with autocast():
                pages.extend(tokens.cpu() for tokens in model.image_tokens(**vision))

        def decode(page_order: Sequence[int]) -> list[str]:
            texts: list[str] = []
            for start in range(0, count, batch_size):
                chunk = [pages[i].to(device) for i in page_order[start : start + batch_size]]
                with autocast():
                    texts.extend(model.greedy_decode(chunk, tokenizer, max_new_tokens))
            return texts

        outputs = decode(range(count))
        shuffled = decode(order)
    finally:
        model.train(was_training)
    rows = [
        {
            "index": i,
            "target": targets[i],
            "output": outputs[i],
            "output_shuffled": shuffled[i],
            "shuffled_from": order[i],
        }
        for i in range(count)
    ]
    return OcrEvaluation(rows, ocr_metrics(rows))


def write_evaluation(result: OcrEvaluation, output_dir: str | Path, extra: dict[str, Any] | None = None) -> None:
    """`eval.jsonl` (one row per page) and `eval.json` (the metrics, plus `extra`) in `output_dir`."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "eval.jsonl", "w", encoding="utf-8") as handle:
        for row in result.rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    (out / "eval.json").write_text(json.dumps({**result.metrics, **(extra or {})}, indent=2) + "\n")
