"""Held-out OCR evaluation: edit distance and rates, the page-blind shuffle, batched greedy decoding against a plain
uncached loop, any tower through `.image_embeds`, real-data loaders, the eval hook of the trainer, and a short run
that has to read pages it never saw."""

from __future__ import annotations

import functools
import json
import random
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from deepencoder.training import (
    ByteTokenizer,
    ImageTextFolder,
    OcrCollator,
    OcrFinetuneConfig,
    OcrVisionLanguageModel,
    SyntheticPages,
    build_optimizer,
    character_error_rate,
    edit_distance,
    evaluate_ocr,
    ocr_metrics,
    run_ocr_finetune,
    shuffled_order,
    tiny_causal_lm,
)
from deepencoder.training.config import OptimConfig


def _reference_distance(a: str, b: str) -> int:
    """Levenshtein distance by its recursive definition (memoised), independent of the library's row DP."""

    @functools.cache
    def d(i: int, j: int) -> int:
        if i == 0 or j == 0:
            return i + j
        return min(d(i - 1, j) + 1, d(i, j - 1) + 1, d(i - 1, j - 1) + (a[i - 1] != b[j - 1]))

    return d(len(a), len(b))


def test_edit_distance_and_cer():
    assert edit_distance("kitten", "sitting") == 3
    assert edit_distance("", "abc") == 3 and edit_distance("abc", "") == 3 and edit_distance("same", "same") == 0
    rng = random.Random(0)
    for _ in range(300):
        a = "".join(rng.choice("ab c\n") for _ in range(rng.randint(0, 9)))
        b = "".join(rng.choice("ab c\n") for _ in range(rng.randint(0, 9)))
        assert edit_distance(a, b) == _reference_distance(a, b), (a, b)
    # corpus CER: (1 + 4) edits over (4 + 4) target characters
    assert character_error_rate(["abcx", ""], ["abcd", "wxyz"]) == pytest.approx(5 / 8)
    with pytest.raises(ValueError):
        character_error_rate([""], [""])


def test_shuffled_order_is_a_derangement():
    for count in (2, 3, 7, 40):
        for seed in range(5):
            order = shuffled_order(count, seed)
            assert sorted(order) == list(range(count))
            assert all(order[i] != i for i in range(count))
            assert order == shuffled_order(count, seed)
    assert shuffled_order(40, 0) != shuffled_order(40, 1)
    with pytest.raises(ValueError):
        shuffled_order(1)


def test_ocr_metrics_from_rows():
    rows = [
        {"target": "abc", "output": "abc", "output_shuffled": "xyz"},
        {"target": "hello", "output": "hallo", "output_shuffled": "abc"},
        {"target": "12", "output": "abc", "output_shuffled": "12"},
    ]
    m = ocr_metrics(rows)
    # model: 0 + 1 + 3 edits; control: 3 + 5 + 0 (by the reference implementation)
    edits = sum(_reference_distance(r["output"], r["target"]) for r in rows)
    control = sum(_reference_distance(r["output_shuffled"], r["target"]) for r in rows)
    assert (edits, control) == (4, 8)
    assert m["pages"] == 3 and m["target_chars"] == 10
    assert m["cer"] == pytest.approx(0.4) and m["cer_shuffled"] == pytest.approx(0.8)
    assert m["control_ratio"] == pytest.approx(2.0)
    assert m["exact_match"] == pytest.approx(1 / 3) and m["exact_match_shuffled"] == pytest.approx(1 / 3)
    assert m["distinct_outputs"] == pytest.approx(2 / 3)  # "abc" twice


def _reference_greedy(language_model, tokens: torch.Tensor, eos: int, max_new_tokens: int) -> list[int]:
    """One page, no KV cache: the whole sequence re-run for every new token."""
    embed = language_model.get_input_embeddings()
    sequence, ids = tokens[None], []
    for _ in range(max_new_tokens):
        next_id = int(language_model(inputs_embeds=sequence).logits[0, -1].argmax())
        if next_id == eos:
            break
        ids.append(next_id)
        sequence = torch.cat([sequence, embed(torch.tensor([[next_id]]))], dim=1)
    return ids


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_batched_greedy_decode_matches_uncached_loop(family):
    torch.manual_seed(0)
    tokenizer = ByteTokenizer()
    language_model = tiny_causal_lm(tokenizer.vocab_size, 32, 2, 2, family).eval()
    model = OcrVisionLanguageModel(None, language_model, image_dim=32)
    # pages of 5, 7, 5, 3, 7 tokens: three length groups, decoded as batches without padding
    pages = [torch.randn(n, 32) for n in (5, 7, 5, 3, 7)]
    expected = [tokenizer.decode(_reference_greedy(language_model, p, tokenizer.eos_token_id, 12)) for p in pages]
    with torch.no_grad():
        got = model.greedy_decode([model.connector(p) for p in pages], tokenizer, max_new_tokens=12)
    assert got == expected
    # an eos early in one row must end that row only: force eos as the first token of page 1
    bias = torch.zeros(tokenizer.vocab_size)
    language_model.lm_head.register_forward_hook(lambda m, i, out: out + bias)
    bias[tokenizer.eos_token_id] = 50.0
    with torch.no_grad():
        assert model.greedy_decode(pages, tokenizer, max_new_tokens=4) == [""] * 5


class _GridTower(nn.Module):
    """A tower that is not DeepEncoder: (B, 3, H, W) -> per page (H/8 * W/8, 24) tokens by 8x8 patch projection;
    forward takes its processor's keys (`pixels`, `sizes`) and returns only `.image_embeds`."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(3 * 8 * 8, 24)
        self.config = SimpleNamespace(projector_dim=24)

    def forward(self, pixels: torch.Tensor, sizes: list[tuple[int, int]]):
        patches = nn.functional.unfold(pixels, kernel_size=8, stride=8).transpose(1, 2)  # (B, HW/64, 192)
        return SimpleNamespace(image_embeds=[self.proj(p) for p in patches])


class _GridProcessor:
    def __call__(self, images, return_tensors="pt"):
        arrays = [
            torch.tensor(list(im.convert("RGB").resize((32, 16)).getdata()), dtype=torch.float32) for im in images
        ]
        pixels = torch.stack([a.view(16, 32, 3).permute(2, 0, 1) / 255.0 for a in arrays])
        return {"pixels": pixels, "sizes": [im.size for im in images], "unused": None}


def test_evaluation_with_another_tower_and_a_folder(tmp_path):
    pages = SyntheticPages(num_samples=5, size=(96, 48), lines=(1, 1), words_per_line=(1, 1), seed=3)
    for i in range(5):
        pages[i]["image"].save(tmp_path / f"p{i}.png")
        (tmp_path / f"p{i}.txt").write_text(pages[i]["text"])
    folder = ImageTextFolder(tmp_path)
    tokenizer = ByteTokenizer()
    torch.manual_seed(0)
    model = OcrVisionLanguageModel(_GridTower(), tiny_causal_lm(tokenizer.vocab_size, 32, 1, 2))
    collate = OcrCollator(tokenizer, _GridProcessor(), max_text_tokens=16)
    loss = model(**collate([folder[i] for i in range(2)])).loss
    loss.backward()
    assert model.vision.proj.weight.grad is not None
    result = evaluate_ocr(model, folder, collate, tokenizer, max_new_tokens=6, batch_size=2, seed=1)
    assert [row["target"] for row in result.rows] == [pages[i]["text"] for i in range(5)]
    order = shuffled_order(5, 1)
    assert [row["shuffled_from"] for row in result.rows] == order
    # the control row of page i is the model's output on page order[i]'s tokens
    direct = {row["index"]: row["output"] for row in result.rows}
    assert all(row["output_shuffled"] == direct[row["shuffled_from"]] for row in result.rows)
    assert result.metrics == ocr_metrics(result.rows) and model.training


def test_lr_scale_groups():
    model = nn.ModuleDict({"vision": nn.Linear(4, 4), "connector": nn.Linear(4, 4), "language_model": nn.Linear(4, 4)})
    config = OptimConfig(lr=1e-3, weight_decay=0.1, lr_scale={"vision": 0.25, "connector": 4.0})
    optimizer = build_optimizer(list(model.named_parameters()), config)
    by_param = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    for name, param in model.named_parameters():
        group = by_param[id(param)]
        scale = {"vision": 0.25, "connector": 4.0}.get(name.split(".")[0], 1.0)
        assert group["lr"] == pytest.approx(1e-3 * scale), name
        assert group["weight_decay"] == (0.1 if param.ndim == 2 else 0.0), name
    with pytest.raises(ValueError, match="match no trainable"):
        build_optimizer(list(model.named_parameters()), OptimConfig(lr_scale={"visoin": 0.5}))


def _reads_config(tmp_path) -> OcrFinetuneConfig:
    """The shortened reading recipe: digits on one line, big glyphs; held-out numbers from another seed."""
    config = OcrFinetuneConfig()
    config.train.output_dir = str(tmp_path / "reads")
    config.train.max_steps, config.train.batch_size, config.train.progress = 280, 16, False
    config.train.seed, config.train.resume = 0, "never"
    optim = config.train.optim
    optim.lr, optim.warmup_steps, optim.weight_decay, optim.min_lr_ratio = 2e-3, 20, 0.01, 0.1
    optim.lr_scale = {"vision": 0.25}
    config.tower.config = {"projector_dim": 80, "initializer_range": 0.15}
    lm = config.language_model
    lm.hidden_size, lm.num_layers, lm.num_heads, lm.max_text_tokens, lm.initializer_range = 128, 2, 4, 12, 0.1
    data = config.data
    data.num_samples, data.size, data.lines, data.words_per_line = 20000, (256, 64), (1, 1), (1, 1)
    data.font_size, data.vocabulary, data.alphabet, data.word_length = (52, 56), "random", "0123456789", (1, 3)
    data.margin, data.mode, data.base_size = (2, 6), "native", 256
    config.eval.num_samples, config.eval.every, config.eval.data = 24, 140, {"seed": 7}
    config.sample_transcriptions = 0
    return config


def test_short_run_reads_held_out_pages(tmp_path):
    trainer = run_ocr_finetune(_reads_config(tmp_path))
    out = tmp_path / "reads"
    rows = [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()]
    metrics = ocr_metrics(rows)
    saved = json.loads((out / "eval.json").read_text())
    print({k: round(v, 3) if isinstance(v, float) else v for k, v in saved.items()})
    for row in rows[:6]:
        print(row)
    assert len(rows) == 24 and saved["cer"] == pytest.approx(metrics["cer"])
    assert saved["held_out_words_seen_in_training"] == 0 and saved["held_out_words"] > 10
    assert metrics["cer"] <= 0.5, metrics
    assert metrics["cer_shuffled"] >= 1.6 * metrics["cer"], metrics
    assert [row["step"] for row in trainer.evals] == [140, 280]
    assert (out / "evals.jsonl").is_file() and (out / "loss_curve.png").is_file()


def test_synthetic_curriculum_exclude_and_held_out_settings(tmp_path):
    pages = SyntheticPages(
        num_samples=400,
        lines=(1, 3),
        words_per_line=(1, 3),
        vocabulary="random",
        alphabet="ab",
        word_length=(1, 5),
        curriculum=200,
        exclude={"ab", "ba"},
    )
    assert all(len(pages.text(i)) == 1 for i in range(3))  # one word of one character at the start
    late = [pages.text(i) for i in range(200, 400)]
    assert max(t.count("\n") for t in late) == 2 and max(len(w) for t in late for w in t.split()) == 5
    assert not {"ab", "ba"} & {w for i in range(400) for w in pages.text(i).split()}
    words = SyntheticPages(num_samples=50, vocabulary="words", alphabet="etaoinshr", word_length=(2, 4))
    assert all(set(w) <= set("etaoinshr") and 2 <= len(w) <= 4 for i in range(50) for w in words.text(i).split())

    from deepencoder.training import build_held_out

    config = OcrFinetuneConfig()
    config.eval.num_samples, config.data.curriculum = 5, 100
    held_out = build_held_out(config)  # synthetic: the next seed, full ranges
    assert held_out.seed == config.data.seed + 1 and held_out.curriculum == 0 and len(held_out) == 5
    config.data.kind, config.data.root = "folder", str(tmp_path)
    with pytest.raises(ValueError, match="training set itself"):
        build_held_out(config)
    config.eval.data = {"roots": "elsewhere"}
    with pytest.raises(ValueError, match="unknown key"):
        build_held_out(config)


def test_evaluation_on_manifest_tokens(tmp_path):
    """Precomputed page tokens (`deepencoder encode`'s manifest) evaluate without a tower."""
    from safetensors.torch import save_file

    from deepencoder.training import ManifestTokens

    save_file({f"page.{i}": torch.randn(4 + i, 24) for i in range(3)}, str(tmp_path / "doc.safetensors"))
    rows = [
        {"source": "doc.pdf", "page": i, "status": "ok", "output": "doc.safetensors", "key": f"page.{i}", "text": t}
        for i, t in enumerate(["one", "two 2", "three"])
    ]
    (tmp_path / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pages = ManifestTokens(tmp_path / "manifest.jsonl")
    tokenizer = ByteTokenizer()
    torch.manual_seed(0)
    model = OcrVisionLanguageModel(None, tiny_causal_lm(tokenizer.vocab_size, 32, 1, 2), image_dim=24)
    result = evaluate_ocr(model, pages, OcrCollator(tokenizer), tokenizer, max_new_tokens=5, batch_size=2)
    assert [row["target"] for row in result.rows] == ["one", "two 2", "three"]
    # page 0's output is the greedy text after its own 4 tokens through the connector
    with torch.no_grad():
        expected = model.greedy_decode([model.connector(pages[0]["image_embeds"])], tokenizer, 5)
    assert result.rows[0]["output"] == expected[0]
    direct = {row["index"]: row["output"] for row in result.rows}
    assert all(row["output_shuffled"] == direct[row["shuffled_from"]] for row in result.rows)
