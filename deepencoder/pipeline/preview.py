"""`--preview`: a PNG per page showing what the tower sees. Left: the page with its tile grid (red) and the tokens
per tile; right: the global view as the processor builds it (padding included) with its token grid (blue). The token
budget is written in the top-left corner."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from ..image_processing_deepencoder import DeepEncoderImageProcessor, PagePlan

PANEL = 640  # long side of each panel in the preview, px


def _fit(image: Image.Image, side: int) -> Image.Image:
    scale = side / max(image.size)
    return image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))))


def budget_text(plan: PagePlan, processor: DeepEncoderImageProcessor) -> str:
    """The page's token budget: total, the global view's share and the tiles' share. v1 modes count token rows with
    their newlines; V2 modes (`layout == "queries"`) count one query per 64 px cell of each view and no newlines."""
    w, h = plan.global_size
    ds = processor.downsample
    queries = processor.resolution.layout == "queries"
    global_tokens = (h // ds) * (w // ds) if queries else (h // ds) * (w // ds + 1) + 1
    kind = "queries" if queries else "tokens"
    text = f"{processor.mode}: {plan.num_tokens} tokens | global {w}x{h} = {global_tokens} {kind}"
    if plan.num_tiles:
        cols, rows = plan.tile_grid
        tiles = plan.num_tokens - global_tokens - (1 if queries else 0)
        text += f" | tiles {cols}x{rows} of {plan.tile_size}px = {tiles} {kind}"
    return text + (" | + 1 separator" if queries else "")


def render_preview(image: Image.Image, plan: PagePlan, processor: DeepEncoderImageProcessor) -> Image.Image:
    page = _fit(image, PANEL).convert("RGB")
    draw = ImageDraw.Draw(page)
    if plan.num_tiles:
        cols, rows = plan.tile_grid
        for c in range(1, cols):
            x = round(c * page.width / cols)
            draw.line([(x, 0), (x, page.height)], fill=(220, 0, 0), width=3)
        for r in range(1, rows):
            y = round(r * page.height / rows)
            draw.line([(0, y), (page.width, y)], fill=(220, 0, 0), width=3)
    draw.rectangle([0, 0, page.width - 1, page.height - 1], outline=(220, 0, 0), width=3)

    view = processor.global_view(image, plan)
    scale = PANEL / max(view.size)
    shown = view.resize((round(view.width * scale), round(view.height * scale))).convert("RGB")
    draw_view = ImageDraw.Draw(shown)
    step = processor.downsample * scale
    for i in range(1, round(view.width / processor.downsample)):
        draw_view.line([(round(i * step), 0), (round(i * step), shown.height)], fill=(60, 90, 230), width=1)
    for j in range(1, round(view.height / processor.downsample)):
        draw_view.line([(0, round(j * step)), (shown.width, round(j * step))], fill=(60, 90, 230), width=1)
    draw_view.rectangle([0, 0, shown.width - 1, shown.height - 1], outline=(60, 90, 230), width=3)

    gap, banner = 16, 28
    canvas = Image.new(
        "RGB", (page.width + shown.width + 3 * gap, max(page.height, shown.height) + banner + gap), "white"
    )
    canvas.paste(page, (gap, banner))
    canvas.paste(shown, (page.width + 2 * gap, banner))
    text = budget_text(plan, processor)
    draw_canvas = ImageDraw.Draw(canvas)
    try:
        font = ImageFont.load_default(size=16)
    except (TypeError, OSError, ImportError):  # Pillow without FreeType: the fixed bitmap font
        font = ImageFont.load_default()
    box = draw_canvas.textbbox((6, 4), text, font=font)
    draw_canvas.rectangle([box[0] - 4, box[1] - 3, box[2] + 4, box[3] + 3], fill=(255, 255, 200), outline="black")
    draw_canvas.text((6, 4), text, fill="black", font=font)
    return canvas


def write_preview(path: Path, image: Image.Image, plan: PagePlan, processor: DeepEncoderImageProcessor) -> None:
    from .writer import TMP_MARK

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + TMP_MARK + "preview")
    render_preview(image, plan, processor).save(tmp, format="PNG")
    tmp.replace(path)
