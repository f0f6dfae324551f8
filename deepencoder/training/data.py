"""Training data: synthetic text pages rendered with Pillow, (image, text) folders, the encode pipeline's manifest.

Every dataset is a `torch.utils.data.Dataset` of dicts: `{"image": PIL.Image, "text": str}` (pages) or
`{"image_embeds": (N, D) tensor, "text": str}` (precomputed tower tokens from the manifest).
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont
from torch.utils.data import Dataset

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".bmp", ".gif")

# A small built-in vocabulary so the generator needs no corpus download.
WORDS: tuple[str, ...] = tuple(
    """the of and to in is was for on that with as by at from his her it an be are this which or had not but were
    have one all their they new can more page text line word paper letter table figure total report date name
    number order price value market water north south east west house school river city world year month day time
    first second third small large black white green red blue light dark open close start end read write model
    data image vision token layer block window patch scale page note index chapter section summary result method""".split()
)


def load_font(size: int, font: str | os.PathLike | None = None) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """A TrueType font at `size` px: `font` (path or name Pillow can find) when given, else Pillow's bundled
    default font (no system fonts or downloads needed)."""
    if font is not None:
        return ImageFont.truetype(str(font), size)
    return ImageFont.load_default(size=size)


def render_page(
    text: str,
    size: tuple[int, int] = (256, 256),
    font_size: int = 20,
    font: str | os.PathLike | None = None,
    margin: int | tuple[int, int] = 8,
    line_spacing: float = 1.25,
    ink: int = 0,
    paper: int = 255,
) -> Image.Image:
    """Render `text` (lines separated by `\\n`, each wrapped at the page width) onto a white RGB page, starting
    `margin` px (or (x, y) px) from the top-left corner."""
    image = Image.new("RGB", size, (paper,) * 3)
    draw = ImageDraw.Draw(image)
    face = load_font(font_size, font)
    left, y = (margin, margin) if isinstance(margin, int) else margin
    step = int(font_size * line_spacing)
    for paragraph in text.split("\n"):
        line = ""
        for word in paragraph.split(" "):
            candidate = f"{line} {word}".strip()
            if line and draw.textlength(candidate, font=face) > size[0] - 2 * left:
                draw.text((left, y), line, fill=(ink,) * 3, font=face)
                y += step
                line = word
            else:
                line = candidate
        draw.text((left, y), line, fill=(ink,) * 3, font=face)
        y += step
    return image


class SyntheticPages(Dataset):
    """`num_samples` pages of random lines of words, rendered deterministically from `seed` and the index.

    Args:
        num_samples: dataset length.
        size: (width, height) of the rendered page.
        lines: (min, max) number of lines per page.
        words_per_line: (min, max) words per line.
        font_size: (min, max) font size in px.
        words: vocabulary to draw from (`WORDS` by default; those of `word_length` characters written with
            `alphabet`), used when `vocabulary` is `words`.
        font: TrueType font path or name; Pillow's default font when None.
        vocabulary: `words` (draw from `words`) or `random` (strings of `alphabet` characters).
        alphabet: characters of `random` words (and the characters a `words` word may use).
        word_length: (min, max) characters of a `random` word, and the most digits of a number.
        numbers: probability that a word is a number instead (1 to `word_length[1]` digits, no leading zero).
        margin: (min, max) px offset of the text block from the top-left corner, drawn per page (both axes).
        exclude: words never drawn (redrawn instead): keeps a held-out set's words out of training pages.
        curriculum: pages over which the text grows with the index: page i uses the fraction f = i / curriculum
            of each range above its minimum (lines, words per line, word length / digits), so page 0 is one line of
            one shortest word and pages from `curriculum` on use the full ranges. 0: off.
    """

    def __init__(
        self,
        num_samples: int = 64,
        size: tuple[int, int] | Sequence[int] = (256, 256),
        lines: tuple[int, int] | Sequence[int] = (1, 3),
        words_per_line: tuple[int, int] | Sequence[int] = (1, 4),
        font_size: tuple[int, int] | Sequence[int] = (18, 26),
        words: Sequence[str] = WORDS,
        font: str | None = None,
        seed: int = 0,
        vocabulary: str = "words",
        alphabet: str = "abcdefghijklmnopqrstuvwxyz",
        word_length: tuple[int, int] | Sequence[int] = (2, 6),
        numbers: float = 0.0,
        margin: tuple[int, int] | Sequence[int] = (8, 8),
        exclude: Iterable[str] = (),
        curriculum: int = 0,
    ) -> None:
        if vocabulary not in ("words", "random"):
            raise ValueError(f"unknown vocabulary {vocabulary!r}; choose words | random")
        self.num_samples = num_samples
        self.size = (int(size[0]), int(size[1]))
        self.lines, self.words_per_line, self.font_size = tuple(lines), tuple(words_per_line), tuple(font_size)
        self.words = list(words)
        self.font = font
        self.seed = seed
        self.vocabulary, self.alphabet = vocabulary, alphabet
        self.word_length, self.numbers, self.margin = tuple(word_length), float(numbers), tuple(margin)
        self.exclude = frozenset(exclude)
        self.curriculum = curriculum
        usable = {
            w for w in self.words if self.word_length[0] <= len(w) <= self.word_length[1] and set(w) <= set(alphabet)
        }
        if vocabulary == "words" and self.numbers < 1 and not usable - self.exclude:
            raise ValueError("no word of the vocabulary fits word_length and alphabet outside `exclude`")

    def __len__(self) -> int:
        return self.num_samples

    def _word(self, rng: random.Random, longest: int) -> str:
        words = [w for w in self.words if self.word_length[0] <= len(w) <= longest and set(w) <= set(self.alphabet)]
        for _ in range(1000):
            if self.numbers and rng.random() < self.numbers:
                digits = rng.randint(1, longest)
                word = str(rng.randint(10 ** (digits - 1) if digits > 1 else 0, 10**digits - 1))
            elif self.vocabulary == "words":
                word = rng.choice(words or [min(self.words, key=len)])
            else:
                word = "".join(rng.choice(self.alphabet) for _ in range(rng.randint(self.word_length[0], longest)))
            if word not in self.exclude:
                return word
        raise ValueError("could not draw a word outside `exclude` in 1000 tries")

    def text(self, index: int) -> str:
        rng = random.Random(self.seed * 1_000_003 + index)
        f = min(1.0, index / self.curriculum) if self.curriculum else 1.0

        def upto(bounds: tuple[int, int]) -> int:
            return round(bounds[0] + f * (bounds[1] - bounds[0]))

        longest = upto(self.word_length)
        return "\n".join(
            " ".join(
                self._word(rng, longest) for _ in range(rng.randint(self.words_per_line[0], upto(self.words_per_line)))
            )
            for _ in range(rng.randint(self.lines[0], upto(self.lines)))
        )

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.num_samples:
            raise IndexError(index)
        text = self.text(index)
        rng = random.Random(self.seed * 7919 + index)
        font_size = rng.randint(*self.font_size)
        margin = (rng.randint(*self.margin), rng.randint(*self.margin))
        return {"image": render_page(text, self.size, font_size, self.font, margin=margin), "text": text}


class ImageTextFolder(Dataset):
    """Pages in a folder (recursively): each image `name.png|jpg|...` paired with the text in `name.txt` beside it.
    Images without a text file are skipped; an empty folder raises."""

    def __init__(self, root: str | os.PathLike) -> None:
        from ..image_processing_deepencoder import load_image

        self._load_image = load_image
        self.root = Path(root)
        self.items = [
            (path, path.with_suffix(".txt"))
            for path in sorted(self.root.rglob("*"))
            if path.suffix.lower() in IMAGE_SUFFIXES and path.with_suffix(".txt").is_file()
        ]
        if not self.items:
            raise ValueError(f"{self.root}: no image with a sidecar .txt file found")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        image_path, text_path = self.items[index]
        return {"image": self._load_image(image_path), "text": text_path.read_text(encoding="utf-8").strip()}


class ManifestTokens(Dataset):
    """Precomputed tower tokens from `deepencoder encode`'s `manifest.jsonl`, paired with text.

    The manifest is read by the pipeline's own reader (`deepencoder.pipeline.load_manifest`): the rank files of
    an unfinished multi-process run are included, a page retried by a later run keeps its last row, and only rows
    with `status: ok` are used. A row's tokens are tensor `key` (`page.<i>`, (tokens, D)) of the safetensors file
    `output` (relative paths are taken from the manifest's folder). The text of a page comes from, in order:

    1. a `text` field of the row;
    2. `texts`: a JSONL sidecar of `{"source": ..., "page": ..., "text": ...}` rows (source as in the manifest);
    3. a `.txt` file beside the source: `<source stem>.txt` for page 0 of a one-page source, or
       `<source stem>.page<i>.txt` (i as in the manifest's `page` field).

    Pages without text are skipped and counted in `self.skipped`. `manifest` may also be the run's folder.
    """

    def __init__(self, manifest: str | os.PathLike, texts: str | os.PathLike | None = None) -> None:
        from ..pipeline.dataset import load_manifest

        self.manifest = Path(manifest)
        base = self.manifest if self.manifest.is_dir() else self.manifest.parent
        sidecar: dict[tuple[str, int], str] = {}
        if texts is not None:
            for line in Path(texts).read_text(encoding="utf-8").splitlines():
                if line.strip():
                    row = json.loads(line)
                    sidecar[(str(row["source"]), int(row["page"]))] = row["text"]
        self.items: list[tuple[Path, str, str]] = []
        self.skipped = 0
        for row in load_manifest(self.manifest, status="ok"):
            page = int(row.get("page") or 0)
            text = row.get("text") or sidecar.get((str(row["source"]), page))
            if text is None:
                text = self._text_beside_source(Path(row["source"]), page, base)
            if text is None:
                self.skipped += 1
                continue
            output = Path(row["output"])
            self.items.append((output if output.is_absolute() else base / output, row["key"], text))
        if not self.items:
            raise ValueError(f"{self.manifest}: no successful page with text ({self.skipped} without text)")

    @staticmethod
    def _text_beside_source(source: Path, page: int, base: Path) -> str | None:
        source = source if source.is_absolute() else base / source
        for candidate in (
            source.with_name(f"{source.stem}.page{page}.txt"),
            source.with_suffix(".txt") if page == 0 else None,
        ):
            if candidate is not None and candidate.is_file():
                return candidate.read_text(encoding="utf-8").strip()
        return None

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        from safetensors import safe_open

        path, key, text = self.items[index]
        with safe_open(str(path), framework="pt") as handle:
            tokens = handle.get_tensor(key)
        return {"image_embeds": tokens, "text": text}


def build_dataset(kind: str, **kwargs) -> Dataset:
    """`synthetic` -> `SyntheticPages(**kwargs)`, `folder` -> `ImageTextFolder(root)`,
    `manifest` -> `ManifestTokens(manifest, texts)`."""
    if kind == "synthetic":
        return SyntheticPages(**kwargs)
    if kind == "folder":
        return ImageTextFolder(kwargs["root"])
    if kind == "manifest":
        return ManifestTokens(kwargs["manifest"], kwargs.get("texts"))
    raise ValueError(f"unknown dataset kind {kind!r}; choose synthetic | folder | manifest")


def dataset_from_settings(data, exclude: Iterable[str] = ()) -> Dataset:
    """The dataset a run's `DataSettings` describe (`kind` synthetic | folder | manifest); `exclude`: words kept out
    of synthetic pages."""
    if data.kind == "synthetic":
        return build_dataset(
            "synthetic",
            num_samples=data.num_samples,
            size=data.size,
            lines=data.lines,
            words_per_line=data.words_per_line,
            font_size=data.font_size,
            font=data.font,
            seed=data.seed,
            vocabulary=data.vocabulary,
            alphabet=data.alphabet,
            word_length=data.word_length,
            numbers=data.numbers,
            margin=data.margin,
            exclude=exclude,
            curriculum=data.curriculum,
        )
    return build_dataset(data.kind, root=data.root, manifest=data.manifest, texts=data.texts)


def pixel_batch(images: Sequence[Image.Image], processor) -> dict:
    """Pages -> the tower's inputs: everything the tower's image processor returns (for DeepEncoder
    `pixel_values`, `tile_grids`, `num_image_tokens` and `pixel_values_tiles` when a page is tiled), None values
    dropped, so any tower taking its processor's outputs works."""
    inputs = processor(images=list(images), return_tensors="pt")
    return {key: value for key, value in inputs.items() if value is not None}


def stack_pixels(images: Sequence[Image.Image], size: int) -> torch.Tensor:
    """Pages resized to size x size, scaled to [-1, 1] as the processor does: (B, 3, size, size)."""
    import numpy as np

    arrays = [
        np.asarray(image.convert("RGB").resize((size, size), Image.BICUBIC), dtype=np.float32) for image in images
    ]
    pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    return (pixels / 255.0 - 0.5) / 0.5
