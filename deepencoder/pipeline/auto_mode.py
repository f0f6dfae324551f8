"""`--mode auto` in the pipeline: per page, the text-token estimate (PDF text layer, `--tokenizer`, or pixels),
the mode chosen by `DeepEncoderImageProcessor.choose_mode`, and the page read at that mode's size, exactly as a run
in that mode would read it. Also the run's summary by mode and `plan_pages` (what `deepencoder plan` prints).

A PDF page with a text layer is decided from its text before anything is rendered and rendered once, at the
chosen mode's size; a PDF page without one (a scan) is rendered at the estimate's working size first (re-rendered
only if the chosen mode's size differs); an image is decoded once."""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from PIL import Image

from ..image_processing_auto_mode import (
    PIXEL_CALIBRATION,
    ModeChoice,
    PixelCalibration,
    TextEstimate,
    choose_mode,
    count_text_tokens,
    estimate_pixel_text_tokens,
    normalize_text,
)
from ..image_processing_deepencoder import AUTO, DeepEncoderImageProcessor
from .sources import (
    PDFIUM_LOCK,
    Document,
    OpenPdfs,
    PageError,
    RenderOptions,
    check_size,
    decode_image_page,
    default_long_side,
    render_pdf_page,
)

# what a page's manifest row (and `plan --json` page) says about the choice (`ModeChoice.row_fields`)
ROW_FIELDS = ("mode", "text_tokens_estimate", "estimate_source", "vision_tokens", "compression", "fits",
              "vision_tokens_by_mode")  # fmt: skip


@functools.lru_cache(maxsize=4)
def load_tokenizer(directory: str | os.PathLike) -> Any:
    """A local transformers tokenizer directory, loaded offline (no hub access)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(os.fspath(directory), local_files_only=True)
    except (OSError, ValueError) as error:
        raise ValueError(f"--tokenizer {directory}: cannot load a tokenizer there ({error})") from error


def concrete_mode(processor: DeepEncoderImageProcessor) -> str:
    """A mode that names the tower: the processor's, or for `auto` its largest allowed mode (what `load_model`
    uses to pick v1 or V2 when the weights do not say)."""
    return processor.auto_modes[-1] if processor.mode == AUTO else processor.mode


@dataclass
class AutoPage:
    """A page read for `--mode auto`: its pixels at the chosen mode's size, that mode's processor, the choice."""

    image: Image.Image
    processor: DeepEncoderImageProcessor
    choice: ModeChoice


class AutoModeReader(OpenPdfs):
    """Reads pages for `--mode auto` (thread-safe: pdfium calls hold `PDFIUM_LOCK`). PDFs stay open between pages
    of a document until `release` / `close`.

    processor: a `mode="auto"` processor; render: the run's render options (`dpi` None: each mode's own size);
    tokenizer: a tokenizer object or a local directory, counting text-layer pages exactly."""

    def __init__(
        self,
        processor: DeepEncoderImageProcessor,
        render: RenderOptions,
        tokenizer: Any = None,
        calibration: PixelCalibration = PIXEL_CALIBRATION,
    ) -> None:
        if processor.mode != AUTO:
            raise ValueError(f"AutoModeReader needs a mode='auto' processor, got mode={processor.mode!r}")
        super().__init__()
        self.processor = processor
        self.processors = processor.mode_processors()
        self.render = render
        self.tokenizer = load_tokenizer(tokenizer) if isinstance(tokenizer, (str, os.PathLike)) else tokenizer
        self.calibration = calibration

    def render_options(self, mode: str) -> RenderOptions:
        return replace(self.render, target_long_side=default_long_side(self.processors[mode].resolution))

    # ------------------------------------------------------------------ estimate and choice
    def _vision_tokens(self, sizes: dict[str, tuple[int, int]]) -> dict[str, int]:
        return {name: p.num_image_tokens(*sizes[name]) for name, p in self.processors.items()}

    def _decide(self, estimate: TextEstimate, sizes: dict[str, tuple[int, int]]) -> ModeChoice:
        margin = self.calibration.decision_margin if estimate.source == "pixels" else 1.0
        return choose_mode(estimate, self._vision_tokens(sizes), self.processor.max_compression, margin)

    def _pixel_estimate(self, image: Image.Image) -> TextEstimate:
        return TextEstimate(estimate_pixel_text_tokens(image, self.calibration), "pixels")

    def _pdf_sizes(self, width_pt: float, height_pt: float) -> dict[str, tuple[int, int]]:
        """Each mode's rendered page size in pixels (pypdfium2 rounds up)."""
        sizes = {}
        for name in self.processors:
            options = self.render_options(name)
            scale = options.dpi / 72.0 if options.dpi else options.target_long_side / max(width_pt, height_pt)
            sizes[name] = (max(1, math.ceil(width_pt * scale)), max(1, math.ceil(height_pt * scale)))
        return sizes

    def choose(self, document: Document, index: int, read: bool = True) -> tuple[ModeChoice, Image.Image | None]:
        """The choice for a page and, with `read`, the page's pixels at the chosen mode's size (None otherwise:
        `deepencoder plan` renders only pages it must estimate from pixels)."""
        if document.kind != "pdf":
            image = decode_image_page(document.source, index, self.render)
            check_size(image.width, image.height, self.render)
            sizes = {name: image.size for name in self.processors}
            return self._decide(self._pixel_estimate(image), sizes), image
        import pypdfium2 as pdfium

        with PDFIUM_LOCK:
            pdf = self._pdf(document.source)
            try:
                page = pdf[index]
                try:
                    width_pt, height_pt = page.get_size()
                    textpage = page.get_textpage()
                    try:
                        text = textpage.get_text_range() if textpage.count_chars() > 0 else ""
                    finally:
                        textpage.close()
                finally:
                    page.close()
            except pdfium.PdfiumError as error:
                raise PageError(f"cannot read PDF page ({error})") from error
            if width_pt <= 0 or height_pt <= 0:
                raise PageError(f"PDF page has no area ({width_pt}x{height_pt} pt)")
            sizes = self._pdf_sizes(width_pt, height_pt)
            work, image = None, None
            if not normalize_text(text):  # no text layer: the pixels decide (rendered once at the working size)
                work = replace(self.render, dpi=None, target_long_side=self.calibration.work_long_side)
                image = render_pdf_page(pdf, index, work)
        if image is None:
            choice = self._decide(TextEstimate(*count_text_tokens(text, self.tokenizer)), sizes)
        else:
            choice = self._decide(self._pixel_estimate(image), sizes)
        if not read:
            return choice, None
        options = self.render_options(choice.mode)
        if work is not None and not options.dpi and work.target_long_side == options.target_long_side:
            return choice, image
        with PDFIUM_LOCK:
            return choice, render_pdf_page(self._pdf(document.source), index, options)

    def read(self, document: Document, index: int) -> AutoPage:
        choice, image = self.choose(document, index)
        check_size(image.width, image.height, self.render)
        processor = self.processors[choice.mode]
        tokens = processor.num_image_tokens(image.width, image.height)  # the rendered size decides the plan
        if tokens != choice.vision_tokens:
            choice = replace(choice, vision_tokens=tokens, compression=choice.text_tokens / tokens)
        return AutoPage(image, processor, choice)


# ---------------------------------------------------------------------------------------------- summary
@dataclass
class AutoModeSummary:
    """Token totals of an auto run: per chosen mode (pages, vision tokens) and the same pages in each single
    allowed mode; pages whose target no mode reached."""

    by_mode: dict[str, list[int]] = field(default_factory=dict)  # mode -> [pages, vision tokens]
    fixed: dict[str, int] = field(default_factory=dict)  # mode -> vision tokens had every page used it
    over_target: int = 0
    text_tokens: int = 0

    def add(self, row: dict[str, Any]) -> None:
        """Count a page from its row (`ModeChoice.row_fields`, as in the manifest)."""
        pages_tokens = self.by_mode.setdefault(row["mode"], [0, 0])
        pages_tokens[0] += 1
        pages_tokens[1] += row["vision_tokens"]
        for name, tokens in row["vision_tokens_by_mode"].items():
            self.fixed[name] = self.fixed.get(name, 0) + tokens
        self.over_target += not row["fits"]
        self.text_tokens += row["text_tokens_estimate"]

    def merge(self, other: AutoModeSummary) -> None:
        for name, (pages, tokens) in other.by_mode.items():
            mine = self.by_mode.setdefault(name, [0, 0])
            mine[0] += pages
            mine[1] += tokens
        for name, tokens in other.fixed.items():
            self.fixed[name] = self.fixed.get(name, 0) + tokens
        self.over_target += other.over_target
        self.text_tokens += other.text_tokens

    @property
    def total(self) -> int:
        return sum(tokens for _, tokens in self.by_mode.values())

    def as_dict(self) -> dict[str, Any]:
        return {
            "pages": sum(pages for pages, _ in self.by_mode.values()),
            "vision_tokens": self.total,
            "text_tokens_estimate": self.text_tokens,
            "by_mode": {name: {"pages": p, "vision_tokens": t} for name, (p, t) in self.by_mode.items()},
            "fixed_mode_vision_tokens": dict(self.fixed),
            "over_target": self.over_target,
        }

    def lines(self) -> list[str]:
        """The summary as text: per mode, then the total against each single mode."""
        if not self.by_mode:
            return []
        total = self.total
        parts = ", ".join(f"{name} {p} pages / {t} tokens" for name, (p, t) in self.by_mode.items())
        lines = [f"auto mode: {parts}; {total} vision tokens for {self.text_tokens} estimated text tokens"]
        against = ", ".join(
            f"{name} {tokens} ({100 * total / tokens:.0f}%)" for name, tokens in self.fixed.items() if tokens
        )
        lines.append(f"  the same pages in one mode: {against}")
        if self.over_target:
            lines.append(f"  {self.over_target} pages exceed the target in every allowed mode (the largest was used)")
        return lines


# ---------------------------------------------------------------------------------------------- plan
def plan_pages(
    inputs: Sequence[str | os.PathLike],
    processor: DeepEncoderImageProcessor,
    render: RenderOptions | None = None,
    pages: str | None = None,
    tokenizer: Any = None,
    calibration: PixelCalibration = PIXEL_CALIBRATION,
) -> dict[str, Any]:
    """`deepencoder plan`: the auto decision for every page of `inputs`, no model. Returns
    `{"pages": [{"source", "page", <ROW_FIELDS>} or {"source", "page", "error"}], "summary": {...}}`."""
    from .sources import count_pages, discover, parse_page_ranges, select_pages

    reader = AutoModeReader(processor, render or RenderOptions(), tokenizer, calibration)
    ranges = parse_page_ranges(pages)
    summary = AutoModeSummary()
    rows: list[dict[str, Any]] = []
    errors = 0
    try:
        for document in discover(inputs):
            try:
                indices = select_pages(count_pages(document), ranges, document.kind)
            except PageError as error:
                rows.append({"source": document.source, "page": None, "error": str(error)})
                errors += 1
                continue
            for index in indices:
                try:
                    choice, _ = reader.choose(document, index, read=False)
                except PageError as error:
                    rows.append({"source": document.source, "page": index, "error": str(error)})
                    errors += 1
                    continue
                rows.append({"source": document.source, "page": index, **choice.row_fields()})
                summary.add(rows[-1])
            reader.release(document)
    finally:
        reader.close()
    return {
        "pages": rows,
        "summary": {
            **summary.as_dict(),
            "errors": errors,
            "max_compression": processor.max_compression,
            "modes": list(processor.auto_modes or ()),
        },
    }
