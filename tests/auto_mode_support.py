"""Pages with known text for the `mode="auto"` tests: Pillow rasters and PDFs with a real text layer."""

from __future__ import annotations

import random
import zlib
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont
from pipeline_support import build_pdf

DEJAVU = Path("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf")
WORDS = "the page model text vision token encoder mode table letter report section figure result data".split()


def font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(str(DEJAVU), size) if DEJAVU.exists() else ImageFont.load_default(size=size)


def lines_of_text(count: int, words: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(words)) for _ in range(count)]


def text_image(size: tuple[int, int], lines: list[str], font_px: int, margin: int = 30) -> Image.Image:
    """Black lines of text on white, `font_px` pixels high, 1.4 line spacing."""
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    face = font(font_px)
    for index, line in enumerate(lines):
        y = margin + index * round(font_px * 1.4)
        if y + font_px > size[1] - margin:
            break
        draw.text((margin, y), line, fill="black", font=face)
    return image


def text_pdf(path: Path, pages: list[list[str]], size_pt: float = 10, page_size=(612, 792)) -> Path:
    """A PDF whose pages carry `pages[i]` as a real text layer (Helvetica lines)."""
    width, height = page_size
    objects: list[bytes] = [b"<< /Type /Catalog /Pages 2 0 R >>", b""]
    kids = []
    font_number = 3
    objects.append(b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica /Encoding /WinAnsiEncoding >>")
    for lines in pages:
        ops = [
            b"BT /F1 %.1f Tf %.1f %.1f Td (%s) Tj ET" % (size_pt, 50, height - 60 - i * size_pt * 1.3, line.encode())
            for i, line in enumerate(lines)
        ]
        stream = zlib.compress(b"\n".join(ops))
        objects.append(b"<< /Length %d /Filter /FlateDecode >>\nstream\n" % len(stream) + stream + b"\nendstream")
        content = len(objects)
        objects.append(
            b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 %d %d] /Resources << /Font << /F1 %d 0 R >> >> "
            b"/Contents %d 0 R >>" % (width, height, font_number, content)
        )
        kids.append(len(objects))
    objects[1] = b"<< /Type /Pages /Kids [%s] /Count %d >>" % (b" ".join(b"%d 0 R" % k for k in kids), len(kids))
    path.write_bytes(build_pdf(objects))
    return path
