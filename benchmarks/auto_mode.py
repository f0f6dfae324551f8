"""`--mode auto`: a labelled page set, the pixel estimate's calibration and the acceptance numbers, in one command.

    python -m benchmarks.auto_mode [--out DIR] [--pages 240] [--calibration-pages 120] [--tokenizer DIR]
                                   [--max-compression 10] [--plan-timing]

1. Generates pages whose text is known exactly (seeded, Pillow with the system's DejaVu fonts, else Pillow's own
   font): slides (light, tinted and dark themes, bar charts), letters, two-column papers with figures, dense
   tables with rules, small print in one to three columns; US letter, A4 and 16:9, at 96-200 dpi, at several
   fill densities; some with a scan's grey paper, noise and blur. Each page is written three ways: a PDF with a
   real text layer (Helvetica, written by hand below), an image-only PDF (the raster as a Flate image) and a PNG.
2. Fits the pixel estimate (`PixelCalibration`) on a calibration split (its own seed), then measures on a separate
   evaluation split: the pixel estimate's relative error (PNGs and image-only PDFs, through `deepencoder plan`'s
   planner), the text-layer estimate's relative error, and the decision: the share of servable pages whose true
   compression stays at or under the target in the chosen mode, and total vision tokens against always-gundam.
3. Writes benchmarks/results/auto-mode.json; the fitted constants printed there are the ones committed in
   deepencoder/image_processing_auto_mode.py (PIXEL_CALIBRATION).

True text tokens are the documented rule (`rule_text_tokens`) applied to the exact text, or the exact count of
`--tokenizer DIR` (a local transformers tokenizer) when given. `--plan-timing` also times `deepencoder plan --json`
on 100 text-layer PDF pages in a subprocess.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from deepencoder.image_processing_auto_mode import (
    PIXEL_CALIBRATION,
    PixelCalibration,
    count_text_tokens,
    line_features,
    normalize_text,
    rule_text_tokens,
)

RESULTS = Path(__file__).parent / "results"
FONT_DIR = Path("/usr/share/fonts/truetype/dejavu")
FONTS = {
    "sans": "DejaVuSans.ttf",
    "sans-bold": "DejaVuSans-Bold.ttf",
    "serif": "DejaVuSerif.ttf",
    "serif-bold": "DejaVuSerif-Bold.ttf",
    "condensed": "DejaVuSansCondensed.ttf",
    "serif-condensed": "DejaVuSerifCondensed.ttf",
    "mono": "DejaVuSansMono.ttf",
    "italic": "DejaVuSerif-Italic.ttf",
}
WORDS = (
    "the of and to in is that for it as was with be by on not he this are or his from at which but have an they you "
    "were her all she there would their we him been has when who will more no if out so said what up its about into "
    "than them can only other new some time could these two may then do first any my now such like our over man me "
    "even most made after also did many before must through back years where much your way well down should because "
    "each just those people how too little state good very make world still own see men work long get here between "
    "both life being under never day same another know while last might us great old year off come since against go "
    "came right used take three states himself few house use during without again place american around however home "
    "small found thought went say part once general high upon school every does got united left number course war "
    "until always away something fact though water less public put thing almost hand enough far took head yet "
    "government system better set told nothing night end why called didn't eyes find going look asked later knew "
    "point next program city business give group toward young days let room president side social present given "
    "several order national possible rather second face per among form important often things looked early white "
    "case john become large big need four within felt along children saw best church ever least power development "
    "light thing seemed family interest want members mind country area others done turned although open problem "
    "encoder vision tokens resolution compression document pages model training dataset accuracy benchmark layer "
    "attention window global local tile mode language decoder precision results method table figure section"
).split()


# ---------------------------------------------------------------------------------------------- text
def sentence(rng: random.Random, words: tuple[int, int] = (6, 18)) -> str:
    items = [rng.choice(WORDS) for _ in range(rng.randint(*words))]
    if rng.random() < 0.3:
        items.insert(rng.randrange(len(items)), str(rng.randint(2, 2030)))
    if rng.random() < 0.2:
        items[rng.randrange(len(items))] += ","
    text = " ".join(items)
    return text[0].upper() + text[1:] + rng.choice(".....?!:")


def paragraph(rng: random.Random, sentences: tuple[int, int] = (2, 6)) -> str:
    return " ".join(sentence(rng) for _ in range(rng.randint(*sentences)))


def cell(rng: random.Random) -> str:
    kind = rng.random()
    if kind < 0.45:
        return f"{rng.uniform(0, 9999):.{rng.randint(0, 3)}f}"
    if kind < 0.6:
        return f"{rng.randint(1, 99)}%"
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 3)))


# ---------------------------------------------------------------------------------------------- pages
@dataclass
class Item:
    """Text at (x, y) points from the top-left, `size` points, or a rectangle (`text` None) to fill/outline."""

    x: float
    y: float
    size: float
    text: str | None = None
    font: str = "sans"
    box: tuple[float, float, float, float] | None = None
    fill: bool = False


@dataclass
class Page:
    name: str
    kind: str
    width: float  # points
    height: float
    dpi: float
    items: list[Item] = field(default_factory=list)
    theme: str = "white"
    scan: bool = False

    @property
    def text(self) -> str:
        return "\n".join(item.text for item in self.items if item.text)


_FONT_CACHE: dict[tuple[str, int], ImageFont.FreeTypeFont] = {}


def font(name: str, size_px: float) -> ImageFont.FreeTypeFont:
    key = (name, max(4, round(size_px)))
    if key not in _FONT_CACHE:
        path = FONT_DIR / FONTS[name]
        _FONT_CACHE[key] = (
            ImageFont.truetype(str(path), key[1]) if path.exists() else ImageFont.load_default(size=key[1])
        )
    return _FONT_CACHE[key]


class Layout:
    """Places wrapped text in points, measuring with the raster font (so lines fit the PNG)."""

    def __init__(self, page: Page) -> None:
        self.page = page

    def width_of(self, text: str, size: float, font_name: str) -> float:
        return font(font_name, size * 4).getlength(text) / 4  # measured at 4 px per point, in points

    def wrap(self, text: str, x: float, y: float, width: float, size: float, font_name: str = "sans",
             leading: float = 1.25, bottom: float | None = None) -> float:  # fmt: skip
        """Wrap `text` into lines of at most `width` points from (x, y); returns the y after it (stops at
        `bottom`)."""
        bottom = self.page.height - 36 if bottom is None else bottom
        line: list[str] = []
        for word in text.split():
            trial = " ".join([*line, word])
            if line and self.width_of(trial, size, font_name) > width:
                if y + size > bottom:
                    return y
                self.page.items.append(Item(x, y, size, " ".join(line), font_name))
                y += size * leading
                line = [word]
            else:
                line.append(word)
        if line and y + size <= bottom:
            self.page.items.append(Item(x, y, size, " ".join(line), font_name))
            y += size * leading
        return y


def make_slide(rng: random.Random, name: str) -> Page:
    page = Page(name, "slide", 960, 540, rng.choice([96, 120, 144]), theme=rng.choice(["white", "tint", "dark"]))
    layout = Layout(page)
    title = rng.uniform(30, 44)
    y = layout.wrap(sentence(rng, (3, 8)).rstrip(".?!:"), 60, 40, 840, title, "sans-bold", 1.15)
    body = rng.uniform(18, 28)
    chart = rng.random() < 0.4
    width = 440 if chart else 840
    y += body * 0.8
    for _ in range(rng.randint(2, 6)):
        y = layout.wrap("- " + sentence(rng, (4, 14)), 70, y, width, body, "sans", 1.3, 520)
        y += body * 0.4
    if chart:
        base = 480
        for index in range(rng.randint(3, 7)):
            top = rng.uniform(180, 440)
            page.items.append(Item(0, 0, 0, box=(560 + index * 50, top, 595 + index * 50, base), fill=True))
        page.items.append(Item(0, 0, 0, box=(550, base, 920, base + 1.5), fill=True))
    return page


def make_letter(rng: random.Random, name: str) -> Page:
    width, height = rng.choice([(612, 792), (595, 842)])
    page = Page(name, "letter", width, height, rng.choice([100, 150, 200]), scan=rng.random() < 0.3)
    layout = Layout(page)
    face = rng.choice(["serif", "sans", "condensed", "mono"])
    size = rng.uniform(10, 12.5)
    y = 60.0
    for _ in range(3):
        y = layout.wrap(f"{rng.randint(1, 999)} {rng.choice(WORDS).title()} {rng.choice(['Street', 'Road'])}",
                        width - 240, y, 200, size * 0.9, face)  # fmt: skip
    y += size
    y = layout.wrap(f"{rng.randint(1, 28)} March {rng.randint(1990, 2030)}", 72, y, 300, size, face)
    y += size
    for _ in range(rng.randint(2, 4)):
        y = layout.wrap(" ".join(rng.choice(WORDS).title() for _ in range(rng.randint(2, 4))), 72, y, 300, size, face)
    y += size
    y = layout.wrap(f"Dear {rng.choice(WORDS).title()},", 72, y, 400, size, face)
    y += size * 0.6
    fill = rng.uniform(0.25, 1.0)
    bottom = 100 + (height - 190) * fill
    for _ in range(12):
        if y > bottom:
            break
        y = layout.wrap(paragraph(rng), 72, y, width - 144, size, face, 1.3, bottom)
        y += size * 0.7
    y = layout.wrap("Yours sincerely,", 72, y + size, 300, size, face)
    return page


def make_paper(rng: random.Random, name: str) -> Page:
    width, height = rng.choice([(612, 792), (595, 842)])
    page = Page(name, "paper", width, height, rng.choice([120, 150, 200]), scan=rng.random() < 0.25)
    layout = Layout(page)
    face = rng.choice(["serif", "serif-condensed", "sans"])
    size = rng.uniform(8.5, 10.5)
    margin, gutter = 54.0, rng.uniform(16, 28)
    y = 60.0
    if rng.random() < 0.6:  # a first page: title, authors, abstract
        y = layout.wrap(sentence(rng, (5, 12)).rstrip(".?!:"), margin + 40, y, width - 2 * margin - 80, 15,
                        "serif-bold", 1.2)  # fmt: skip
        y = layout.wrap(", ".join(rng.choice(WORDS).title() for _ in range(rng.randint(2, 6))), margin + 60, y + 4,
                        width - 2 * margin - 120, 10.5, face)  # fmt: skip
        y = layout.wrap(paragraph(rng, (3, 6)), margin + 30, y + 10, width - 2 * margin - 60, size, "italic", 1.2)
        y += 12
    column = (width - 2 * margin - gutter) / 2
    figure = rng.random() < 0.35
    for index in range(2):
        x = margin + index * (column + gutter)
        cy = y
        bottom = height - 60
        if figure and index == 1:
            top = cy + 10
            page.items.append(Item(0, 0, 0, box=(x, top, x + column, top + 150)))
            for k in range(4):
                page.items.append(Item(0, 0, 0, box=(x + 10, top + 30 + 30 * k, x + column - 10, top + 31 + 30 * k),
                                       fill=True))  # fmt: skip
            cy = layout.wrap("Figure " + str(rng.randint(1, 9)) + ": " + sentence(rng), x, top + 160, column,
                             size * 0.9, face, 1.2)  # fmt: skip
            cy += 8
        while cy < bottom - size:
            if rng.random() < 0.2:
                cy = layout.wrap(f"{rng.randint(1, 9)} {rng.choice(WORDS).title()} {rng.choice(WORDS)}", x, cy + 4,
                                 column, size * 1.15, "serif-bold", 1.3, bottom)  # fmt: skip
            cy = layout.wrap(paragraph(rng, (2, 5)), x, cy, column, size, face, 1.22, bottom)
            cy += size * 0.5
    return page


def make_table(rng: random.Random, name: str) -> Page:
    width, height = rng.choice([(612, 792), (595, 842), (792, 612)])
    page = Page(name, "table", width, height, rng.choice([120, 150, 200]), scan=rng.random() < 0.25)
    layout = Layout(page)
    face = rng.choice(["sans", "condensed", "mono", "serif"])
    size = rng.uniform(7, 10)
    y = layout.wrap("Table " + str(rng.randint(1, 20)) + ". " + sentence(rng, (4, 10)), 48, 48, width - 96, 11,
                    "sans-bold")  # fmt: skip
    cols = rng.randint(4, 10)
    col_width = (width - 96) / cols
    rows = int((height - y - 60) * rng.uniform(0.5, 1.0) / (size * 1.6))
    rules = rng.choice(["all", "header", "grid"])
    y += 6
    for row in range(rows):
        for col in range(cols):
            text = cell(rng) if row else rng.choice(WORDS).title()
            while layout.width_of(text, size, face) > col_width - size * 1.2 and " " in text:
                text = text.rsplit(" ", 1)[0]
            if layout.width_of(text, size, face) > col_width - size * 1.2:
                continue
            page.items.append(Item(48 + col * col_width + size * 0.4, y + size * 0.3, size, text,
                                   "sans-bold" if row == 0 else face))  # fmt: skip
        if rules == "all" or (rules == "header" and row in (0, 1)) or rules == "grid":
            page.items.append(Item(0, 0, 0, box=(48, y, width - 48, y + 0.8), fill=True))
        y += size * 1.6
    page.items.append(Item(0, 0, 0, box=(48, y, width - 48, y + 0.8), fill=True))
    if rules == "grid":
        top = page.items[0].y + 20
        for col in range(cols + 1):
            page.items.append(Item(0, 0, 0, box=(48 + col * col_width, top, 48.8 + col * col_width, y), fill=True))
    return page


def make_small_print(rng: random.Random, name: str) -> Page:
    width, height = rng.choice([(612, 792), (595, 842)])
    page = Page(name, "small-print", width, height, rng.choice([150, 200]), scan=rng.random() < 0.25)
    layout = Layout(page)
    face = rng.choice(["sans", "condensed", "serif"])
    size = rng.uniform(6.5, 8)
    columns = rng.randint(1, 3)
    gutter = 14.0
    column = (width - 80 - gutter * (columns - 1)) / columns
    fill = rng.uniform(0.5, 1.0)
    bottom = 60 + (height - 100) * fill
    for index in range(columns):
        x, y = 40 + index * (column + gutter), 40.0
        while y < bottom - size:
            y = layout.wrap(paragraph(rng, (3, 8)), x, y, column, size, face, 1.18, bottom)
            y += size * 0.4
    return page


MAKERS = {
    "slide": make_slide,
    "letter": make_letter,
    "paper": make_paper,
    "table": make_table,
    "small-print": make_small_print,
}


def make_pages(count: int, seed: int) -> list[Page]:
    rng = random.Random(seed)
    kinds = list(MAKERS)
    pages = [MAKERS[kinds[i % len(kinds)]](rng, f"s{seed}-{i:04d}-{kinds[i % len(kinds)]}") for i in range(count)]
    pages.append(Page(f"s{seed}-blank", "blank", 612, 792, 150))  # a blank page and a near-blank one
    near = Page(f"s{seed}-near-blank", "blank", 612, 792, 150)
    near.items.append(Item(500, 740, 9, "Page 1"))
    pages.append(near)
    return pages


# ---------------------------------------------------------------------------------------------- rendering
THEMES = {"white": ((255, 255, 255), (0, 0, 0)), "tint": ((246, 240, 222), (40, 30, 20)),
          "dark": ((28, 30, 40), (235, 235, 235))}  # fmt: skip


def rasterize(page: Page, seed: int) -> Image.Image:
    scale = page.dpi / 72
    background, ink = THEMES[page.theme]
    if page.scan:
        background = (236, 234, 228)
    image = Image.new("RGB", (round(page.width * scale), round(page.height * scale)), background)
    draw = ImageDraw.Draw(image)
    for item in page.items:
        if item.text is None:
            x0, y0, x1, y1 = (round(v * scale) for v in item.box)
            colour = (70, 110, 170) if page.kind == "slide" else ink
            if item.fill:
                draw.rectangle((x0, y0, max(x0, x1 - 1), max(y0, y1 - 1)), fill=colour)
            else:
                draw.rectangle((x0, y0, x1, y1), outline=ink, width=max(1, round(scale * 0.8)))
            continue
        draw.text((item.x * scale, item.y * scale), item.text, fill=ink, font=font(item.font, item.size * scale))
    if page.scan:
        rng = np.random.default_rng(seed)
        array = np.asarray(image.filter(ImageFilter.GaussianBlur(0.6)), dtype=np.float32)
        array = array + rng.normal(0, 6, array.shape[:2])[..., None]
        image = Image.fromarray(np.clip(array, 0, 255).astype(np.uint8))
    return image


def _pdf(objects: list[bytes]) -> bytes:
    """A PDF file from its objects (object i+1 = objects[i]; 1 is the catalog), with a correct xref table."""
    out = bytearray(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    return bytes(out)


def _stream(data: bytes, extra: bytes = b"") -> bytes:
    packed = zlib.compress(data)
    return b"<< /Length %d /Filter /FlateDecode %s>>\nstream\n" % (len(packed), extra) + packed + b"\nendstream"


def _pdf_string(text: str) -> bytes:
    data = text.encode("cp1252", errors="replace")
    return b"(" + data.replace(b"\\", b"\\\\").replace(b"(", b"\\(").replace(b")", b"\\)") + b")"


def text_pdf(page: Page) -> bytes:
    """The page with a real text layer: Helvetica (bold / Times / Courier where the raster font is), WinAnsi."""
    fonts = {"sans": b"F1", "condensed": b"F1", "sans-bold": b"F2", "serif-bold": b"F2", "serif": b"F3",
             "serif-condensed": b"F3", "italic": b"F3", "mono": b"F4"}  # fmt: skip
    ops = []
    for item in page.items:
        if item.text is None:
            x0, y0, x1, y1 = item.box
            op = b"f" if item.fill else b"S"
            ops.append(b"%.2f %.2f %.2f %.2f re %s" % (x0, page.height - y1, x1 - x0, y1 - y0, op))
            continue
        baseline = page.height - item.y - item.size * 0.8
        ops.append(b"BT /%s %.2f Tf %.2f %.2f Td %s Tj ET" % (fonts[item.font], item.size, item.x, baseline,
                                                              _pdf_string(item.text)))  # fmt: skip
    content = _stream(b"\n".join(ops))
    names = [b"Helvetica", b"Helvetica-Bold", b"Times-Roman", b"Courier"]
    font_objects = [b"<< /Type /Font /Subtype /Type1 /BaseFont /%s /Encoding /WinAnsiEncoding >>" % n for n in names]
    resources = b"<< /Font << /F1 5 0 R /F2 6 0 R /F3 7 0 R /F4 8 0 R >> >>"
    return _pdf([
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 %.2f %.2f] /Resources %s /Contents 4 0 R >>"
        % (page.width, page.height, resources),
        content,
        *font_objects,
    ])  # fmt: skip


def image_pdf(page: Page, image: Image.Image) -> bytes:
    """The page as a scan: the raster as one grey Flate image filling the page, no text layer."""
    grey = image.convert("L")
    picture = _stream(grey.tobytes(), b"/Type /XObject /Subtype /Image /Width %d /Height %d /ColorSpace /DeviceGray "
                      b"/BitsPerComponent 8 " % grey.size)  # fmt: skip
    content = _stream(b"q %.2f 0 0 %.2f 0 0 cm /Im1 Do Q" % (page.width, page.height))
    return _pdf([
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 %.2f %.2f] /Resources << /XObject << /Im1 5 0 R >> >> "
        b"/Contents 4 0 R >>" % (page.width, page.height),
        content,
        picture,
    ])  # fmt: skip


def write_set(pages: list[Page], folder: Path, seed: int) -> list[dict]:
    """PNG, text-layer PDF and image-only PDF of every page, plus labels.jsonl; returns the labels."""
    for sub in ("png", "text-pdf", "image-pdf"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    labels = []
    for index, page in enumerate(pages):
        image = rasterize(page, seed * 100003 + index)
        image.save(folder / "png" / f"{page.name}.png")
        (folder / "text-pdf" / f"{page.name}.pdf").write_bytes(text_pdf(page))
        (folder / "image-pdf" / f"{page.name}.pdf").write_bytes(image_pdf(page, image))
        labels.append({"name": page.name, "kind": page.kind, "dpi": page.dpi, "theme": page.theme, "scan": page.scan,
                       "size": list(image.size), "text": page.text})  # fmt: skip
    with open(folder / "labels.jsonl", "w", encoding="utf-8") as handle:
        for label in labels:
            handle.write(json.dumps(label) + "\n")
    return labels


# ---------------------------------------------------------------------------------------------- fit / evaluate
def true_tokens(text: str, tokenizer) -> int:
    return count_text_tokens(text, tokenizer)[0] if tokenizer is not None else rule_text_tokens(text)


def fit(folder: Path, labels: list[dict]) -> tuple[PixelCalibration, dict]:
    """characters ~ a * length (the sum of line widths in line heights) over the calibration PNGs (pages of fewer
    than 20 characters left out): `a` is the median of characters / length, so the estimate errs high as often as
    low; the decision margin is the 90th percentile of true / estimated characters after the fit."""
    ratios = []
    for label in labels:
        chars = len(normalize_text(label["text"]))
        if chars < 20:
            continue
        features = line_features(Image.open(folder / "png" / f"{label['name']}.png"))
        ratios.append(chars / max(features.length, 1e-9))
    per_length = float(np.median(ratios))
    calibration = replace(PIXEL_CALIBRATION, chars_per_line_height=round(per_length, 4))
    under = np.asarray(ratios) / per_length  # true / estimated characters
    margin = round(float(np.percentile(under, 90)), 3)
    calibration = replace(calibration, decision_margin=max(1.0, margin))
    return calibration, {"pages": len(ratios), "p10_ratio": round(float(np.percentile(under, 10)), 3),
                         "p90_ratio": margin}  # fmt: skip


def relative_errors(estimates: list[float], truths: list[float]) -> dict:
    errors = np.abs(np.asarray(estimates, dtype=float) - np.asarray(truths, dtype=float)) / np.asarray(truths, float)
    return {"n": int(len(errors)), "median": round(float(np.median(errors)), 4),
            "p90": round(float(np.percentile(errors, 90)), 4), "max": round(float(errors.max()), 4)}  # fmt: skip


def evaluate(folder: Path, labels: list[dict], calibration: PixelCalibration, tokenizer, tokenizer_dir,
             max_compression: float) -> dict:  # fmt: skip
    from deepencoder.image_processing_deepencoder import DeepEncoderImageProcessor
    from deepencoder.pipeline.auto_mode import plan_pages

    truth = {label["name"]: true_tokens(label["text"], tokenizer) for label in labels}
    kinds = {label["name"]: label["kind"] for label in labels}
    processor = DeepEncoderImageProcessor(mode="auto", max_compression=max_compression)
    report: dict = {}
    per_format = {}
    for fmt, suffix in (("png", "png"), ("image-pdf", "pdf"), ("text-pdf", "pdf")):
        inputs = [str(folder / fmt / f"{label['name']}.{suffix}") for label in labels]
        rows = plan_pages(inputs, processor, tokenizer=tokenizer_dir, calibration=calibration)["pages"]
        per_format[fmt] = rows
        for row in rows:
            row["name"] = Path(row["source"]).stem
    pixel_rows = [r for fmt in ("png", "image-pdf") for r in per_format[fmt] if truth[r["name"]] > 0]
    if any(r["estimate_source"] != "pixels" for r in pixel_rows):
        raise AssertionError("a PNG / image-only PDF page was not estimated from pixels")
    meaningful = [r for r in pixel_rows if truth[r["name"]] >= 10]
    report["pixel_estimate"] = relative_errors([r["text_tokens_estimate"] for r in meaningful],
                                               [truth[r["name"]] for r in meaningful])  # fmt: skip
    report["pixel_estimate_by_kind"] = {
        kind: relative_errors([r["text_tokens_estimate"] for r in meaningful if kinds[r["name"]] == kind],
                              [truth[r["name"]] for r in meaningful if kinds[r["name"]] == kind])
        for kind in MAKERS
    }  # fmt: skip
    text_rows = [r for r in per_format["text-pdf"] if truth[r["name"]] >= 10]
    expected_source = "tokenizer" if tokenizer is not None else "text-layer"
    report["text_layer_estimate"] = relative_errors([r["text_tokens_estimate"] for r in text_rows],
                                                    [truth[r["name"]] for r in text_rows])  # fmt: skip
    report["text_layer_sources"] = sorted({r["estimate_source"] for r in per_format["text-pdf"] if truth[r["name"]]})
    if report["text_layer_sources"] != [expected_source]:
        raise AssertionError(f"text-layer PDFs estimated from {report['text_layer_sources']}")
    decisions = {}
    for fmt, rows in per_format.items():
        servable = [r for r in rows if truth[r["name"]] <= max_compression * max(r["vision_tokens_by_mode"].values())]
        kept = [r for r in servable if truth[r["name"]] <= max_compression * r["vision_tokens"]]
        total = sum(r["vision_tokens"] for r in rows)
        gundam = sum(r["vision_tokens_by_mode"]["gundam"] for r in rows)
        modes: dict[str, int] = {}
        for r in rows:
            modes[r["mode"]] = modes.get(r["mode"], 0) + 1
        decisions[fmt] = {"pages": len(rows), "servable": len(servable), "kept_within_target": len(kept),
                          "kept_share": round(len(kept) / max(1, len(servable)), 4), "vision_tokens": total,
                          "always_gundam": gundam, "share_of_gundam": round(total / gundam, 4),
                          "pages_by_mode": modes}  # fmt: skip
    report["decision"] = decisions
    return report


def plan_timing(folder: Path, labels: list[dict]) -> dict:
    """`deepencoder plan --json` on 100 text-layer PDF pages in a fresh interpreter (imports included), the same
    interpreter start with only the imports, and the planning alone in this process."""
    from deepencoder.image_processing_deepencoder import DeepEncoderImageProcessor
    from deepencoder.pipeline.auto_mode import plan_pages

    inputs = [str(folder / "text-pdf" / f"{label['name']}.pdf") for label in labels[:100]]
    listing = folder / "plan-100.txt"
    listing.write_text("\n".join(inputs) + "\n")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "deepencoder", "plan", str(listing), "--json"], env=env,
                         capture_output=True, text=True, check=True)  # fmt: skip
    seconds = time.perf_counter() - start
    pages = len(json.loads(out.stdout)["pages"])
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import deepencoder.cli, deepencoder.pipeline.plan"], env=env, check=True)
    imports = time.perf_counter() - start
    start = time.perf_counter()
    plan_pages([str(listing)], DeepEncoderImageProcessor(mode="auto"))
    work = time.perf_counter() - start
    return {"pages": pages, "seconds": round(seconds, 2), "import_seconds": round(imports, 2),
            "planning_seconds_in_process": round(work, 2), "load_average": [round(v, 2) for v in os.getloadavg()]}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="folder for the generated pages (default: a temporary folder)")
    parser.add_argument("--pages", type=int, default=240, help="evaluation pages (plus a blank and a near-blank)")
    parser.add_argument("--calibration-pages", type=int, default=120, help="calibration pages (separate seed)")
    parser.add_argument("--seed", type=int, default=21, help="evaluation seed; calibration uses seed + 1000")
    parser.add_argument("--tokenizer", help="local transformers tokenizer directory: true tokens counted with it")
    parser.add_argument("--max-compression", type=float, default=10.0)
    parser.add_argument("--plan-timing", action="store_true", help="time `deepencoder plan` on 100 PDF pages")
    parser.add_argument("--results", default=str(RESULTS / "auto-mode.json"))
    args = parser.parse_args(argv)
    tokenizer = None
    if args.tokenizer:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer, local_files_only=True)
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(args.out or scratch)
        start = time.perf_counter()
        calibration_labels = write_set(make_pages(args.calibration_pages, args.seed + 1000), root / "calibration",
                                       args.seed + 1000)  # fmt: skip
        labels = write_set(make_pages(args.pages, args.seed), root / "evaluation", args.seed)
        generated = time.perf_counter() - start
        calibration, fit_stats = fit(root / "calibration", calibration_labels)
        print(f"fitted: {calibration}", file=sys.stderr)
        report = evaluate(root / "evaluation", labels, calibration, tokenizer, args.tokenizer, args.max_compression)
        report["calibration"] = {**calibration.__dict__, **fit_stats}
        report["committed_calibration"] = PIXEL_CALIBRATION.__dict__
        report["set"] = {"evaluation_pages": len(labels), "calibration_pages": len(calibration_labels),
                         "kinds": {k: sum(label["kind"] == k for label in labels) for k in (*MAKERS, "blank")},
                         "formats": ["png", "image-pdf", "text-pdf"], "generation_seconds": round(generated, 1),
                         "truth": "tokenizer" if tokenizer is not None else "rule"}  # fmt: skip
        if args.plan_timing:
            report["plan_timing"] = plan_timing(root / "evaluation", labels)
        report["machine"] = {"platform": platform.platform(), "cpus": os.cpu_count(),
                             "load_average": [round(v, 2) for v in os.getloadavg()]}  # fmt: skip
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(args.results).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
