"""Page sources: which documents an `encode` run covers, how many pages each has, and each page as an RGB image.

A *document* is one input file, a local path or any fsspec URL (`s3://bucket/scans/`, `file:///data/a.pdf`): a PDF (pages rendered with pypdfium2), a multi-page TIFF (one page per frame) or a
single image (PNG, JPEG, WebP, BMP, GIF's first frame, ...). Pages are addressed by their 0-based index in the
document, the same index as the output key `page.<index>`. Everything here raises `PageError` with a sentence a
user can act on; nothing here stops a run.
"""

from __future__ import annotations

import ctypes
import glob
import hashlib
import os
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import fsspec
import numpy as np
from fsspec.implementations.local import LocalFileSystem
from PIL import Image, ImageOps

from ..image_processing_deepencoder import RESOLUTION_MODES, PadSpot, ResolutionMode, to_rgb

PDF_SUFFIXES = (".pdf",)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".webp", ".bmp", ".gif")
LIST_SUFFIXES = (".txt", ".lst")
GLOB_CHARS = "*?["

# pdfium is not thread-safe: every call into it goes through this lock (rendering overlaps with decoding of other
# formats and with the model, not with itself).
PDFIUM_LOCK = threading.Lock()


# Pillow refuses images above 2 * `PIL.Image.MAX_IMAGE_PIXELS` when it opens them, before `check_size` sees them;
# the CLI's --max-image-pixels sets that process-wide limit too (API users raise it themselves).
BOMB_HINT = (
    "{error} (a decompression-bomb guard; raise it with --max-image-pixels, or PIL.Image.MAX_IMAGE_PIXELS, "
    "if the file is trusted)"
)


class PageError(Exception):
    """A document or page that cannot be encoded; the message says why (and, where it helps, what to do)."""


@dataclass(frozen=True)
class Document:
    """source: the path as found (relative paths stay relative); name: output file stem inside the output folder,
    unique within a run (`<relative path>` of the source, e.g. `scans/a.pdf`); kind: `pdf` | `image`;
    source_bytes: the file's size once a run has looked at it (rows carry it: a rerun tells a changed or different
    file under the same name from the one whose pages the folder holds)."""

    source: str
    name: str
    kind: str
    source_bytes: int | None = None

    @property
    def output(self) -> str:
        """Path of the document's safetensors file relative to the output folder."""
        return f"{self.name}.safetensors"


@dataclass(frozen=True)
class RenderOptions:
    """How pages become pixels.

    dpi: PDF rendering resolution; None picks it per page so the page's long side becomes `target_long_side` px.
    target_long_side: see `default_long_side(mode)`.
    max_image_pixels: largest page (width * height) accepted, Pillow's `Image.MAX_IMAGE_PIXELS` by default (a
        decompression-bomb guard); 0 or None disables the check.
    max_aspect: largest long side / short side accepted (a 1 x 20000 strip carries nothing readable once fitted
        into a square view).
    min_side: smallest side in pixels accepted.
    """

    dpi: float | None = None
    target_long_side: int = 1600
    max_image_pixels: int | None = Image.MAX_IMAGE_PIXELS
    max_aspect: float = 20.0
    min_side: int = 8


def default_long_side(mode: str | ResolutionMode) -> int:
    """Long side (px) a PDF page is rendered to when no DPI is given: 2.5 tiles for the tiled modes (1600 px in
    `gundam`: 145 dpi for a US-letter page, about the 144 dpi DeepSeek-OCR's own PDF tooling renders at; tiles of a
    portrait page are then barely resampled), the global view's side otherwise. `mode`: a mode name or a processor's
    `resolution` (size overrides applied)."""
    resolution = RESOLUTION_MODES[mode] if isinstance(mode, str) else mode
    return round(resolution.tile_size * 2.5) if resolution.tile_size else resolution.base_size


# ---------------------------------------------------------------------------------------------- discovery
def _kind(path: Path) -> str:
    return "pdf" if path.suffix.lower() in PDF_SUFFIXES else "image"


def _is_url(value: str) -> bool:
    return "://" in value


def resolve_source(source: str) -> tuple[fsspec.AbstractFileSystem | None, str]:
    """(None, local path) for a local path or a `file://` URL; (filesystem, path inside it) for any other URL."""
    if not _is_url(source):
        return None, source
    fs, path = fsspec.core.url_to_fs(source)
    return (None, path) if isinstance(fs, LocalFileSystem) else (fs, path)


def _wanted_match(pattern: str, match: str, is_dir: bool) -> bool:
    """Whether a glob's match is an input: a folder, a PDF or an image, or a file of the suffix the pattern itself
    names (`lists/*.txt` asks for path lists; `scans/*` does not take a page's OCR `.txt` beside it for one)."""
    suffix = os.path.splitext(match)[1].lower()
    if is_dir or suffix in PDF_SUFFIXES + IMAGE_SUFFIXES:
        return True
    return bool(suffix) and pattern.lower().endswith(suffix)


def _list_entries(text: str) -> list[str]:
    """The paths of a list file: one a line, `#` comments and blank lines skipped, a byte-order mark ignored."""
    lines = (line.strip() for line in text.removeprefix("\ufeff").splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def _expand_url(arg: str, seen_lists: set[str]) -> list[tuple[str, str]]:
    fs, path = fsspec.core.url_to_fs(arg)
    path = path.rstrip("/")
    if fs.isdir(path):
        found = sorted(p for p in fs.find(path) if p.lower().endswith(PDF_SUFFIXES + IMAGE_SUFFIXES))
        base = arg.rstrip("/")  # sources keep the user's spelling of the folder URL
        return [(f"{base}/{p[len(path) + 1 :]}", p[len(path) + 1 :]) for p in found]
    if path.lower().endswith(LIST_SUFFIXES) and fs.isfile(path):
        if arg in seen_lists:
            return []
        seen_lists.add(arg)
        parent = fs.unstrip_protocol(path.rsplit("/", 1)[0]) if "/" in path else ""
        out = []
        for line in _list_entries(fs.cat_file(path).decode("utf-8")):
            entry = line if _is_url(line) or line.startswith("/") else f"{parent}/{line}"
            out.extend(_expand(entry, seen_lists))
        return out
    if any(c in path for c in GLOB_CHARS) and not fs.exists(path):
        matches = [m for m in sorted(fs.glob(path)) if _wanted_match(path, m, fs.isdir(m))]
        return [item for match in matches for item in _expand(fs.unstrip_protocol(match), seen_lists)]
    return [(arg, path.rsplit("/", 1)[-1])]


def _files_under(folder: Path) -> list[Path]:
    """The PDFs and images under `folder`, through symbolic links to folders too (each real folder walked once: a
    link back up is no loop), sorted by their path below `folder`."""
    found, seen = [], set()
    for top, dirs, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(top)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        dirs.sort()
        found.extend(Path(top) / name for name in files if Path(name).suffix.lower() in PDF_SUFFIXES + IMAGE_SUFFIXES)
    return sorted((p for p in found if p.is_file()), key=lambda p: p.relative_to(folder).parts)


def no_documents_warning(arg: str) -> None:
    """`discover`'s `on_empty` of the encode entry points: one line on stderr."""
    print(f"warning: {arg}: no PDF or image found there, nothing to encode from it", file=sys.stderr)


def _expand(arg: str, seen_lists: set[str]) -> list[tuple[str, str]]:
    """One command-line input -> [(source path or URL, name relative to the input)]."""
    if _is_url(arg):
        return _expand_url(arg, seen_lists)
    path = Path(arg)
    if path.is_dir():
        return [(str(p), p.relative_to(path).as_posix()) for p in _files_under(path)]
    if path.is_file() and path.suffix.lower() in LIST_SUFFIXES:
        if str(path.resolve()) in seen_lists:
            return []
        seen_lists.add(str(path.resolve()))
        out = []
        for line in _list_entries(path.read_text(encoding="utf-8")):
            entry = line if Path(line).is_absolute() else str(path.parent / line)
            out.extend(_expand(entry, seen_lists))
        return out
    if not path.exists() and any(c in arg for c in GLOB_CHARS):
        matches = [m for m in sorted(glob.glob(arg, recursive=True)) if _wanted_match(arg, m, os.path.isdir(m))]
        return [item for match in matches for item in _expand(match, seen_lists)]
    return [(arg, path.name)]  # a file (any suffix: it is tried), or a missing path that becomes an error row


def _identity(source: str) -> str:
    """One spelling per file: the absolute path of a local file, the normalised URL of a remote one."""
    fs, path = resolve_source(source)
    return str(Path(path).resolve()) if fs is None else fs.unstrip_protocol(path)


def discover(inputs: Sequence[str | os.PathLike], on_empty: Callable[[str], None] | None = None) -> list[Document]:
    """Files, folders (recursive, by suffix, through links to folders), globs (their matches: folders, PDFs and images,
    or files of the suffix the pattern names) and text files of paths (one a line, `#` comments) -> documents,
    sorted by output name. A source listed twice is kept once; two sources with the same relative name get a short
    hash of their absolute path appended, so every document has its own output file whatever the order of inputs.
    on_empty: told each input (a folder, a glob, a list) that gave no document (a typo in a pattern, an empty folder),
    which is otherwise silent."""
    seen_lists: set[str] = set()
    by_source: dict[str, str] = {}
    for arg in inputs:
        expanded = _expand(os.fspath(arg), seen_lists)
        if not expanded and on_empty is not None:
            on_empty(os.fspath(arg))
        for source, name in expanded:
            by_source.setdefault(_identity(source), source + "\0" + name)
    entries = sorted((value.split("\0") for value in by_source.values()), key=lambda e: (e[1], e[0]))
    counts: dict[str, int] = {}
    for _, name in entries:
        counts[name] = counts.get(name, 0) + 1
    documents = []
    for source, name in entries:
        if counts[name] > 1:
            digest = hashlib.sha1(_identity(source).encode()).hexdigest()[:8]
            name = f"{name}-{digest}"
        documents.append(Document(source=source, name=name, kind=_kind(Path(source))))
    return sorted(documents, key=lambda d: d.name)


def parse_page_ranges(spec: str | None) -> list[tuple[int, int | None]] | None:
    """`"0-2,5,9-,-1"` -> [(0, 2), (5, 5), (9, None), (0, 1)]: 0-based page indices, inclusive, open-ended with a
    trailing `-` (to the last page), from page 0 with a leading one. A range whose end comes before its start is
    refused (it would select nothing)."""
    if not spec:
        return None
    ranges: list[tuple[int, int | None]] = []
    for part in spec.split(","):
        part = part.strip()
        try:
            if "-" in part:
                start, end = part.split("-", 1)
                ranges.append((int(start or 0), int(end) if end.strip() else None))
            else:
                ranges.append((int(part), int(part)))
        except ValueError as error:
            raise ValueError(f"bad page range {part!r} in {spec!r}; use 0-based indices like 0-2,5,9-") from error
        first, last = ranges[-1]
        if first < 0 or (last is not None and last < first):
            raise ValueError(f"page range {part!r} in {spec!r} selects no page: its end comes before its start")
    return ranges


def select_pages(count: int, ranges: list[tuple[int, int | None]] | None, kind: str = "pdf") -> list[int]:
    """The 0-based pages of a document of `count` pages that `ranges` (`parse_page_ranges`) select. Ranges are for
    multi-page documents (PDFs, multi-frame images): a single image (`kind` "image", one frame) is its one page."""
    if ranges is None or (kind != "pdf" and count == 1):
        return list(range(count))
    pages = {i for start, end in ranges for i in range(start, min(count - 1, count if end is None else end) + 1)}
    return sorted(i for i in pages if 0 <= i < count)


# ---------------------------------------------------------------------------------------------- opening
def source_size(source: str) -> int:
    """The size in bytes of a document's file; PageError for a missing, irregular or empty one."""
    fs, path = resolve_source(source)
    if fs is not None:
        try:
            info = fs.info(path)
        except FileNotFoundError:
            raise PageError("no such file") from None
        if info.get("type") != "file":
            raise PageError("not a regular file")
        if not info.get("size"):
            raise PageError("empty file (0 bytes)")
        return int(info["size"])
    local = Path(path)
    if not local.exists():
        raise PageError("no such file")
    if not local.is_file():
        raise PageError("not a regular file")
    size = local.stat().st_size
    if size == 0:
        raise PageError("empty file (0 bytes)")
    return size


def _image_file(source: str):
    """What `Image.open` takes: the local path, or a seekable fsspec file for a URL."""
    fs, path = resolve_source(source)
    return path if fs is None else fs.open(path, "rb")


def _misnamed(source: str, kind: str) -> str:
    """For a file that failed to open as its suffix says: what it holds instead, when that is clear (a PDF saved as
    `.jpg`, an image saved as `.pdf`), as a sentence to append; "" otherwise. Read only on failure: one small read."""
    fs, path = resolve_source(source)
    try:
        if fs is None:
            with open(path, "rb") as handle:
                head = handle.read(8)
        else:
            head = fs.cat_file(path, start=0, end=8)
        if kind != "pdf" and head.startswith(b"%PDF-"):
            return "; the file is a PDF: give it the .pdf suffix"
        if kind == "pdf" and not head.startswith(b"%PDF-"):
            with Image.open(_image_file(source)) as image:
                return f"; the file is a {image.format} image: give it its image suffix"
    except Exception:  # noqa: BLE001 - only a hint: the error itself stands
        pass
    return ""


def _open_pdf(source: str):
    import pypdfium2 as pdfium

    fs, path = resolve_source(source)
    try:
        return pdfium.PdfDocument(path if fs is None else fs.cat_file(path))
    except pdfium.PdfiumError as error:
        text = str(error)
        if "password" in text.lower():
            raise PageError("encrypted PDF (password required); decrypt it first, e.g. `qpdf --decrypt`") from error
        raise PageError(f"cannot open PDF ({text}){_misnamed(source, 'pdf')}") from error


def count_pages(document: Document, checked: bool = False) -> int:
    """Number of pages, opening only what is needed (PDF trailer, TIFF frames). Raises PageError. checked: the
    file's `source_size` was just taken (no second look)."""
    if not checked:
        source_size(document.source)
    if document.kind == "pdf":
        with PDFIUM_LOCK:
            pdf = _open_pdf(document.source)
            try:
                count = len(pdf)
            finally:
                pdf.close()
        if count == 0:
            raise PageError("PDF has no pages")
        return count
    try:
        with Image.open(_image_file(document.source)) as image:
            return int(getattr(image, "n_frames", 1)) if image.format == "TIFF" else 1
    except Image.DecompressionBombError as error:
        raise PageError(BOMB_HINT.format(error=error)) from error
    except (OSError, SyntaxError, ValueError) as error:
        hint = _misnamed(document.source, document.kind)
        raise PageError(f"cannot read image ({type(error).__name__}: {error}){hint}") from error


def check_size(width: int, height: int, options: RenderOptions) -> None:
    """Raise PageError for pages the run refuses: decompression bombs, degenerate strips, specks."""
    limit = options.max_image_pixels
    if limit and width * height > limit:
        raise PageError(
            f"page is {width}x{height} = {width * height} pixels, above the limit of {limit} "
            "(a decompression-bomb guard; raise it with --max-image-pixels if the file is trusted)"
        )
    aspect = max(width, height) / max(1, min(width, height))
    if aspect > options.max_aspect:
        raise PageError(
            f"page is {width}x{height} pixels: aspect ratio {aspect:.0f}:1 exceeds {options.max_aspect:g}:1 "
            "(nothing readable survives fitting it into a view; raise --max-aspect to encode it anyway)"
        )
    if min(width, height) < options.min_side:
        raise PageError(f"page is {width}x{height} pixels: a side is under {options.min_side} px")


class PaddedView(NamedTuple):
    """A page rendered straight into its padded global view (`render_pdf_page(..., place=)`): the view's pixels
    (H, W, 3) uint8 and the page's own rendered (width, height)."""

    pixels: np.ndarray
    size: tuple[int, int]


def render_pdf_page(
    pdf, index: int, options: RenderOptions, place: Callable[[int, int], PadSpot | None] | None = None
) -> Image.Image | PaddedView:
    """One page of an open `pypdfium2.PdfDocument` -> RGB image. Call under `PDFIUM_LOCK`.

    `place(width, height)`: where a page of the size pdfium renders lands unresampled in its global view
    (`DeepEncoderImageProcessor.pad_spot`), or None. Where it lands, pdfium draws the page into the view itself
    (a bitmap over the view's memory, the view's stride), and a `PaddedView` is returned: the pixels `global_view`
    would make from the image, without the image (no copy out of pdfium's buffer, no padding copy)."""
    import pypdfium2 as pdfium

    view: list = []

    def bitmap_maker(width, height, format, rev_byteorder):
        spot = place(width, height) if place is not None else None
        if spot is None or format != pdfium.raw.FPDFBitmap_BGR or not rev_byteorder:  # RGB, 3 bytes a pixel only
            return pdfium.PdfBitmap.new_native(width, height, format, rev_byteorder)
        (view_w, view_h), (x, y) = spot.size, spot.offset
        stride = view_w * 3
        memory = np.empty(view_h * stride + stride, dtype=np.uint8)  # a row of slack: pdfium's buffer check
        pixels = memory[: view_h * stride].reshape(view_h, view_w, 3)
        color = np.asarray(spot.color, dtype=np.uint8)
        pixels[:y] = color  # the margins only: pdfium fills the page's own area (white) before drawing
        pixels[y + height :] = color
        pixels[y : y + height, :x] = color
        pixels[y : y + height, x + width :] = color
        start = (y * view_w + x) * 3
        buffer = (ctypes.c_ubyte * (memory.size - start)).from_buffer(memory, start)
        view.append(PaddedView(pixels, (width, height)))
        return pdfium.PdfBitmap.new_native(width, height, format, rev_byteorder, buffer=buffer, stride=stride)

    try:
        page = pdf[index]
        try:
            width_pt, height_pt = page.get_size()
            if width_pt <= 0 or height_pt <= 0:
                raise PageError(f"PDF page has no area ({width_pt}x{height_pt} pt)")
            if options.dpi:
                scale = options.dpi / 72.0
            else:
                scale = options.target_long_side / max(width_pt, height_pt)
            check_size(max(1, round(width_pt * scale)), max(1, round(height_pt * scale)), options)
            # pdfium writes RGB itself (rev_byteorder): one copy out of its buffer, no per-pixel BGR unpacking
            bitmap = page.render(scale=scale, rev_byteorder=True, bitmap_maker=bitmap_maker)
            try:
                if view:
                    return view[0]
                pixels = np.array(bitmap.to_numpy())
                image = (Image.fromarray(pixels, "RGB") if pixels.ndim == 3 and pixels.shape[2] == 3
                         else bitmap.to_pil().convert("RGB"))  # fmt: skip
            finally:
                bitmap.close()
        finally:
            page.close()
    except pdfium.PdfiumError as error:
        raise PageError(f"cannot render PDF page ({error})") from error
    return image


def decode_image_page(source: str, index: int, options: RenderOptions) -> Image.Image:
    """Frame `index` of an image file -> RGB with EXIF orientation applied. Convertible modes are converted: CMYK,
    palette, 16-bit and float grayscale (scaled to 8 bits), alpha (composited onto white); see `to_rgb`."""
    try:
        with Image.open(_image_file(source)) as image:
            check_size(image.width, image.height, options)  # header only: before any pixel is decoded
            if index:
                image.seek(index)
                check_size(image.width, image.height, options)
            image.load()
            image = ImageOps.exif_transpose(image)
            return to_rgb(image)
    except PageError:
        raise
    except Image.DecompressionBombError as error:
        raise PageError(BOMB_HINT.format(error=error)) from error
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        raise PageError(f"cannot decode image ({type(error).__name__}: {error})") from error


class OpenPdfs:
    """The pdfium documents a page reader keeps open between pages of the same document (one handle per document,
    closed by `release` or `close`). `_pdf` is called with `PDFIUM_LOCK` held."""

    def __init__(self) -> None:
        self._pdfs: dict[str, object] = {}

    def _pdf(self, source: str):
        pdf = self._pdfs.get(source)
        if pdf is None:
            pdf = self._pdfs[source] = _open_pdf(source)
        return pdf

    def release(self, document: Document) -> None:
        with PDFIUM_LOCK:
            pdf = self._pdfs.pop(document.source, None)
            if pdf is not None:
                pdf.close()

    def close(self) -> None:
        with PDFIUM_LOCK:
            for pdf in self._pdfs.values():
                pdf.close()
            self._pdfs.clear()


class PageReader(OpenPdfs):
    """Renders pages of documents from worker threads. PDFs stay open between pages of the same document (one
    pdfium handle per document, closed by `release`)."""

    def __init__(self, options: RenderOptions) -> None:
        super().__init__()
        self.options = options

    def read(
        self, document: Document, index: int, place: Callable[[int, int], PadSpot | None] | None = None
    ) -> Image.Image | PaddedView:
        """The page as an RGB image; a PDF page that lands unresampled in its global view (`place`, see
        `render_pdf_page`) as that view."""
        if document.kind != "pdf":
            image = decode_image_page(document.source, index, self.options)
        else:
            with PDFIUM_LOCK:
                image = render_pdf_page(self._pdf(document.source), index, self.options, place)
        check_size(*image.size, self.options)
        return image
