"""Write the sample documents of the quick start into examples/data/ (no downloads: Pillow draws them).

    .venv/bin/python examples/make_examples.py [--out examples/data]

- slides.pdf   two 16:9 slides (gundam renders them 1600x900: a 2x1 tile grid, 273 + 210 = 483 tokens each)
- letter.png   a 480x620 portrait note (no side above 640: global view only, 273 tokens)
- receipt.jpg  a 320x600 receipt (global view only, 273 tokens)

Small on purpose: with the real-size tower on a laptop CPU every global view costs tens of seconds. Each file gets a
`<stem>.txt` / `<stem>.page<i>.txt` transcription beside it (the text a training loader pairs with the tokens).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont


def font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def draw_lines(size: tuple[int, int], title: str, lines: list[str], title_size: int, body_size: int) -> Image.Image:
    page = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(page)
    margin = size[0] // 16
    draw.text((margin, margin), title, fill=(20, 20, 90), font=font(title_size))
    y = margin + int(title_size * 1.8)
    for line in lines:
        draw.text((margin, y), line, fill="black", font=font(body_size))
        y += int(body_size * 1.5)
    return page


SLIDES = [
    (
        "DeepEncoder: pages in, tokens out",
        [
            "SAM ViT-B reads the page at 16 px patches",
            "a 16x compressor hands 1024 channels to CLIP-L/14",
            "CLIP tokens + SAM tokens: 2048 -> 1280 projector",
            "one token per 64x64 pixels of each view",
        ],
    ),
    (
        "Gundam mode",
        [
            "global view: the page padded to 1024 x 1024 (273 tokens)",
            "local tiles: 640 x 640, 2 to 9 per page",
            "each tile adds 10 rows of 10 tokens + newlines",
            "all global views batch together, all tiles together",
        ],
    ),
]
LETTER = [
    "Dear reader,",
    "",
    "this note is small enough that",
    "gundam mode sends only its",
    "global view to the model.",
    "",
    "Tokens: 16 x 17 + 1 = 273.",
    "",
    "Regards,",
    "the example script",
]
RECEIPT = [
    "CORNER CAFE",
    "",
    "espresso      2.40",
    "croissant     1.90",
    "water         1.00",
    "",
    "TOTAL         5.30",
    "",
    "thank you!",
]


def make(out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = []
    slides = [draw_lines((1600, 900), title, body, 72, 44) for title, body in SLIDES]
    pdf = out / "slides.pdf"
    slides[0].save(pdf, save_all=True, append_images=slides[1:], resolution=150.0)  # 768 x 432 pt pages
    for index, (title, body) in enumerate(SLIDES):
        (out / f"slides.page{index}.txt").write_text("\n".join([title, *body]) + "\n", encoding="utf-8")
    written.append(pdf)

    letter = draw_lines((480, 620), "A short letter", LETTER, 30, 22)
    letter.save(out / "letter.png")
    (out / "letter.txt").write_text("\n".join(["A short letter", *LETTER]) + "\n", encoding="utf-8")
    written.append(out / "letter.png")

    receipt = draw_lines((320, 600), "Receipt #0042", RECEIPT, 26, 20)
    receipt.save(out / "receipt.jpg", quality=92)
    (out / "receipt.txt").write_text("\n".join(["Receipt #0042", *RECEIPT]) + "\n", encoding="utf-8")
    written.append(out / "receipt.jpg")
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).parent / "data"), help="folder to write into")
    args = parser.parse_args()
    for path in make(Path(args.out)):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
